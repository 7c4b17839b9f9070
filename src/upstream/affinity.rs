//! Keeps one client's requests on one upstream connection while that connection has room.
//!
//! Spreading each request to the least busy connection splits a client's burst over every
//! connection of the group: its answers then come back in as many pieces, each a separate read
//! here and a separate write to the client, and the client answers with as many small bursts.
//! Measured on loopback, that fragmentation cost more CPU in the proxy, the client and the
//! server than the multiplexing saved. Sticking to one connection until it is as busy as the
//! pool's growth threshold keeps bursts whole; past it the request goes to the least busy one.

use std::sync::{Arc, Weak};

use super::mux::MuxConn;
use super::pool::Group;

/// The connection a client used last, and the group it belongs to (a USE moves the client to
/// another group, whose connections are bound to another keyspace).
#[derive(Debug, Default)]
pub struct Affinity {
    group: Weak<Group>,
    conn: Option<Arc<MuxConn>>,
}

impl Affinity {
    /// The remembered connection, if it serves `group` and can take one more request without
    /// passing `limit` requests in flight (taking a rate permit when it can).
    pub(super) fn usable(&self, group: &Arc<Group>, limit: usize) -> Option<&Arc<MuxConn>> {
        let conn = self.conn.as_ref()?;
        let same_group = std::ptr::eq(self.group.as_ptr(), Arc::as_ptr(group));
        (same_group
            && conn.is_ready()
            && conn.has_free_stream()
            && conn.in_flight() < limit
            && conn.try_acquire())
        .then_some(conn)
    }

    pub(super) fn remember(&mut self, group: &Arc<Group>, conn: &Arc<MuxConn>) {
        if !self.conn.as_ref().is_some_and(|c| {
            Arc::ptr_eq(c, conn) && std::ptr::eq(self.group.as_ptr(), Arc::as_ptr(group))
        }) {
            self.group = Arc::downgrade(group);
            self.conn = Some(conn.clone());
        }
    }
}
