//! One client connection to the emulator: TLS, the Keyspaces handshake, then requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use keyspaces_proxy::auth::sigv4;
use keyspaces_proxy::frame::compression::{compressed, decompressed};
use keyspaces_proxy::frame::header::{is_supported_version, Header};
use keyspaces_proxy::frame::messages::{
    self, consistency, error_code, unsupported_version_message,
};
use keyspaces_proxy::frame::request::{parse_execute, parse_query};
use keyspaces_proxy::frame::{opcode, Compression, Frame, FrameCodec};
use keyspaces_proxy::writer::{FrameWriter, QUEUE_DEPTH};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use crate::auth::{new_nonce, verify_plain, verify_sigv4, AuthFailure};
use crate::engine::{throttled, Reply};
use crate::Shared;

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

enum State {
    AwaitStartup,
    AwaitCredentials,
    AwaitSignature { nonce: String },
    Ready,
}

/// Counts requests in one-second windows: Keyspaces' per-connection cap.
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

/// What the connection's writer task is given.
pub enum Out {
    Frame(Frame),
    /// Write these bytes (part of a frame), then close: a connection lost mid-response.
    Cut(Bytes),
}

/// Coalesces queued frames into one write, like the proxy's own writer.
async fn write_out<W: tokio::io::AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Out>, w: W) {
    let mut out = FrameWriter::new(w, None);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batched = 0;
        while let Some(o) = next.take() {
            match o {
                Out::Frame(f) => {
                    if out.push(&f).await.is_err() {
                        return;
                    }
                }
                Out::Cut(bytes) => {
                    let _ = out.flush().await;
                    let _ = out.write_raw(&bytes).await;
                    let _ = out.shutdown().await;
                    return;
                }
            }
            batched += 1;
            if batched < 1024 {
                next = rx.try_recv().ok();
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
    let _ = out.shutdown().await;
}

pub async fn serve(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, local: SocketAddr) {
    let id = shared.next_conn_id();
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
    let mut frames = FramedRead::new(read, FrameCodec::new(shared.config.max_frame_len));
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let writer = tokio::spawn(write_out(rx, write));
    let mut conn = Conn {
        id,
        state: State::AwaitStartup,
        version: 4,
        compression: Compression::None,
        keyspace: None,
        requests: 0,
        limiter: RateLimiter {
            cap: shared.config.rate_limit,
            window: Instant::now(),
            count: 0,
        },
        tx,
        shared,
    };
    let mut disconnects = conn.shared.faults.disconnects();
    loop {
        let next = tokio::select! {
            n = frames.next() => n,
            _ = disconnects.changed() => {
                conn.shared.events.record(json!({"event": "fault_disconnect", "conn": id}));
                break;
            }
        };
        let Some(next) = next else { break };
        let frame = match next {
            Ok(f) => f,
            Err(e) => {
                let _ = conn
                    .tx
                    .send(Out::Frame(messages::error(
                        4,
                        0,
                        error_code::PROTOCOL_ERROR,
                        &e.to_string(),
                    )))
                    .await;
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
    let _ = writer.await;
}

impl Conn {
    async fn send(&self, header: Header, body: Bytes, may_compress: bool) -> bool {
        let f = Frame::new(header, body);
        let f = if may_compress {
            compressed(f, self.compression)
        } else {
            f
        };
        self.tx.send(Out::Frame(f)).await.is_ok()
    }

    async fn reply(&self, stream: i16, op: u8, body: Bytes) -> bool {
        let ready = matches!(self.state, State::Ready);
        self.send(Header::response(self.version, stream, op), body, ready)
            .await
    }

    async fn error(&self, stream: i16, code: i32, message: &str) -> bool {
        let f = messages::error(self.version, stream, code, message);
        self.reply(stream, opcode::ERROR, f.body).await
    }

    /// Handles one frame; false to close the connection.
    async fn on_frame(&mut self, frame: Frame) -> bool {
        let h = frame.header;
        let v = h.protocol_version();
        if !is_supported_version(v) {
            let f = messages::error(
                4,
                h.stream,
                error_code::PROTOCOL_ERROR,
                &unsupported_version_message(v),
            );
            return self.tx.send(Out::Frame(f)).await.is_ok();
        }
        if matches!(self.state, State::AwaitStartup) {
            self.version = v;
        } else if v != self.version || h.is_response() {
            self.error(
                h.stream,
                error_code::PROTOCOL_ERROR,
                "Invalid message version or direction",
            )
            .await;
            return false;
        }
        let frame = match decompressed(frame, self.compression, self.shared.config.max_frame_len) {
            Ok(f) => f,
            Err(e) => {
                self.error(h.stream, error_code::PROTOCOL_ERROR, &e.to_string())
                    .await;
                return false;
            }
        };
        let body = match messages::message_body(&frame.header, &frame.body) {
            // A view of the frame's body past its prefixes, not a copy.
            Ok(b) => frame.body.slice(frame.body.len() - b.len()..),
            Err(e) => {
                return self
                    .error(h.stream, error_code::PROTOCOL_ERROR, &e.to_string())
                    .await
            }
        };
        match (&self.state, h.opcode) {
            (_, opcode::OPTIONS) => {
                let algos: Vec<&str> = self
                    .shared
                    .config
                    .compression
                    .iter()
                    .filter_map(|c| c.name())
                    .collect();
                let f = messages::supported(
                    self.version,
                    h.stream,
                    &[
                        ("CQL_VERSION", &["3.4.4"]),
                        ("COMPRESSION", &algos),
                        ("PROTOCOL_VERSIONS", &["3/v3", "4/v4"]),
                    ],
                );
                self.reply(h.stream, opcode::SUPPORTED, f.body).await
            }
            (State::AwaitStartup, opcode::STARTUP) => self.on_startup(h.stream, &body).await,
            (State::AwaitCredentials, opcode::AUTH_RESPONSE) => {
                self.on_credentials(h.stream, &body).await
            }
            (State::AwaitSignature { .. }, opcode::AUTH_RESPONSE) => {
                self.on_signature(h.stream, &body).await
            }
            (State::Ready, opcode::REGISTER) => {
                self.reply(h.stream, opcode::READY, Bytes::new()).await
            }
            (State::Ready, opcode::QUERY | opcode::PREPARE | opcode::EXECUTE | opcode::BATCH) => {
                self.on_request(h.stream, h.opcode, body).await
            }
            (State::Ready, op) => {
                let msg = format!("Unexpected message {}", opcode::name(op));
                self.error(h.stream, error_code::PROTOCOL_ERROR, &msg).await
            }
            (State::AwaitStartup, op) => {
                let msg = format!(
                    "Unexpected message {}, expecting STARTUP or OPTIONS",
                    opcode::name(op)
                );
                self.error(h.stream, error_code::PROTOCOL_ERROR, &msg).await
            }
            (_, op) => {
                let msg = format!(
                    "Unexpected message {} before authentication",
                    opcode::name(op)
                );
                self.error(h.stream, error_code::UNAUTHORIZED, &msg).await
            }
        }
    }

    async fn on_startup(&mut self, stream: i16, body: &[u8]) -> bool {
        let options = match messages::parse_startup(body) {
            Ok(o) => o,
            Err(e) => {
                return self
                    .error(stream, error_code::PROTOCOL_ERROR, &e.to_string())
                    .await
            }
        };
        let mut sorted: Vec<_> = options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        sorted.sort();
        self.shared
            .events
            .record(json!({"event": "startup", "conn": self.id, "options": sorted}));
        let compression = match Compression::from_option(options.get("COMPRESSION").copied()) {
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
        let f = messages::authenticate(self.version, stream, messages::PASSWORD_AUTHENTICATOR);
        let ok = self.reply(stream, opcode::AUTHENTICATE, f.body).await;
        // Compression applies to every frame after the answer to STARTUP.
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
                let f = messages::auth_success(self.version, stream, None);
                self.reply(stream, opcode::AUTH_SUCCESS, f.body).await
            }
            Err(e) => {
                self.state = State::AwaitCredentials;
                self.error(stream, error_code::BAD_CREDENTIALS, &e.to_string())
                    .await
            }
        }
    }

    async fn on_credentials(&mut self, stream: i16, body: &[u8]) -> bool {
        let token = messages::parse_auth_token(body).unwrap_or_default();
        if token == sigv4::INITIAL_RESPONSE {
            let nonce = new_nonce();
            let f = messages::auth_challenge(
                self.version,
                stream,
                Some(format!("nonce={nonce}").as_bytes()),
            );
            self.state = State::AwaitSignature { nonce };
            return self.reply(stream, opcode::AUTH_CHALLENGE, f.body).await;
        }
        match messages::parse_plain_token(token) {
            Ok((user, password)) => {
                let user = user.to_owned();
                let r = verify_plain(&self.shared.config.plain_users, &user, password);
                self.auth_result(stream, "plain", &user, false, r).await
            }
            Err(_) => {
                let r = Err(AuthFailure::Malformed("not a PLAIN or SigV4 token".into()));
                self.auth_result(stream, "unknown", "", false, r).await
            }
        }
    }

    async fn on_signature(&mut self, stream: i16, body: &[u8]) -> bool {
        let State::AwaitSignature { nonce } = &self.state else {
            return false;
        };
        let token = messages::parse_auth_token(body).unwrap_or_default();
        let parsed = sigv4::SignedResponse::parse(token).ok();
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

    async fn on_request(&mut self, stream: i16, op: u8, body: Bytes) -> bool {
        self.requests += 1;
        let close_after = self.shared.faults.close_after();
        if close_after != 0 && self.requests >= close_after {
            self.shared
                .events
                .record(json!({"event": "fault_close", "conn": self.id}));
            return false;
        }
        if self.shared.events.enabled() {
            self.record_request(op, &body);
        }
        let engine = &self.shared.engine;
        let reply = if self.limiter.allow() {
            engine.handle(op, &body, self.keyspace.as_deref())
        } else {
            throttled(engine.classify(op, &body))
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
        let header = Header::response(self.version, stream, rop);
        let cut_at = self.shared.faults.cut_response_at();
        if cut_at != 0 && self.requests >= cut_at {
            self.shared
                .events
                .record(json!({"event": "fault_cut_response", "conn": self.id}));
            let whole = compressed(Frame::new(header, rbody), self.compression).to_bytes();
            let half = whole.slice(..whole.len() / 2);
            let _ = self.tx.send(Out::Cut(half)).await;
            return false;
        }
        let latency = self.shared.faults.latency();
        if latency.is_zero() {
            return self.send(header, rbody, true).await;
        }
        let (tx, algo) = (self.tx.clone(), self.compression);
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            let _ = tx
                .send(Out::Frame(compressed(Frame::new(header, rbody), algo)))
                .await;
        });
        true
    }

    fn record_request(&self, op: u8, body: &[u8]) {
        let (cql, cl) = match op {
            opcode::QUERY => parse_query(body)
                .map(|q| (Some(q.text.to_owned()), Some(q.consistency)))
                .unwrap_or((None, None)),
            opcode::PREPARE => (
                keyspaces_proxy::frame::request::parse_prepare(body)
                    .ok()
                    .map(str::to_owned),
                None,
            ),
            opcode::EXECUTE => (None, parse_execute(body).ok().map(|e| e.consistency)),
            _ => (None, None),
        };
        self.shared.events.record(json!({
            "event": "request", "conn": self.id, "opcode": opcode::name(op),
            "cql": cql, "consistency": cl.map(consistency::name), "keyspace": self.keyspace,
        }));
    }
}
