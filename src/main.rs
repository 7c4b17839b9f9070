use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use keyspaces_proxy::admin::AdminState;
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::auth::identity_roles::IdentityRoles;
use keyspaces_proxy::config::{Cli, Command, LogFormat};
use keyspaces_proxy::session::ProxyContext;
use keyspaces_proxy::{check, server};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The command line with the config file's entries merged in (flag > env > file > default).
fn parse_cli(argv: Vec<OsString>) -> Result<Cli, Box<dyn std::error::Error>> {
    Cli::parse_with_config(argv)
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// First SIGTERM/SIGINT: drain. Second: exit at once.
fn watch_stop_signals(shutdown: watch::Sender<bool>) {
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("shutting down: no new connections; draining in-flight requests");
        let _ = shutdown.send(true);
        stop_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// SIGHUP: re-read the configuration (file, environment, flags) for client users and reload
/// AWS credentials, without touching open connections.
fn watch_reload(ctx: Arc<ProxyContext>, credentials: Option<Arc<CredentialCache>>) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            // The error is rendered at once: the boxed one is not Send across the awaits below.
            match parse_cli(std::env::args_os().collect()).map_err(|e| e.to_string()) {
                Ok(cli) => reload_clients(&ctx, &cli).await,
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: configuration invalid; nothing reloaded")
                }
            }
            if let Some(c) = &credentials {
                match c.refresh(true).await {
                    Ok(_) => tracing::info!("SIGHUP: AWS credentials reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: credential reload failed"),
                }
            }
        }
    });
    #[cfg(not(unix))]
    let _ = (ctx, credentials);
}

/// Applies a re-read configuration's identity roles and client users; a part that fails to
/// load keeps its previous value.
async fn reload_clients(ctx: &ProxyContext, cli: &Cli) {
    if let Some(pools) = &ctx.identity_pools {
        match cli.identity_roles.as_deref().map(IdentityRoles::load) {
            Some(Ok(roles)) => {
                pools.replace_roles(roles).await;
                tracing::info!("SIGHUP: identity roles reloaded");
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "SIGHUP: keeping the previous identity roles")
            }
            None => pools.replace_roles(IdentityRoles::default()).await,
        }
    }
    match cli.client_auth().await {
        Ok(auth) => {
            ctx.client_auth.store(Arc::new(auth));
            // Sessions vouched for by the old users must be checked again.
            ctx.sessions.clear();
            tracing::info!("SIGHUP: client authentication reloaded");
        }
        Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the previous client users"),
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut resolved = cli.resolve().await?;
    resolved.context.shutdown = shutdown_rx;
    watch_stop_signals(shutdown_tx);
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
    if let Some(pool) = resolved.context.pool.clone() {
        // Warm the pool now so the first client's STARTUP needs no upstream round trip; a
        // failure here is only logged: clients get the error, and the pool keeps retrying.
        tokio::spawn(async move {
            if let Err(e) = pool.group(4, None).await {
                tracing::warn!(error = %e, "cannot connect to Keyspaces yet");
            }
        });
    }
    let listener = TcpListener::bind(cli.listen).await?;
    let admin_listener = TcpListener::bind(cli.metrics_listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = %admin_listener.local_addr()?,
        upstream = %resolved.context.upstream.address,
        region = resolved.region.as_deref().unwrap_or("-"),
        "keyspaces-proxy ready"
    );
    let ctx = Arc::new(resolved.context);
    watch_reload(ctx.clone(), resolved.credentials.clone());
    let admin = Arc::new(AdminState {
        ctx: ctx.clone(),
        credentials: resolved.credentials.clone(),
    });
    // The admin endpoints stay up while draining: /readyz then reports the shutdown.
    let (_admin_stop, admin_rx) = watch::channel(false);
    tokio::spawn(keyspaces_proxy::admin::serve(
        admin_listener,
        admin,
        admin_rx,
    ));
    server::serve(
        listener,
        ctx,
        cli.max_connections,
        Duration::from_secs(cli.drain_timeout),
    )
    .await;
    tracing::info!("stopped");
    Ok(())
}

fn main() -> ExitCode {
    let cli = match parse_cli(std::env::args_os().collect()) {
        Ok(c) => c,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_err) => clap_err.exit(),
            Err(e) => {
                eprintln!("keyspaces-proxy: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if cli.print_config {
        print!("{}", cli.effective_toml());
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Probe { path }) = &cli.command {
        return keyspaces_proxy::probe::run(cli.metrics_listen, path);
    }
    let checking = cli.command == Some(Command::Check);
    if !checking {
        init_logging(cli.log_format);
    }
    let runtime = match keyspaces_proxy::runtime::build(cli.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyspaces-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if checking {
        return runtime.block_on(check::run(&cli));
    }
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keyspaces-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
