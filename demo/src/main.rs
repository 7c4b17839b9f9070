//! keyspaces-demo: keyspaces-proxy in front of the Keyspaces emulator, in one process, so a
//! newcomer sees a real driver go through the proxy (TLS, SigV4, the pool) without an AWS
//! account or a second terminal. Everything stays on loopback and in memory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keyspaces_emulator::{Emulator, EmulatorConfig, SigV4Key};
use keyspaces_proxy::app::{self, Listening};
use keyspaces_proxy::config::{Cli, LogFormat};

/// The emulator's throwaway identity; the proxy finds it through the AWS chain like any other.
const DEMO_ACCESS_KEY: &str = "AKIDKEYSPACESDEMO";
const DEMO_SECRET: &str = "keyspaces-demo-secret";
const REGION: &str = "us-east-1";

/// See keyspaces-proxy work without AWS: the proxy in front of a local Keyspaces emulator.
#[derive(Debug, Parser)]
#[command(name = "keyspaces-demo", version, about)]
struct Args {
    /// Where CQL clients connect (loopback only).
    #[arg(long, default_value = "127.0.0.1:9042")]
    listen: SocketAddr,
    /// The proxy's /metrics, /livez and /readyz (loopback only).
    #[arg(long, default_value = "127.0.0.1:9464")]
    metrics_listen: SocketAddr,
    /// Directory for the emulator's CA and certificate (default: a new temporary directory,
    /// removed on exit).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// Points the AWS chain at the demo's identity alone: no profile, no instance metadata, and no
/// `KEYSPACES_PROXY_*` setting from the caller's environment can change what the demo runs.
/// Runs before any thread starts (the environment is process-wide).
fn pin_environment(aws_file: &std::path::Path) {
    let inherited: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            k.starts_with("KEYSPACES_PROXY_") || k.starts_with("AWS_")
        })
        .collect();
    for k in inherited {
        std::env::remove_var(k);
    }
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", DEMO_ACCESS_KEY);
    std::env::set_var("AWS_SECRET_ACCESS_KEY", DEMO_SECRET);
    std::env::set_var("AWS_CONFIG_FILE", aws_file);
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", aws_file);
}

/// A new directory only this user can read (it holds the emulator's CA key), never one that
/// already exists: it is removed on exit, with everything in it.
fn private_temp_dir() -> std::io::Result<PathBuf> {
    let base = std::env::temp_dir();
    let mut attempt = 0u32;
    loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "keyspaces-demo-{}-{nanos:08x}-{attempt}",
            std::process::id()
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1
            }
            Err(e) => return Err(e),
        }
    }
}

fn next_steps(l: Listening) -> String {
    let host = l.clients.ip();
    let port = l.clients.port();
    format!(
        r#"
keyspaces-demo: keyspaces-proxy listens on {clients}, in front of a local Keyspaces emulator
(TLS, SigV4, Keyspaces' system tables and rules; no AWS account; data in memory only).

Try it (pip install cqlsh cassandra-driver; cqlsh's "built against 5.0.0" warning is harmless):

  cqlsh {host} {port} -e "SELECT cluster_name, release_version, data_center FROM system.local"

  cqlsh {host} {port}
    CONSISTENCY LOCAL_QUORUM;
    CREATE KEYSPACE demo WITH replication = {{'class': 'SingleRegionStrategy'}};
    CREATE TABLE demo.kv (k text PRIMARY KEY, v text);
    INSERT INTO demo.kv (k, v) VALUES ('hello', 'keyspaces');
    SELECT * FROM demo.kv;

  python3 -c '
from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster, ExecutionProfile, EXEC_PROFILE_DEFAULT
profile = ExecutionProfile(consistency_level=ConsistencyLevel.LOCAL_QUORUM)
cluster = Cluster(["{host}"], port={port}, execution_profiles={{EXEC_PROFILE_DEFAULT: profile}})
print(cluster.connect().execute("SELECT cluster_name, release_version FROM system.local").one())
cluster.shutdown()'

  curl -s http://{metrics}/metrics | grep keyspaces_proxy_requests_total

Ctrl-C stops the demo. Against Amazon Keyspaces: keyspaces-proxy --region {REGION}
"#,
        clients = l.clients,
        metrics = l.metrics,
    )
}

async fn serve(args: Args, state_dir: PathBuf) -> Result<(), String> {
    let emulator = Emulator::start(EmulatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        state_dir,
        region: REGION.into(),
        sigv4_keys: vec![SigV4Key {
            access_key_id: DEMO_ACCESS_KEY.into(),
            secret_access_key: DEMO_SECRET.into(),
            session_token: None,
        }],
        listen_on_peers: false,
        ..EmulatorConfig::default()
    })
    .await
    .map_err(|e| format!("the emulator did not start: {e}"))?;
    let argv: Vec<std::ffi::OsString> = [
        "keyspaces-proxy".to_owned(),
        format!("--region={REGION}"),
        format!("--endpoint={}", emulator.addr),
        format!("--tls-server-name=cassandra.{REGION}.amazonaws.com"),
        format!("--ca-file={}", emulator.ca_pem.display()),
        format!("--listen={}", args.listen),
        format!("--metrics-listen={}", args.metrics_listen),
    ]
    .into_iter()
    .map(Into::into)
    .collect();
    let cli = Cli::parse_with_config(argv.clone()).map_err(|e| e.to_string())?;
    // SIGHUP re-reads the demo's own proxy command line, never the demo's.
    app::run(cli, argv, |l| {
        // A closed stdout (`keyspaces-demo | head`) must not end the demo.
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "{}", next_steps(l));
    })
    .await
    .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    for (flag, addr) in [
        ("--listen", args.listen),
        ("--metrics-listen", args.metrics_listen),
    ] {
        if !addr.ip().is_loopback() {
            eprintln!("keyspaces-demo: {flag} {addr} is not a loopback address; the demo stays on this machine");
            return ExitCode::from(2);
        }
    }
    let (state_dir, temporary) = match &args.state_dir {
        Some(d) => match std::fs::create_dir_all(d) {
            Ok(()) => (d.clone(), false),
            Err(e) => {
                eprintln!("keyspaces-demo: cannot create {}: {e}", d.display());
                return ExitCode::FAILURE;
            }
        },
        None => match private_temp_dir() {
            Ok(d) => (d, true),
            Err(e) => {
                eprintln!("keyspaces-demo: cannot create a temporary directory: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let aws_file = state_dir.join("aws-empty");
    if let Err(e) = std::fs::write(&aws_file, "") {
        eprintln!("keyspaces-demo: cannot write {}: {e}", aws_file.display());
        return ExitCode::FAILURE;
    }
    pin_environment(&aws_file);
    app::init_logging(LogFormat::Text);
    let result = match keyspaces_proxy::runtime::build(0) {
        Ok(runtime) => runtime.block_on(serve(args, state_dir.clone())),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&state_dir);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
