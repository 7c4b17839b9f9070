//! keyspaces-emulator: a local stand-in for Amazon Keyspaces that behaves as it does on the
//! wire (TLS only, SigV4 or PLAIN auth, v3/v4, its system tables, consistency rules and
//! per-connection rate cap), with fault injection and an event log for tests. Its facts about
//! Keyspaces come from KEYSPACES.md (this directory); what that does not say is marked ASSUMPTION.

pub mod auth;
pub mod connection;
mod delay;
pub mod engine;
pub mod events;
pub mod faults;
pub mod sigv4;
pub mod tls;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use auth::{PlainUser, SigV4Key};
pub use engine::Partitioner;
pub use events::EventLog;
pub use faults::Faults;
pub use wire::Compression;

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("engine setup failed: {0}")]
    Engine(String),
    #[error("event log: {0}")]
    EventLog(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub region: String,
    pub sigv4_keys: Vec<SigV4Key>,
    pub plain_users: Vec<PlainUser>,
    /// Rows in system.peers (9 like the public endpoints, 3 like FIPS ones: KEYSPACES.md,
    /// "Protocol").
    pub peers: usize,
    /// Also accept connections on the peer addresses, so a driver that follows system.peers is
    /// seen (and logged) instead of silently failing to connect.
    pub listen_on_peers: bool,
    pub partitioner: Partitioner,
    /// Enforce Keyspaces' consistency rules.
    pub keyspaces_rules: bool,
    /// Requests per second per connection (0 = unlimited); Keyspaces' is 3,000 (KEYSPACES.md,
    /// "Throughput limits and errors").
    pub rate_limit: u32,
    /// Compression algorithms offered in SUPPORTED (none by default: Keyspaces' support is
    /// unknown, KEYSPACES.md, "Protocol").
    pub compression: Vec<Compression>,
    pub record_events: bool,
    pub event_log: Option<PathBuf>,
    pub max_frame_len: usize,
    /// BENCHMARKS ONLY: accept plaintext instead of TLS (the emulator listens on loopback only;
    /// Keyspaces is TLS-only, KEYSPACES.md, "Endpoints").
    pub insecure_plaintext: bool,
    /// Serve a certificate that expired in 2020 (clients must refuse it).
    pub expired_certificate: bool,
    /// Serve a chain under a stand-in for one of the roots Keyspaces documents (KEYSPACES.md,
    /// "TLS").
    pub root: Option<tls::RootKind>,
    /// Accept SigV4 from access keys it does not know (issued by a test STS), unverified.
    pub accept_unknown_keys: bool,
    /// Close the connection after answering a request body the emulator cannot decode, as
    /// Cassandra's Message.ExceptionHandler does: everything else in flight on it fails.
    pub close_on_protocol_error: bool,
    /// Write each answer on its own, header and body in separate writes (separate TLS
    /// records), as other servers do.
    pub split_answers: bool,
    /// With `split_answers`, how long the connection's thread works between an answer's header
    /// and its body (blocking it, as a single-threaded server's interpreter does).
    pub split_gap: std::time::Duration,
    /// The TLS versions offered (both by default).
    pub tls_versions: tls::TlsVersions,
}

/// Cassandra's default `native_transport_max_frame_size_in_mb` (256; native_protocol_v4.spec
/// §2.5). ASSUMPTION: Keyspaces' frame limit is undocumented.
pub const DEFAULT_MAX_FRAME_LEN: usize = 256 * 1024 * 1024;

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 19142)),
            state_dir: std::env::temp_dir().join("keyspaces-emulator"),
            region: "us-east-1".into(),
            sigv4_keys: Vec::new(),
            plain_users: Vec::new(),
            peers: 9,
            listen_on_peers: true,
            partitioner: Partitioner::Murmur3,
            keyspaces_rules: true,
            rate_limit: 3000,
            compression: Vec::new(),
            record_events: false,
            event_log: None,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            insecure_plaintext: false,
            expired_certificate: false,
            root: None,
            accept_unknown_keys: false,
            close_on_protocol_error: false,
            split_answers: false,
            split_gap: std::time::Duration::ZERO,
            tls_versions: tls::TlsVersions::Both,
        }
    }
}

/// The loopback addresses standing in for Keyspaces' load balancers (KEYSPACES.md, "Protocol"):
/// 127.0.1.1, 127.0.1.2, …
pub fn peer_addresses(n: usize) -> Vec<IpAddr> {
    (1..=n.min(254))
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i as u8)))
        .collect()
}

/// State every connection shares.
pub struct Shared {
    pub config: EmulatorConfig,
    pub engine: engine::Engine,
    pub acceptor: TlsAcceptor,
    pub faults: Arc<Faults>,
    pub events: Arc<EventLog>,
    keys: std::sync::RwLock<Vec<SigV4Key>>,
    next_id: AtomicU64,
    delayer: std::sync::OnceLock<delay::Delayer>,
}

impl Shared {
    /// The SigV4 credentials accepted right now (they can be rotated at run time).
    pub fn sigv4_keys(&self) -> Vec<SigV4Key> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The thread releasing answers held back by injected latency (started on first use).
    pub fn delayer(&self) -> &delay::Delayer {
        self.delayer.get_or_init(delay::Delayer::start)
    }

    fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A running emulator; dropping it stops the listeners.
pub struct Emulator {
    pub addr: SocketAddr,
    pub peer_addrs: Vec<SocketAddr>,
    pub ca_pem: PathBuf,
    pub faults: Arc<Faults>,
    pub events: Arc<EventLog>,
    shared: Arc<Shared>,
    /// One accept loop per address listened on.
    listeners: std::sync::Mutex<Vec<(SocketAddr, JoinHandle<()>)>>,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        for (_, t) in self
            .listeners
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            t.abort();
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let local = tcp.local_addr().unwrap_or(peer);
        tokio::spawn(connection::serve(shared.clone(), tcp, peer, local));
    }
}

impl Emulator {
    /// Replaces the accepted SigV4 credentials (a key rotation); open connections stay.
    pub fn set_credentials(&self, keys: Vec<SigV4Key>) {
        *self.shared.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    }

    /// Stops listening on `addr` (one of the emulator's addresses) and drops the connections
    /// accepted there, as a load balancer taken out of service would: new connections to it
    /// are refused until `reopen_address`.
    pub async fn close_address(&self, addr: SocketAddr) {
        let task = {
            let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
            let at = listeners.iter().position(|(a, _)| *a == addr);
            at.map(|i| listeners.swap_remove(i).1)
        };
        if let Some(task) = task {
            task.abort();
            // Awaited, so that the listening socket is closed when this returns.
            let _ = task.await;
        }
        self.faults.disconnect_local(addr);
    }

    /// Listens on `addr` again after `close_address`.
    pub async fn reopen_address(&self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = TcpListener::bind(addr).await?;
        self.faults.reopen_local(addr);
        let task = tokio::spawn(accept_loop(listener, self.shared.clone()));
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr, task));
        Ok(())
    }

    /// Makes every prepared statement unknown (the next EXECUTE gets UNPREPARED).
    pub fn forget_prepared(&self) {
        self.shared.engine.forget_prepared();
    }

    pub async fn start(config: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| EmulatorError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Bind {
                addr: config.listen,
                source,
            })?;
        let peers = peer_addresses(config.peers);
        let mut tls_ips = vec![addr.ip()];
        tls_ips.extend(peers.iter().copied());
        let names = tls::subject_alt_names(&config.region, &tls_ips);
        let material = match config.root {
            Some(kind) => tls::under_root(&config.state_dir, &names, kind, config.tls_versions)?,
            None => tls::load_or_create(
                &config.state_dir,
                &names,
                config.expired_certificate,
                config.tls_versions,
            )?,
        };
        let topology = engine::Topology {
            region: config.region.clone(),
            partitioner: config.partitioner,
            local_address: addr.ip(),
            peers: peers.clone(),
        };
        let engine = engine::Engine::new(&topology, config.keyspaces_rules)
            .map_err(EmulatorError::Engine)?;
        let events = if config.record_events || config.event_log.is_some() {
            EventLog::new(config.event_log.as_deref()).map_err(EmulatorError::EventLog)?
        } else {
            EventLog::disabled()
        };
        let faults = Arc::new(Faults::default());
        let events = Arc::new(events);
        let listen_on_peers = config.listen_on_peers;
        let shared = Arc::new(Shared {
            keys: std::sync::RwLock::new(config.sigv4_keys.clone()),
            config,
            engine,
            acceptor: TlsAcceptor::from(material.server_config),
            faults: faults.clone(),
            events: events.clone(),
            next_id: AtomicU64::new(0),
            delayer: std::sync::OnceLock::new(),
        });
        let mut listeners = vec![(addr, tokio::spawn(accept_loop(listener, shared.clone())))];
        let mut peer_addrs = Vec::new();
        if listen_on_peers {
            for ip in peers {
                let peer_addr = SocketAddr::new(ip, addr.port());
                match TcpListener::bind(peer_addr).await {
                    Ok(l) => {
                        peer_addrs.push(peer_addr);
                        listeners.push((peer_addr, tokio::spawn(accept_loop(l, shared.clone()))));
                    }
                    Err(e) => {
                        tracing::warn!(%peer_addr, error = %e, "cannot listen on peer address")
                    }
                }
            }
        }
        Ok(Emulator {
            addr,
            peer_addrs,
            ca_pem: material.ca_pem,
            faults,
            events,
            shared,
            listeners: std::sync::Mutex::new(listeners),
        })
    }
}
