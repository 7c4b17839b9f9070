//! One group of upstream connections: those of one protocol version and keyspace, with what
//! the pool needs to grow it (connects under way, failures for back-off) and to pick from it.

use crate::frame::ProtocolVersion;
use crate::reference::Reference;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::Notify;

use super::connection::UpstreamError;
use super::mux::MuxConn;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub version: ProtocolVersion,
    pub keyspace: Option<Arc<str>>,
}

/// Connections for one (version, keyspace).
pub struct Group {
    pub key: GroupKey,
    pub(super) conns: ArcSwap<Vec<Arc<MuxConn>>>,
    /// Bumped whenever `conns` changes, so sessions know to rebalance their affinity.
    pub(super) generation: AtomicU64,
    pub(super) connecting: AtomicUsize,
    pub(super) failures: AtomicU32,
    /// The back-off `failures` calls for, drawn once per counted failure.
    backoff: Mutex<Backoff>,
    /// The last failed connection attempt: when, why, and the reference it was logged under.
    pub(super) last_failure: Mutex<Option<(Instant, Arc<UpstreamError>, Reference)>>,
    pub(super) changed: Notify,
    pub(super) last_used: Mutex<Instant>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("key", &self.key)
            .field("connections", &self.conns.load().len())
            .finish()
    }
}

impl Group {
    pub(super) fn new(key: GroupKey) -> Group {
        Group {
            key,
            conns: ArcSwap::from_pointee(Vec::new()),
            generation: AtomicU64::new(0),
            connecting: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            backoff: Mutex::new(Backoff::default()),
            last_failure: Mutex::new(None),
            changed: Notify::new(),
            last_used: Mutex::new(Instant::now()),
        }
    }

    pub fn connections(&self) -> Arc<Vec<Arc<MuxConn>>> {
        self.conns.load_full()
    }

    pub fn ready_count(&self) -> usize {
        self.conns.load().iter().filter(|c| c.is_ready()).count()
    }

    /// Requests in flight on all of the group's connections.
    pub(crate) fn in_flight(&self) -> usize {
        self.conns.load().iter().map(|c| c.in_flight()).sum()
    }

    /// Whether more clients are pinned to the group's ready connections than there are of them
    /// (some must share), and the connections carry more than `depth` requests each on average.
    pub(super) fn crowded(&self, depth: usize) -> bool {
        crowded(self.conns.load().as_slice(), depth)
    }

    /// Requests in flight on the least busy ready connection, if there is one.
    pub(super) fn least_in_flight(&self) -> Option<usize> {
        least_in_flight(self.conns.load().as_slice())
    }

    pub(super) fn last_failure(&self) -> Option<(Instant, Arc<UpstreamError>, Reference)> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes a slot in `connecting` for a connection attempt if `room` allows one beside those
    /// under way; the attempt gives it back when it ends (`Pool::open_counted`).
    pub(super) fn reserve_connect(&self, room: impl Fn(usize) -> bool) -> bool {
        self.connecting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |connecting| {
                room(connecting).then_some(connecting + 1)
            })
            .is_ok()
    }

    /// Records a connection attempt begun at `started` that failed at `now`. Attempts under way
    /// together fail together (one cut, one outage): only the first of them lengthens the
    /// back-off, so that a brief loss that caught four connects mid-handshake costs one step,
    /// not four. An attempt begun after that step was taken is the next failure in a row.
    pub(super) fn record_failure(
        &self,
        started: Instant,
        now: Instant,
        err: Arc<UpstreamError>,
        reference: Reference,
    ) {
        {
            let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
            if escalates(started, backoff.escalated_at) {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                *backoff = Backoff {
                    escalated_at: Some(now),
                    delay: jittered(n),
                };
            }
        }
        *self.last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some((now, err, reference));
    }

    /// A connection attempt succeeded: the next failure starts the back-off afresh, whenever
    /// the attempt that fails began.
    pub(super) fn record_success(&self) {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut backoff = self.backoff.lock().unwrap_or_else(|e| e.into_inner());
        *backoff = Backoff::default();
        self.failures.store(0, Ordering::Relaxed);
    }

    /// The delay before the next connection attempt after `failures` in a row.
    pub(super) fn backoff(&self) -> Duration {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return Duration::ZERO;
        }
        self.backoff.lock().unwrap_or_else(|e| e.into_inner()).delay
    }

    /// Whether a connection attempt at `now` would come within the back-off after the last
    /// failure. Checked without a lock while nothing has failed.
    pub(super) fn backing_off(&self, now: Instant) -> bool {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let delay = self.backoff();
        self.last_failure()
            .is_some_and(|(at, _, _)| now.saturating_duration_since(at) < delay)
    }

    /// The error to answer with at `now` if the group has no ready connection and is backing
    /// off: the upstream is known to be down.
    pub(super) fn down(&self, now: Instant) -> Option<Arc<UpstreamError>> {
        if self.ready_count() > 0 || !self.backing_off(now) {
            return None;
        }
        self.last_failure().map(|(_, e, _)| e)
    }

    /// The least busy ready connection with a free stream id and rate budget.
    pub(super) fn pick(&self) -> Option<Arc<MuxConn>> {
        self.pick_where(|_| true)
    }

    /// As `pick`, on another address than `addr`: a connection just lost there may have
    /// siblings about to be lost with it, and they look the least busy.
    pub(super) fn pick_elsewhere(&self, addr: SocketAddr) -> Option<Arc<MuxConn>> {
        self.pick_where(|c| c.addr() != addr)
    }

    fn pick_where(&self, allowed: impl Fn(&MuxConn) -> bool) -> Option<Arc<MuxConn>> {
        least_busy(self.conns.load().as_slice(), allowed)
    }

    pub(super) fn add(&self, conn: Arc<MuxConn>) {
        self.conns.rcu(|v| {
            let mut v = (**v).clone();
            v.push(conn.clone());
            v
        });
        self.generation.fetch_add(1, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(super) fn remove_dead_and_drained(&self) {
        let current = self.conns.load();
        if current.iter().all(|c| c.is_ready()) {
            return;
        }
        for c in current.iter() {
            if c.state() == super::mux::ConnState::Draining && c.in_flight() == 0 {
                c.close();
            }
        }
        self.conns.rcu(|v| {
            v.iter()
                .filter(|c| c.state() != super::mux::ConnState::Dead)
                .cloned()
                .collect::<Vec<_>>()
        });
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub(super) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

/// What choosing among a group's connections needs to know of one: `MuxConn`, and plain
/// values in tests. The choosing functions are generic over it, so the per-request paths call
/// `MuxConn`'s own methods directly.
pub(super) trait Candidate {
    fn is_ready(&self) -> bool;
    fn in_flight(&self) -> usize;
    fn has_free_stream(&self) -> bool;
    /// Takes a send permit from its rate budget, if one is available now.
    fn try_acquire(&self) -> bool;
    /// Client sessions pinned to it (see `affinity`).
    fn affine(&self) -> usize;
    fn pin(&self);
    fn unpin(&self);
    /// The endpoint address it is connected to.
    fn addr(&self) -> SocketAddr;
}

impl Candidate for MuxConn {
    fn is_ready(&self) -> bool {
        MuxConn::is_ready(self)
    }
    fn in_flight(&self) -> usize {
        MuxConn::in_flight(self)
    }
    fn has_free_stream(&self) -> bool {
        MuxConn::has_free_stream(self)
    }
    fn try_acquire(&self) -> bool {
        MuxConn::try_acquire(self)
    }
    fn affine(&self) -> usize {
        MuxConn::affine(self)
    }
    fn pin(&self) {
        MuxConn::pin(self);
    }
    fn unpin(&self) {
        MuxConn::unpin(self);
    }
    fn addr(&self) -> SocketAddr {
        self.address.addr
    }
}

/// The least busy ready connection among those `allowed`, with a free stream id and rate
/// budget (a permit taken).
fn least_busy<C: Candidate>(conns: &[Arc<C>], allowed: impl Fn(&C) -> bool) -> Option<Arc<C>> {
    // Fast path, without allocating: the least busy usable connection, if it has budget.
    let best = conns
        .iter()
        .filter(|c| c.is_ready() && c.has_free_stream() && allowed(c))
        .min_by_key(|c| c.in_flight());
    match best {
        Some(c) if c.try_acquire() => return Some(c.clone()),
        None => return None,
        Some(_) => {}
    }
    // Rate-limited: try the others, least busy first.
    // Snapshot the counts first: they change under our feet, and sorting on live values
    // would not be a total order.
    let mut candidates: Vec<(usize, &Arc<C>)> = conns
        .iter()
        .filter(|c| c.is_ready() && allowed(c))
        .map(|c| (c.in_flight(), c))
        .collect();
    candidates.sort_unstable_by_key(|(n, _)| *n);
    candidates
        .into_iter()
        .map(|(_, c)| c)
        .find(|c| c.has_free_stream() && c.try_acquire())
        .cloned()
}

/// Whether more clients are pinned to the ready connections than there are of them, and those
/// carry more than `depth` requests each on average (in one pass: this runs per request while
/// a shared connection is deep).
fn crowded<C: Candidate>(conns: &[Arc<C>], depth: usize) -> bool {
    let ready = conns.iter().filter(|c| c.is_ready());
    let (n, clients, in_flight) = ready.fold((0, 0, 0), |(n, k, sum), c| {
        (n + 1, k + c.affine(), sum + c.in_flight())
    });
    clients > n && in_flight > n * depth
}

/// Requests in flight on the least busy ready connection, if there is one.
fn least_in_flight<C: Candidate>(conns: &[Arc<C>]) -> Option<usize> {
    conns
        .iter()
        .filter(|c| c.is_ready())
        .map(|c| c.in_flight())
        .min()
}

/// Where a group's back-off stands. The jitter is drawn once per counted failure: drawn again
/// on every check, the soonest of many draws wins and the cap acts as half of itself.
#[derive(Debug, Default)]
struct Backoff {
    /// When the last failure that lengthened the back-off (counted in `failures`) happened.
    escalated_at: Option<Instant>,
    delay: Duration,
}

/// The back-off after `n` failures in a row: doubling from `BACKOFF_BASE` up to `BACKOFF_MAX`,
/// then between half and all of that, so that groups cut together do not retry together.
fn jittered(n: u32) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << n.min(10))
        .min(BACKOFF_MAX);
    exp.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// Whether an attempt begun at `started` failing is one more failure in a row: it is unless a
/// failure after it began (`escalated_at`, the last one counted) already counted the outage.
/// The same rule for a group's back-off and an address's (`AddressBook::failed`).
pub(super) fn escalates(started: Instant, escalated_at: Option<Instant>) -> bool {
    escalated_at.is_none_or(|at| at < started)
}

/// A connection as plain values, for tests of choosing: what `Candidate` reads, set by hand.
#[cfg(test)]
pub(super) mod fake {
    use std::cell::Cell;
    use std::net::SocketAddr;

    use super::Candidate;

    #[derive(Debug)]
    pub(crate) struct FakeConn {
        pub(crate) ready: Cell<bool>,
        pub(crate) in_flight: Cell<usize>,
        pub(crate) free_stream: Cell<bool>,
        /// Rate permits left (`usize::MAX`: no rate budget).
        pub(crate) permits: Cell<usize>,
        pub(crate) affine: Cell<usize>,
        pub(crate) addr: SocketAddr,
    }

    impl FakeConn {
        /// A ready, idle connection to 127.0.1.`host` with no rate budget.
        pub(crate) fn new(host: u8) -> FakeConn {
            FakeConn {
                ready: Cell::new(true),
                in_flight: Cell::new(0),
                free_stream: Cell::new(true),
                permits: Cell::new(usize::MAX),
                affine: Cell::new(0),
                addr: SocketAddr::from(([127, 0, 1, host], 9142)),
            }
        }

        pub(crate) fn with_in_flight(self, n: usize) -> FakeConn {
            self.in_flight.set(n);
            self
        }
    }

    impl Candidate for FakeConn {
        fn is_ready(&self) -> bool {
            self.ready.get()
        }
        fn in_flight(&self) -> usize {
            self.in_flight.get()
        }
        fn has_free_stream(&self) -> bool {
            self.free_stream.get()
        }
        fn try_acquire(&self) -> bool {
            match self.permits.get() {
                0 => false,
                usize::MAX => true,
                n => {
                    self.permits.set(n - 1);
                    true
                }
            }
        }
        fn affine(&self) -> usize {
            self.affine.get()
        }
        fn pin(&self) {
            self.affine.set(self.affine.get() + 1);
        }
        fn unpin(&self) {
            self.affine.set(self.affine.get() - 1);
        }
        fn addr(&self) -> SocketAddr {
            self.addr
        }
    }
}

#[cfg(test)]
// The fake connection is single-threaded (Cells); the code under test only needs `Arc`.
#[allow(clippy::arc_with_non_send_sync)]
mod tests {
    use std::net::SocketAddr;

    use tokio::sync::oneshot;

    use super::fake::FakeConn;
    use super::*;
    use crate::frame::messages;
    use crate::upstream::streams::{Pending, ReplyTo};

    /// Ready connections with these requests in flight, to 127.0.1.1, .2, ...
    fn with_depths(depths: &[usize]) -> Vec<Arc<FakeConn>> {
        (1..)
            .zip(depths)
            .map(|(host, n)| Arc::new(FakeConn::new(host).with_in_flight(*n)))
            .collect()
    }

    /// Which of `conns` was picked (its position).
    fn picked(conns: &[Arc<FakeConn>], pick: Option<Arc<FakeConn>>) -> Option<usize> {
        let pick = pick?;
        conns.iter().position(|c| Arc::ptr_eq(c, &pick))
    }

    fn pick_any(conns: &[Arc<FakeConn>]) -> Option<usize> {
        picked(conns, least_busy(conns, |_| true))
    }

    /// Connections this deep, with `clients` pinned to each.
    fn shared(depths: &[usize], clients: usize) -> Vec<Arc<FakeConn>> {
        let conns = with_depths(depths);
        conns.iter().for_each(|c| c.affine.set(clients));
        conns
    }

    #[test]
    fn a_group_is_crowded_only_when_its_load_is_deep_on_average() {
        // 32 clients of 8 each on two connections: every client waits behind 120 others.
        assert!(crowded(&shared(&[128, 128], 16), 64));
        // One busy client (100) and twenty light ones (one each).
        assert!(!crowded(&shared(&[110, 10], 10), 64));
        assert!(!crowded(&shared(&[64, 64, 64, 64], 8), 64));
        assert!(!crowded(&shared(&[], 0), 64));
        // Deep, but each client has its own.
        assert!(!crowded(&shared(&[200, 200], 1), 64));
        // Connections not ready carry nothing new.
        let conns = shared(&[200, 10], 10);
        conns[0].ready.set(false);
        assert!(!crowded(&conns, 64));
    }

    fn group() -> Group {
        Group::new(GroupKey {
            version: ProtocolVersion::V4,
            keyspace: None,
        })
    }

    /// An attempt begun at `t0 + started` ms that failed at `t0 + failed` ms.
    fn failed(group: &Group, t0: Instant, started: u64, failed: u64) {
        let ms = Duration::from_millis;
        let e = Arc::new(UpstreamError::Closed);
        group.record_failure(t0 + ms(started), t0 + ms(failed), e, Reference::new());
    }

    fn failures(group: &Group) -> u32 {
        group.failures.load(Ordering::Relaxed)
    }

    #[test]
    fn attempts_that_fail_together_lengthen_the_back_off_once() {
        let (group, t0) = (group(), Instant::now());
        for i in 0..4 {
            failed(&group, t0, 0, 100 + i);
        }
        assert_eq!(failures(&group), 1);
        // The next attempt, begun after that outage was counted, is a second failure in a row.
        failed(&group, t0, 200, 300);
        assert_eq!(failures(&group), 2);
        assert!(group.backoff() <= BACKOFF_BASE * 4);
    }

    #[test]
    fn attempts_overlapping_in_a_chain_still_lengthen_the_back_off() {
        // Slow connects started half a second apart, each failing after two and a half: one
        // that failed uncounted does not hide the ones begun after the last counted failure.
        let (group, t0) = (group(), Instant::now());
        for i in 0..10 {
            failed(&group, t0, 500 * i, 500 * i + 2500);
        }
        assert!(failures(&group) >= 2, "{}", failures(&group));
    }

    #[test]
    fn the_back_off_is_drawn_once_per_failure_and_reaches_its_cap() {
        let (group, t0) = (group(), Instant::now());
        for i in 0..12 {
            failed(&group, t0, 100 * i, 100 * i + 50);
        }
        let delay = group.backoff();
        assert!(
            delay >= BACKOFF_MAX / 2 && delay <= BACKOFF_MAX,
            "{delay:?}"
        );
        for _ in 0..100 {
            assert_eq!(group.backoff(), delay);
        }
        let (failed_at, _, _) = group.last_failure().expect("a failure");
        assert!(group.backing_off(failed_at + delay - Duration::from_millis(1)));
        assert!(!group.backing_off(failed_at + delay));
    }

    #[test]
    fn after_a_success_the_next_failure_counts_whenever_it_began() {
        let (group, t0) = (group(), Instant::now());
        failed(&group, t0, 0, 100);
        group.record_success();
        assert_eq!(failures(&group), 0);
        // Begun before the failure above, failing after the success.
        failed(&group, t0, 50, 300);
        assert_eq!(failures(&group), 1);
    }

    #[test]
    fn the_least_busy_connection_is_picked_and_charged_a_permit() {
        let conns = with_depths(&[5, 2, 7, 2]);
        conns[1].permits.set(3);
        assert_eq!(pick_any(&conns), Some(1), "the first of the least busy");
        assert_eq!(conns[1].permits.get(), 2);
    }

    #[test]
    fn connections_not_ready_or_without_a_stream_id_are_skipped() {
        let conns = with_depths(&[5, 2, 7, 3]);
        conns[1].ready.set(false); // draining or dead
        conns[3].free_stream.set(false);
        assert_eq!(pick_any(&conns), Some(0));
        for c in &conns {
            c.ready.set(false);
        }
        assert_eq!(pick_any(&conns), None);
        assert_eq!(pick_any(&[]), None);
    }

    #[test]
    fn a_rate_limited_connection_gives_way_to_the_next_least_busy() {
        let conns = with_depths(&[5, 2, 7, 3]);
        conns[1].permits.set(0);
        conns[3].permits.set(0);
        assert_eq!(pick_any(&conns), Some(0));
        // With no stream id, the one with budget is passed over too.
        conns[0].free_stream.set(false);
        assert_eq!(pick_any(&conns), Some(2));
        conns[2].permits.set(0);
        assert_eq!(pick_any(&conns), None, "no budget anywhere");
    }

    #[test]
    fn a_pick_elsewhere_avoids_the_address_just_lost() {
        let conns = with_depths(&[5, 2, 7]);
        let lost = conns[1].addr;
        assert_eq!(
            picked(&conns, least_busy(&conns, |c| c.addr() != lost)),
            Some(0)
        );
    }

    #[test]
    fn growth_looks_at_the_ready_connections_only() {
        let conns = with_depths(&[5, 2, 7]);
        conns[1].ready.set(false);
        assert_eq!(least_in_flight(&conns), Some(5));
        assert_eq!(least_in_flight::<FakeConn>(&[]), None);
        // Two ready connections: three clients outnumber them, two do not.
        conns[0].affine.set(2);
        conns[1].affine.set(5);
        assert!(!crowded(&conns, 0));
        conns[2].affine.set(1);
        assert!(crowded(&conns, 0));
    }

    fn request() -> Pending {
        let (tx, _) = oneshot::channel();
        Pending::new(
            messages::options(ProtocolVersion::V4, 0),
            ReplyTo::Internal(tx),
        )
    }

    /// The same choices on a group of real connections (with no sockets).
    #[test]
    fn a_group_picks_among_its_connections() {
        let group = Group::new(GroupKey {
            version: ProtocolVersion::V4,
            keyspace: None,
        });
        let addr = |host: u8| SocketAddr::from(([127, 0, 1, host], 9142));
        let open = |id, host| MuxConn::idle_for_tests(id, addr(host));
        let (a, b) = (open(1, 1), open(2, 2));
        group.add(a.clone());
        group.add(b.clone());
        assert_eq!(
            group.generation(),
            2,
            "each change is seen by pinned clients"
        );
        a.send(request()).unwrap();
        assert!(group.pick().is_some_and(|c| Arc::ptr_eq(&c, &b)));
        assert!(group
            .pick_elsewhere(addr(2))
            .is_some_and(|c| Arc::ptr_eq(&c, &a)));
        assert_eq!(group.least_in_flight(), Some(0));
        b.drain();
        assert!(group.pick().is_some_and(|c| Arc::ptr_eq(&c, &a)));
        assert_eq!(group.ready_count(), 1);
    }
}
