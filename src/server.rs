//! The accept loop: one task per client connection, bounded in number, stopped on shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::context::ProxyContext;
use crate::metrics::{metrics, Metrics, Reason};
use crate::session;

/// Accepts clients until `ctx.shutdown` begins, then waits up to `drain` for the sessions
/// to answer what they already accepted. Connections beyond `max_connections` are closed at
/// once rather than queued, so an overload never grows memory without bound.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    max_connections: usize,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut spare = SpareDescriptor::new();
    let mut last_warning: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = ctx.shutdown.begun() => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors (EMFILE) the waiting client would hang in the
                        // backlog and the loop spin on the same error: refuse it at once.
                        let refused = spare.refuse_one(&listener).await;
                        if refused {
                            Metrics::count(&metrics().client_connections_rejected, Reason { reason: "file_limit" });
                        }
                        if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            last_warning = Some(std::time::Instant::now());
                            tracing::warn!(error = %e, refused, "accept failed (out of file descriptors? see the open-file limit logged at start)");
                        }
                        if !refused {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        continue;
                    }
                };
                let m = metrics();
                m.client_connections_opened.inc();
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "connection limit reached; closing new connection");
                    Metrics::count(&m.client_connections_rejected, Reason { reason: "connection_limit" });
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

/// A descriptor held in reserve: when the process has none left, it is given up for a moment
/// to accept the waiting client and close it at once.
struct SpareDescriptor(Option<std::fs::File>);

impl SpareDescriptor {
    fn new() -> SpareDescriptor {
        SpareDescriptor(std::fs::File::open("/dev/null").ok())
    }

    /// Accepts one waiting connection with the spare descriptor and closes it; whether one was.
    async fn refuse_one(&mut self, listener: &TcpListener) -> bool {
        if self.0.take().is_none() {
            *self = SpareDescriptor::new();
            return false;
        }
        let waiting = tokio::time::timeout(Duration::from_millis(10), listener.accept()).await;
        let refused = matches!(waiting, Ok(Ok(_)));
        drop(waiting);
        *self = SpareDescriptor::new();
        refused
    }
}
