//! The pool's background work, one task per group: expire unanswered requests, re-sign
//! connections before their credentials expire, heartbeat, shrink an idle group and retire
//! keyspace groups nobody uses. What to do is decided in `upkeep`, on a snapshot; this is the
//! part that acts.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::group::Group;
use super::mux::MuxConn;
use super::pool::Pool;
use super::streams::{Pending, ReplyTo};
use super::upkeep::{self, Action, ConnView, Limits, Rhythm};
use crate::frame::messages;
use crate::frame::ErrorReply;
use tokio::sync::oneshot;

const MAINTENANCE_TICK: Duration = Duration::from_millis(500);
/// How long a TCP connect may take to show that an address is back.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl Pool {
    pub(super) fn spawn_maintenance(&self, group: Arc<Group>) {
        let pool = self.me.clone();
        tokio::spawn(async move {
            let mut rhythm = Rhythm::new(Instant::now());
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
        self.expire_unanswered(&conns);
        let views: Vec<ConnView<&Arc<MuxConn>>> = conns
            .iter()
            .map(|c| ConnView {
                conn: c,
                ready: c.is_ready(),
                in_flight: c.in_flight(),
                sent: c.sent(),
                credentials_expiry: c.credentials_expiry,
            })
            .collect();
        let limits = Limits {
            heartbeat_interval: self.settings.heartbeat_interval,
            recycle_before_expiry: self.settings.recycle_before_expiry,
            shrink_window: self.settings.shrink_window,
            max_rate_per_connection: self.settings.max_rate_per_connection,
            shared_grow_at: super::pool::shared_grow_at(self.settings.grow_at_in_flight),
            min_ready: self.min_for(group),
        };
        let actions = upkeep::plan(&views, &limits, Instant::now(), SystemTime::now(), rhythm);
        for action in actions {
            match action {
                Action::Recycle(c) => {
                    tracing::info!(
                        conn = c.id,
                        "recycling upstream connection before its credentials expire"
                    );
                    c.drain();
                    self.grow(group);
                }
                Action::Heartbeat(c) => self.heartbeat(c.clone()),
                Action::Shrink(c) => {
                    tracing::debug!(conn = c.id, "shrinking idle upstream group");
                    c.drain();
                }
                Action::Rebalance => self.rebalance(group),
            }
        }
        let ready = group.ready_count();
        let connecting = group.connecting.load(Ordering::Acquire);
        if upkeep::below_minimum(ready, connecting, self.min_for(group)) {
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
                self.forget_if_empty(group);
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
                book.probed(addr, ok, now, Instant::now());
            });
        }
        let settled = book.settled(now);
        let moved = upkeep::connection_to_move(&on, &settled).and_then(|i| ready.get(i));
        let Some(c) = moved.cloned() else {
            return;
        };
        tracing::debug!(conn = c.id, address = %c.address.addr, "moving a connection to a less used address");
        // Drained only once its replacement is ready: a move never costs capacity.
        self.grow_then(group, move || c.drain());
    }

    /// Answers the requests no answer came for within the request timeout.
    fn expire_unanswered(&self, conns: &[Arc<MuxConn>]) {
        for c in conns {
            for p in c.expire(self.settings.request_timeout) {
                let f = ErrorReply::no_answer_within(self.settings.request_timeout)
                    .frame(p.request.header.answer_version(), 0);
                p.reply.deliver(f);
            }
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
            let outcome = tokio::time::timeout(timeout, rx).await;
            if upkeep::heartbeat_unanswered(&outcome) {
                tracing::warn!(
                    conn = conn.id,
                    "upstream heartbeat unanswered; closing the connection"
                );
                conn.close();
            }
        });
    }
}
