//! One piece of work per key however many ask for it at once: the first caller does it, the
//! others wait for its result (logins presenting the same credentials, KMS calls per token).

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

#[derive(Debug)]
pub struct SingleFlight<K, T> {
    inflight: Mutex<HashMap<K, Arc<OnceCell<T>>>>,
}

impl<K, T> Default for SingleFlight<K, T> {
    fn default() -> Self {
        SingleFlight {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, T: Clone> SingleFlight<K, T> {
    /// `work`'s result, run once for all callers with `key` while it is under way. Results are
    /// not kept: the next caller after it finishes runs it again.
    pub async fn run<F, Fut>(&self, key: K, work: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let cell = self
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let out = cell.get_or_init(work).await.clone();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            inflight.remove(&key);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_ones_run_again() {
        let flights = Arc::new(SingleFlight::<u8, usize>::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut waiting = Vec::new();
        for _ in 0..8 {
            let (f, runs, gate) = (flights.clone(), runs.clone(), gate.clone());
            waiting.push(tokio::spawn(async move {
                f.run(1, || async move {
                    gate.notified().await;
                    runs.fetch_add(1, Ordering::SeqCst) + 1
                })
                .await
            }));
        }
        // Wait on state: all eight are parked on the one cell before it is released.
        while flights
            .inflight
            .lock()
            .unwrap()
            .get(&1)
            .map(Arc::strong_count)
            != Some(9)
        {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for w in waiting {
            assert_eq!(w.await.unwrap(), 1);
        }
        assert_eq!(flights.run(1, || async { 7 }).await, 7, "not kept");
    }
}
