use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use keyspaces_proxy::config::{Cli, LogFormat};
use keyspaces_proxy::server;
use tokio::net::TcpListener;
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

async fn shutdown_signal() {
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

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let resolved = cli.resolve().await?;
    if let Some(cache) = &resolved.credentials {
        match cache.get().await {
            Ok(c) => tracing::info!(access_key_id = c.access_key_id(), "AWS credentials loaded"),
            Err(e) => {
                tracing::warn!(error = %e, "AWS credentials not available yet; will retry per connection")
            }
        }
        cache.spawn_refresher();
    }
    if !cli.listen.ip().is_loopback()
        && matches!(
            cli.client_auth,
            keyspaces_proxy::config::ClientAuthMode::None
        )
    {
        tracing::warn!(listen = %cli.listen, "listening on a non-loopback address without client authentication");
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
    tracing::info!(
        listen = %listener.local_addr()?,
        upstream = %resolved.context.upstream.address,
        region = resolved.region.as_deref().unwrap_or("-"),
        "keyspaces-proxy ready"
    );
    server::serve(
        listener,
        Arc::new(resolved.context),
        cli.max_connections,
        shutdown_signal(),
    )
    .await;
    tracing::info!("shutting down");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keyspaces-proxy: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("keyspaces-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}
