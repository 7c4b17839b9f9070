//! Shared harness for the Rust integration tests: an in-process emulator, an in-process proxy,
//! and a minimal CQL client that speaks frames through its own codec (`cql.rs`), not the proxy's.
#![allow(dead_code)]

pub mod cql;
pub mod hostile;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use cql::{Codec, Frame};
use futures_util::{SinkExt, StreamExt};
use keyspaces_emulator::{Emulator, EmulatorConfig, PlainUser, SigV4Key};
use keyspaces_proxy::auth::client::ClientAuth;
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::context::ProxyContext;
use keyspaces_proxy::upstream::pool::{Pool, PoolSettings};
use keyspaces_proxy::upstream::tls::{client_config, server_name};
use keyspaces_proxy::upstream::{UpstreamAuth, UpstreamTarget};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

pub const AKID: &str = "AKIDEMULATOR";
pub const SECRET: &str = "emulator-secret";
pub const REGION: &str = "us-east-1";

pub async fn emulator(dir: &Path, tweak: impl FnOnce(&mut EmulatorConfig)) -> Emulator {
    let mut cfg = EmulatorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: dir.to_path_buf(),
        sigv4_keys: vec![SigV4Key {
            access_key_id: AKID.into(),
            secret_access_key: SECRET.into(),
            session_token: None,
        }],
        plain_users: vec![PlainUser {
            user: "svc".into(),
            password: "svc-pw".into(),
        }],
        listen_on_peers: false,
        record_events: true,
        rate_limit: 0,
        ..EmulatorConfig::default()
    };
    tweak(&mut cfg);
    Emulator::start(cfg).await.expect("emulator starts")
}

pub fn sigv4(secret: &str) -> UpstreamAuth {
    UpstreamAuth::SigV4 {
        credentials: CredentialCache::fixed(Credentials::new(AKID, secret, None, None, "test")),
        region: REGION.into(),
    }
}

pub struct ProxyOptions {
    pub auth: UpstreamAuth,
    pub ca: std::path::PathBuf,
    pub server_name: String,
    pub client_auth: ClientAuth,
    /// `None`: dedicated mode (one upstream connection per client).
    pub pool: Option<PoolSettings>,
    pub consistency_guard: bool,
    pub max_frame_len: usize,
    pub handshake_timeout: Duration,
    pub max_client_in_flight: usize,
    pub max_client_buffer: usize,
    pub max_connections: usize,
    pub max_handshaking: usize,
    pub login_failures_per_minute: u32,
    /// Dial this instead of the emulator (a fake upstream).
    pub endpoint: Option<String>,
    pub session_ttl: Duration,
    pub client_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
}

impl ProxyOptions {
    pub fn for_emulator(emu: &Emulator) -> Self {
        ProxyOptions {
            auth: sigv4(SECRET),
            ca: emu.ca_pem.clone(),
            server_name: format!("cassandra.{REGION}.amazonaws.com"),
            client_auth: ClientAuth::None,
            pool: Some(PoolSettings::default()),
            consistency_guard: false,
            max_frame_len: 1 << 24,
            handshake_timeout: Duration::from_secs(5),
            max_client_in_flight: 4096,
            max_client_buffer: 64 << 20,
            max_connections: 1000,
            max_handshaking: 1000,
            login_failures_per_minute: 1000,
            endpoint: None,
            session_ttl: Duration::from_secs(1800),
            client_tls: None,
        }
    }

    pub fn dedicated(mut self) -> Self {
        self.pool = None;
        self
    }
}

/// A pool of one to two connections with a short request timeout, for fault tests that count
/// connections and want answers soon.
pub fn small_pool() -> PoolSettings {
    PoolSettings {
        min_connections: 1,
        max_connections: 2,
        max_rate_per_connection: 0,
        request_timeout: Duration::from_millis(400),
        ..PoolSettings::default()
    }
}

/// Starts a proxy in this runtime in front of `emu`; returns its address.
pub async fn proxy(emu: &Emulator, opts: ProxyOptions) -> SocketAddr {
    proxy_with_pool(emu, opts).await.0
}

/// Starts a proxy and also returns its pool (pooled mode) for white-box assertions.
pub async fn proxy_with_pool(
    emu: &Emulator,
    opts: ProxyOptions,
) -> (SocketAddr, Option<Arc<Pool>>) {
    let max_connections = opts.max_connections;
    let ctx = context(emu, opts);
    let pool = ctx.pool.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keyspaces_proxy::server::serve(
        listener,
        Arc::new(ctx),
        max_connections,
        Duration::from_secs(5),
    ));
    (addr, pool)
}

/// What a proxy in front of `emu` shares between its sessions.
pub fn context(emu: &Emulator, opts: ProxyOptions) -> ProxyContext {
    let address = opts.endpoint.unwrap_or_else(|| emu.addr.to_string());
    let upstream = UpstreamTarget {
        addresses: Arc::new(keyspaces_proxy::upstream::addresses::AddressBook::new(
            &address,
        )),
        address,
        server_name: server_name(&opts.server_name).unwrap(),
        tls: client_config(Some(&opts.ca)).unwrap(),
        insecure_plaintext: false,
        auth: opts.auth,
        connect_timeout: Duration::from_secs(5),
        max_frame_len: 1 << 24,
    };
    let pool = opts.pool.map(|s| Pool::new(upstream.clone(), s));
    ProxyContext {
        upstream,
        pool: pool.clone(),
        consistency_guard: opts.consistency_guard,
        shutdown: keyspaces_proxy::shutdown::Shutdown::new(),
        last_read: Default::default(),
        logins: arc_swap::ArcSwap::from_pointee(keyspaces_proxy::auth::client::Logins::new(
            opts.client_auth,
            keyspaces_proxy::auth::sessions::SessionCache::new(opts.session_ttl, 1000),
        )),
        advertise_address: None,
        host_id_seed: String::new(),
        max_frame_len: opts.max_frame_len,
        handshake_timeout: opts.handshake_timeout,
        max_client_in_flight: opts.max_client_in_flight,
        client_buffers: keyspaces_proxy::upstream::streams::ClientBuffers::new(
            opts.max_client_buffer,
            usize::MAX / 2,
        ),
        handshaking: keyspaces_proxy::session::admission::HandshakeSlots::new(
            opts.max_handshaking,
            opts.max_handshaking,
        ),
        login_failures: std::sync::Arc::new(keyspaces_proxy::auth::attempts::LoginFailures::new(
            keyspaces_proxy::auth::attempts::Budget::per_minute(opts.login_failures_per_minute),
            keyspaces_proxy::auth::attempts::Budget::per_minute(opts.login_failures_per_minute),
        )),
        identity_pools: None,
        client_tls: arc_swap::ArcSwapOption::new(opts.client_tls),
    }
}

/// The error in `f`, which must be an ERROR frame.
pub fn error_of(f: &Frame) -> cql::messages::ErrorInfo {
    use cql::opcode;
    assert_eq!(
        f.opcode(),
        opcode::ERROR,
        "expected an ERROR, got {}",
        opcode::name(f.opcode())
    );
    cql::messages::ErrorInfo::parse(&f.body).unwrap()
}

pub type DirectTls = Framed<tokio_rustls::client::TlsStream<TcpStream>, Codec>;

/// A direct TLS + SigV4 connection to the emulator, as a driver with the official plugin makes
/// (the proxy's signer stands in for the plugin's; the frames are the test client's own).
pub async fn direct_tls(emu: &Emulator) -> DirectTls {
    use cql::{messages, opcode};
    use keyspaces_proxy::auth::sigv4 as signer;
    let tcp = TcpStream::connect(emu.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(&emu.ca_pem)).unwrap());
    let name = server_name(&format!("cassandra.{REGION}.amazonaws.com")).unwrap();
    let mut c = Framed::new(
        connector.connect(name, tcp).await.unwrap(),
        Codec::default(),
    );
    let mut call = async |f: Frame| {
        c.send(f).await.unwrap();
        c.next().await.unwrap().unwrap()
    };
    let a = call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")])).await;
    assert_eq!(a.opcode(), opcode::AUTHENTICATE);
    let challenge = call(messages::auth_response(4, 0, signer::INITIAL_RESPONSE)).await;
    let token = messages::parse_auth_token(&challenge.body)
        .unwrap()
        .to_vec();
    let response = signer::signed_response(&signer::SigningParams {
        access_key_id: AKID,
        secret_access_key: SECRET,
        session_token: None,
        region: REGION,
        nonce: signer::parse_challenge(&token).unwrap(),
        time: std::time::SystemTime::now(),
    });
    let ok = call(messages::auth_response(4, 0, response.as_bytes())).await;
    assert_eq!(ok.opcode(), opcode::AUTH_SUCCESS, "{ok:?}");
    c
}

/// The test client: frames through `cql::Codec`, never the proxy's codec.
pub struct Client {
    framed: Framed<TcpStream, Codec>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let tcp = TcpStream::connect(addr).await.unwrap();
        Client {
            framed: Framed::new(tcp, Codec::default()),
        }
    }

    /// Connected and past STARTUP (no authentication).
    pub async fn ready(addr: SocketAddr) -> Client {
        use cql::{messages, opcode};
        let mut c = Client::connect(addr).await;
        let r = c
            .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        let why = messages::ErrorInfo::parse(&r.body);
        assert_eq!(r.opcode(), opcode::READY, "{why:?}");
        c
    }

    pub fn from_stream(tcp: TcpStream) -> Client {
        Client {
            framed: Framed::new(tcp, Codec::default()),
        }
    }

    pub fn into_framed(self) -> Framed<TcpStream, Codec> {
        self.framed
    }

    /// Drops the connection with a TCP reset instead of a FIN.
    #[allow(deprecated)]
    pub fn reset(self) {
        let _ = self.framed.get_ref().set_linger(Some(Duration::ZERO));
        drop(self);
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.framed.get_mut().write_all(bytes).await.unwrap();
    }

    pub fn framed_mut(&mut self) -> &mut Framed<TcpStream, Codec> {
        &mut self.framed
    }

    pub async fn send(&mut self, f: Frame) {
        self.framed.send(f).await.unwrap();
    }

    /// The next frame, or `None` if the connection closed.
    pub async fn recv(&mut self) -> Option<Frame> {
        match tokio::time::timeout(Duration::from_secs(10), self.framed.next()).await {
            Ok(Some(Ok(f))) => Some(f),
            Ok(_) => None,
            Err(_) => panic!("no reply within 10 s"),
        }
    }

    /// Runs one CQL statement and asserts it succeeded.
    pub async fn run_ok(&mut self, cql: &str) -> Frame {
        use cql::messages::{self, ErrorInfo};
        use cql::{consistency, opcode};
        let r = self
            .call(messages::query(4, 1, cql, consistency::LOCAL_QUORUM))
            .await;
        assert_eq!(
            r.opcode(),
            opcode::RESULT,
            "{cql}: {:?}",
            ErrorInfo::parse(&r.body)
        );
        r
    }

    pub async fn call(&mut self, f: Frame) -> Frame {
        self.send(f).await;
        self.recv().await.expect("a reply")
    }
}

/// Polls `done` (state, not a clock) for up to a minute: a limit for a hang, not a speed.
pub async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
