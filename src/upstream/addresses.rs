//! Every address the upstream endpoint offers: Keyspaces' regional endpoint resolves to several
//! load balancers (its `system.peers` lists them), and connections should spread over them.
//! Each new connection goes to the usable address with the fewest connections (in turn among
//! equals); an address that refuses or fails a handshake sits out with back-off while the
//! others carry the load. The TLS server name and
//! the SigV4 host stay the endpoint's name: only where to dial changes.
//!
//! The choices are pure (the caller passes the time); resolving is the only I/O.
//!
//! What the upstream lists is not trusted: peers must be addresses of the kind the endpoint
//! itself resolved to (loopback, private or public, same family; never unspecified,
//! broadcast, multicast or link-local such as the instance metadata service), and at most
//! `MAX_ADDRESSES` are kept, which also bounds the per-address metric series.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{metrics, Address};

/// Keyspaces lists 9 load balancers (3 for FIPS); a VPC endpoint one per subnet.
const MAX_ADDRESSES: usize = 32;

/// How long DNS answers are used before the name is resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// Back-off after a failure, doubling per failure in a row, at most `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Entry {
    addr: SocketAddr,
    /// Named by DNS, by the upstream's system.peers, or both; kept while either names it.
    in_dns: bool,
    in_peers: bool,
    failures: u32,
    /// When the last failure that lengthened the back-off (counted in `failures`) happened.
    escalated_at: Option<Instant>,
    retry_at: Option<Instant>,
    /// Connections open to it now (see `AddressLease`).
    open: usize,
    /// It accepted a connection (or a probe) since it last failed: worth moving connections
    /// to. An address listed but never reached is tried by new connections, not rebalancing.
    reachable: bool,
}

impl Entry {
    /// Not sitting out a back-off.
    fn usable(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|t| t <= now)
    }
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next: usize,
    resolved_at: Option<Instant>,
    peers_at: Option<Instant>,
}

impl State {
    fn entry(&mut self, addr: SocketAddr) -> Option<&mut Entry> {
        self.entries.iter_mut().find(|e| e.addr == addr)
    }
}

#[derive(Debug)]
pub struct AddressBook {
    /// `host:port` as configured.
    endpoint: String,
    port: u16,
    state: Mutex<State>,
}

impl AddressBook {
    pub fn new(endpoint: &str) -> AddressBook {
        let port = endpoint
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(9142);
        AddressBook {
            endpoint: endpoint.to_owned(),
            port,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The address for the next connection, resolving the endpoint when its answers are stale.
    pub async fn pick(&self) -> std::io::Result<SocketAddr> {
        let now = Instant::now();
        let stale = self
            .lock()
            .resolved_at
            .is_none_or(|at| now.duration_since(at) >= RESOLVE_EVERY);
        if stale {
            match tokio::net::lookup_host(self.endpoint.as_str()).await {
                Ok(found) => self.resolved(found.collect(), now),
                // Keep what is known; with nothing known the error is the caller's.
                Err(e) if self.lock().entries.is_empty() => return Err(e),
                Err(e) => {
                    tracing::warn!(endpoint = %self.endpoint, error = %e, "cannot resolve the endpoint again; using the addresses known")
                }
            }
        }
        self.choose(now).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} resolves to no address", self.endpoint),
            )
        })
    }

    /// DNS answered `found`: addresses that disappeared are dropped, those that stay keep their
    /// back-off.
    fn resolved(&self, mut found: Vec<SocketAddr>, now: Instant) {
        found.truncate(MAX_ADDRESSES);
        let mut s = self.lock();
        s.resolved_at = Some(now);
        for e in s.entries.iter_mut() {
            e.in_dns = found.contains(&e.addr);
        }
        add(&mut s.entries, &found, |e| e.in_dns = true);
        forget_unnamed(&mut s.entries);
    }

    /// Whether the upstream's `system.peers` should be read (again) now.
    pub fn wants_peers(&self, now: Instant) -> bool {
        self.lock()
            .peers_at
            .is_none_or(|at| now.duration_since(at) >= RESOLVE_EVERY)
    }

    /// The upstream reached at `reached` listed `peers` in `system.peers` (at the endpoint's
    /// port): those of the same kind as `reached` replace the peers learned before.
    pub fn learned_peers(&self, peers: &[IpAddr], reached: IpAddr, now: Instant) {
        let port = self.port;
        let mut wanted: Vec<SocketAddr> = Vec::new();
        for ip in peers.iter().filter(|ip| same_kind(**ip, reached)) {
            let addr = SocketAddr::new(*ip, port);
            if !wanted.contains(&addr) {
                wanted.push(addr);
            }
            if wanted.len() == MAX_ADDRESSES {
                break;
            }
        }
        let mut s = self.lock();
        s.peers_at = Some(now);
        for e in s.entries.iter_mut() {
            e.in_peers = wanted.contains(&e.addr);
        }
        let room = MAX_ADDRESSES.saturating_sub(s.entries.iter().filter(|e| e.in_dns).count());
        let new: Vec<SocketAddr> = wanted
            .into_iter()
            .filter(|a| !s.entries.iter().any(|e| e.addr == *a))
            .take(room)
            .collect();
        add(&mut s.entries, &new, |e| e.in_peers = true);
        forget_unnamed(&mut s.entries);
    }

    /// The usable address with the fewest connections, in turn among equals (so an address
    /// that comes back takes the next connections); when none is usable, the one back soonest.
    fn choose(&self, now: Instant) -> Option<SocketAddr> {
        let mut s = self.lock();
        let n = s.entries.len();
        let best = (0..n)
            .map(|i| (s.next + i) % n)
            .filter(|&at| s.entries[at].usable(now))
            .min_by_key(|&at| s.entries[at].open);
        if let Some(at) = best {
            s.next = (at + 1) % n;
            return Some(s.entries[at].addr);
        }
        s.entries.iter().min_by_key(|e| e.retry_at).map(|e| e.addr)
    }

    /// A connection to `addr` begun at `started` failed at `now` (TCP, TLS or the CQL
    /// handshake): counted per address, and the address sits out.
    pub fn dial_failed(&self, addr: SocketAddr, started: Instant, now: Instant) {
        metrics()
            .upstream_address_failures
            .get_or_create(&Address {
                address: addr.to_string(),
            })
            .inc();
        self.failed(addr, started, now);
    }

    /// `addr` refused a connection or failed its handshake: it sits out, longer each time —
    /// but attempts under way together fail together (one cut), and only the first of them
    /// lengthens the back-off, as for a group's (`Group::record_failure`).
    pub fn failed(&self, addr: SocketAddr, started: Instant, now: Instant) {
        if let Some(e) = self.lock().entry(addr) {
            e.reachable = false;
            if super::group::escalates(started, e.escalated_at) {
                e.failures = e.failures.saturating_add(1);
                e.escalated_at = Some(now);
            }
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << e.failures.saturating_sub(1).min(6))
                .min(MAX_BACKOFF);
            e.retry_at = e.retry_at.max(Some(now + backoff));
        }
    }

    /// A connection to `addr` succeeded: the address is good again, and counts the connection
    /// until the lease is dropped.
    pub fn lease(self: &Arc<Self>, addr: SocketAddr) -> AddressLease {
        if let Some(e) = self.lock().entry(addr) {
            e.failures = 0;
            e.escalated_at = None;
            e.retry_at = None;
            e.open += 1;
            e.reachable = true;
        }
        AddressLease {
            book: self.clone(),
            addr,
            released: AtomicBool::new(false),
        }
    }

    /// Addresses not known to be reachable whose back-off is over: the caller checks each with
    /// a TCP connect (`probed`), so that one that came back is used again without a handshake
    /// spent on one that has not. They sit out while the probe runs.
    pub fn probes_due(&self, now: Instant, timeout: Duration) -> Vec<SocketAddr> {
        let mut s = self.lock();
        let mut due = Vec::new();
        for e in s.entries.iter_mut() {
            if !e.reachable && e.usable(now) {
                e.retry_at = Some(now + timeout);
                due.push(e.addr);
            }
        }
        due
    }

    /// A probe of `addr` begun at `started` connected (`ok`) or not.
    pub fn probed(&self, addr: SocketAddr, ok: bool, started: Instant, now: Instant) {
        if !ok {
            return self.failed(addr, started, now);
        }
        if let Some(e) = self.lock().entry(addr) {
            e.reachable = true;
            e.retry_at = None;
        }
    }

    /// Open connections by address, for every address known.
    pub fn connections(&self) -> Vec<(SocketAddr, usize)> {
        self.lock()
            .entries
            .iter()
            .map(|e| (e.addr, e.open))
            .collect()
    }

    /// The addresses connections may be moved to: reachable and not sitting out.
    pub fn settled(&self, now: Instant) -> Vec<SocketAddr> {
        let s = self.lock();
        s.entries
            .iter()
            .filter(|e| e.reachable && e.usable(now))
            .map(|e| e.addr)
            .collect()
    }

    /// Addresses known, and those usable now (for `/readyz` and `check`).
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let s = self.lock();
        let usable = s.entries.iter().filter(|e| e.usable(now)).count();
        (s.entries.len(), usable)
    }
}

/// The address one of a group's connections should move away from, when the group's
/// connections (`on`, one address each) are spread over the `usable` addresses unevenly by two
/// or more — an address that came back, or one the others filled in for, gets its share again.
pub fn crowded(on: &[SocketAddr], usable: &[SocketAddr]) -> Option<SocketAddr> {
    let count = |a: &SocketAddr| on.iter().filter(|c| *c == a).count();
    let fewest = usable.iter().map(count).min()?;
    let most = on.iter().max_by_key(|a| count(a))?;
    (count(most) >= fewest + 2).then_some(*most)
}

/// One open connection to one of the endpoint's addresses: counted until it closes.
#[derive(Debug)]
pub struct AddressLease {
    book: Arc<AddressBook>,
    pub addr: SocketAddr,
    released: AtomicBool,
}

impl AddressLease {
    /// The connection closed (its handle may live on in clients pinned to it).
    pub fn release(&self) {
        if self.released.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(e) = self.book.lock().entry(self.addr) {
            e.open = e.open.saturating_sub(1);
        }
    }
}

impl Drop for AddressLease {
    fn drop(&mut self) {
        self.release();
    }
}

/// Whether `peer`, listed by the upstream reached at `reached`, may be dialled: the same
/// family and kind (loopback, private, public), and never an address that is not one host's.
fn same_kind(peer: IpAddr, reached: IpAddr) -> bool {
    kind(peer).is_some() && kind(peer) == kind(reached)
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Kind {
    Loopback4,
    Private4,
    Public4,
    Loopback6,
    Private6,
    Public6,
}

fn kind(ip: IpAddr) -> Option<Kind> {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            let shared = a == 100 && (b & 0xc0) == 64; // 100.64.0.0/10
            if v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_documentation()
                || a == 0
            {
                None
            } else if v4.is_loopback() {
                Some(Kind::Loopback4)
            } else if v4.is_private() || shared {
                Some(Kind::Private4)
            } else {
                Some(Kind::Public4)
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return kind(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_unspecified() || v6.is_multicast() || (first & 0xffc0) == 0xfe80 {
                None
            } else if v6.is_loopback() {
                Some(Kind::Loopback6)
            } else if (first & 0xfe00) == 0xfc00 {
                Some(Kind::Private6)
            } else {
                Some(Kind::Public6)
            }
        }
    }
}

/// Drops the addresses neither DNS nor the peers name any more, with their failure series.
fn forget_unnamed(entries: &mut Vec<Entry>) {
    entries.retain(|e| {
        let named = e.in_dns || e.in_peers;
        if !named {
            metrics().upstream_address_failures.remove(&Address {
                address: e.addr.to_string(),
            });
        }
        named
    });
}

/// Adds the addresses of `found` not yet in `entries`, marked by `mark`.
fn add(entries: &mut Vec<Entry>, found: &[SocketAddr], mark: impl Fn(&mut Entry)) {
    for addr in found {
        if !entries.iter().any(|e| e.addr == *addr) {
            let mut entry = Entry {
                addr: *addr,
                in_dns: false,
                in_peers: false,
                failures: 0,
                escalated_at: None,
                retry_at: None,
                open: 0,
                reachable: false,
            };
            mark(&mut entry);
            entries.push(entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 1, last], 9142))
    }

    #[test]
    fn connections_go_round_and_failed_addresses_sit_out() {
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        book.resolved(vec![addr(1), addr(2), addr(3)], t0);
        let picks: Vec<_> = (0..6).map(|_| book.choose(t0).unwrap()).collect();
        assert_eq!(
            picks,
            [addr(1), addr(2), addr(3), addr(1), addr(2), addr(3)]
        );
        book.failed(addr(2), t0, t0);
        let picks: Vec<_> = (0..4).map(|_| book.choose(t0).unwrap()).collect();
        assert!(!picks.contains(&addr(2)), "{picks:?}");
        assert_eq!(book.counts(t0), (3, 2));
        // Back after its back-off, and for good after a success.
        let later = t0 + FIRST_BACKOFF;
        assert!((0..3).any(|_| book.choose(later) == Some(addr(2))));
        book.failed(addr(2), later, later);
        let again = later + Duration::from_millis(1);
        book.failed(addr(2), again, again);
        assert_eq!(
            book.counts(later + FIRST_BACKOFF * 2).1,
            2,
            "longer each time"
        );
        let book = Arc::new(book);
        let _lease = book.lease(addr(2));
        assert_eq!(book.counts(later).1, 3);
    }

    #[test]
    fn dns_and_peers_merge_and_disappearing_addresses_go() {
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        book.resolved(vec![addr(1), addr(2)], t0);
        book.learned_peers(&[addr(2).ip(), addr(3).ip()], addr(1).ip(), t0);
        assert_eq!(book.counts(t0).0, 3, "addr 2 once");
        book.failed(addr(1), t0, t0);
        book.resolved(vec![addr(1)], t0);
        assert_eq!(
            book.counts(t0),
            (3, 2),
            "1 kept its back-off; 2 stays as a peer"
        );
        book.learned_peers(&[], addr(1).ip(), t0);
        assert_eq!(book.counts(t0).0, 1);
    }

    #[test]
    fn with_every_address_out_the_soonest_back_is_tried() {
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        book.resolved(vec![addr(1), addr(2)], t0);
        book.failed(addr(1), t0, t0);
        let again = t0 + Duration::from_millis(1);
        book.failed(addr(1), again, again);
        book.failed(addr(2), t0, t0);
        assert_eq!(book.choose(t0), Some(addr(2)));
    }

    #[test]
    fn dials_that_fail_together_lengthen_an_addresss_back_off_once() {
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        book.resolved(vec![addr(1), addr(2)], t0);
        // Four connects on their way to addr 1 when it was cut: one failure, one second out.
        for i in 0..4 {
            book.failed(addr(1), t0, t0 + ms(10 + i));
        }
        assert!(book.choose(t0 + FIRST_BACKOFF + ms(20)).is_some());
        assert_eq!(
            book.counts(t0 + FIRST_BACKOFF + ms(20)).1,
            2,
            "back after one step, not four"
        );
        // The next dial, begun after that failure was counted, is a second one in a row.
        book.failed(addr(1), t0 + ms(100), t0 + ms(200));
        assert_eq!(book.counts(t0 + FIRST_BACKOFF + ms(300)).1, 1);
        assert_eq!(book.counts(t0 + FIRST_BACKOFF * 2 + ms(300)).1, 2);
    }

    #[test]
    fn new_connections_go_to_the_address_with_fewest() {
        let book = Arc::new(AddressBook::new("cassandra.example:9142"));
        let t0 = Instant::now();
        book.resolved(vec![addr(1), addr(2), addr(3)], t0);
        let mut leases: Vec<_> = (0..6)
            .map(|_| book.lease(book.choose(t0).unwrap()))
            .collect();
        assert!(book.connections().iter().all(|(_, n)| *n == 2));
        // addr 2 goes away and its connections with it; while it is out the others take all.
        book.failed(addr(2), t0, t0);
        leases.retain(|l| l.addr != addr(2));
        for _ in 0..2 {
            leases.push(book.lease(book.choose(t0).unwrap()));
        }
        assert_eq!(book.connections()[1], (addr(2), 0));
        // Back: it is chosen first until it has as many as the others.
        let later = t0 + FIRST_BACKOFF;
        assert_eq!(book.choose(later), Some(addr(2)));
        assert_eq!(
            book.settled(later).len(),
            2,
            "not moved to before it is reached again"
        );
        assert_eq!(book.probes_due(later, FIRST_BACKOFF), vec![addr(2)]);
        assert!(
            book.probes_due(later, FIRST_BACKOFF).is_empty(),
            "one probe at a time"
        );
        book.probed(addr(2), true, later, later);
        assert_eq!(book.settled(later).len(), 3);
        drop(leases);
        assert!(book.connections().iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn a_group_spread_unevenly_by_two_moves_one_connection() {
        let usable = [addr(1), addr(2), addr(3)];
        assert_eq!(
            crowded(&[addr(1), addr(2), addr(3), addr(1)], &usable),
            None
        );
        let moved = crowded(&[addr(1), addr(1), addr(2), addr(2)], &usable);
        assert!(
            moved == Some(addr(1)) || moved == Some(addr(2)),
            "{moved:?}"
        );
        // Connections on an address out of rotation count against nothing usable.
        assert_eq!(
            crowded(&[addr(4), addr(4), addr(4)], &usable),
            Some(addr(4))
        );
        assert_eq!(crowded(&[], &usable), None);
        assert_eq!(crowded(&[addr(1), addr(1)], &[]), None);
    }

    #[test]
    fn peers_must_be_of_the_endpoints_kind_and_few() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        let listed: Vec<IpAddr> = [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "169.254.169.254",
            "::",
            "fe80::1",
            "10.1.2.3",
            "192.0.2.1",
            "127.0.1.1",
            "127.0.1.1",
            "::1",
            "::ffff:127.0.1.2",
        ]
        .iter()
        .map(|s| ip(s))
        .collect();
        book.learned_peers(&listed, ip("127.0.0.1"), t0);
        let known: Vec<IpAddr> = book.connections().iter().map(|(a, _)| a.ip()).collect();
        assert_eq!(known, [ip("127.0.1.1"), ip("::ffff:127.0.1.2")]);
        // A VPC endpoint's private addresses list private peers.
        book.learned_peers(&listed, ip("10.0.0.5"), t0);
        let known: Vec<IpAddr> = book.connections().iter().map(|(a, _)| a.ip()).collect();
        assert_eq!(known, [ip("10.1.2.3")]);
        let many: Vec<IpAddr> = (0..=255u8)
            .flat_map(|b| (1..=255u8).map(move |c| IpAddr::from([127, 1, b, c])))
            .collect();
        book.learned_peers(&many, ip("127.0.0.1"), t0);
        assert_eq!(book.connections().len(), MAX_ADDRESSES);
    }

    #[test]
    fn a_lease_counts_until_released_once() {
        let book = Arc::new(AddressBook::new("cassandra.example:9142"));
        let t0 = Instant::now();
        book.resolved(vec![addr(1)], t0);
        let lease = book.lease(addr(1));
        assert_eq!(book.connections(), [(addr(1), 1)]);
        lease.release();
        lease.release();
        assert_eq!(book.connections(), [(addr(1), 0)]);
        drop(lease);
        assert_eq!(book.connections(), [(addr(1), 0)]);
    }

    #[test]
    fn peers_never_reached_draw_no_connections_by_rebalancing() {
        let book = Arc::new(AddressBook::new("cassandra.example:9142"));
        let t0 = Instant::now();
        book.resolved(vec![addr(1)], t0);
        let peers: Vec<IpAddr> = (2..=9).map(|i| addr(i).ip()).collect();
        book.learned_peers(&peers, addr(1).ip(), t0);
        let _leases = [book.lease(addr(1)), book.lease(addr(1))];
        assert_eq!(book.settled(t0), [addr(1)]);
        assert_eq!(crowded(&[addr(1), addr(1)], &book.settled(t0)), None);
        // Probed and refused, they sit out; one that answers becomes a place to move to.
        let due = book.probes_due(t0, FIRST_BACKOFF);
        assert_eq!(due.len(), 8);
        for a in &due {
            book.probed(*a, *a == addr(5), t0, t0);
        }
        assert_eq!(book.settled(t0), [addr(1), addr(5)]);
        assert_eq!(
            crowded(&[addr(1), addr(1)], &book.settled(t0)),
            Some(addr(1))
        );
        assert!(
            book.probes_due(t0, FIRST_BACKOFF).is_empty(),
            "the others back off"
        );
    }
}
