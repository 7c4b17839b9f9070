//! The pool's background work, one task per group: expire unanswered requests, re-sign
//! connections before their credentials expire, heartbeat, shrink an idle group and retire
//! keyspace groups nobody uses.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::addresses::crowded;
use super::group::Group;
use super::mux::MuxConn;
use super::pool::Pool;
use super::streams::{Pending, ReplyTo};
use crate::frame::messages::{self, error_code};
use tokio::sync::oneshot;

const MAINTENANCE_TICK: Duration = Duration::from_millis(500);
/// At most one connection moved between addresses per group this often.
const REBALANCE_EVERY: Duration = Duration::from_secs(5);
/// How long a TCP connect may take to show that an address is back.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// When a group's periodic work last ran, and the request count it last saw.
struct Rhythm {
    last_heartbeat: Instant,
    window_start: Instant,
    window_sent: u64,
    last_rebalance: Instant,
}

impl Pool {
    pub(super) fn spawn_maintenance(&self, group: Arc<Group>) {
        let pool = self.me.clone();
        tokio::spawn(async move {
            let now = Instant::now();
            let mut rhythm = Rhythm {
                last_heartbeat: now,
                window_start: now,
                window_sent: 0,
                last_rebalance: now,
            };
            loop {
                tokio::time::sleep(MAINTENANCE_TICK).await;
                let Some(pool) = pool.upgrade() else { return };
                if !pool.maintain(&group, &mut rhythm) {
                    return;
                }
            }
        });
    }

    /// One maintenance pass; false when the group has been retired.
    fn maintain(&self, group: &Arc<Group>, rhythm: &mut Rhythm) -> bool {
        group.remove_dead_and_drained();
        let conns = group.connections();
        for c in conns.iter() {
            for p in c.expire(self.settings.request_timeout) {
                let secs = self.settings.request_timeout.as_secs_f32();
                let f = messages::error(
                    p.request.header.protocol_version(),
                    0,
                    error_code::SERVER_ERROR,
                    &format!("keyspaces-proxy: no answer from Keyspaces within {secs} s"),
                );
                p.reply.deliver(f);
            }
        }
        // Re-sign before the credentials behind a connection expire.
        let now = SystemTime::now();
        for c in conns.iter().filter(|c| c.is_ready()) {
            let expiring = c.credentials_expiry.is_some_and(|exp| {
                exp.duration_since(now)
                    .map_or(true, |left| left < self.settings.recycle_before_expiry)
            });
            if expiring {
                tracing::info!(
                    conn = c.id,
                    "recycling upstream connection before its credentials expire"
                );
                c.drain();
                self.grow(group);
            }
        }
        if rhythm.last_heartbeat.elapsed() >= self.settings.heartbeat_interval {
            rhythm.last_heartbeat = Instant::now();
            for c in conns.iter().filter(|c| c.is_ready()) {
                self.heartbeat(c.clone());
            }
        }
        // Shrink when the load would fit in one connection fewer, at half the budget.
        let sent: u64 = conns.iter().map(|c| c.sent()).sum();
        let window_start = rhythm.window_start;
        if window_start.elapsed() >= self.settings.shrink_window {
            let ready: Vec<_> = conns.iter().filter(|c| c.is_ready()).collect();
            let rate = sent.saturating_sub(rhythm.window_sent) as f64
                / window_start.elapsed().as_secs_f64();
            let budget = f64::from(self.settings.max_rate_per_connection);
            let fewer = ready.len().saturating_sub(1);
            let fits_rate = if budget > 0.0 {
                rate < fewer as f64 * budget * 0.5
            } else {
                rate == 0.0
            };
            // Growth also follows queue depth, so shrinking must leave room for it: otherwise
            // a slow but deep workload would open and close a connection every window.
            let in_flight: usize = ready.iter().map(|c| c.in_flight()).sum();
            let shared = super::pool::shared_grow_at(self.settings.grow_at_in_flight);
            let fits = fits_rate && in_flight <= fewer * shared / 2;
            if ready.len() > self.min_for(group) && fits {
                if let Some(c) = ready.iter().min_by_key(|c| c.in_flight()) {
                    tracing::debug!(conn = c.id, "shrinking idle upstream group");
                    c.drain();
                }
            }
            rhythm.window_start = Instant::now();
            rhythm.window_sent = sent;
        }
        if rhythm.last_rebalance.elapsed() >= REBALANCE_EVERY {
            rhythm.last_rebalance = Instant::now();
            self.rebalance(group);
        }
        let live = group.ready_count() + group.connecting.load(Ordering::Acquire);
        if live < self.min_for(group) {
            self.grow(group);
        }
        // Retire keyspace groups nobody uses any more.
        if group.key.keyspace.is_some()
            && Arc::strong_count(group) <= 2
            && group.conns.load().is_empty()
        {
            let idle = group
                .last_used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed()
                > self.settings.shrink_window;
            if idle {
                self.groups
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&group.key);
                return false;
            }
        }
        true
    }

    /// Moves one connection off an address crowded relative to the others (see
    /// `addresses::crowded`): drained, so that nothing in flight on it is lost.
    fn rebalance(&self, group: &Arc<Group>) {
        if group.connecting.load(Ordering::Acquire) > 0 {
            return;
        }
        let ready: Vec<_> = group
            .connections()
            .iter()
            .filter(|c| c.is_ready())
            .cloned()
            .collect();
        let on: Vec<_> = ready.iter().map(|c| c.address.addr).collect();
        let book = &self.target.addresses;
        let now = Instant::now();
        for addr in book.probes_due(now, PROBE_TIMEOUT) {
            let book = book.clone();
            tokio::spawn(async move {
                let connect = tokio::net::TcpStream::connect(addr);
                let ok = matches!(
                    tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                    Ok(Ok(_))
                );
                book.probed(addr, ok, Instant::now());
            });
        }
        let Some(crowded) = crowded(&on, &book.settled(now)) else {
            return;
        };
        if let Some(c) = ready.iter().find(|c| c.address.addr == crowded).cloned() {
            tracing::debug!(conn = c.id, address = %crowded, "moving a connection to a less used address");
            // Drained only once its replacement is ready: a move never costs capacity.
            self.grow_then(group, move || c.drain());
        }
    }

    fn heartbeat(&self, conn: Arc<MuxConn>) {
        let timeout = self.settings.request_timeout;
        tokio::spawn(async move {
            let (tx, rx) = oneshot::channel();
            let p = Pending::new(messages::options(conn.version, 0), ReplyTo::Internal(tx));
            if conn.send(p).is_err() {
                return;
            }
            if !matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(_))) {
                tracing::warn!(
                    conn = conn.id,
                    "upstream heartbeat unanswered; closing the connection"
                );
                conn.close();
            }
        });
    }
}
