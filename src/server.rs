//! The accept loop: one task per client connection, bounded in number, stopped on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::metrics::{metrics, Metrics};
use crate::session::{self, ProxyContext};

/// Accepts clients until `ctx.shutdown` turns true, then waits up to `drain` for the sessions
/// to answer what they already accepted. Connections beyond `max_connections` are closed at
/// once rather than queued, so an overload never grows memory without bound.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    max_connections: usize,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = crate::session::stopping(&mut shutdown) => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let m = metrics();
                m.client_connections_opened.inc();
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; closing new connection");
                    Metrics::count(&m.client_connections_rejected, vec![("reason", "connection_limit")]);
                    drop(socket);
                    continue;
                };
                let ctx = ctx.clone();
                m.client_connections.inc();
                tokio::spawn(async move {
                    session::run(ctx, socket, peer).await;
                    metrics().client_connections.dec();
                    drop(permit);
                });
            }
        }
    }
    drop(listener);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(drain, permits.acquire_many(all))
        .await
        .is_ok();
    if drained {
        tracing::info!("all client connections drained");
    } else {
        tracing::warn!(
            ?drain,
            "drain time over; closing remaining client connections"
        );
    }
}
