//! One group of upstream connections: those of one protocol version and keyspace, with what
//! the pool needs to grow it (connects under way, failures for back-off) and to pick from it.

use crate::reference::Reference;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rand::Rng;
use tokio::sync::Notify;

use super::connection::UpstreamError;
use super::mux::MuxConn;

pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    pub version: u8,
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

    /// Whether more clients are pinned to the group's ready connections than there are of them
    /// (some must share).
    pub(super) fn clients_outnumber_connections(&self) -> bool {
        let conns = self.conns.load();
        let ready = conns.iter().filter(|c| c.is_ready());
        let (n, clients) = ready.fold((0, 0), |(n, k), c| (n + 1, k + c.affine()));
        clients > n
    }

    /// Requests in flight on the least busy ready connection, if there is one.
    pub(super) fn least_in_flight(&self) -> Option<usize> {
        self.conns
            .load()
            .iter()
            .filter(|c| c.is_ready())
            .map(|c| c.in_flight())
            .min()
    }

    pub(super) fn last_failure(&self) -> Option<(Instant, Arc<UpstreamError>, Reference)> {
        self.last_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The delay before the next connection attempt after `failures` in a row, with jitter.
    pub(super) fn backoff(&self) -> Duration {
        let n = self.failures.load(Ordering::Relaxed);
        if n == 0 {
            return Duration::ZERO;
        }
        let exp = BACKOFF_BASE
            .saturating_mul(1u32 << n.min(10))
            .min(BACKOFF_MAX);
        exp.mul_f64(rand::rng().random_range(0.5..1.0))
    }

    /// The least busy ready connection with a free stream id and rate budget.
    pub(super) fn pick(&self) -> Option<Arc<MuxConn>> {
        self.pick_where(|_| true)
    }

    /// As `pick`, on another address than `addr`: a connection just lost there may have
    /// siblings about to be lost with it, and they look the least busy.
    pub(super) fn pick_elsewhere(&self, addr: std::net::SocketAddr) -> Option<Arc<MuxConn>> {
        self.pick_where(|c| c.address.addr != addr)
    }

    fn pick_where(&self, allowed: impl Fn(&MuxConn) -> bool) -> Option<Arc<MuxConn>> {
        let conns = self.conns.load();
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
        let mut candidates: Vec<(usize, &Arc<MuxConn>)> = conns
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
