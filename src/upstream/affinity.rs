//! Keeps each client's requests on one upstream connection, and spreads clients evenly over the
//! connections.
//!
//! Sending every request to the least busy connection splits a client's burst over every
//! connection of the group: its answers come back in as many pieces, each a separate read here
//! and a separate write to the client, and the client answers with as many small bursts.
//! Measured on loopback, that fragmentation cost more CPU in the proxy, the client and the
//! server than the balancing gained. So a client is pinned to the connection with the fewest
//! pinned clients, re-pinned when the group changes or its connection is busy while another has
//! two clients fewer, and only a request its connection cannot take (no stream id, no rate
//! budget, or deeper than the spill depth) goes elsewhere.

use std::sync::{Arc, Weak};

use super::mux::MuxConn;
use super::pool::Group;

/// The connection a client is pinned to, within one group (a USE moves the client to another
/// group, whose connections are bound to another keyspace).
#[derive(Debug, Default)]
pub struct Affinity {
    group: Weak<Group>,
    generation: u64,
    conn: Option<Arc<MuxConn>>,
    /// Requests the client has in flight (its session keeps this current): whether it is busy
    /// enough for sharing a connection to cost it.
    pub client_in_flight: usize,
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            c.unpin();
        }
    }
}

impl Affinity {
    /// The pinned connection if it can take one more request now: fewer than `spill_at` in
    /// flight, a free stream id and a rate permit (taken). Re-pins first when the group's
    /// connections changed, the pinned one is no longer ready, or it is deeper than `busy_at`
    /// (then a less shared connection may exist).
    pub(super) fn usable(
        &mut self,
        group: &Arc<Group>,
        busy_at: usize,
        spill_at: usize,
    ) -> Option<&Arc<MuxConn>> {
        let stale = match &self.conn {
            Some(c) => {
                !self.belongs_to(group)
                    || !c.is_ready()
                    || self.generation != group.generation()
                    || c.in_flight() >= busy_at
            }
            None => true,
        };
        if stale {
            self.repin(group);
        }
        let conn = self.conn.as_ref()?;
        (conn.has_free_stream() && conn.in_flight() < spill_at && conn.try_acquire())
            .then_some(conn)
    }

    /// Whether the pin was taken in `group` (the `Weak` keeps its address from being reused).
    fn belongs_to(&self, group: &Arc<Group>) -> bool {
        std::ptr::eq(self.group.as_ptr(), Arc::as_ptr(group))
    }

    /// Pins to the ready connection with the fewest pinned clients, keeping the current one
    /// unless another has at least two fewer (moving would then even them out).
    fn repin(&mut self, group: &Arc<Group>) {
        let generation = group.generation();
        let conns = group.conns.load();
        let least = conns
            .iter()
            .filter(|c| c.is_ready())
            .min_by_key(|c| (c.affine(), c.in_flight()));
        let same_group = self.belongs_to(group);
        let current = self
            .conn
            .as_ref()
            .filter(|c| same_group && c.is_ready() && conns.iter().any(|o| Arc::ptr_eq(o, c)));
        let keep = match (current, least) {
            (Some(c), Some(l)) => l.affine() + 2 > c.affine(),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !keep {
            let next = least.cloned();
            if let Some(n) = &next {
                n.pin();
            }
            if let Some(old) = std::mem::replace(&mut self.conn, next) {
                old.unpin();
            }
        }
        self.group = Arc::downgrade(group);
        self.generation = generation;
    }
}
