//! When to let the upstream start on a client's burst before the whole burst is routed.
//!
//! One socket read can bring a client's whole window (64 requests and more). Routing them all
//! before the upstream writer runs makes the server wait for the last one, and the client for
//! the server: with one busy client, proxy and server took turns instead of working at once,
//! and throughput fell to 0.74–0.90× direct. Yielding every `CHUNK` requests lets the writer
//! send what is queued, so the server works while the rest is routed.
//!
//! Each chunk costs a write here and a read and a write at the server, and splits the answers
//! (and the client's next burst) into as many pieces. When other clients keep the server busy
//! that buys nothing and costs CPU: measured with two busy clients, throughput fell from 0.93×
//! to 0.8× direct. So a read's requests get a head start only while no other client has sent
//! anything within `OTHERS_WINDOW` (whatever its keyspace: they share the server) and, when a
//! chunk is ready, nothing but this client's requests is in flight on its connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Requests routed between two head starts: small enough that the server starts within a few
/// microseconds of routing, large enough that a 64-request window costs 8 writes, not 64.
const CHUNK: usize = 8;

/// How recently another client must have sent for this one not to count as alone: a few round
/// trips at loopback speed. Against a server far away requests come further apart, and a head
/// start is then worth little either way (routing a window takes tens of microseconds).
const OTHERS_WINDOW: Duration = Duration::from_millis(1);

/// Low bits of the record: the client's tag. Above them, microseconds since the record's epoch,
/// compared modulo 2^40 (12.7 days): a record that old read as recent costs one head start.
const TAG_BITS: u32 = 24;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const TIME_MASK: u64 = (1 << (64 - TAG_BITS)) - 1;

/// Which client read requests last, and when, in one word so it is read and replaced at once.
/// Every pooled session of the process shares one (`ProxyContext::last_read`).
#[derive(Debug)]
pub struct LastRead {
    word: AtomicU64,
    epoch: Instant,
    next_tag: AtomicU64,
}

impl Default for LastRead {
    fn default() -> Self {
        LastRead {
            word: AtomicU64::new(0),
            epoch: Instant::now(),
            next_tag: AtomicU64::new(0),
        }
    }
}

impl LastRead {
    /// A tag for a new client, never 0 (a zero word is no record): unique among 2^24
    /// connections in a row; a repeat costs at most head starts that should not have been.
    fn tag(&self) -> u64 {
        1 + self.next_tag.fetch_add(1, Ordering::Relaxed) % TAG_MASK
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64 & TIME_MASK
    }

    /// Replaces the record with client `tag` reading at `micros`; when the record it replaces
    /// was another client's, that one's time.
    fn swap(&self, tag: u64, micros: u64) -> Option<u64> {
        let previous = self.word.swap(micros << TAG_BITS | tag, Ordering::Relaxed);
        (previous != 0 && previous & TAG_MASK != tag).then_some(previous >> TAG_BITS)
    }
}

/// One client's view: its tag, the requests of its current read, and when it last saw another
/// client read.
#[derive(Debug)]
pub(super) struct HeadStart {
    tag: u64,
    routed: usize,
    alone: bool,
    /// Remembered across reads: the shared record holds only the latest reader, so a client
    /// whose burst came in two reads would otherwise see only itself the second time.
    others_read_at: Option<u64>,
}

impl HeadStart {
    pub(super) fn new(last_read: &LastRead) -> HeadStart {
        HeadStart {
            tag: last_read.tag(),
            routed: 0,
            alone: false,
            others_read_at: None,
        }
    }

    /// A socket read completed at `at` (whatever the frames it brought turn out to be).
    pub(super) fn read(&mut self, last_read: &LastRead, at: Instant) {
        let now = last_read.micros(at);
        if let Some(other) = last_read.swap(self.tag, now) {
            self.others_read_at = Some(other);
        }
        let window = OTHERS_WINDOW.as_micros() as u64;
        self.alone = self
            .others_read_at
            .is_none_or(|t| now.wrapping_sub(t) & TIME_MASK >= window);
        self.routed = 0;
    }

    /// A request of the current read went upstream. True when the writer should run now: a
    /// chunk is queued, the client is alone, and `in_flight_upstream` (asked only then) is no
    /// more than `mine`, the client's own requests in flight.
    pub(super) fn after_routing(
        &mut self,
        mine: usize,
        in_flight_upstream: impl FnOnce() -> usize,
    ) -> bool {
        self.routed += 1;
        self.alone && self.routed.is_multiple_of(CHUNK) && in_flight_upstream() <= mine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The requests after which a read of `n` at `at` yields, with `others` in flight upstream
    /// besides the client's own.
    fn burst(
        h: &mut HeadStart,
        record: &LastRead,
        n: usize,
        at: Instant,
        others: usize,
    ) -> Vec<usize> {
        h.read(record, at);
        (1..=n)
            .filter(|&i| h.after_routing(i, || others + i))
            .collect()
    }

    #[test]
    fn a_burst_alone_on_the_server_goes_out_a_chunk_at_a_time() {
        let record = LastRead::default();
        let mut h = HeadStart::new(&record);
        let now = Instant::now();
        assert_eq!(
            burst(&mut h, &record, 64, now, 0),
            [8, 16, 24, 32, 40, 48, 56, 64]
        );
        assert!(
            burst(&mut h, &record, 7, now, 0).is_empty(),
            "short reads go in one write"
        );
    }

    #[test]
    fn a_busy_server_gets_the_burst_in_one_write() {
        let record = LastRead::default();
        let mut h = HeadStart::new(&record);
        assert!(burst(&mut h, &record, 64, Instant::now(), 1).is_empty());
    }

    #[test]
    fn a_burst_soon_after_another_clients_read_goes_in_one_write() {
        let record = LastRead::default();
        let (mut a, mut b) = (HeadStart::new(&record), HeadStart::new(&record));
        let t = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(
            burst(&mut a, &record, 16, t, 0),
            [8, 16],
            "the first client alone"
        );
        assert!(burst(&mut b, &record, 16, t + ms(1) / 2, 0).is_empty());
        assert!(burst(&mut a, &record, 16, t + ms(1), 0).is_empty());
        // A's second read of the same burst: the record now names A, but A saw B.
        assert!(burst(&mut a, &record, 16, t + ms(1) + ms(1) / 10, 0).is_empty());
        // B's read is now more than the window old.
        assert_eq!(burst(&mut a, &record, 16, t + ms(2), 0), [8, 16]);
        assert!(
            burst(&mut b, &record, 8, t + ms(2) + ms(1) / 2, 0).is_empty(),
            "A read half a window before"
        );
        // B read last, but more than the window before.
        assert_eq!(burst(&mut a, &record, 8, t + ms(5), 0), [8]);
    }

    #[test]
    fn each_read_counts_afresh() {
        let record = LastRead::default();
        let mut h = HeadStart::new(&record);
        let t = Instant::now();
        h.read(&record, t);
        for _ in 0..7 {
            assert!(!h.after_routing(0, || 0));
        }
        h.read(&record, t);
        for _ in 0..7 {
            assert!(!h.after_routing(0, || 0));
        }
        assert!(h.after_routing(0, || 0));
    }

    #[test]
    fn times_compare_across_the_record_wrapping() {
        let record = LastRead::default();
        let (mut a, mut b) = (HeadStart::new(&record), HeadStart::new(&record));
        // Just before the 40-bit microsecond clock wraps, and just after.
        let before = record.epoch + Duration::from_micros(TIME_MASK - 100);
        b.read(&record, before);
        a.read(&record, before + Duration::from_micros(200));
        assert!(!a.alone, "B read 200 µs before, across the wrap");
        a.read(&record, before + Duration::from_micros(200) + OTHERS_WINDOW);
        assert!(a.alone);
    }
}
