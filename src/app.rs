//! Running the proxy as a process: resolve the configuration, bind, say where it listens and
//! whether the upstream is usable, serve until a signal. The `keyspaces-proxy` binary and the
//! demo (which runs it beside the emulator) share it.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::admin::AdminState;
use crate::config::{Cli, ConfigError, LogFormat};
use crate::context::ProxyContext;
use crate::frame::ProtocolVersion;
use crate::shutdown::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("--listen and --metrics-listen are both {0}: give each its own port")]
    SameAddress(SocketAddr),
    #[error("cannot listen on {addr} ({flag}): {reason}")]
    Bind {
        addr: SocketAddr,
        flag: &'static str,
        reason: String,
    },
}

impl StartError {
    /// The process's exit status: 2 for a configuration that cannot work (restarting will
    /// not help: systemd's RestartPreventExitStatus=2), 1 for the rest.
    pub fn exit_status(&self) -> u8 {
        match self {
            StartError::Config(_) | StartError::SameAddress(_) => 2,
            StartError::Bind { .. } => 1,
        }
    }
}

/// Where the proxy accepts connections, once it does.
#[derive(Debug, Clone, Copy)]
pub struct Listening {
    pub clients: SocketAddr,
    pub metrics: SocketAddr,
}

/// Colour only for a person at a terminal: escape codes in a file or the journal are noise,
/// and `NO_COLOR` (no-color.org) turns them off everywhere.
fn use_colour() -> bool {
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

/// `info`, less the SDK's warning per failed instance-metadata region lookup: it repeats a
/// page of debug output for what the proxy's own error says in one line. `RUST_LOG` overrides.
const DEFAULT_LOG_FILTER: &str = "info,aws_config::imds::region=error";

/// Never shown, whatever `RUST_LOG` asks (a layer filter, which no directive can widen): the
/// SDK's warning about a credentials file that is not UTF-8 prints the whole file, secret key
/// included, as a byte array; the profile parser traces what it read; a failing
/// `credential_process` has its stderr quoted by the chain's warning. The proxy's own errors
/// ("credential reload failed", "no credentials found in chain") say what went wrong.
const SILENCED_TARGETS: [&str; 4] = [
    "aws_runtime::env_config",
    "aws_config::profile",
    "aws_config::credential_process",
    "aws_config::meta::credentials",
];

fn not_silenced(meta: &tracing::Metadata<'_>) -> bool {
    !SILENCED_TARGETS
        .iter()
        .any(|t| meta.target().starts_with(t))
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // No report of a failed log write: tracing-subscriber would `eprintln!` it, which panics
    // on a closed stderr (a log shipper that went away) and takes down whichever task was
    // logging, the signal handler and client sessions included.
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(use_colour())
        .log_internal_errors(false)
        .with_writer(std::io::stderr);
    let keep = tracing_subscriber::filter::filter_fn(not_silenced);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(layer.with_filter(keep)).init(),
        LogFormat::Json => registry.with(layer.json().with_filter(keep)).init(),
    }
}

/// A bind failure that names the address, the flag that sets it and what to do.
fn bind_error(addr: SocketAddr, flag: &'static str, e: &std::io::Error) -> StartError {
    use std::io::ErrorKind;
    let reason = match e.kind() {
        ErrorKind::AddrInUse => format!(
            "the address is already in use (another keyspaces-proxy, or Cassandra?); stop that \
             process or choose another address with {flag}"
        ),
        ErrorKind::PermissionDenied => {
            format!(
                "permission denied (ports below 1024 need privileges); choose another with {flag}"
            )
        }
        ErrorKind::AddrNotAvailable => {
            format!("this machine has no such address; choose another with {flag}")
        }
        _ => e.to_string(),
    };
    StartError::Bind { addr, flag, reason }
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(addr, flag, &e))
}

/// First SIGTERM/SIGINT: drain. Second: exit at once. The handlers are installed before this
/// returns, not when the task first runs: a signal sent right after "listening" is logged must
/// drain, not kill.
#[cfg(unix)]
fn watch_stop_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot handle SIGTERM/SIGINT: they will stop the proxy without draining");
            return;
        }
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        shutdown.begin();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

#[cfg(not(unix))]
fn watch_stop_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        shutdown.begin();
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}

/// Raises the open-file soft limit to the hard one, and says so: every client is a descriptor,
/// and a soft limit of 1,024 (a common default) would stop a shared proxy near a thousand
/// clients with EMFILE on accept.
fn raise_open_file_limit(max_connections: usize) {
    let (soft, hard) = match rlimit::Resource::NOFILE.get() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the open-file limit");
            return;
        }
    };
    let now = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            soft
        }
    };
    tracing::info!(was = soft, soft = now, hard, "open-file limit");
    if now < u64::try_from(max_connections).unwrap_or(u64::MAX) {
        tracing::warn!(
            limit = now,
            max_connections,
            "the open-file limit is below --max-connections: clients beyond it are refused \
             (closed at once); raise the hard limit (LimitNOFILE=, ulimit -Hn)"
        );
    }
}

/// Opens the pool's first connections now, so the first client's STARTUP needs no upstream
/// round trip, and says in the log whether the upstream is usable, and why not: "listening"
/// alone says nothing about Keyspaces.
fn warm_upstream(ctx: &ProxyContext) {
    let address = ctx.upstream.address.clone();
    let Some(pool) = ctx.pool.clone() else {
        tracing::info!(
            upstream = %address,
            "dedicated mode: each client gets its own upstream connection when it connects \
             (`keyspaces-proxy check` tests the path now)"
        );
        return;
    };
    tokio::spawn(async move {
        match pool.group(ProtocolVersion::V4, None).await {
            Ok(group) => tracing::info!(
                upstream = %address,
                connections = group.ready_count(),
                "upstream usable: authenticated to Keyspaces"
            ),
            Err(e) => tracing::warn!(
                upstream = %address,
                reason = %e,
                "upstream not usable yet: clients get an error until it is (retried as they \
                 connect; /readyz and `keyspaces-proxy check` say more)"
            ),
        }
    });
}

/// Serves until SIGTERM/SIGINT and the drain that follows. `argv` is the command line SIGHUP
/// parses again (with the environment and config file as they are then); `announce` runs once
/// both listeners are bound.
pub async fn run(
    cli: Cli,
    argv: Vec<OsString>,
    announce: impl FnOnce(Listening),
) -> Result<(), StartError> {
    if cli.listen == cli.metrics_listen && cli.listen.port() != 0 {
        return Err(StartError::SameAddress(cli.listen));
    }
    let resolved = cli.resolve().await?;
    raise_open_file_limit(cli.max_connections);
    let environment = std::env::vars_os().filter_map(|(k, _)| k.into_string().ok());
    for w in resolved
        .warnings
        .iter()
        .chain(&crate::config::unknown_environment(environment))
    {
        tracing::warn!("{w}");
    }
    let listener = bind(cli.listen, "--listen").await?;
    let admin_listener = bind(cli.metrics_listen, "--metrics-listen").await?;
    watch_stop_signals(resolved.context.shutdown.clone());
    if let Some(cache) = &resolved.credentials {
        match cache.get().await {
            Ok(c) => tracing::info!(access_key_id = c.access_key_id(), "AWS credentials loaded"),
            Err(e) => {
                tracing::warn!(error = %e, "AWS credentials not available yet; will retry per connection")
            }
        }
        cache.spawn_refresher();
    }
    if let Some(w) = cli.exposure_warning() {
        tracing::warn!(listen = %cli.listen, "{w}");
    }
    let listening = Listening {
        clients: listener.local_addr().unwrap_or(cli.listen),
        metrics: admin_listener.local_addr().unwrap_or(cli.metrics_listen),
    };
    let ctx = Arc::new(resolved.context);
    crate::reload::spawn(&cli, argv, ctx.clone(), resolved.credentials.clone());
    tracing::info!(
        upstream = %ctx.upstream.address,
        region = resolved.region.as_deref().unwrap_or("-"),
        "listening on {} for CQL clients ({}); /metrics, /livez, /readyz on {}",
        listening.clients,
        match (ctx.client_tls.load().is_some(), cli.client_ca.is_some()) {
            (false, _) => "plaintext",
            (true, false) => "TLS",
            (true, true) => "mutual TLS",
        },
        listening.metrics
    );
    warm_upstream(&ctx);
    announce(listening);
    let admin = Arc::new(AdminState {
        ctx: ctx.clone(),
        credentials: resolved.credentials.clone(),
    });
    // The admin endpoints stay up while draining: /readyz then reports the shutdown.
    let admin_stop = Shutdown::new();
    tokio::spawn(crate::admin::serve(
        admin_listener,
        admin,
        admin_stop.clone(),
    ));
    crate::server::serve(
        listener,
        ctx,
        cli.max_connections,
        Duration::from_secs(cli.drain_timeout),
    )
    .await;
    admin_stop.begin();
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_taken_port_names_the_address_and_the_flag() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let err = bind(addr, "--listen").await.err().unwrap().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("--listen"), "{err}");
        assert!(err.contains("already in use"), "{err}");
    }
}
