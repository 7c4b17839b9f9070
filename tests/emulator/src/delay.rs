//! Answers held back by injected latency, released by one thread with sub-millisecond
//! precision: tokio's timer counts whole milliseconds, and a server that answers in 400 µs
//! (an independent Keyspaces stand-in measured exactly that) is the case worth emulating.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::wire::writer::Out;

struct Held {
    due: Instant,
    seq: u64,
    to: mpsc::Sender<Out>,
    out: Out,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// Hands answers to their connection's writer when they are due.
pub struct Delayer {
    tx: std::sync::Mutex<std_mpsc::Sender<Held>>,
    seq: std::sync::atomic::AtomicU64,
}

impl Delayer {
    pub fn start() -> Delayer {
        let (tx, rx) = std_mpsc::channel::<Held>();
        std::thread::Builder::new()
            .name("emulator-delay".into())
            .spawn(move || release(rx))
            .ok();
        Delayer {
            tx: std::sync::Mutex::new(tx),
            seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Sends `out` to `to` at `due` (in order among answers due at the same instant).
    pub fn hold(&self, due: Instant, to: mpsc::Sender<Out>, out: Out) {
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let held = Held { due, seq, to, out };
        let _ = self.tx.lock().unwrap_or_else(|e| e.into_inner()).send(held);
    }
}

fn release(rx: std_mpsc::Receiver<Held>) {
    let mut heap: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    loop {
        let next = match heap.peek() {
            None => rx.recv().ok(),
            Some(Reverse(first)) => {
                match rx.recv_timeout(first.due.saturating_duration_since(Instant::now())) {
                    Ok(h) => Some(h),
                    Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                    // The emulator is gone: so are the connections the answers were for.
                    Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
        };
        match next {
            Some(h) => heap.push(Reverse(h)),
            None if heap.is_empty() => return, // the emulator is gone
            None => {}
        }
        let now = Instant::now();
        while heap.peek().is_some_and(|Reverse(h)| h.due <= now) {
            if let Some(Reverse(h)) = heap.pop() {
                // A writer that is gone (its connection was cut) drops the answer.
                let _ = h.to.blocking_send(h.out);
            }
        }
    }
}
