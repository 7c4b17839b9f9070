//! The accept loop: one task per client connection, bounded in number, stopped on shutdown.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::session::{self, ProxyContext};

/// Accepts clients until `shutdown` completes. Connections beyond `max_connections` are
/// closed at once rather than queued, so an overload never grows memory without bound.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
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
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; closing new connection");
                    drop(socket);
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    session::run(ctx, socket, peer).await;
                    drop(permit);
                });
            }
        }
    }
}
