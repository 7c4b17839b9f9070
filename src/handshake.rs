//! The client side of the connection handshake, as a pure state machine.
//!
//! The proxy terminates the client's handshake itself: it answers OPTIONS, refuses versions it
//! does not speak (keeping the socket open so drivers downgrade), and either trusts the client or
//! checks PLAIN credentials. It never does I/O: the session acts on the steps it returns.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

use crate::auth::certificate;
use crate::auth::client::{bad_credentials_message, ClientAuth, Logins};
use crate::frame::compression::decompressed;

use crate::frame::messages::{self, error_code};
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Compression, ErrorReply, Frame};

/// The largest AUTH_RESPONSE body, decompressed, worth reading: a username and a password or
/// a kmsauth token are far smaller, and a decompression bomb stops here.
const MAX_CREDENTIALS_BODY: usize = 64 << 10;

/// The largest frame a client may send before it has authenticated: a STARTUP, OPTIONS or
/// AUTH_RESPONSE is far smaller, and an unauthenticated client must not make the proxy buffer
/// `--max-frame-len` (256 MiB) for it.
pub const MAX_HANDSHAKE_FRAME: usize = 64 << 10;

/// kmsauth tokens are a few hundred bytes (KMS ciphertext of a small JSON document, base64); a
/// longer one is refused before it costs a KMS call.
const MAX_TOKEN: usize = 8 << 10;

/// Passwords longer than this are refused before any hashing.
const MAX_PASSWORD: usize = 1 << 10;

/// What the session must do with a frame received during the handshake.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this frame and keep reading.
    Reply(Frame),
    /// Send this frame, then close the connection.
    Close(Frame),
    /// The client is accepted: open the upstream, then answer with `success` (READY or
    /// AUTH_SUCCESS) or, if the upstream fails, with an error on the same stream.
    Connect(Accepted),
    /// Check these credentials (locally, from a session, or with KMS), then call
    /// `ClientHandshake::verified` with the outcome.
    Verify(Credentials),
}

/// PLAIN credentials awaiting a check. The secret is wiped when dropped and never printed.
#[derive(PartialEq, Eq)]
pub struct Credentials {
    pub version: ProtocolVersion,
    pub compression: Compression,
    pub stream: i16,
    pub user: String,
    pub secret: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Accepted {
    pub version: ProtocolVersion,
    pub compression: Compression,
    pub success: Frame,
    /// The authenticated local user, if any (for logs; never the password).
    pub user: Option<String>,
}

#[derive(Debug)]
enum State {
    AwaitStartup,
    AwaitCredentials {
        version: ProtocolVersion,
        compression: Compression,
    },
}

#[derive(Debug)]
pub struct ClientHandshake {
    /// One snapshot for the whole handshake: what it offers and how it checks agree even when
    /// a SIGHUP swaps the settings halfway.
    logins: Arc<Logins>,
    /// The client's verified TLS certificate, if it presented one.
    certificate: Option<CertificateDer<'static>>,
    state: State,
}

/// The SUPPORTED answer the proxy gives locally: the versions and algorithms it handles itself.
pub fn supported(version: ProtocolVersion, stream: i16) -> Frame {
    messages::supported(
        version,
        stream,
        &[
            ("CQL_VERSION", &["3.4.4"]),
            ("COMPRESSION", &["lz4", "snappy"]),
            ("PROTOCOL_VERSIONS", &["3/v3", "4/v4"]),
        ],
    )
}

fn protocol_error(version: ProtocolVersion, stream: i16, message: &str) -> Frame {
    ErrorReply::protocol(message.to_owned()).frame(version, stream)
}

impl ClientHandshake {
    pub fn new(logins: Arc<Logins>) -> Self {
        ClientHandshake {
            logins,
            certificate: None,
            state: State::AwaitStartup,
        }
    }

    /// The certificate the client presented in its (already verified) TLS handshake.
    pub fn with_certificate(mut self, certificate: Option<CertificateDer<'static>>) -> Self {
        self.certificate = certificate;
        self
    }

    /// The settings this handshake checks credentials with.
    pub fn logins(&self) -> &Arc<Logins> {
        &self.logins
    }

    /// Moves this handshake to reloaded settings, if they check the credentials it asked for
    /// (PasswordAuthenticator, whether against users or kmsauth); false if they would not
    /// have asked for them (no authentication, or client certificates).
    pub fn adopt(&mut self, logins: &Arc<Logins>) -> bool {
        if Arc::ptr_eq(&self.logins, logins) {
            return true;
        }
        let asks = |a: &ClientAuth| matches!(a, ClientAuth::Password(_) | ClientAuth::KmsAuth(_));
        if asks(&self.logins.auth) && asks(&logins.auth) {
            self.logins = logins.clone();
            true
        } else {
            false
        }
    }

    pub fn on_frame(&mut self, frame: &Frame) -> Step {
        let h = &frame.header;
        let Some(version) = h.version() else {
            // Answered in the newest version spoken: drivers parse that and downgrade.
            return Step::Reply(protocol_error(
                ProtocolVersion::NEWEST,
                h.stream,
                &messages::unsupported_version_message(h.protocol_version()),
            ));
        };
        if h.is_response() {
            return Step::Close(protocol_error(
                version,
                h.stream,
                "Unexpected response frame from a client",
            ));
        }
        if h.stream < 0 {
            // Negative ids are the server's, for events: no request is answered there.
            return Step::Reply(protocol_error(
                version,
                h.stream,
                &format!(
                    "Invalid stream id {}: negative ids are reserved for server events",
                    h.stream
                ),
            ));
        }
        match (&self.state, h.opcode) {
            (_, opcode::OPTIONS) => Step::Reply(supported(version, h.stream)),
            (State::AwaitStartup, opcode::STARTUP) => self.on_startup(frame, version),
            (
                State::AwaitCredentials {
                    version: v,
                    compression,
                },
                opcode::AUTH_RESPONSE,
            ) => {
                let (v, compression) = (*v, *compression);
                if version != v {
                    // Cassandra's words: a connection speaks the version its STARTUP chose.
                    return Step::Close(protocol_error(
                        v,
                        h.stream,
                        &format!(
                            "Invalid message version. Got {version} but previous messages on \
                             this connection had version {v}"
                        ),
                    ));
                }
                self.on_credentials(frame, v, compression)
            }
            (State::AwaitStartup, op) => Step::Reply(protocol_error(
                version,
                h.stream,
                &format!(
                    "Unexpected message {}, expecting STARTUP or OPTIONS",
                    opcode::name(op)
                ),
            )),
            (State::AwaitCredentials { .. }, op) => Step::Reply(protocol_error(
                version,
                h.stream,
                &format!(
                    "Unexpected message {}, expecting AUTH_RESPONSE",
                    opcode::name(op)
                ),
            )),
        }
    }

    fn on_startup(&mut self, frame: &Frame, version: ProtocolVersion) -> Step {
        let stream = frame.stream();
        let options = match messages::parse_startup(&frame.body) {
            Ok(o) => o,
            Err(e) => {
                return Step::Close(protocol_error(
                    version,
                    stream,
                    &format!("Invalid STARTUP message: {e}"),
                ))
            }
        };
        if !options.contains_key("CQL_VERSION") {
            return Step::Reply(protocol_error(
                version,
                stream,
                "CQL_VERSION is a mandatory STARTUP option",
            ));
        }
        let compression = match Compression::from_option(options.get("COMPRESSION").copied()) {
            Ok(c) => c,
            Err(e) => return Step::Reply(protocol_error(version, stream, &e.to_string())),
        };
        match &self.logins.auth {
            ClientAuth::None => Step::Connect(Accepted {
                version,
                compression,
                success: messages::ready(version, stream),
                user: None,
            }),
            ClientAuth::Certificate(fields) => {
                let identity = match &self.certificate {
                    None => Err("a client certificate is required".to_owned()),
                    Some(der) => certificate::identity(der, fields).map_err(|e| e.to_string()),
                };
                match identity {
                    Ok(identity) => Step::Connect(Accepted {
                        version,
                        compression,
                        success: messages::ready(version, stream),
                        user: Some(identity),
                    }),
                    Err(why) => Step::Close(
                        ErrorReply::proxy(error_code::BAD_CREDENTIALS, &why).frame(version, stream),
                    ),
                }
            }
            ClientAuth::Password(_) | ClientAuth::KmsAuth(_) => {
                self.state = State::AwaitCredentials {
                    version,
                    compression,
                };
                Step::Reply(messages::authenticate(
                    version,
                    stream,
                    messages::PASSWORD_AUTHENTICATOR,
                ))
            }
        }
    }

    fn on_credentials(
        &mut self,
        frame: &Frame,
        version: ProtocolVersion,
        compression: Compression,
    ) -> Step {
        let stream = frame.stream();
        if matches!(
            &self.logins.auth,
            ClientAuth::None | ClientAuth::Certificate(_)
        ) {
            return Step::Close(protocol_error(version, stream, "Unexpected AUTH_RESPONSE"));
        }
        // Drivers compress everything after STARTUP once it negotiated an algorithm (the Python
        // driver with lz4 installed, Java 3): read the credentials through it.
        let plain = match decompressed(frame.clone(), compression, MAX_CREDENTIALS_BODY) {
            Ok(f) => f,
            Err(e) => {
                return Step::Close(protocol_error(
                    version,
                    stream,
                    &format!("Invalid compressed frame: {e}"),
                ))
            }
        };
        let token = messages::message_body(&plain.header, &plain.body)
            .and_then(messages::parse_auth_token)
            .unwrap_or_default();
        let Ok((user, password)) = messages::parse_plain_token(token) else {
            return Step::Close(
                ErrorReply::bad_credentials("Authentication failure: malformed PLAIN credentials")
                    .frame(version, stream),
            );
        };
        let (limit, what) = match &self.logins.auth {
            ClientAuth::KmsAuth(_) => (MAX_TOKEN, "token"),
            _ => (MAX_PASSWORD, "password"),
        };
        if password.len() > limit {
            return Step::Close(
                ErrorReply::bad_credentials(format!(
                    "Authentication failure: the {what} is longer than {limit} bytes"
                ))
                .frame(version, stream),
            );
        }
        Step::Verify(Credentials {
            version,
            compression,
            stream,
            user: user.to_owned(),
            secret: zeroize::Zeroizing::new(password.to_vec()),
        })
    }

    /// `creds` refused without a verdict on them (their source or username failed too often
    /// lately, or the settings changed under the login): `why` is all the client is told.
    pub fn refused_unchecked(&mut self, creds: &Credentials, why: &str) -> Step {
        Step::Close(
            ErrorReply::proxy(error_code::BAD_CREDENTIALS, why).frame(creds.version, creds.stream),
        )
    }

    /// The outcome of checking `creds`: the accepted identity, or why not (shown to the client
    /// after Cassandra's usual words, so drivers report it as bad credentials).
    pub fn verified(&mut self, creds: &Credentials, outcome: Result<String, String>) -> Step {
        match outcome {
            Ok(identity) => Step::Connect(Accepted {
                version: creds.version,
                compression: creds.compression,
                success: messages::auth_success(creds.version, creds.stream, None),
                user: Some(identity),
            }),
            Err(why) => {
                let mut message = bad_credentials_message(&creds.user);
                if !why.is_empty() {
                    message = format!("{message}: {why}");
                }
                // One try per connection: a client that could retry on the same socket could
                // drive password guesses and KMS calls as fast as it can write.
                Step::Close(ErrorReply::bad_credentials(message).frame(creds.version, creds.stream))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::auth::client::UserStore;
    use crate::frame::messages::ErrorInfo;
    use crate::frame::Header;

    fn startup(version: ProtocolVersion) -> Frame {
        messages::startup(version, 1, &[("CQL_VERSION", "3.0.0")])
    }

    fn error_of(step: &Step) -> ErrorInfo {
        match step {
            Step::Reply(f) | Step::Close(f) => ErrorInfo::parse(&f.body).unwrap(),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn v5_is_refused_with_keyspaces_text_and_socket_kept() {
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(ClientAuth::None)));
        let mut v5 = messages::options(ProtocolVersion::V4, 0);
        v5.header.version = 5;
        let step = hs.on_frame(&v5);
        assert!(matches!(step, Step::Reply(_)));
        let e = error_of(&step);
        assert_eq!(e.code, error_code::PROTOCOL_ERROR);
        assert!(e.message.contains(
            "Invalid or unsupported protocol version (5); supported versions are (3/v3, 4/v4)"
        ));
        // Then the driver retries with v4 on the same socket.
        assert!(matches!(
            hs.on_frame(&startup(ProtocolVersion::V4)),
            Step::Connect(_)
        ));
    }

    #[test]
    fn no_auth_accepts_startup_with_ready() {
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(ClientAuth::None)));
        let Step::Connect(a) = hs.on_frame(&messages::startup(
            ProtocolVersion::V3,
            9,
            &[("CQL_VERSION", "3.0.0"), ("COMPRESSION", "lz4")],
        )) else {
            panic!()
        };
        assert_eq!(a.version, ProtocolVersion::V3);
        assert_eq!(a.compression, Compression::Lz4);
        assert_eq!(a.success.opcode(), opcode::READY);
        assert_eq!(a.success.stream(), 9);
        assert_eq!(a.success.header.version, 0x83);
    }

    /// A password handshake that has had its v4 STARTUP and waits for credentials.
    fn awaiting_password() -> ClientHandshake {
        let users = UserStore::parse("app:pw").unwrap();
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(
            ClientAuth::Password(users),
        )));
        assert!(matches!(
            hs.on_frame(&startup(ProtocolVersion::V4)),
            Step::Reply(_)
        ));
        hs
    }

    /// A connection speaks the version its STARTUP chose: credentials in another are refused,
    /// not checked and accepted for a session in the first.
    #[test]
    fn credentials_in_another_version_are_refused() {
        let mut hs = awaiting_password();
        let v3 =
            messages::auth_response(ProtocolVersion::V3, 2, &messages::plain_token("app", "pw"));
        let step = hs.on_frame(&v3);
        assert!(matches!(step, Step::Close(_)), "{step:?}");
        let e = error_of(&step);
        assert_eq!(e.code, error_code::PROTOCOL_ERROR);
        assert_eq!(
            e.message,
            "Invalid message version. Got v3 but previous messages on this connection had \
             version v4"
        );
    }

    #[test]
    fn password_mode_checks_credentials() {
        let users = UserStore::parse("app:pw").unwrap();
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(
            ClientAuth::Password(users),
        )));
        let Step::Reply(f) = hs.on_frame(&startup(ProtocolVersion::V4)) else {
            panic!()
        };
        assert_eq!(f.opcode(), opcode::AUTHENTICATE);
        assert_eq!(
            messages::parse_authenticate(&f.body).unwrap(),
            messages::PASSWORD_AUTHENTICATOR
        );

        // The credentials are handed to the session to check, then the outcome comes back.
        let wrong = messages::auth_response(
            ProtocolVersion::V4,
            2,
            &messages::plain_token("app", "nope"),
        );
        let Step::Verify(creds) = hs.on_frame(&wrong) else {
            panic!()
        };
        assert_eq!(
            (creds.user.as_str(), &creds.secret[..]),
            ("app", &b"nope"[..])
        );
        assert!(
            !format!("{creds:?}").contains("nope"),
            "the secret is never printed"
        );
        let failed = hs.verified(&creds, Err(String::new()));
        assert!(matches!(failed, Step::Close(_)), "one try per connection");
        let e = error_of(&failed);
        assert_eq!(e.code, error_code::BAD_CREDENTIALS);
        assert_eq!(
            e.message,
            "Provided username app and/or password are incorrect"
        );
        let e = error_of(&hs.verified(&creds, Err("Token lifetime exceeded.".into())));
        assert!(e.message.ends_with(": Token lifetime exceeded."));

        let right =
            messages::auth_response(ProtocolVersion::V4, 3, &messages::plain_token("app", "pw"));
        let Step::Verify(creds) = hs.on_frame(&right) else {
            panic!()
        };
        let Step::Connect(a) = hs.verified(&creds, Ok("app".into())) else {
            panic!()
        };
        assert_eq!(a.success.opcode(), opcode::AUTH_SUCCESS);
        assert_eq!(a.success.stream(), 3);
        assert_eq!(a.user.as_deref(), Some("app"));
    }

    #[test]
    fn compressed_credentials_are_read_with_the_negotiated_algorithm() {
        for (name, algo) in [("lz4", Compression::Lz4), ("snappy", Compression::Snappy)] {
            let users = UserStore::parse("app:pw").unwrap();
            let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(
                ClientAuth::Password(users),
            )));
            let startup = messages::startup(
                ProtocolVersion::V4,
                1,
                &[("CQL_VERSION", "3.0.0"), ("COMPRESSION", name)],
            );
            assert!(matches!(hs.on_frame(&startup), Step::Reply(_)));
            let token = messages::plain_token("app", "pw");
            let packed = crate::frame::compression::compressed(
                messages::auth_response(ProtocolVersion::V4, 2, &token),
                algo,
            );
            assert!(packed.header.has_flag(crate::frame::flags::COMPRESSION));
            let Step::Verify(creds) = hs.on_frame(&packed) else {
                panic!("{name}")
            };
            assert_eq!(
                (creds.user.as_str(), &creds.secret[..]),
                ("app", &b"pw"[..])
            );
        }
    }

    #[test]
    fn negative_streams_are_refused_in_the_handshake_too() {
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(ClientAuth::None)));
        for frame in [
            messages::options(ProtocolVersion::V4, -1),
            messages::startup(ProtocolVersion::V4, -5, &[("CQL_VERSION", "3.0.0")]),
        ] {
            let step = hs.on_frame(&frame);
            assert_eq!(error_of(&step).code, error_code::PROTOCOL_ERROR);
            let (Step::Reply(f) | Step::Close(f)) = &step else {
                unreachable!()
            };
            assert_eq!(f.stream(), frame.stream());
        }
        assert!(matches!(
            hs.on_frame(&startup(ProtocolVersion::V4)),
            Step::Connect(_)
        ));
    }

    #[test]
    fn requests_before_startup_get_errors() {
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(ClientAuth::None)));
        let e = error_of(&hs.on_frame(&messages::query(ProtocolVersion::V4, 1, "SELECT 1", 1)));
        assert!(e.message.contains("expecting STARTUP"));
        let garbage = Frame::new(
            Header::request(ProtocolVersion::V4, 1, opcode::STARTUP),
            Bytes::from_static(&[0xff]),
        );
        assert!(matches!(hs.on_frame(&garbage), Step::Close(_)));
    }

    #[test]
    fn response_frames_from_clients_close() {
        let mut hs = ClientHandshake::new(Arc::new(Logins::without_sessions(ClientAuth::None)));
        assert!(matches!(
            hs.on_frame(&messages::ready(ProtocolVersion::V4, 1)),
            Step::Close(_)
        ));
    }

    #[test]
    fn oversized_secrets_are_refused_before_any_check() {
        let mut hs = awaiting_password();
        let long = "x".repeat(1025);
        let step = hs.on_frame(&messages::auth_response(
            ProtocolVersion::V4,
            2,
            &messages::plain_token("app", &long),
        ));
        assert!(matches!(step, Step::Close(_)), "{step:?}");
        assert!(error_of(&step).message.contains("longer than 1024 bytes"));
        let ok = "x".repeat(1024);
        let step = hs.on_frame(&messages::auth_response(
            ProtocolVersion::V4,
            3,
            &messages::plain_token("app", &ok),
        ));
        assert!(matches!(step, Step::Verify(_)));
    }
}
