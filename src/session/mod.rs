//! One client connection: the handshake, then the forwarding loop between the client and its
//! upstream connection. A failure here ends this connection only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{Framed, FramedRead};
use tracing::Instrument;

use crate::auth::client::ClientAuth;
use crate::context::ProxyContext;
use crate::frame::messages::{self, error_code};
use crate::frame::ErrorReply;
use crate::frame::ProtocolVersion;
use crate::frame::{ForeignProtocol, Frame, FrameCodec, FrameDecodeError, FrameError};
use crate::handshake::{Accepted, ClientHandshake, Step, MAX_HANDSHAKE_FRAME};
use crate::metrics::{metrics, Metrics, Outcome, Reason};
use crate::upstream::pool::{Group, Pool};
use crate::upstream::UpstreamConnection;
use crate::writer::{write_frames_counted, QUEUE_DEPTH};

pub mod admission;
mod client_stream;
mod dedicated;
mod head_start;
pub use head_start::LastRead;
mod login;
mod pooled;

use client_stream::{ClientReader, ClientStream, ClientWriter};

/// What the client is connected to once its handshake is done.
enum Upstream {
    Dedicated(Box<UpstreamConnection>),
    Pooled(Arc<Pool>, Arc<Group>),
}

type ClientFramed = Framed<ClientStream, FrameCodec>;

/// Initial read buffer per client connection; it grows to fit larger frames.
const CLIENT_BUFFER: usize = 512;

/// Serves one accepted client connection to the end.
pub async fn run(ctx: Arc<ProxyContext>, socket: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("client", %peer);
    async move {
        let _ = socket.set_nodelay(true);
        let proxy_ip = match (ctx.advertise_address, socket.local_addr()) {
            (Some(ip), _) => ip,
            (None, Ok(local)) => local.ip(),
            (None, Err(_)) => IpAddr::from([127, 0, 0, 1]),
        };
        let handshaking = match ctx.handshaking.try_take(peer.ip()) {
            Ok(slot) => slot,
            Err(full) => {
                let reason = match full {
                    admission::Full::Total => "handshaking_limit",
                    admission::Full::Source => "handshaking_source_limit",
                };
                tracing::debug!(
                    reason,
                    "too many clients in their handshake; closing this one"
                );
                Metrics::count(&metrics().client_connections_rejected, Reason { reason });
                return;
            }
        };
        // One deadline for the whole handshake, TLS included, not one per frame: a client
        // trickling OPTIONS or a byte at a time must not hold a connection slot for ever.
        let handshake = tokio::time::timeout(ctx.handshake_timeout, async {
            let Some((stream, certificate)) = open_stream(&ctx, socket).await else {
                return std::io::Result::Ok(None);
            };
            // Small buffers that grow with traffic: thousands of idle clients must stay cheap.
            // Until the client is authenticated its frames stay small too.
            let codec = FrameCodec::new(ctx.max_frame_len.min(MAX_HANDSHAKE_FRAME));
            let mut client = Framed::with_capacity(stream, codec, CLIENT_BUFFER);
            let done = handshake(&ctx, &mut client, peer.ip(), certificate).await?;
            Ok(done.map(|(accepted, upstream)| (client, accepted, upstream)))
        });
        let handshake = match handshake.await {
            Ok(h) => h,
            Err(_) => {
                tracing::debug!("client handshake timed out");
                Metrics::count(
                    &metrics().client_closed,
                    Reason {
                        reason: "handshake_timeout",
                    },
                );
                Ok(None)
            }
        };
        drop(handshaking);
        match handshake {
            Ok(Some((mut client, accepted, upstream))) => {
                client.codec_mut().set_max_body(ctx.max_frame_len);
                tracing::debug!(
                    version = accepted.version.wire(),
                    user = accepted.user.as_deref(),
                    "client ready"
                );
                match upstream {
                    Upstream::Dedicated(up) => {
                        dedicated::forward(&ctx, client, accepted, *up, proxy_ip).await
                    }
                    Upstream::Pooled(pool, group) => {
                        pooled::forward(&ctx, client, accepted, pool, group, proxy_ip).await
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "client handshake ended"),
        }
        tracing::debug!("client connection closed");
    }
    .instrument(span)
    .await
}

fn is_bad_credentials(f: &Frame) -> bool {
    f.opcode() == crate::frame::opcode::ERROR
        && messages::ErrorInfo::parse(&f.body).is_ok_and(|e| e.code == error_code::BAD_CREDENTIALS)
}

/// The client's stream: the socket itself, or its TLS session when the port requires TLS
/// (with the client certificate, if any). A plaintext CQL client on a TLS port is told why it
/// is refused; a failed TLS handshake is the answer to anything else.
async fn open_stream(
    ctx: &ProxyContext,
    socket: TcpStream,
) -> Option<(ClientStream, Option<CertificateDer<'static>>)> {
    let Some(tls) = ctx.client_tls.load_full() else {
        return Some((ClientStream::Plain(socket), None));
    };
    let mut first = [0u8; 9];
    let seen = socket.peek(&mut first).await.ok()?;
    if seen == 0 {
        return None;
    }
    if first[0] != crate::client_tls::TLS_HANDSHAKE_RECORD {
        refuse_plaintext(socket, &first[..seen]).await;
        return None;
    }
    match tokio_rustls::TlsAcceptor::from(tls).accept(socket).await {
        Ok(stream) => {
            let certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned());
            Some((ClientStream::Tls(Box::new(stream)), certificate))
        }
        Err(e) => {
            tracing::debug!(error = %e, "client TLS handshake failed");
            Metrics::count(
                &metrics().client_closed,
                Reason {
                    reason: "tls_failed",
                },
            );
            None
        }
    }
}

/// A client that sent plaintext to the TLS port: a CQL client gets an ERROR on the stream its
/// first frame used, saying what to change; anything else is closed.
async fn refuse_plaintext(mut socket: TcpStream, first: &[u8]) {
    use tokio::io::AsyncReadExt;
    Metrics::count(&metrics().client_closed, Reason { reason: "not_tls" });
    if worth_logging("plaintext") {
        tracing::warn!(
            "the client sent plaintext, but the client port requires TLS: connect with TLS \
         (cqlsh --ssl, the driver's SSL context)"
        );
    }
    let cql_request = matches!(first.first(), Some(3..=5));
    if !cql_request {
        return;
    }
    let version = ProtocolVersion::nearest(first[0]);
    let stream = match first {
        [_, _, hi, lo, ..] => i16::from_be_bytes([*hi, *lo]),
        _ => 0,
    };
    // What was peeked is read, so closing does not reset the connection before the reply lands.
    let mut sink = [0u8; 9];
    let _ = socket.read(&mut sink[..first.len()]).await;
    let reply = ErrorReply::proxy(
        error_code::PROTOCOL_ERROR,
        "this port requires TLS; connect with TLS (cqlsh --ssl, the driver's SSL context)",
    )
    .frame(version, stream);
    let mut framed = Framed::new(socket, FrameCodec::new(MAX_HANDSHAKE_FRAME));
    let _ = framed.send(reply).await;
    let _ = framed.get_mut().shutdown().await;
}

/// Whether a warning about what a peer sent before it was let in may be logged: each connection
/// must not buy a log line. A few a minute of each kind; the metrics count them all.
fn worth_logging(kind: &'static str) -> bool {
    use crate::auth::attempts::{Buckets, Budget};
    static BUDGET: std::sync::OnceLock<Buckets<&'static str>> = std::sync::OnceLock::new();
    BUDGET
        .get_or_init(|| Buckets::new(Budget::per_minute(6)))
        .reserve(&kind, std::time::Instant::now())
        .is_ok()
}

/// A client that speaks another protocol gets what it can read (HTTP: a 400 that says why; TLS:
/// nothing, the close is its answer), and the log says what to change.
async fn refuse_foreign(client: &mut ClientFramed, protocol: ForeignProtocol) {
    Metrics::count(&metrics().client_closed, Reason { reason: "not_cql" });
    let log = worth_logging("foreign");
    match protocol {
        ForeignProtocol::Tls if log => tracing::warn!(
            "the client speaks TLS, but the proxy's client port is plaintext: connect without \
             TLS (cqlsh without --ssl, drivers without an SSL context)"
        ),
        ForeignProtocol::Tls => {}
        ForeignProtocol::Http => {
            if log {
                tracing::warn!(
                    "the client speaks HTTP (or another text protocol), not CQL: health checks \
                     and metrics are on --metrics-listen"
                );
            }
            let body = "This is keyspaces-proxy's CQL port. Health checks and metrics \
                        (/livez, /readyz, /metrics) are on --metrics-listen.\n";
            let reply = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                 connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.get_mut().write_all(reply.as_bytes()).await;
        }
    }
    let _ = client.get_mut().shutdown().await;
}

/// The error a client sees for a frame the decoder refused.
fn decode_error_frame(e: &FrameError) -> Frame {
    let (version, stream) = match e {
        FrameError::TooLarge { header, .. } => (header.answer_version(), header.stream),
        FrameError::LegacyVersion { .. } | FrameError::Foreign(_) => (ProtocolVersion::NEWEST, 0),
    };
    ErrorReply::undecodable(e).frame(version, stream)
}

/// An authenticated identity with no role under `--unmapped-identities deny`: refused as bad
/// credentials (drivers report it as an authentication failure), without internal details.
async fn refuse_unmapped(
    client: &mut ClientFramed,
    accepted: &Accepted,
    user: &str,
) -> std::io::Result<()> {
    Metrics::count(
        &metrics().client_handshakes,
        Outcome {
            result: "unmapped_identity",
        },
    );
    if worth_logging("unmapped") {
        tracing::warn!(
            user = %crate::auth::attempts::loggable(user),
            "login refused: --identity-roles maps no role to this identity (--unmapped-identities deny)"
        );
    }
    let reply = ErrorReply::proxy(
        error_code::BAD_CREDENTIALS,
        "no role is configured for this identity",
    )
    .frame(accepted.version, accepted.success.stream());
    client.send(reply).await
}

async fn handshake(
    ctx: &ProxyContext,
    client: &mut ClientFramed,
    source: IpAddr,
    certificate: Option<CertificateDer<'static>>,
) -> std::io::Result<Option<(Accepted, Upstream)>> {
    let mut hs = ClientHandshake::new(ctx.logins.load_full()).with_certificate(certificate);
    loop {
        let frame = match client.next().await {
            None => return Ok(None),
            Some(Ok(f)) => f,
            Some(Err(FrameDecodeError::Frame(FrameError::Foreign(protocol)))) => {
                refuse_foreign(client, protocol).await;
                return Ok(None);
            }
            Some(Err(FrameDecodeError::Frame(e))) => {
                Metrics::count(
                    &metrics().client_closed,
                    Reason {
                        reason: "protocol_error",
                    },
                );
                client.send(decode_error_frame(&e)).await?;
                return Ok(None);
            }
            Some(Err(FrameDecodeError::Io(e))) => return Err(e),
        };
        metrics().request(
            frame.opcode(),
            frame.body.len() + crate::frame::header::HEADER_LEN,
        );
        let mut step = hs.on_frame(&frame);
        if let Step::Verify(creds) = step {
            step = login::verify(ctx, &mut hs, source, &creds).await;
        }
        match step {
            // `verified` never asks for another check.
            Step::Verify(_) => return Ok(None),
            Step::Reply(r) => {
                if is_bad_credentials(&r) {
                    Metrics::count(
                        &metrics().client_handshakes,
                        Outcome {
                            result: "bad_credentials",
                        },
                    );
                }
                client.send(r).await?
            }
            Step::Close(r) => {
                // A failed login closes too (one try per connection): count it as what it is.
                let result = if is_bad_credentials(&r) {
                    if matches!(hs.logins().auth, ClientAuth::Certificate(_))
                        && worth_logging("certificate")
                    {
                        let why = messages::ErrorInfo::parse(&r.body).map(|e| e.message);
                        tracing::warn!(reason = ?why.unwrap_or_default(), "client certificate refused");
                    }
                    "bad_credentials"
                } else {
                    "protocol_error"
                };
                Metrics::count(&metrics().client_handshakes, Outcome { result });
                client.send(r).await?;
                return Ok(None);
            }
            Step::Connect(accepted) => {
                let connected = match &ctx.pool {
                    // A warm pool answers at once: no upstream round trip before READY.
                    Some(shared) => {
                        // An identity with a role of its own gets its own pool.
                        let own = match (&ctx.identity_pools, &accepted.user) {
                            (Some(ip), Some(user)) => match Box::pin(ip.pool_for(user)).await {
                                None if ip.denies_unmapped() => {
                                    refuse_unmapped(client, &accepted, user).await?;
                                    return Ok(None);
                                }
                                own => own,
                            },
                            // No identity at all is unmapped too (configuration refuses
                            // --identity-roles without client authentication; this is the
                            // backstop).
                            (Some(ip), None) if ip.denies_unmapped() => {
                                refuse_unmapped(client, &accepted, "").await?;
                                return Ok(None);
                            }
                            _ => None,
                        };
                        let pool = own.unwrap_or_else(|| shared.clone());
                        pool.group(accepted.version, None)
                            .await
                            .map(|g| Upstream::Pooled(pool, g))
                    }
                    None => ctx
                        .upstream
                        .connect(accepted.version, accepted.compression)
                        .await
                        .map(|c| Upstream::Dedicated(Box::new(c)))
                        .map_err(Arc::new),
                };
                return match connected {
                    Ok(up) => {
                        Metrics::count(&metrics().client_handshakes, Outcome { result: "ok" });
                        client.send(accepted.success.clone()).await?;
                        Ok(Some((accepted, up)))
                    }
                    Err(e) => {
                        Metrics::count(
                            &metrics().client_handshakes,
                            Outcome {
                                result: "upstream_error",
                            },
                        );
                        tracing::warn!(error = %e, "upstream connection failed");
                        let reply = e.reply().frame(accepted.version, accepted.success.stream());
                        client.send(reply).await?;
                        Ok(None)
                    }
                };
            }
        }
    }
}

/// The client socket after its handshake: frames in, and a queue to its writer task.
struct ClientIo {
    frames: FramedRead<ClientReader, FrameCodec>,
    tx: mpsc::Sender<Frame>,
    writer: JoinHandle<std::io::Result<()>>,
}

/// The client socket's halves after the handshake, keeping bytes already read.
fn split_client(
    client: ClientFramed,
    max_frame_len: usize,
) -> (FramedRead<ClientReader, FrameCodec>, ClientWriter) {
    let parts = client.into_parts();
    let (read, write) = parts.io.split();
    let mut frames = FramedRead::with_capacity(read, FrameCodec::new(max_frame_len), CLIENT_BUFFER);
    frames.read_buffer_mut().extend_from_slice(&parts.read_buf);
    (frames, write)
}

/// The next client frame from `frames`; `None` when the session should end, with the frame
/// that tells the client why, if any.
async fn next_client_frame(
    frames: &mut FramedRead<ClientReader, FrameCodec>,
) -> Result<Frame, Option<Frame>> {
    client_frame(frames.next().await)
}

/// As `next_client_frame` for a frame the read buffer already holds whole; `None` otherwise.
fn buffered_client_frame(
    frames: &mut FramedRead<ClientReader, FrameCodec>,
) -> Option<Result<Frame, Option<Frame>>> {
    crate::frame::codec::next_buffered(frames).map(|next| client_frame(Some(next)))
}

fn client_frame(next: Option<Result<Frame, FrameDecodeError>>) -> Result<Frame, Option<Frame>> {
    match next {
        None => Err(None),
        Some(Ok(f)) => {
            metrics().request(f.opcode(), f.body.len() + crate::frame::header::HEADER_LEN);
            Ok(f)
        }
        Some(Err(FrameDecodeError::Frame(e))) => {
            Metrics::count(
                &metrics().client_closed,
                Reason {
                    reason: "protocol_error",
                },
            );
            Err(Some(decode_error_frame(&e)))
        }
        Some(Err(FrameDecodeError::Io(e))) => {
            tracing::debug!(error = %e, "client read failed");
            Err(None)
        }
    }
}

impl ClientIo {
    fn split(client: ClientFramed, max_frame_len: usize) -> ClientIo {
        let (frames, write) = split_client(client, max_frame_len);
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        ClientIo {
            frames,
            tx,
            writer: tokio::spawn(write_frames_counted(
                rx,
                write,
                Some(metrics().client_sent_bytes.clone()),
            )),
        }
    }

    /// The next client frame; `None` when the session should end (after telling the client why,
    /// for frames the decoder refused).
    async fn next(&mut self) -> Option<Frame> {
        match next_client_frame(&mut self.frames).await {
            Ok(f) => Some(f),
            Err(Some(why)) => {
                let _ = self.tx.send(why).await;
                None
            }
            Err(None) => None,
        }
    }

    /// Lets queued replies (an error that explains the close) reach the client, but not forever.
    async fn finish(self) {
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.writer).await;
    }
}
