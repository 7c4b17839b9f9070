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

use super::group::{Candidate, Group};
use super::mux::MuxConn;

/// The connection a client is pinned to, within one group (a USE moves the client to another
/// group, whose connections are bound to another keyspace).
#[derive(Debug, Default)]
pub struct Affinity {
    group: Weak<Group>,
    pinned: Pinned<MuxConn>,
    /// Requests the client has in flight (its session keeps this current): whether it waits
    /// behind others on a shared connection or is the one they wait behind.
    pub client_in_flight: usize,
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
        let same_group = self.belongs_to(group);
        if self
            .pinned
            .is_stale(same_group, || group.generation(), busy_at)
        {
            let generation = group.generation();
            self.pinned
                .repin(group.conns.load().as_slice(), generation, same_group);
            self.group = Arc::downgrade(group);
        }
        self.pinned.take_one(spill_at)
    }

    /// Whether the pin was taken in `group` (the `Weak` keeps its address from being reused).
    fn belongs_to(&self, group: &Arc<Group>) -> bool {
        std::ptr::eq(self.group.as_ptr(), Arc::as_ptr(group))
    }
}

/// The pin itself, over any kind of connection: what `Affinity` decides, testable on plain
/// values. The connection counts the pin (`Candidate::pin`) until it moves or is dropped.
#[derive(Debug)]
struct Pinned<C: Candidate> {
    /// The generation of the group's connections when the pin was chosen.
    generation: u64,
    conn: Option<Arc<C>>,
}

impl<C: Candidate> Default for Pinned<C> {
    fn default() -> Self {
        Pinned {
            generation: 0,
            conn: None,
        }
    }
}

impl<C: Candidate> Drop for Pinned<C> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            c.unpin();
        }
    }
}

impl<C: Candidate> Pinned<C> {
    /// Whether the pin must be chosen again: there is none, it was taken in another group
    /// (`same_group` false), its connection is no longer ready, the group's connections
    /// changed since (`generation`, read only when it matters), or it is `busy_at` deep.
    fn is_stale(&self, same_group: bool, generation: impl FnOnce() -> u64, busy_at: usize) -> bool {
        match &self.conn {
            Some(c) => {
                !same_group
                    || !c.is_ready()
                    || self.generation != generation()
                    || c.in_flight() >= busy_at
            }
            None => true,
        }
    }

    /// Pins to the ready connection of `conns` with the fewest pinned clients, keeping the
    /// current one unless another has at least two fewer (moving would then even them out).
    fn repin(&mut self, conns: &[Arc<C>], generation: u64, same_group: bool) {
        let least = conns
            .iter()
            .filter(|c| c.is_ready())
            .min_by_key(|c| (c.affine(), c.in_flight()));
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
        self.generation = generation;
    }

    /// The pinned connection if it can take one more request now: fewer than `spill_at` in
    /// flight, a free stream id and a rate permit (taken).
    fn take_one(&self, spill_at: usize) -> Option<&Arc<C>> {
        let conn = self.conn.as_ref()?;
        (conn.has_free_stream() && conn.in_flight() < spill_at && conn.try_acquire())
            .then_some(conn)
    }
}

#[cfg(test)]
// The fake connection is single-threaded (Cells); the code under test only needs `Arc`.
#[allow(clippy::arc_with_non_send_sync)]
mod tests {
    use crate::frame::ProtocolVersion;
    use std::net::SocketAddr;

    use super::*;
    use crate::upstream::group::fake::FakeConn;
    use crate::upstream::group::GroupKey;

    const BUSY_AT: usize = 256;
    const SPILL_AT: usize = 512;

    fn fakes(n: u8) -> Vec<Arc<FakeConn>> {
        (1..=n).map(|host| Arc::new(FakeConn::new(host))).collect()
    }

    /// Which of `conns` the pin is on.
    fn on(pinned: &Pinned<FakeConn>, conns: &[Arc<FakeConn>]) -> Option<usize> {
        let c = pinned.conn.as_ref()?;
        conns.iter().position(|o| Arc::ptr_eq(o, c))
    }

    /// What `Affinity::usable` does for one request, on a group of `conns` at `generation`:
    /// which connection takes it, if the pinned one can.
    fn take(
        pinned: &mut Pinned<FakeConn>,
        conns: &[Arc<FakeConn>],
        generation: u64,
        same_group: bool,
    ) -> Option<usize> {
        if pinned.is_stale(same_group, || generation, BUSY_AT) {
            pinned.repin(conns, generation, same_group);
        }
        let c = pinned.take_one(SPILL_AT)?;
        conns.iter().position(|o| Arc::ptr_eq(o, c))
    }

    fn pins(conns: &[Arc<FakeConn>]) -> Vec<usize> {
        conns.iter().map(|c| c.affine.get()).collect()
    }

    #[test]
    fn a_client_pins_to_the_connection_with_fewest_clients_then_the_least_busy() {
        let conns = fakes(3);
        conns[0].affine.set(3);
        conns[1].affine.set(1);
        conns[2].affine.set(1);
        conns[1].in_flight.set(9);
        conns[2].in_flight.set(4);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(2));
        assert_eq!(pins(&conns), [3, 1, 2]);
    }

    #[test]
    fn a_client_stays_on_its_connection_while_it_is_usable() {
        let conns = fakes(2);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        conns[0].affine.set(4); // others joined it
        conns[0].in_flight.set(BUSY_AT - 1);
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        assert_eq!(
            pins(&conns),
            [4, 0],
            "not moved while the group is unchanged"
        );
    }

    #[test]
    fn a_change_of_connections_moves_the_pin_only_to_even_them_out() {
        let mut conns = fakes(2);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        conns[0].affine.set(3);
        conns[1].affine.set(2);
        // A connection fewer by one client only: moving would not even them out.
        assert_eq!(take(&mut pinned, &conns, 1, true), Some(0));
        // A new connection, three clients fewer: moved to it.
        conns.push(Arc::new(FakeConn::new(3)));
        assert_eq!(take(&mut pinned, &conns, 2, true), Some(2));
        assert_eq!(pins(&conns), [2, 2, 1]);
        // Its connection gone from the group: moved, whatever the counts.
        let left = [conns[0].clone(), conns[1].clone()];
        assert_eq!(take(&mut pinned, &left, 3, true), Some(0));
        assert_eq!(pins(&conns), [3, 2, 0]);
    }

    #[test]
    fn a_client_in_another_group_pins_there_and_lets_go_of_the_old_one() {
        let (first, second) = (fakes(1), fakes(2));
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &first, 0, true), Some(0));
        second[0].affine.set(1);
        assert_eq!(take(&mut pinned, &second, 0, false), Some(1));
        assert_eq!(pins(&first), [0]);
        assert_eq!(pins(&second), [1, 1]);
    }

    #[test]
    fn a_pin_too_deep_moves_to_a_connection_with_two_fewer_clients() {
        let conns = fakes(2);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        conns[0].affine.set(3);
        conns[1].affine.set(2);
        conns[0].in_flight.set(BUSY_AT);
        assert_eq!(
            take(&mut pinned, &conns, 0, true),
            Some(0),
            "deep, but the other is as shared"
        );
        conns[1].affine.set(1);
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(1));
        assert_eq!(pins(&conns), [2, 2]);
    }

    #[test]
    fn a_request_the_pinned_connection_cannot_take_goes_elsewhere_without_moving_the_pin() {
        let conns = fakes(2);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        conns[0].affine.set(2);
        conns[1].affine.set(1);
        conns[0].in_flight.set(SPILL_AT);
        assert_eq!(take(&mut pinned, &conns, 0, true), None, "spills");
        conns[0].in_flight.set(0);
        conns[0].free_stream.set(false);
        assert_eq!(take(&mut pinned, &conns, 0, true), None, "no stream id");
        conns[0].free_stream.set(true);
        conns[0].permits.set(0);
        assert_eq!(take(&mut pinned, &conns, 0, true), None, "no rate budget");
        assert_eq!(on(&pinned, &conns), Some(0));
        assert_eq!(pins(&conns), [2, 1]);
    }

    #[test]
    fn a_pin_on_a_connection_no_longer_ready_moves_or_goes() {
        let conns = fakes(2);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        conns[0].ready.set(false);
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(1));
        assert_eq!(pins(&conns), [0, 1]);
        conns[1].ready.set(false);
        assert_eq!(take(&mut pinned, &conns, 0, true), None);
        assert_eq!(on(&pinned, &conns), None);
        assert_eq!(pins(&conns), [0, 0]);
    }

    #[test]
    fn a_dropped_pin_no_longer_counts() {
        let conns = fakes(1);
        let mut pinned = Pinned::default();
        assert_eq!(take(&mut pinned, &conns, 0, true), Some(0));
        assert_eq!(pins(&conns), [1]);
        drop(pinned);
        assert_eq!(pins(&conns), [0]);
    }

    /// The same on real groups (connections with no sockets): an affinity follows its group's
    /// changes and a move to another group.
    #[test]
    fn an_affinity_follows_its_groups() {
        let open = |id: u64| MuxConn::idle_for_tests(id, SocketAddr::from(([127, 0, 1, 1], 9142)));
        let group = |keyspace: Option<&str>| {
            Arc::new(Group::new(GroupKey {
                version: ProtocolVersion::V4,
                keyspace: keyspace.map(Arc::from),
            }))
        };
        let usable = |affinity: &mut Affinity, group: &Arc<Group>| {
            affinity.usable(group, BUSY_AT, SPILL_AT).cloned()
        };
        let (shared, a, b) = (group(None), open(1), open(2));
        shared.add(a.clone());
        let mut affinity = Affinity::default();
        assert!(usable(&mut affinity, &shared).is_some_and(|c| Arc::ptr_eq(&c, &a)));
        assert_eq!(a.affine(), 1);
        a.pin(); // two other clients
        a.pin();
        shared.add(b.clone());
        assert!(usable(&mut affinity, &shared).is_some_and(|c| Arc::ptr_eq(&c, &b)));
        assert_eq!((a.affine(), b.affine()), (2, 1));
        let (keyspace, c) = (group(Some("shop")), open(3));
        keyspace.add(c.clone());
        assert!(usable(&mut affinity, &keyspace).is_some_and(|got| Arc::ptr_eq(&got, &c)));
        assert_eq!((b.affine(), c.affine()), (0, 1));
        drop(affinity);
        assert_eq!(c.affine(), 0);
    }

    /// While its group and connection stay as they were, a client stays put even where a
    /// re-pin would move it: re-pinning on every request would cost a scan and two atomic
    /// updates each.
    #[test]
    fn an_affinity_stays_while_nothing_changed() {
        let open = |id: u64| MuxConn::idle_for_tests(id, SocketAddr::from(([127, 0, 1, 1], 9142)));
        let shared = Arc::new(Group::new(GroupKey {
            version: ProtocolVersion::V4,
            keyspace: None,
        }));
        let (a, b) = (open(1), open(2));
        shared.add(a.clone());
        shared.add(b.clone());
        let mut affinity = Affinity::default();
        let first = affinity.usable(&shared, BUSY_AT, SPILL_AT).cloned();
        assert!(first.is_some_and(|c| Arc::ptr_eq(&c, &a)));
        // Two more clients on `a`: a fresh pin would now choose `b`.
        a.pin();
        a.pin();
        for _ in 0..3 {
            let again = affinity.usable(&shared, BUSY_AT, SPILL_AT).cloned();
            assert!(again.is_some_and(|c| Arc::ptr_eq(&c, &a)));
        }
        assert_eq!((a.affine(), b.affine()), (3, 0));
    }
}
