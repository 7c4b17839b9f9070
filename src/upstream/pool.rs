//! Warm, pre-authenticated upstream connections shared by every client.
//!
//! Keyspaces serves at most 3,000 requests/s on one connection, and a driver that sees one node
//! (the proxy) opens one connection. The pool removes that ceiling: connections are grouped by
//! protocol version and keyspace (a `USE` changes only the client's group, never a shared
//! connection), each client is pinned to one connection of its group (see `affinity`) and a
//! request its connection cannot take goes to the least busy one under its rate budget; groups
//! grow with load and shrink when idle, and connections are re-signed before their STS
//! credentials expire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::affinity::Affinity;
use super::connection::{UpstreamError, UpstreamTarget};
pub use super::group::{Group, GroupKey};
use super::mux::{ConnOwner, MuxConn, OpenParams};
use super::streams::Pending;
use crate::frame::ErrorReply;
use crate::frame::Frame;
use crate::frame::ProtocolVersion;
use crate::policy::prepared::PreparedCache;
use crate::policy::CqlPolicy;

#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Connections kept open per protocol version without a keyspace.
    pub min_connections: usize,
    /// Most connections per group.
    pub max_connections: usize,
    /// Requests per second one connection may carry (0 = unlimited).
    pub max_rate_per_connection: u32,
    pub max_streams_per_connection: usize,
    /// Grow when the least busy connection carries more requests than this.
    pub grow_at_in_flight: usize,
    pub heartbeat_interval: Duration,
    pub request_timeout: Duration,
    /// Replace connections this long before their signing credentials expire.
    pub recycle_before_expiry: Duration,
    pub max_prepared: usize,
    /// How long the load is watched before an idle connection is let go (one per window), and
    /// how long an unused keyspace group lives on.
    pub shrink_window: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            min_connections: 2,
            max_connections: 64,
            max_rate_per_connection: 1000,
            max_streams_per_connection: 2048,
            grow_at_in_flight: 256,
            heartbeat_interval: Duration::from_secs(30),
            request_timeout: Duration::from_secs(12),
            recycle_before_expiry: Duration::from_secs(300),
            max_prepared: 10_000,
            shrink_window: Duration::from_secs(30),
        }
    }
}

const MAX_CONCURRENT_CONNECTS: usize = 4;
/// How often a client waiting for a group's first connection looks again.
const FIRST_CONNECTION_POLL: Duration = Duration::from_millis(100);
/// How often a read is sent again when connections die under it: a load balancer going away
/// takes all its connections, not one.
pub(super) const MAX_READ_RETRIES: u8 = 2;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub ready: usize,
    pub draining: usize,
    pub connecting: usize,
    pub streams_in_use: usize,
    /// Why a group has no ready connection, if one has none: the failure's kind, a bounded
    /// code (the details are in the log).
    pub last_error: Option<&'static str>,
}

/// In-flight depth at which a connection pinned by two or more clients is worth splitting:
/// below it, sharing costs nothing; above it, the clients' bursts queue behind each other.
pub(super) fn shared_grow_at(grow_at: usize) -> usize {
    (grow_at / 4).max(1)
}

/// Whether a client with `mine` requests in flight, on a connection carrying `on_conn` for
/// `clients` pinned clients, waits behind the others there: the connection is past the shared
/// depth, the others carry at least half of it, and the client is no lighter than half the
/// connection's average client. A light client beside one busy client is far below that
/// average, and the busy client has nobody deep to wait behind: neither grows the pool, which
/// would otherwise grow around the busy client to its depth over the shared depth.
fn waits_behind_others(on_conn: usize, mine: usize, clients: usize, shared: usize) -> bool {
    on_conn > shared
        && on_conn.saturating_sub(mine) >= shared / 2
        && mine.saturating_mul(clients).saturating_mul(2) >= on_conn
}

/// Why a request could not be sent: the client sees this as a retryable error.
fn unavailable_frame(p: &Pending, why: &str) -> Frame {
    // Stream 0: delivering the reply gives it the client's stream.
    ErrorReply::unavailable(why).frame(p.request.header.answer_version(), 0)
}

pub struct Pool {
    pub(super) target: UpstreamTarget,
    pub(super) settings: PoolSettings,
    pub(super) groups: Mutex<HashMap<GroupKey, Arc<Group>>>,
    /// The policy's statement cache, which client sessions share (see `CqlPolicy::prepared`).
    pub prepared: Arc<PreparedCache>,
    /// What answers call for: learning prepared statements, re-preparing, retry safety.
    pub(super) policy: CqlPolicy,
    next_id: AtomicU64,
    pub(super) me: Weak<Pool>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(target: UpstreamTarget, settings: PoolSettings) -> Arc<Pool> {
        let policy = CqlPolicy::new(settings.max_prepared);
        Arc::new_cyclic(|me| Pool {
            prepared: policy.prepared().clone(),
            policy,
            target,
            settings,
            groups: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Connections by state and stream ids in use, across groups (for gauges and /readyz).
    pub fn stats(&self) -> PoolStats {
        let groups: Vec<_> = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut s = PoolStats::default();
        for g in groups {
            s.connecting += g.connecting.load(Ordering::Acquire);
            for c in g.conns.load().iter() {
                match c.state() {
                    super::mux::ConnState::Ready => s.ready += 1,
                    super::mux::ConnState::Draining => s.draining += 1,
                    super::mux::ConnState::Dead => {}
                }
                s.streams_in_use += c.in_flight();
            }
            if s.last_error.is_none() && g.ready_count() == 0 {
                s.last_error = g.last_failure().map(|(_, e, _)| e.kind());
            }
        }
        s
    }

    /// Has the pool try to open its shared group in the background (a /readyz probe found no
    /// ready connection and must not wait for one); nothing if a connection is under way.
    pub(crate) fn warm_in_background(&self) {
        if self.stats().connecting > 0 {
            return;
        }
        let pool = self.arc();
        tokio::spawn(async move {
            let _ = pool.group(ProtocolVersion::V4, None).await;
        });
    }

    pub(super) fn arc(&self) -> Arc<Pool> {
        // `me` is set at construction and the pool is only reachable through an Arc.
        self.me.upgrade().expect("pool is alive while used")
    }

    pub(super) fn min_for(&self, group: &Arc<Group>) -> usize {
        match group.key.keyspace {
            None => self.settings.min_connections.max(1),
            // Keep one while any client session holds the group (the map and the maintenance
            // task hold the other references).
            Some(_) if Arc::strong_count(group) > 2 => 1,
            Some(_) => 0,
        }
    }

    /// For a keyspace group, its version's group without a keyspace (which the pool keeps
    /// warm, and whose back-off stands for the upstream's).
    fn base_of(&self, group: &Group) -> Option<Arc<Group>> {
        group.key.keyspace.as_ref()?;
        let key = GroupKey {
            version: group.key.version,
            keyspace: None,
        };
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }

    /// Drops a keyspace group that has no connection from the map: a keyspace that does not
    /// exist, or a `USE` during an outage, leaves nothing behind. Only this group: another
    /// for the same keyspace may have taken its place meanwhile.
    pub(super) fn forget_if_empty(&self, group: &Group) {
        if group.key.keyspace.is_none() || !group.conns.load().is_empty() {
            return;
        }
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if groups
            .get(&group.key)
            .is_some_and(|g| std::ptr::eq(g.as_ref(), group))
        {
            groups.remove(&group.key);
        }
    }

    fn get_or_create(&self, key: GroupKey) -> (Arc<Group>, bool) {
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(g) = groups.get(&key) {
            return (g.clone(), false);
        }
        let g = Arc::new(Group::new(key.clone()));
        groups.insert(key, g.clone());
        (g, true)
    }

    /// The group for `version` and `keyspace`, with at least one ready connection; or the error
    /// that prevented one (returned at once while the upstream is known to be down).
    pub async fn group(
        &self,
        version: ProtocolVersion,
        keyspace: Option<&str>,
    ) -> Result<Arc<Group>, Arc<UpstreamError>> {
        let key = GroupKey {
            version,
            keyspace: keyspace.map(Arc::from),
        };
        let (group, created) = self.get_or_create(key);
        if created {
            self.spawn_maintenance(group.clone());
        }
        *group.last_used.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        if group.ready_count() > 0 {
            return Ok(group);
        }
        let now = Instant::now();
        if let Some(err) = group.down(now) {
            return Err(err);
        }
        // A keyspace group dials the same upstream as its version's own group: while that one
        // has no connection and backs off, so does this one (else each `USE` during an outage
        // would open a connection attempt of its own).
        if let Some(err) = self.base_of(&group).and_then(|base| base.down(now)) {
            // Sessions in the keyspace keep a group they hold; one made for this USE goes.
            if created {
                self.forget_if_empty(&group);
            }
            return Err(err);
        }
        // Boxed: the first connection of a group is rare, and its handshake and waits would
        // otherwise be part of every session task, idle or not (tests/footprint.rs).
        Box::pin(self.first_connection(group, created)).await
    }

    /// Opens a connection into `group`, which has none ready, or waits for one under way:
    /// clients arriving together share at most `MAX_CONCURRENT_CONNECTS` attempts, within
    /// `--pool-max-connections`, rather than each opening its own (against a slow or
    /// black-holed upstream, one per client). A keyspace group this call `created` is forgotten
    /// again when its connection fails; one that sessions already hold stays theirs.
    async fn first_connection(
        &self,
        group: Arc<Group>,
        created: bool,
    ) -> Result<Arc<Group>, Arc<UpstreamError>> {
        let limit = MAX_CONCURRENT_CONNECTS.min(self.settings.max_connections.max(1));
        let since = Instant::now();
        let deadline = since + self.target.connect_timeout;
        loop {
            if group.ready_count() > 0 {
                return Ok(group);
            }
            if group.reserve_connect(|connecting| connecting < limit) {
                return self.opened(&group, created, self.open_counted(&group).await);
            }
            let changed = group.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if group.ready_count() > 0 {
                return Ok(group.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Arc::new(UpstreamError::Timeout(
                    self.target.connect_timeout,
                )));
            }
            // Woken when an attempt ends; polled as well, so that nothing hangs on a wake-up
            // that came before `enable`.
            let _ =
                tokio::time::timeout((deadline - now).min(FIRST_CONNECTION_POLL), changed).await;
            // Every attempt under way has ended without a connection: one that failed while
            // this client waited is its answer (else it tries itself on the next turn).
            if group.ready_count() == 0 && group.connecting.load(Ordering::Acquire) == 0 {
                if let Some((at, e, _)) = group.last_failure() {
                    if at >= since {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// What `group` returns once its own connection attempt has ended.
    fn opened(
        &self,
        group: &Arc<Group>,
        created: bool,
        result: Result<(), Arc<UpstreamError>>,
    ) -> Result<Arc<Group>, Arc<UpstreamError>> {
        match result {
            Ok(()) => Ok(group.clone()),
            Err(e) => {
                if group.ready_count() > 0 {
                    return Ok(group.clone());
                }
                if created {
                    self.forget_if_empty(group);
                }
                Err(e)
            }
        }
    }

    /// Opens one connection whose slot in `group.connecting` the caller has already taken.
    async fn open_counted(&self, group: &Arc<Group>) -> Result<(), Arc<UpstreamError>> {
        let params = OpenParams {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            version: group.key.version,
            keyspace: group.key.keyspace.clone(),
            max_streams: self.settings.max_streams_per_connection,
            max_rate: self.settings.max_rate_per_connection,
        };
        let owner: Arc<dyn ConnOwner> = self.arc();
        let started = Instant::now();
        let result = MuxConn::open(&self.target, params, owner).await;
        group.connecting.fetch_sub(1, Ordering::AcqRel);
        match result {
            Ok(conn) => {
                tracing::debug!(conn = conn.id, keyspace = ?group.key.keyspace, "upstream connection ready");
                // The back-off is cleared by the connection's first answer, not here: an
                // upstream that authenticates and then drops every connection would otherwise
                // get a reconnect per request (`on_closed`).
                group.add(conn);
                Ok(())
            }
            Err(e) => {
                let e = Arc::new(e);
                let reference = crate::reference::Reference::new();
                tracing::warn!(%reference, error = %e, keyspace = ?group.key.keyspace, "upstream connection failed");
                let now = Instant::now();
                group.record_failure(started, now, e.clone(), reference);
                // Only a missing keyspace is the keyspace group's own failure; the rest say
                // the upstream is down, and lengthen the back-off every group consults.
                if !matches!(*e, UpstreamError::UseFailed(_)) {
                    if let Some(base) = self.base_of(group) {
                        base.record_failure(started, now, e.clone(), reference);
                    }
                }
                group.changed.notify_waiters();
                Err(e)
            }
        }
    }

    /// Starts another connection in the background, within the group's limits.
    pub(super) fn grow(&self, group: &Arc<Group>) {
        self.grow_then(group, || {});
    }

    /// As `grow`, running `then` once the new connection is ready (not if none was started or
    /// it failed).
    pub(super) fn grow_then(&self, group: &Arc<Group>, then: impl FnOnce() + Send + 'static) {
        let open = group.conns.load().len();
        let room = |connecting: usize| {
            open + connecting < self.settings.max_connections
                && connecting < MAX_CONCURRENT_CONNECTS
        };
        // Checked first without a lock: at the pool's limit this runs on many requests.
        if !room(group.connecting.load(Ordering::Acquire)) {
            return;
        }
        if group.backing_off(Instant::now()) {
            return;
        }
        // The slot is taken here, not in the spawned task: callers on the same thread would
        // otherwise all see zero connections under way and each start one.
        if !group.reserve_connect(room) {
            return;
        }
        let (pool, group) = (self.arc(), group.clone());
        tokio::spawn(async move {
            if pool.open_counted(&group).await.is_ok() {
                then();
            }
        });
    }

    /// Grows `group` when even its least busy connection is deeper than `grow_at_in_flight`.
    /// One connection at a time: the queue only shrinks once the new one is ready, and growing
    /// on every request meanwhile would open the whole group at once.
    fn grow_if_deep(&self, group: &Arc<Group>, least_in_flight: Option<usize>) {
        if least_in_flight.is_some_and(|n| n > self.settings.grow_at_in_flight)
            && group.connecting.load(Ordering::Acquire) == 0
        {
            self.grow(group);
        }
    }

    /// Sends a request on the least busy connection of `group`, waiting briefly for capacity.
    /// Never hangs: without a usable connection the requester gets an OVERLOADED error.
    pub(crate) async fn dispatch(&self, group: &Arc<Group>, pending: Pending) {
        self.dispatch_from(group, pending, &mut Affinity::default())
            .await
    }

    /// As `dispatch`, preferring the connection this client is pinned to (see `Affinity`).
    pub(crate) async fn dispatch_from(
        &self,
        group: &Arc<Group>,
        pending: Pending,
        affinity: &mut Affinity,
    ) {
        if let Err(p) = self.try_dispatch_pinned(group, pending, affinity) {
            self.dispatch_waiting(group, p).await;
        }
    }

    /// The common case of `dispatch_from`, without an `async` frame: the pinned connection
    /// takes the request. Gives it back when another connection, or a wait, is needed.
    pub(crate) fn try_dispatch_pinned(
        &self,
        group: &Arc<Group>,
        pending: Pending,
        affinity: &mut Affinity,
    ) -> Result<(), Pending> {
        let grow_at = self.settings.grow_at_in_flight;
        // Deep enough for two clients' bursts to share a connection without splitting them.
        let spill_at = grow_at.saturating_mul(2);
        let mine = affinity.client_in_flight;
        let Some(conn) = affinity.usable(group, grow_at, spill_at) else {
            return Err(pending);
        };
        // Only a deep pinned connection makes the group worth scanning.
        let in_flight = conn.in_flight();
        if in_flight > grow_at {
            self.grow_if_deep(group, group.least_in_flight());
        } else if waits_behind_others(in_flight, mine, conn.affine(), shared_grow_at(grow_at))
            && conn.affine() >= 2
            && group.connecting.load(Ordering::Acquire) == 0
            && group.crowded(shared_grow_at(grow_at))
        {
            // Clients sharing connections that are deep on average, while they outnumber the
            // connections: each waits behind the others' requests, where going direct it would
            // have had a connection of its own. One more spreads them out (they are re-pinned
            // when the group changes). Growth stops once the connections are no deeper on
            // average than the shared depth, or at the pool's limit.
            self.grow(group);
        }
        conn.send(pending)
    }

    /// The least busy connection that can take `pending`, waiting briefly for capacity (what
    /// `dispatch_from` does when `try_dispatch_pinned` gave the request back).
    pub(crate) async fn dispatch_waiting(&self, group: &Arc<Group>, mut pending: Pending) {
        // Only computed when no connection can take the request at once.
        let mut deadline = None;
        loop {
            if let Some(conn) = group.pick() {
                // `pick` chose the least busy usable connection.
                self.grow_if_deep(group, Some(conn.in_flight()));
                match conn.send(pending) {
                    Ok(()) => return,
                    Err(p) => {
                        pending = p;
                        continue;
                    }
                }
            }
            self.grow(group);
            let no_connection =
                group.ready_count() == 0 && group.connecting.load(Ordering::Acquire) == 0;
            if no_connection {
                if let Some((_, e, reference)) = group.last_failure() {
                    // The failure's kind only: this runs per request, and the details were
                    // logged, under this reference, when the connection failed.
                    let why = format!(
                        "no connection to Keyspaces ({}; reference {reference} in the proxy's log)",
                        e.kind()
                    );
                    let f = unavailable_frame(&pending, &why);
                    pending.reply.deliver(f);
                    return;
                }
            }
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + self.target.connect_timeout);
            if Instant::now() >= deadline {
                let f =
                    unavailable_frame(&pending, "no upstream capacity within the connect timeout");
                pending.reply.deliver(f);
                return;
            }
            let wait = group
                .conns
                .load()
                .iter()
                .filter(|c| c.is_ready())
                .map(|c| c.wait_time())
                .min()
                .unwrap_or(Duration::from_millis(5))
                .clamp(Duration::from_micros(200), Duration::from_millis(5));
            let changed = group.changed.notified();
            let _ = tokio::time::timeout(wait, changed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::waits_behind_others;

    #[test]
    fn only_clients_waiting_behind_others_like_them_grow_the_pool() {
        // Two clients of 64 on one connection; sixteen of 8; sixty-four of 2.
        assert!(waits_behind_others(128, 64, 2, 64));
        assert!(waits_behind_others(128, 8, 16, 64));
        assert!(waits_behind_others(128, 2, 64, 64));
        // One busy client (2000) beside twenty light ones (one or two each): the busy one
        // waits behind nobody, the light ones are far below the connection's average client.
        assert!(!waits_behind_others(2020, 2000, 21, 64));
        assert!(!waits_behind_others(2020, 1, 21, 64));
        assert!(!waits_behind_others(2040, 2, 21, 64));
        // Shallow, however shared.
        assert!(!waits_behind_others(60, 30, 2, 64));
    }
}
