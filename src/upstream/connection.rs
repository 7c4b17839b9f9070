//! One authenticated connection to Keyspaces: TCP, TLS, STARTUP and the SigV4 (or PLAIN)
//! exchange. Every connection is signed anew: the server's nonce makes handshakes unreplayable.

use std::net::SocketAddr;
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

use super::peers::Peers;
use crate::auth::credentials::CredentialCache;
use crate::auth::sigv4;
use crate::frame::messages::{self, ErrorInfo};
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Compression, Frame, FrameCodec};
use crate::metrics::{metrics, HandshakeOutcome, Metrics};

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
    /// `host:port` to dial: the name is resolved to every address it offers.
    pub address: String,
    /// Those addresses (and the upstream's peers), which connections spread over.
    pub addresses: Arc<super::addresses::AddressBook>,
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
    /// Which of the endpoint's addresses it reached, counted while the connection lives.
    pub address: super::addresses::AddressLease,
    pub version: ProtocolVersion,
    pub compression: Compression,
}

pub use super::error::UpstreamError;

/// A connection attempt on one address after TCP and TLS: unless it ends in a verdict that
/// is not the address's fault, the address sits out (also when the attempt is dropped).
struct AddressAttempt<'a> {
    book: &'a super::addresses::AddressBook,
    addr: SocketAddr,
    /// When the connection's dial began.
    started: std::time::Instant,
    blamed: bool,
}

impl Drop for AddressAttempt<'_> {
    fn drop(&mut self) {
        if self.blamed {
            self.book
                .dial_failed(self.addr, self.started, std::time::Instant::now());
        }
    }
}

const HANDSHAKE_STREAM: i16 = 0;

/// Addresses tried for one connection before its failure is the caller's.
const MAX_DIALS: usize = 16;

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
        version: ProtocolVersion,
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
                HandshakeOutcome { auth, result },
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
        version: ProtocolVersion,
        compression: Compression,
    ) -> Result<UpstreamConnection, UpstreamError> {
        let started = std::time::Instant::now();
        let (io, addr) = self.dial().await?;
        // Stalling or breaking the CQL handshake is the address's fault as much as refusing
        // TCP: so is being cut off by the connect timeout (this future dropped).
        let mut attempt = AddressAttempt {
            book: &self.addresses,
            addr,
            started,
            blamed: true,
        };
        let result = self.handshake(io, version, compression).await;
        attempt.blamed = result.as_ref().is_err_and(UpstreamError::blames_address);
        drop(attempt);
        let (mut framed, compression) = result?;
        let address = self.addresses.lease(addr);
        // Keyspaces' other load balancers, for the next connections to spread over (SigV4
        // only: behind other servers' proxies — Astra's SNI — peers are not for dialling).
        let now = std::time::Instant::now();
        if matches!(self.auth, UpstreamAuth::SigV4 { .. }) && self.addresses.wants_peers(now) {
            match super::peers::read(&mut framed, version, compression).await {
                Ok(Peers::Listed(peers)) => self.addresses.learned_peers(&peers, addr.ip(), now),
                Ok(Peers::NotListed(e)) => tracing::debug!(error = %e, "cannot read system.peers"),
                Err(e) => {
                    // Dropped at its first question: a failed connect, and the address's fault
                    // (handed on as ready, it would fail whoever it served first).
                    drop(address);
                    self.addresses
                        .dial_failed(addr, started, std::time::Instant::now());
                    return Err(e);
                }
            }
        }
        Ok(UpstreamConnection {
            framed,
            address,
            version,
            compression,
        })
    }

    /// OPTIONS, STARTUP and authentication on a fresh connection; the compression agreed.
    async fn handshake(
        &self,
        io: UpstreamIo,
        version: ProtocolVersion,
        compression: Compression,
    ) -> Result<(UpstreamFramed, Compression), UpstreamError> {
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
        Ok((framed, compression))
    }

    /// TCP, then TLS unless benchmarking, to the endpoint's addresses in turn: an address
    /// that refuses or fails its TLS handshake sits out and the next is tried, so one dead
    /// load balancer costs a connection nothing but the attempt.
    async fn dial(&self) -> Result<(UpstreamIo, SocketAddr), UpstreamError> {
        let mut last = None;
        let known = self.addresses.counts(std::time::Instant::now()).0;
        for _ in 0..known.clamp(1, MAX_DIALS) {
            let addr = self
                .addresses
                .pick()
                .await
                .map_err(|source| UpstreamError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
            if last.as_ref().is_some_and(|(tried, _)| *tried == addr) {
                break; // nothing else to try
            }
            let started = std::time::Instant::now();
            match self.dial_one(addr).await {
                Ok(io) => return Ok((io, addr)),
                Err(e) => {
                    self.addresses
                        .dial_failed(addr, started, std::time::Instant::now());
                    tracing::debug!(%addr, error = %e, "upstream address failed; trying the next");
                    last = Some((addr, e));
                }
            }
        }
        Err(last.map_or_else(
            || UpstreamError::Connect {
                address: self.address.clone(),
                source: std::io::Error::other("no address to dial"),
            },
            |(_, e)| e,
        ))
    }

    /// TCP and TLS to one address, within a quarter of the connect timeout: a silent address
    /// (one that accepts TCP and never answers TLS, too) must not use up the whole of it
    /// while the others wait.
    async fn dial_one(&self, addr: SocketAddr) -> Result<UpstreamIo, UpstreamError> {
        let limit = (self.connect_timeout / 4).max(Duration::from_secs(1));
        match tokio::time::timeout(limit, self.dial_within(addr)).await {
            Ok(dialled) => dialled,
            Err(_) => Err(UpstreamError::Connect {
                address: format!("{} ({addr})", self.address),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no TCP or TLS answer within {limit:?}"),
                ),
            }),
        }
    }

    async fn dial_within(&self, addr: SocketAddr) -> Result<UpstreamIo, UpstreamError> {
        let named = || format!("{} ({addr})", self.address);
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| UpstreamError::Connect {
                address: named(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if self.insecure_plaintext {
            return Ok(UpstreamIo::Plain(tcp));
        }
        let tls_started = std::time::Instant::now();
        let tls = TlsConnector::from(self.tls.clone())
            .connect(
                self.server_name.clone(),
                BufReader::with_capacity(TLS_READ_BUFFER, tcp),
            )
            .await
            .map_err(|source| UpstreamError::Tls {
                address: named(),
                source,
            })?;
        metrics()
            .tls_handshake_duration
            .observe(tls_started.elapsed().as_secs_f64());
        Ok(UpstreamIo::Tls(Box::new(tls)))
    }

    async fn authenticate(
        &self,
        framed: &mut UpstreamFramed,
        version: ProtocolVersion,
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
