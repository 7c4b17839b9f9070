//! One client connection to the emulator: TLS, the Keyspaces handshake, then requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::auth::{new_nonce, verify_plain, verify_sigv4, AuthFailure};
use crate::engine::{throttled, Reply};
use crate::sigv4::{self, SignedResponse};
use crate::wire::request::{decode_message, message_start, Request};
use crate::wire::writer::{write_out, Out, QUEUE_DEPTH};
use crate::wire::{
    consistency, error_code, flags, opcode, response, Compression, Frame, FrameDecoder,
};
use crate::Shared;

/// The text Keyspaces answers a v5 client with; drivers look for exactly this to downgrade
/// (KEYSPACES.md, "Protocol"). Other versions get it too (Cassandra's format; ASSUMPTION).
pub fn unsupported_version_message(version: u8) -> String {
    format!(
        "Invalid or unsupported protocol version ({version}); supported versions are (3/v3, 4/v4)"
    )
}

// What AUTHENTICATE names (KEYSPACES.md, "Protocol": seen 2025; older: HelenusAuthenticator).
const PASSWORD_AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

enum State {
    AwaitStartup,
    AwaitCredentials,
    AwaitSignature { nonce: String },
    Ready,
}

/// Counts requests in one-second windows: Keyspaces' per-connection cap (3,000/s, KEYSPACES.md,
/// "Throughput limits and errors"). ASSUMPTION: the shape (fixed one-second windows per
/// connection, the first from its creation); KEYSPACES.md gives only the rate.
struct RateLimiter {
    cap: u32,
    window: Instant,
    count: u32,
}

impl RateLimiter {
    fn allow(&mut self) -> bool {
        if self.cap == 0 {
            return true;
        }
        let now = Instant::now();
        if now.duration_since(self.window).as_secs() >= 1 {
            self.window = now;
            self.count = 0;
        }
        self.count += 1;
        self.count <= self.cap
    }
}

struct Conn {
    shared: Arc<Shared>,
    id: u64,
    state: State,
    version: u8,
    compression: Compression,
    keyspace: Option<String>,
    requests: u64,
    limiter: RateLimiter,
    tx: mpsc::Sender<Out>,
}

pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let id = shared.next_conn_id();
    // Subscribed before anything else, so that no cut after this point is missed; one before
    // it that closed this address is seen below.
    let mut disconnects = shared.faults.disconnects();
    disconnects.mark_unchanged();
    shared.events.record(json!({"event": "connect", "conn": id, "peer": peer.to_string(), "local": local.to_string()}));
    if shared.faults.refuse_connections() {
        shared
            .events
            .record(json!({"event": "refused", "conn": id}));
        return;
    }
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = if shared.config.insecure_plaintext {
        Box::new(tcp)
    } else {
        match shared.acceptor.accept(tcp).await {
            Ok(t) => Box::new(t),
            Err(e) => {
                shared
                    .events
                    .record(json!({"event": "tls_failed", "conn": id, "error": e.to_string()}));
                return;
            }
        }
    };
    let (read, write) = tokio::io::split(io);
    let decoder = FrameDecoder {
        max_frame_len: shared.config.max_frame_len,
    };
    let mut frames = FramedRead::new(read, decoder);
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let writer = tokio::spawn(write_out(
        rx,
        write,
        shared
            .config
            .split_answers
            .then_some(shared.config.split_gap),
    ));
    let mut conn = Conn {
        id,
        state: State::AwaitStartup,
        version: 4,
        compression: Compression::None,
        keyspace: None,
        requests: 0,
        limiter: RateLimiter {
            cap: shared.config.rate_limit,
            // ASSUMPTION: the first window opens with the connection, not at login.
            window: Instant::now(),
            count: 0,
        },
        tx,
        shared,
    };
    let mut cut = false;
    if conn.shared.faults.is_closed(local) {
        conn.shared
            .events
            .record(json!({"event": "fault_disconnect", "conn": id}));
        cut = true;
    }
    while !cut {
        let next = tokio::select! {
            n = frames.next() => n,
            Ok(()) = disconnects.changed() => {
                let (_, target) = *disconnects.borrow_and_update();
                if !target.hits(id, local) {
                    continue;
                }
                conn.shared.events.record(json!({"event": "fault_disconnect", "conn": id}));
                cut = true;
                break;
            }
        };
        let Some(next) = next else { break };
        let frame = match next {
            Ok(f) => f,
            Err(e) => {
                let body = response::error(error_code::PROTOCOL_ERROR, &e.to_string());
                let f = Frame::response(conn.version, 0, opcode::ERROR, body);
                let _ = conn.tx.send(Out::Frame(f)).await;
                break;
            }
        };
        if !conn.on_frame(frame).await {
            break;
        }
    }
    conn.shared
        .events
        .record(json!({"event": "disconnect", "conn": id}));
    drop(conn);
    if cut {
        // A lost connection: answers still queued (or delayed by injected latency) never go out.
        writer.abort();
    }
    let _ = writer.await;
}

/// How an answer is framed: compressed once compression is on; traced requests get a tracing
/// session id in front of the body (native_protocol_v4.spec §2.2; ASSUMPTION that Keyspaces does).
#[derive(Debug, Clone, Copy)]
struct Framing {
    version: u8,
    compression: Compression,
    traced: bool,
}

impl Framing {
    fn frame(self, stream: i16, op: u8, body: Bytes) -> Frame {
        let mut f = Frame::response(self.version, stream, op, body);
        if self.traced {
            let mut b = BytesMut::with_capacity(16 + f.body.len());
            b.put_u128(rand::random::<u128>());
            b.put_slice(&f.body);
            f.body = b.freeze();
            f.flags |= flags::TRACING;
        }
        if let Some(packed) = self.compression.compress(&f.body) {
            f.body = packed;
            f.flags |= flags::COMPRESSION;
        }
        f
    }
}

impl Conn {
    fn framing(&self, traced: bool) -> Framing {
        let ready = matches!(self.state, State::Ready);
        Framing {
            version: self.version,
            compression: if ready {
                self.compression
            } else {
                Compression::None
            },
            traced,
        }
    }

    async fn reply(&self, stream: i16, op: u8, body: Bytes) -> bool {
        let f = self.framing(false).frame(stream, op, body);
        self.tx.send(Out::Frame(f)).await.is_ok()
    }

    async fn error(&self, stream: i16, code: i32, message: &str) -> bool {
        self.reply(stream, opcode::ERROR, response::error(code, message))
            .await
    }

    /// Handles one frame; false to close the connection.
    async fn on_frame(&mut self, frame: Frame) -> bool {
        let v = frame.protocol_version();
        let stream = frame.stream;
        if !(3..=4).contains(&v) {
            // Socket kept open (KEYSPACES.md, "Protocol"). v4 header: Cassandra's ProtocolVersion
            // answers unknown versions in its highest (but v1/v2 in their own; ASSUMPTION here).
            let body = response::error(error_code::PROTOCOL_ERROR, &unsupported_version_message(v));
            let f = Frame::response(4, stream, opcode::ERROR, body);
            return self.tx.send(Out::Frame(f)).await.is_ok();
        }
        if matches!(self.state, State::AwaitStartup) {
            self.version = v;
        } else if v != self.version || frame.is_response() {
            // Cassandra's Frame.Decoder refuses a version change too ("Invalid message version.
            // Got …"); this text and the close are the emulator's (ASSUMPTION for Keyspaces).
            self.error(
                stream,
                error_code::PROTOCOL_ERROR,
                "Invalid message version or direction",
            )
            .await;
            return false;
        }
        let body = if frame.flags & flags::COMPRESSION != 0 {
            let max = self.shared.config.max_frame_len;
            match self.compression.decompress(&frame.body, max) {
                Ok(b) => b,
                Err(e) => {
                    self.error(stream, error_code::PROTOCOL_ERROR, &e.to_string())
                        .await;
                    return false;
                }
            }
        } else {
            frame.body.clone()
        };
        // The engine reads the message itself, past any custom payload.
        let decoded = message_start(v, frame.flags, &body).and_then(|start| {
            let message = &body[start..];
            decode_message(v, frame.opcode, message).map(|r| (message, r))
        });
        let (message, request) = match decoded {
            Ok(d) => d,
            Err(e) => return self.undecodable(stream, frame.opcode, &e.0).await,
        };
        let traced = frame.flags & flags::TRACING != 0;
        match (&self.state, request) {
            (_, Request::Options) => {
                let algos: Vec<&str> = self
                    .shared
                    .config
                    .compression
                    .iter()
                    .filter_map(|c| c.name())
                    .collect();
                // CQL 3.4.4 and v3/v4: KEYSPACES.md, "Protocol". ASSUMPTION: Keyspaces' SUPPORTED
                // lists them so (undocumented); COMPRESSION is configurable, its support unknown.
                let body = response::supported(&[
                    ("CQL_VERSION", &["3.4.4"]),
                    ("COMPRESSION", &algos),
                    ("PROTOCOL_VERSIONS", &["3/v3", "4/v4"]),
                ]);
                if !matches!(self.state, State::Ready) {
                    return self.reply(stream, opcode::SUPPORTED, body).await;
                }
                // After login an OPTIONS is a client's (a pool's heartbeat): logged and
                // withheld like any request, so a test can see heartbeats and silence them.
                if self.shared.events.enabled() {
                    self.record_request(opcode::OPTIONS, &Request::Options);
                }
                let answer = self.framing(traced).frame(stream, opcode::SUPPORTED, body);
                match self.shared.faults.park(&self.tx, Out::Frame(answer)) {
                    Ok(()) => true,
                    Err(answer) => self.tx.send(answer).await.is_ok(),
                }
            }
            (State::AwaitStartup, Request::Startup(options)) => {
                self.on_startup(stream, options).await
            }
            (State::AwaitCredentials, Request::AuthResponse(token)) => {
                self.on_credentials(stream, token.unwrap_or_default()).await
            }
            (State::AwaitSignature { .. }, Request::AuthResponse(token)) => {
                self.on_signature(stream, token.unwrap_or_default()).await
            }
            // ASSUMPTION: REGISTER accepted, no event ever pushed (KEYSPACES.md, "Protocol":
            // unknown).
            (State::Ready, Request::Register(_)) => {
                self.reply(stream, opcode::READY, Bytes::new()).await
            }
            (
                State::Ready,
                r @ (Request::Query(..)
                | Request::Prepare(_)
                | Request::Execute(..)
                | Request::Batch(_)),
            ) => {
                self.on_request(stream, frame.opcode, message, &r, traced)
                    .await
            }
            (State::Ready, _) => {
                // The emulator's text (Cassandra's ServerConnection adds ", the connection is
                // already initialized" for STARTUP).
                let msg = format!("Unexpected message {}", opcode::name(frame.opcode));
                self.error(stream, error_code::PROTOCOL_ERROR, &msg).await
            }
            (State::AwaitStartup, _) => {
                // Cassandra's ServerConnection.validateNewMessage text.
                let msg = format!(
                    "Unexpected message {}, expecting STARTUP or OPTIONS",
                    opcode::name(frame.opcode)
                );
                self.error(stream, error_code::PROTOCOL_ERROR, &msg).await
            }
            (_, _) => {
                // The emulator's choice: Cassandra answers a ProtocolException "Unexpected message
                // %s, expecting SASL_RESPONSE"; Keyspaces' answer is undocumented.
                let msg = format!(
                    "Unexpected message {} before authentication",
                    opcode::name(frame.opcode)
                );
                self.error(stream, error_code::UNAUTHORIZED, &msg).await
            }
        }
    }

    /// A body the emulator's decoder cannot read. Cassandra answers a ProtocolException and its
    /// Message.ExceptionHandler closes the connection after one: with `close_on_protocol_error`
    /// the emulator does the same (ASSUMPTION for Keyspaces, undocumented), failing everything
    /// else in flight on this connection — the cost a proxy that forwards such a body imposes on
    /// bystanders.
    async fn undecodable(&mut self, stream: i16, op: u8, why: &str) -> bool {
        let message = format!("Invalid {} message: {why}", opcode::name(op));
        let close = self.shared.config.close_on_protocol_error;
        self.shared.events.record(json!({
            "event": "undecodable", "conn": self.id, "opcode": opcode::name(op),
            "error": why, "closed": close,
        }));
        let sent = self
            .error(stream, error_code::PROTOCOL_ERROR, &message)
            .await;
        if close {
            let _ = self.tx.send(Out::Close).await;
            return false;
        }
        sent
    }

    async fn on_startup(&mut self, stream: i16, options: BTreeMap<&str, &str>) -> bool {
        let sorted: Vec<_> = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.shared
            .events
            .record(json!({"event": "startup", "conn": self.id, "options": sorted}));
        // Cassandra's StartupMessage also refuses an unknown algorithm with a ProtocolException
        // (its text: "Unknown compression algorithm: …"); this text is the emulator's.
        let requested = options.get("COMPRESSION").copied().unwrap_or("");
        let compression = match requested.parse::<Compression>() {
            Ok(c) if c == Compression::None || self.shared.config.compression.contains(&c) => c,
            _ => {
                return self
                    .error(
                        stream,
                        error_code::PROTOCOL_ERROR,
                        "Unsupported compression",
                    )
                    .await
            }
        };
        let delay = self.shared.faults.handshake_delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.state = State::AwaitCredentials;
        let body = response::authenticate(PASSWORD_AUTHENTICATOR);
        let ok = self.reply(stream, opcode::AUTHENTICATE, body).await;
        // Compression applies to every frame after the answer to STARTUP: the emulator's choice;
        // native_protocol_v4.spec §2.2/§4.1.1 say only that STARTUP itself is never compressed.
        self.compression = compression;
        ok
    }

    async fn auth_result(
        &mut self,
        stream: i16,
        mode: &str,
        who: &str,
        token: bool,
        result: Result<(), AuthFailure>,
    ) -> bool {
        let result = if self.shared.faults.fail_auth() {
            Err(AuthFailure::Injected)
        } else {
            result
        };
        let (ok, reason) = match &result {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e.reason())),
        };
        self.shared.events.record(json!({
            "event": "auth", "conn": self.id, "mode": mode, "who": who,
            "token_present": token, "ok": ok, "reason": reason,
        }));
        match result {
            Ok(()) => {
                self.state = State::Ready;
                let body = response::auth_token(None);
                self.reply(stream, opcode::AUTH_SUCCESS, body).await
            }
            Err(e) => {
                // 0x0100 (KEYSPACES.md, "SigV4 exchange", step 4). ASSUMPTION: the connection stays
                // open for another attempt (it does not say).
                self.state = State::AwaitCredentials;
                self.error(stream, error_code::BAD_CREDENTIALS, &e.to_string())
                    .await
            }
        }
    }

    async fn on_credentials(&mut self, stream: i16, token: &[u8]) -> bool {
        // KEYSPACES.md, "SigV4 exchange", steps 1-2: `SigV4\0\0` gets exactly `nonce=<hex>`.
        if token == sigv4::INITIAL_RESPONSE {
            let nonce = new_nonce();
            let body = response::auth_token(Some(format!("nonce={nonce}").as_bytes()));
            self.state = State::AwaitSignature { nonce };
            return self.reply(stream, opcode::AUTH_CHALLENGE, body).await;
        }
        // PLAIN: `[authzid]\0user\0password` (RFC 4616), no challenge round, for service-specific
        // credentials (KEYSPACES.md, "SigV4 exchange").
        let mut parts = token.splitn(3, |b| *b == 0);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(_), Some(user), Some(password)) => {
                let user = String::from_utf8_lossy(user).into_owned();
                let r = verify_plain(&self.shared.config.plain_users, &user, password);
                self.auth_result(stream, "plain", &user, false, r).await
            }
            _ => {
                let r = Err(AuthFailure::Malformed("not a PLAIN or SigV4 token".into()));
                self.auth_result(stream, "unknown", "", false, r).await
            }
        }
    }

    async fn on_signature(&mut self, stream: i16, token: &[u8]) -> bool {
        let State::AwaitSignature { nonce } = &self.state else {
            return false;
        };
        let parsed = SignedResponse::parse(token).ok();
        let key_id = parsed
            .as_ref()
            .map(|p| p.access_key.to_owned())
            .unwrap_or_default();
        let has_token = parsed.as_ref().is_some_and(|p| p.session_token.is_some());
        let keys = self.shared.sigv4_keys();
        let r = verify_sigv4(
            &keys,
            &self.shared.config.region,
            nonce,
            token,
            SystemTime::now(),
        )
        .map(|_| ());
        // Keys issued by an STS the emulator does not share (moto in tests) cannot be checked:
        // with --accept-unknown-keys they are let in (and logged by key id).
        let r = match r {
            Err(AuthFailure::UnknownKey(_)) if self.shared.config.accept_unknown_keys => Ok(()),
            other => other,
        };
        self.auth_result(stream, "sigv4", &key_id, has_token, r)
            .await
    }

    async fn on_request(
        &mut self,
        stream: i16,
        op: u8,
        body: &[u8],
        request: &Request<'_>,
        traced: bool,
    ) -> bool {
        self.requests += 1;
        let close_after = self.shared.faults.close_after();
        if close_after != 0 && self.requests >= close_after {
            self.shared
                .events
                .record(json!({"event": "fault_close", "conn": self.id}));
            return false;
        }
        if self.shared.events.enabled() {
            self.record_request(op, request);
        }
        let engine = &self.shared.engine;
        // ASSUMPTION: only QUERY/PREPARE/EXECUTE/BATCH count towards the cap, not handshakes or
        // OPTIONS heartbeats (KEYSPACES.md, "Throughput limits and errors" says "CQL requests").
        let reply = if self.limiter.allow() {
            engine.handle(op, body, self.keyspace.as_deref())
        } else {
            throttled(engine.classify(request))
        };
        let Reply {
            opcode: rop,
            body: rbody,
            keyspace,
            ..
        } = reply;
        if keyspace.is_some() {
            self.keyspace = keyspace;
        }
        let framing = self.framing(traced);
        let cut_at = self.shared.faults.cut_response_at();
        if cut_at != 0 && self.requests >= cut_at {
            self.shared
                .events
                .record(json!({"event": "fault_cut_response", "conn": self.id}));
            let whole = framing.frame(stream, rop, rbody).to_bytes();
            let half = whole.slice(..whole.len() / 2);
            let _ = self.tx.send(Out::Cut(half)).await;
            return false;
        }
        let latency = self.shared.faults.latency();
        let answer = match self
            .shared
            .faults
            .park(&self.tx, Out::Frame(framing.frame(stream, rop, rbody)))
        {
            Ok(()) => return true,
            Err(answer) => answer,
        };
        if latency.is_zero() {
            return self.tx.send(answer).await.is_ok();
        }
        self.shared
            .delayer()
            .hold(Instant::now() + latency, self.tx.clone(), answer);
        true
    }

    fn record_request(&self, op: u8, request: &Request<'_>) {
        let (cql, cl) = match request {
            Request::Query(text, p) => (Some(*text), Some(p.consistency)),
            Request::Prepare(text) => (Some(*text), None),
            Request::Execute(_, p) => (None, Some(p.consistency)),
            Request::Batch(b) => (None, Some(b.consistency)),
            _ => (None, None),
        };
        self.shared.events.record(json!({
            "event": "request", "conn": self.id, "opcode": opcode::name(op),
            "cql": cql, "consistency": cl.map(consistency::name), "keyspace": self.keyspace,
        }));
    }
}
