//! The process's one shutdown signal. It is begun once (first SIGTERM/SIGINT, or a test) and
//! never undone; the accept loop stops taking clients, and every session stops reading new
//! requests and ends once what it accepted is answered.

use std::sync::Arc;

use tokio::sync::watch;

/// Cheap to clone; every clone sees the same signal.
///
/// A watch channel underneath rather than a cancellation token: every session polls its wait
/// on most loop turns (select polls branches until one is ready), and a token's poll takes the
/// token's one mutex, shared by every session, where a watch receiver's parked wait uses one of
/// several sharded locks.
#[derive(Debug, Clone)]
pub struct Shutdown(Arc<watch::Sender<bool>>);

impl Default for Shutdown {
    fn default() -> Shutdown {
        Shutdown(Arc::new(watch::Sender::new(false)))
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown; later calls do nothing.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    pub fn has_begun(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the shutdown has begun. Sessions create it once and keep it pinned across
    /// loop turns: a fresh one per turn registers and unregisters a waiter each time.
    pub fn begun(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (sender, mut seen) = (self.0.clone(), self.0.subscribe());
        async move {
            // This future holds a sender too, so the wait cannot end for want of one (which
            // would read as a shutdown). The guard `wait_for` returns is not `Send`; it is
            // dropped at once.
            let _keep = sender;
            let _ = seen.wait_for(|begun| *begun).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_begin_and_it_stays_begun() {
        let shutdown = Shutdown::new();
        let seen_by = shutdown.clone();
        assert!(!seen_by.has_begun());
        let waiting = tokio::spawn(async move { seen_by.begun().await });
        shutdown.begin();
        shutdown.begin();
        waiting.await.unwrap();
        assert!(shutdown.has_begun());
        // Begun before the wait: resolves at once.
        shutdown.begun().await;
    }
}
