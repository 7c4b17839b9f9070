//! One authenticated connection to Keyspaces: TCP, TLS, STARTUP and the SigV4 (or PLAIN)
//! exchange. Every connection is signed anew: the server's nonce makes handshakes unreplayable.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::BufReader;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;

use crate::auth::credentials::{CredentialCache, CredentialsError};
use crate::auth::sigv4;
use crate::frame::messages::{self, ErrorInfo};
use crate::frame::{opcode, Compression, Frame, FrameCodec, FrameDecodeError};
use crate::metrics::{metrics, Metrics};

/// How the proxy proves itself to the upstream.
#[derive(Clone)]
pub enum UpstreamAuth {
    SigV4 {
        credentials: Arc<CredentialCache>,
        region: String,
    },
    /// Keyspaces service-specific credentials or a Cassandra PasswordAuthenticator user. The
    /// password is wiped from memory when dropped.
    Plain {
        username: String,
        password: zeroize::Zeroizing<String>,
    },
}

impl std::fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpstreamAuth::SigV4 { region, .. } => write!(f, "SigV4({region})"),
            UpstreamAuth::Plain { username, .. } => write!(f, "Plain({username})"),
        }
    }
}

/// Where and how to connect; shared by every upstream connection.
#[derive(Debug, Clone)]
pub struct UpstreamTarget {
    /// `host:port` to dial.
    pub address: String,
    /// The name sent as SNI and verified in the certificate.
    pub server_name: ServerName<'static>,
    pub tls: Arc<ClientConfig>,
    /// Speak plaintext upstream. Only for side-by-side benchmarks against a loopback emulator;
    /// the configuration refuses it for any other address.
    pub insecure_plaintext: bool,
    pub auth: UpstreamAuth,
    pub connect_timeout: Duration,
    pub max_frame_len: usize,
}

pub type UpstreamFramed = Framed<UpstreamIo, FrameCodec>;

/// rustls reads at most 4 KiB per call; a burst of answers arrives in several records, so under
/// load every upstream read was split into three or four syscalls. Reading the socket through
/// this buffer takes the whole burst in one.
const TLS_READ_BUFFER: usize = 64 * 1024;

/// The upstream byte stream: TLS, or plaintext for loopback benchmarks only.
pub enum UpstreamIo {
    Tls(Box<TlsStream<BufReader<TcpStream>>>),
    Plain(TcpStream),
}

impl AsyncRead for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            UpstreamIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            UpstreamIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            UpstreamIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamIo::Tls(s) => s.is_write_vectored(),
            UpstreamIo::Plain(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            UpstreamIo::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            UpstreamIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An authenticated upstream connection, ready for requests.
pub struct UpstreamConnection {
    pub framed: UpstreamFramed,
    pub version: u8,
    pub compression: Compression,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} failed: {source}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("upstream handshake timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream rejected authentication: {}", .0.message)]
    AuthRejected(ErrorInfo),
    #[error("upstream refused the connection handshake: {}", .0.message)]
    Refused(ErrorInfo),
    #[error("{}", .0.message)]
    UseFailed(ErrorInfo),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    #[error("upstream closed the connection during the handshake")]
    Closed,
}

/// Whether upstream text names an AWS account: an ARN (any case), a 12-digit account id on its
/// own, or one written as three groups of four digits with short separators between them
/// (`1234-5678-9012`, `1234.5678.9012`, `1234 - 5678 - 9012`).
fn names_an_account(text: &str) -> bool {
    if text.to_ascii_lowercase().contains("arn:") {
        return true;
    }
    // Runs of digits, with what separates each from the one before it.
    let mut runs: Vec<(&str, &str)> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        let gap = &rest[..start];
        let after = &rest[start..];
        let end = after
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(after.len());
        runs.push((gap, &after[..end]));
        rest = &after[end..];
    }
    let separator =
        |gap: &str| !gap.is_empty() && gap.len() <= 3 && !gap.chars().any(|c| c.is_alphanumeric());
    runs.iter().any(|(_, run)| run.len() == 12)
        || runs.windows(3).any(|w| {
            w.iter().all(|(_, run)| run.len() == 4) && separator(w[1].0) && separator(w[2].0)
        })
}

impl UpstreamError {
    /// What a client may be told. Credential and IAM failures carry SDK text (role and
    /// principal ARNs, account ids, HTTP bodies): the client gets a short reason and a
    /// reference, and the details are logged under that reference. Network and TLS failures
    /// name only the endpoint and the cause, which the client needs to see.
    pub fn public_message(&self) -> String {
        let withheld = |what: &str| {
            let reference = crate::reference::Reference::new();
            tracing::warn!(%reference, error = %self, "{what}");
            reference
        };
        match self {
            UpstreamError::AuthRejected(info) | UpstreamError::UseFailed(info)
                if !names_an_account(&info.message) =>
            {
                info.message.clone()
            }
            UpstreamError::AuthRejected(_) => {
                let reference = withheld("upstream authentication failed");
                format!(
                    "keyspaces-proxy: Keyspaces did not accept the proxy's AWS credentials \
                     (reference {reference} in the proxy's log)"
                )
            }
            UpstreamError::Credentials(_) => {
                let reference = withheld("AWS credentials unavailable");
                format!(
                    "keyspaces-proxy: could not obtain AWS credentials for this connection \
                     (reference {reference} in the proxy's log)"
                )
            }
            UpstreamError::UseFailed(_) | UpstreamError::Refused(_) if self.names_an_account() => {
                let reference = withheld("upstream refused a request the proxy made");
                format!(
                    "keyspaces-proxy: Keyspaces refused the request (reference {reference} in \
                     the proxy's log)"
                )
            }
            other => format!("keyspaces-proxy cannot reach Keyspaces: {other}"),
        }
    }

    fn names_an_account(&self) -> bool {
        match self {
            UpstreamError::AuthRejected(info)
            | UpstreamError::Refused(info)
            | UpstreamError::UseFailed(info) => names_an_account(&info.message),
            _ => false,
        }
    }

    /// A bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Connect { .. } => "connect_error",
            UpstreamError::Tls { .. } => "tls_error",
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::AuthRejected(_) => "rejected",
            UpstreamError::Refused(_) | UpstreamError::UseFailed(_) => "refused",
            UpstreamError::Credentials(_) => "credentials_error",
            UpstreamError::Protocol(_) | UpstreamError::Closed => "protocol_error",
        }
    }
}

impl From<FrameDecodeError> for UpstreamError {
    fn from(e: FrameDecodeError) -> Self {
        UpstreamError::Protocol(e.to_string())
    }
}

const HANDSHAKE_STREAM: i16 = 0;

/// Sends one handshake-time request and waits for its answer on the handshake stream.
pub(crate) async fn roundtrip(
    framed: &mut UpstreamFramed,
    frame: Frame,
) -> Result<Frame, UpstreamError> {
    framed
        .send(frame)
        .await
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    loop {
        match framed.next().await {
            None => return Err(UpstreamError::Closed),
            Some(Err(e)) => return Err(e.into()),
            // Events may arrive unsolicited; only the handshake stream answers us.
            Some(Ok(f)) if f.stream() != HANDSHAKE_STREAM => continue,
            Some(Ok(f)) => return Ok(f),
        }
    }
}

fn unexpected(f: &Frame, during: &str) -> UpstreamError {
    if f.opcode() == opcode::ERROR {
        if let Ok(info) = ErrorInfo::parse(&f.body) {
            return UpstreamError::Refused(info);
        }
    }
    UpstreamError::Protocol(format!(
        "unexpected {} during {during}",
        opcode::name(f.opcode())
    ))
}

impl UpstreamTarget {
    /// Opens and authenticates one connection speaking `version`, with `compression` if the
    /// upstream offers it (else none: the caller then compresses for its client itself).
    ///
    /// A SigV4 rejection makes it reload credentials and try once more if they changed: keys
    /// rotated under a long-lived cache then cost one failed handshake, not an outage.
    pub async fn connect(
        &self,
        version: u8,
        compression: Compression,
    ) -> Result<UpstreamConnection, UpstreamError> {
        let limit = self.connect_timeout;
        let attempt = || async {
            let r = tokio::time::timeout(limit, self.connect_inner(version, compression))
                .await
                .map_err(|_| UpstreamError::Timeout(limit))
                .and_then(|r| r);
            let auth = match self.auth {
                UpstreamAuth::SigV4 { .. } => "sigv4",
                UpstreamAuth::Plain { .. } => "plain",
            };
            let result = match &r {
                Ok(_) => "ok",
                Err(e) => e.kind(),
            };
            Metrics::count(
                &metrics().upstream_handshakes,
                vec![("auth", auth), ("result", result)],
            );
            r
        };
        match (attempt().await, &self.auth) {
            (Err(UpstreamError::AuthRejected(info)), UpstreamAuth::SigV4 { credentials, .. }) => {
                let before = credentials.get().await?;
                let after = credentials.refresh(true).await?;
                if before.access_key_id() == after.access_key_id()
                    && before.secret_access_key() == after.secret_access_key()
                    && before.session_token() == after.session_token()
                {
                    return Err(UpstreamError::AuthRejected(info));
                }
                tracing::info!(
                    access_key_id = after.access_key_id(),
                    "credentials changed; retrying the upstream handshake"
                );
                attempt().await
            }
            (result, _) => result,
        }
    }

    async fn connect_inner(
        &self,
        version: u8,
        compression: Compression,
    ) -> Result<UpstreamConnection, UpstreamError> {
        let tcp =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| UpstreamError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let io = if self.insecure_plaintext {
            UpstreamIo::Plain(tcp)
        } else {
            let tls_started = std::time::Instant::now();
            let tls = TlsConnector::from(self.tls.clone())
                .connect(
                    self.server_name.clone(),
                    BufReader::with_capacity(TLS_READ_BUFFER, tcp),
                )
                .await
                .map_err(|source| UpstreamError::Tls {
                    address: self.address.clone(),
                    source,
                })?;
            metrics()
                .tls_handshake_duration
                .observe(tls_started.elapsed().as_secs_f64());
            UpstreamIo::Tls(Box::new(tls))
        };
        let mut framed = Framed::new(io, FrameCodec::new(self.max_frame_len));

        let supported =
            roundtrip(&mut framed, messages::options(version, HANDSHAKE_STREAM)).await?;
        if supported.opcode() != opcode::SUPPORTED {
            return Err(unexpected(&supported, "OPTIONS"));
        }
        let offered = messages::parse_supported(&supported.body)
            .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
        let compression = match compression.name() {
            Some(name)
                if offered
                    .get("COMPRESSION")
                    .is_some_and(|algos| algos.iter().any(|a| a.eq_ignore_ascii_case(name))) =>
            {
                compression
            }
            _ => Compression::None,
        };

        let mut options = vec![("CQL_VERSION", "3.0.0"), ("DRIVER_NAME", "keyspaces-proxy")];
        if let Some(name) = compression.name() {
            options.push(("COMPRESSION", name));
        }
        let reply = roundtrip(
            &mut framed,
            messages::startup(version, HANDSHAKE_STREAM, &options),
        )
        .await?;
        match reply.opcode() {
            opcode::READY => {}
            opcode::AUTHENTICATE => self.authenticate(&mut framed, version).await?,
            _ => return Err(unexpected(&reply, "STARTUP")),
        }
        Ok(UpstreamConnection {
            framed,
            version,
            compression,
        })
    }

    async fn authenticate(
        &self,
        framed: &mut UpstreamFramed,
        version: u8,
    ) -> Result<(), UpstreamError> {
        let reply = match &self.auth {
            UpstreamAuth::Plain { username, password } => {
                let token = zeroize::Zeroizing::new(messages::plain_token(username, password));
                roundtrip(
                    framed,
                    messages::auth_response(version, HANDSHAKE_STREAM, &token),
                )
                .await?
            }
            UpstreamAuth::SigV4 {
                credentials,
                region,
            } => {
                // Load credentials first so a provider failure never leaves a half-done exchange.
                let creds = credentials.get().await?;
                let challenge = roundtrip(
                    framed,
                    messages::auth_response(version, HANDSHAKE_STREAM, sigv4::INITIAL_RESPONSE),
                )
                .await?;
                if challenge.opcode() != opcode::AUTH_CHALLENGE {
                    return Err(auth_failure(&challenge));
                }
                let token = messages::parse_auth_token(&challenge.body)
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                let nonce = sigv4::parse_challenge(token)
                    .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
                let response = sigv4::signed_response(&sigv4::SigningParams {
                    access_key_id: creds.access_key_id(),
                    secret_access_key: creds.secret_access_key(),
                    session_token: creds.session_token(),
                    region,
                    nonce,
                    time: SystemTime::now(),
                });
                roundtrip(
                    framed,
                    messages::auth_response(version, HANDSHAKE_STREAM, response.as_bytes()),
                )
                .await?
            }
        };
        match reply.opcode() {
            opcode::AUTH_SUCCESS => Ok(()),
            _ => Err(auth_failure(&reply)),
        }
    }
}

fn auth_failure(f: &Frame) -> UpstreamError {
    match (f.opcode(), ErrorInfo::parse(&f.body)) {
        (opcode::ERROR, Ok(info)) => UpstreamError::AuthRejected(info),
        _ => UpstreamError::Protocol(format!(
            "unexpected {} during authentication",
            opcode::name(f.opcode())
        )),
    }
}

#[cfg(test)]
mod public_message_tests {
    use super::*;

    #[test]
    fn clients_never_see_account_ids_or_sdk_text() {
        use crate::frame::messages::ErrorInfo;
        let iam = UpstreamError::AuthRejected(ErrorInfo {
            code: 0x0100,
            message: "User arn:aws:sts::111122223333:assumed-role/orders/x has no permissions."
                .into(),
        });
        let sdk = UpstreamError::Credentials(crate::auth::credentials::CredentialsError(
            "AccessDenied: arn:aws:iam::111122223333:role/orders; request id 5f1c".into(),
        ));
        let startup = UpstreamError::Refused(ErrorInfo {
            code: 0x0000,
            message: "User: arn:aws:iam::999988887777:role/internal is not authorized".into(),
        });
        let keyspace = UpstreamError::UseFailed(ErrorInfo {
            code: 0x2100,
            message: "User 999988887777 may not access keyspace x".into(),
        });
        let shouted = UpstreamError::Refused(ErrorInfo {
            code: 0x0000,
            message: "ARN:AWS:STS::9999-8888-7777:ASSUMED-ROLE/x".into(),
        });
        let spaced = UpstreamError::UseFailed(ErrorInfo {
            code: 0x2100,
            message: "no access in account 9999 8888 7777".into(),
        });
        assert!(!names_an_account(
            "Keyspace orders does not exist (2024-01-15)"
        ));
        assert!(!names_an_account("retry in 1000 ms, 3 of 5"));
        for hidden in [
            "throttled 111122223333 5 times",
            "request at 2024-01-01 111122223333 denied",
            "account 1111.2222.3333 denied",
            "account 1111_2222_3333 denied",
            "account 1111 - 2222 - 3333 denied",
        ] {
            assert!(names_an_account(hidden), "{hidden}");
        }
        for e in [&iam, &sdk, &startup, &keyspace, &shouted, &spaced] {
            let m = e.public_message();
            assert!(!names_an_account(&m), "{m}");
            assert!(m.contains("reference"), "{m}");
        }
        let signature = UpstreamError::AuthRejected(ErrorInfo {
            code: 0x0100,
            message: "Authentication failure: Invalid signature".into(),
        });
        assert_eq!(
            signature.public_message(),
            "Authentication failure: Invalid signature"
        );
    }
}
