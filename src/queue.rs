//! A frame queue between two tasks on the data path: producers append under a short lock and
//! wake the consumer only when the queue was empty; the consumer takes the whole backlog at once.
//!
//! It replaces tokio's unbounded channel for the upstream writers and the client inboxes. Their
//! consumers always want everything queued, and the channel's per-frame atomics (block list,
//! semaphore, waker) were ~8% of the proxy's profile under load.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::frame::Frame;

#[derive(Debug, Default)]
pub struct FrameQueue {
    frames: Mutex<Vec<Frame>>,
    ready: Notify,
    closed: AtomicBool,
}

impl FrameQueue {
    pub fn new() -> FrameQueue {
        FrameQueue::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Frame>> {
        // A panic while holding the lock cannot leave a half-pushed Vec behind.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends `frame`; gives it back once the consumer has gone (`close`).
    pub fn push(&self, frame: Frame) -> Result<(), Frame> {
        if self.is_closed() {
            return Err(frame);
        }
        let was_empty = {
            let mut frames = self.lock();
            frames.push(frame);
            frames.len() == 1
        };
        // A consumer that is busy will look again before it waits; one wake-up per backlog.
        if was_empty {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Moves every queued frame to the end of `into`. Swapping keeps both vectors' capacity,
    /// so a steady stream allocates nothing.
    pub fn take_all(&self, into: &mut Vec<Frame>) {
        let mut frames = self.lock();
        if into.is_empty() {
            std::mem::swap(&mut *frames, into);
        } else {
            into.append(&mut frames);
        }
    }

    /// Resolves after a push to an empty queue (possibly one already taken: wake-ups can be
    /// spurious). A push made before this future is polled is not missed.
    pub fn notified(&self) -> Notified<'_> {
        self.ready.notified()
    }

    /// The consumer has gone: later pushes are refused.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Closes the queue when the consumer ends, however it ends (returned, failed or aborted).
pub(crate) struct CloseOnDrop<'a>(pub &'a FrameQueue);

impl Drop for CloseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use crate::frame::ProtocolVersion;
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::frame::messages;

    #[test]
    fn takes_everything_in_order_and_refuses_after_close() {
        let q = FrameQueue::new();
        for s in 0..3 {
            q.push(messages::ready(ProtocolVersion::V4, s)).unwrap();
        }
        let mut got = vec![messages::ready(ProtocolVersion::V4, 9)];
        q.take_all(&mut got);
        let streams: Vec<_> = got.iter().map(|f| f.stream()).collect();
        assert_eq!(streams, [9, 0, 1, 2]);
        got.clear();
        q.take_all(&mut got);
        assert!(got.is_empty());
        q.close();
        assert!(q.push(messages::ready(ProtocolVersion::V4, 5)).is_err());
    }

    #[tokio::test]
    async fn a_push_before_the_wait_is_not_missed() {
        let q = Arc::new(FrameQueue::new());
        q.push(messages::ready(ProtocolVersion::V4, 1)).unwrap();
        // The wake-up was stored: this resolves at once.
        tokio::time::timeout(Duration::from_secs(5), q.notified())
            .await
            .expect("the stored wake-up");
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    q.take_all(&mut got);
                    if got.len() >= 2 {
                        return got.len();
                    }
                    q.notified().await;
                }
            })
        };
        tokio::task::yield_now().await;
        q.push(messages::ready(ProtocolVersion::V4, 2)).unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the push")
            .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn close_on_drop_closes() {
        let q = FrameQueue::new();
        drop(CloseOnDrop(&q));
        assert!(q.is_closed());
    }
}
