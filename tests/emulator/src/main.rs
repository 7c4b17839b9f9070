use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keyspaces_emulator::{Compression, Emulator, EmulatorConfig, Partitioner, PlainUser, SigV4Key};

/// A local, Keyspaces-faithful CQL endpoint for tests, benchmarks and trying keyspaces-proxy
/// without an AWS account.
#[derive(Debug, Parser)]
#[command(name = "keyspaces-emulator", version, about)]
struct Cli {
    /// TLS listen address (loopback only).
    #[arg(long, default_value = "127.0.0.1:19142")]
    listen: SocketAddr,
    /// Directory for the generated CA (ca.pem) and server certificate; reused across runs.
    #[arg(long, default_value = "target/keyspaces-emulator")]
    state_dir: PathBuf,
    /// Region: signing scope, data_center and rack.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Accepted SigV4 credentials AKID:SECRET[:SESSION_TOKEN] (repeatable).
    #[arg(long = "credential")]
    credentials: Vec<SigV4Key>,
    /// Accepted service-specific credentials USER:PASSWORD (repeatable).
    #[arg(long = "plain-user")]
    plain_users: Vec<PlainUser>,
    /// Rows in system.peers.
    #[arg(long, default_value_t = 9)]
    peers: usize,
    // 9 peers on public endpoints, 3 on FIPS ones: KEYSPACES.md, "Protocol".
    /// Behave like a FIPS endpoint (3 peers).
    #[arg(long)]
    fips: bool,
    /// Do not listen on the peer addresses.
    #[arg(long)]
    no_peer_listeners: bool,
    #[arg(long, value_enum, default_value = "murmur3")]
    partitioner: Partitioner,
    // KEYSPACES.md, "Protocol".
    /// Accept every consistency level (Keyspaces allows only LOCAL_QUORUM writes).
    #[arg(long)]
    no_keyspaces_rules: bool,
    // 3,000: KEYSPACES.md, "Throughput limits and errors".
    /// Requests per second per connection; 0 = unlimited.
    #[arg(long, default_value_t = 3000)]
    rate_limit: u32,
    /// Compression algorithms to offer: lz4, snappy (comma separated).
    #[arg(long, value_delimiter = ',')]
    compression: Vec<String>,
    /// Write JSON-lines events (connections, auth attempts, queries) here.
    #[arg(long)]
    event_log: Option<PathBuf>,
    // TLS-only: KEYSPACES.md, "Endpoints".
    /// BENCHMARKS ONLY: speak plaintext instead of TLS (Keyspaces itself is TLS-only).
    #[arg(long)]
    insecure_plaintext_for_benchmarks: bool,
    /// Fault: milliseconds added to every request.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Microseconds added to every request (with --latency-ms, the two add up): a server that
    /// answers in 400 µs, not the emulator's few.
    #[arg(long, default_value_t = 0)]
    latency_us: u64,
    /// Write each answer on its own, header and body in separate writes (separate TLS
    /// records), instead of batching queued answers into one write.
    #[arg(long)]
    split_answers: bool,
    /// With --split-answers: microseconds the connection's thread works between an answer's
    /// header and its body (a single-threaded server between two writes).
    #[arg(long, default_value_t = 0)]
    split_gap_us: u64,
    /// TLS versions offered: 1.2, 1.3 or both.
    #[arg(long, default_value = "both")]
    tls_versions: keyspaces_emulator::tls::TlsVersions,
    /// Fault: close each connection at its Nth request.
    #[arg(long, default_value_t = 0)]
    close_after: u64,
    /// Fault: from its Nth request on, a connection sends half an answer, then closes.
    #[arg(long, default_value_t = 0)]
    cut_response_at: u64,
    /// Fault: serve a server certificate that expired in 2020.
    #[arg(long)]
    expired_certificate: bool,
    // The roots: KEYSPACES.md, "TLS".
    /// Serve the certificate through an intermediate under a stand-in for a root Keyspaces
    /// documents (amazon-root-ca-1..4, starfield-class-2); the root is written to the state
    /// directory as root-<kind>.pem and reported as the CA.
    #[arg(long, value_parser = parse_root)]
    root: Option<keyspaces_emulator::tls::RootKind>,
    /// TESTS: accept SigV4 from unknown access keys (issued by a local STS such as moto's)
    /// without checking the signature; they are logged by key id.
    #[arg(long)]
    accept_unknown_keys: bool,
    // As Cassandra's Message.ExceptionHandler does after a ProtocolException.
    /// Close a connection after answering a request body it cannot decode, as Cassandra
    /// does (every other request in flight on it fails).
    #[arg(long)]
    close_on_protocol_error: bool,
    /// Fault: accept and immediately close every connection.
    #[arg(long)]
    refuse_connections: bool,
    /// Fault: reject every authentication.
    #[arg(long)]
    fail_auth: bool,
    /// Fault: milliseconds before answering STARTUP.
    #[arg(long, default_value_t = 0)]
    handshake_delay_ms: u64,
    /// Runtime worker threads (0 = one per core). The engine runs every statement under one
    /// lock, so a second thread adds no engine throughput, only contention on that lock: the
    /// benchmarks use 1 (see benches/compare.sh).
    #[arg(long, default_value_t = 0)]
    worker_threads: usize,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() {
        eprintln!(
            "keyspaces-emulator: refusing to listen on non-loopback address {}",
            cli.listen
        );
        return ExitCode::FAILURE;
    }
    let mut compression = Vec::new();
    for c in &cli.compression {
        match c.parse::<Compression>() {
            Ok(Compression::None) => {}
            Ok(a) => compression.push(a),
            Err(e) => {
                eprintln!("keyspaces-emulator: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let config = EmulatorConfig {
        listen: cli.listen,
        state_dir: cli.state_dir,
        // The signing region is the plain region name, lowercase (KEYSPACES.md, "Endpoints").
        region: cli.region.to_ascii_lowercase(),
        sigv4_keys: cli.credentials,
        plain_users: cli.plain_users,
        peers: if cli.fips { 3 } else { cli.peers },
        listen_on_peers: !cli.no_peer_listeners,
        partitioner: cli.partitioner,
        keyspaces_rules: !cli.no_keyspaces_rules,
        rate_limit: cli.rate_limit,
        compression,
        record_events: cli.event_log.is_some(),
        event_log: cli.event_log,
        insecure_plaintext: cli.insecure_plaintext_for_benchmarks,
        expired_certificate: cli.expired_certificate,
        root: cli.root,
        accept_unknown_keys: cli.accept_unknown_keys,
        close_on_protocol_error: cli.close_on_protocol_error,
        split_answers: cli.split_answers,
        split_gap: std::time::Duration::from_micros(cli.split_gap_us),
        tls_versions: cli.tls_versions,
        ..EmulatorConfig::default()
    };
    // One thread: a current-thread runtime, without the work-stealing a single worker would
    // only pay for.
    let mut runtime = match cli.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b
        }
    };
    let runtime = match runtime.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyspaces-emulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let emulator = match Emulator::start(config).await {
            Ok(e) => e,
            Err(e) => {
                eprintln!("keyspaces-emulator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let f = &emulator.faults;
        f.set_latency(
            std::time::Duration::from_millis(cli.latency_ms)
                + std::time::Duration::from_micros(cli.latency_us),
        );
        f.set_close_after(cli.close_after);
        f.set_cut_response_at(cli.cut_response_at);
        f.set_refuse_connections(cli.refuse_connections);
        f.set_fail_auth(cli.fail_auth);
        f.set_handshake_delay(std::time::Duration::from_millis(cli.handshake_delay_ms));
        // One machine-readable line so scripts know where to connect and what to trust.
        println!(
            "{}",
            serde_json::json!({
                "listen": emulator.addr.to_string(),
                "ca": emulator.ca_pem.display().to_string(),
                "peers": emulator.peer_addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            })
        );
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}

fn parse_root(s: &str) -> Result<keyspaces_emulator::tls::RootKind, String> {
    keyspaces_emulator::tls::RootKind::parse(s).ok_or_else(|| {
        "expected amazon-root-ca-1, amazon-root-ca-2, amazon-root-ca-3, amazon-root-ca-4 or starfield-class-2".to_owned()
    })
}
