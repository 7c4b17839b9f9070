//! When to let the upstream start on a client's burst before the whole burst is routed.
//!
//! One socket read can bring a client's whole window (64 requests and more). Routing them all
//! before the upstream writer runs makes the server wait for the last one, and the client for
//! the server: with one busy client, proxy and server took turns instead of working at once,
//! and throughput fell to 0.76–0.90× direct. Yielding every `CHUNK` requests lets the writer
//! send what is queued, so the server works while the rest is routed.
//!
//! Each chunk costs a write here and a read and a write at the server, and splits the answers
//! (and the client's next burst) into as many pieces. When other clients keep the server busy
//! that only costs CPU: measured with two busy clients, throughput fell from 0.93× to 0.8×
//! direct. So a burst gets a head start only while its client is the only one sending: no other
//! client started a burst within `OTHERS_WINDOW` before it, and nothing but the burst itself is
//! in flight upstream when a chunk is ready.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Requests routed between two head starts.
const CHUNK: usize = 8;

/// How recent another client's burst must be to count as that client being busy: a few round
/// trips at loopback speed. Against a server far away bursts come further apart, and head
/// starts are then rarely worth anything either way.
const OTHERS_WINDOW: Duration = Duration::from_millis(1);

/// Who started the latest burst, and when: one word, so it is read and replaced at once.
#[derive(Debug)]
pub(crate) struct LastBurst {
    /// The client's tag in the low 16 bits, microseconds since `epoch` above them.
    word: AtomicU64,
    epoch: Instant,
}

impl LastBurst {
    pub(crate) fn new() -> LastBurst {
        LastBurst {
            word: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Records that client `tag` started a burst at `at`; whether another client had started
    /// one within `OTHERS_WINDOW` before.
    fn others_busy(&self, tag: u16, at: Instant) -> bool {
        let micros = at.saturating_duration_since(self.epoch).as_micros() as u64;
        let previous = self
            .word
            .swap(micros << 16 | u64::from(tag), Ordering::Relaxed);
        let (by, since) = ((previous & 0xffff) as u16, previous >> 16);
        previous != 0
            && by != tag
            && micros.saturating_sub(since) < OTHERS_WINDOW.as_micros() as u64
    }
}

/// The one record every pooled session shares: the clients share one server.
static LAST_BURST: LazyLock<LastBurst> = LazyLock::new(LastBurst::new);

/// Tags told apart among the clients active at once; a reused tag costs at most a head start.
static NEXT_TAG: AtomicU16 = AtomicU16::new(1);

/// Counts the requests of one client's burst (those that came with one socket read).
#[derive(Debug)]
pub(super) struct HeadStart {
    last_burst: &'static LastBurst,
    tag: u16,
    routed: usize,
    alone: bool,
}

impl Default for HeadStart {
    fn default() -> Self {
        HeadStart::sharing(&LAST_BURST)
    }
}

impl HeadStart {
    fn sharing(last_burst: &'static LastBurst) -> HeadStart {
        HeadStart {
            last_burst,
            tag: NEXT_TAG.fetch_add(1, Ordering::Relaxed),
            routed: 0,
            alone: false,
        }
    }

    /// Called after each request went upstream: `buffered` is whether it came with the same
    /// read as the one before, `read_at` when that read completed. True when the writer should
    /// run now: a chunk of a burst that is alone is queued, and `in_flight_upstream` (asked only
    /// then) shows nothing else keeps the server busy.
    pub(super) fn after_routing(
        &mut self,
        buffered: bool,
        read_at: Instant,
        in_flight_upstream: impl FnOnce() -> usize,
    ) -> bool {
        if buffered {
            self.routed += 1;
        } else {
            self.routed = 1;
            self.alone = !self.last_burst.others_busy(self.tag, read_at);
        }
        self.alone && self.routed.is_multiple_of(CHUNK) && in_flight_upstream() <= self.routed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> &'static LastBurst {
        Box::leak(Box::new(LastBurst::new()))
    }

    /// The requests after which a burst of `n` read at `at` yields, with `others` in flight
    /// upstream besides it.
    fn burst(h: &mut HeadStart, n: usize, at: Instant, others: usize) -> Vec<usize> {
        (1..=n)
            .filter(|&i| h.after_routing(i > 1, at, || others + i))
            .collect()
    }

    #[test]
    fn a_burst_alone_on_the_server_goes_out_a_chunk_at_a_time() {
        let mut h = HeadStart::sharing(record());
        let now = Instant::now();
        assert_eq!(burst(&mut h, 64, now, 0), [8, 16, 24, 32, 40, 48, 56, 64]);
        assert_eq!(
            burst(&mut h, 7, now, 0),
            Vec::<usize>::new(),
            "short bursts go in one write"
        );
    }

    #[test]
    fn a_busy_server_gets_the_burst_in_one_write() {
        let mut h = HeadStart::sharing(record());
        assert_eq!(burst(&mut h, 64, Instant::now(), 1), Vec::<usize>::new());
    }

    #[test]
    fn a_burst_soon_after_another_clients_goes_in_one_write() {
        let shared = record();
        let (mut a, mut b) = (HeadStart::sharing(shared), HeadStart::sharing(shared));
        let t = Instant::now();
        assert_eq!(burst(&mut a, 16, t, 0), [8, 16], "the first client alone");
        assert!(burst(&mut b, 16, t + Duration::from_micros(300), 0).is_empty());
        assert!(burst(&mut a, 16, t + Duration::from_micros(600), 0).is_empty());
        // The other client went quiet: a head start again.
        assert_eq!(burst(&mut a, 16, t + Duration::from_millis(5), 0), [8, 16]);
    }

    #[test]
    fn a_new_read_starts_a_new_count() {
        let mut h = HeadStart::sharing(record());
        let (t, idle) = (Instant::now(), || 0);
        for _ in 0..7 {
            assert!(!h.after_routing(true, t, idle));
        }
        assert!(
            !h.after_routing(false, t, idle),
            "the 8th came with a new read"
        );
        for _ in 0..6 {
            assert!(!h.after_routing(true, t, idle));
        }
        assert!(h.after_routing(true, t, idle));
    }
}
