//! The process's one shutdown signal. It is begun once (first SIGTERM/SIGINT, or a test) and
//! never undone; the accept loop stops taking clients, and every session stops reading new
//! requests and ends once what it accepted is answered.

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Cheap to clone; every clone sees the same signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Starts the shutdown; later calls do nothing.
    pub fn begin(&self) {
        self.0.cancel();
    }

    pub fn has_begun(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the shutdown has begun. Sessions create it once and keep it pinned across
    /// loop turns: a fresh one per turn registers and unregisters a waiter each time.
    pub fn begun(&self) -> WaitForCancellationFuture<'_> {
        self.0.cancelled()
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
