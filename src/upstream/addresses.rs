//! Every address the upstream endpoint offers: Keyspaces' regional endpoint resolves to several
//! load balancers (its `system.peers` lists them), and connections should spread over them.
//! New connections go round the usable addresses in turn; an address that refuses or fails a
//! handshake sits out with back-off while the others carry the load. The TLS server name and
//! the SigV4 host stay the endpoint's name: only where to dial changes.
//!
//! The choices are pure (the caller passes the time); resolving is the only I/O.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    retry_at: Option<Instant>,
    /// Connections open to it now (see `AddressLease`).
    open: usize,
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    next: usize,
    resolved_at: Option<Instant>,
    peers_at: Option<Instant>,
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
    fn resolved(&self, found: Vec<SocketAddr>, now: Instant) {
        let mut s = self.lock();
        s.resolved_at = Some(now);
        for e in s.entries.iter_mut() {
            e.in_dns = found.contains(&e.addr);
        }
        add(&mut s.entries, &found, |e| e.in_dns = true);
        s.entries.retain(|e| e.in_dns || e.in_peers);
    }

    /// Whether the upstream's `system.peers` should be read (again) now.
    pub fn wants_peers(&self, now: Instant) -> bool {
        self.lock()
            .peers_at
            .is_none_or(|at| now.duration_since(at) >= RESOLVE_EVERY)
    }

    /// The upstream's `system.peers` named `peers` (at the endpoint's port): they replace the
    /// peers learned before.
    pub fn learned_peers(&self, peers: &[IpAddr], now: Instant) {
        let port = self.port;
        let mut s = self.lock();
        s.peers_at = Some(now);
        let wanted: Vec<SocketAddr> = peers.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        for e in s.entries.iter_mut() {
            e.in_peers = wanted.contains(&e.addr);
        }
        add(&mut s.entries, &wanted, |e| e.in_peers = true);
        s.entries.retain(|e| e.in_dns || e.in_peers);
    }

    /// The usable address with the fewest connections, in turn among equals (so an address
    /// that comes back takes the next connections); when none is usable, the one back soonest.
    fn choose(&self, now: Instant) -> Option<SocketAddr> {
        let mut s = self.lock();
        let n = s.entries.len();
        let best = (0..n)
            .map(|i| (s.next + i) % n)
            .filter(|&at| s.entries[at].retry_at.is_none_or(|t| t <= now))
            .min_by_key(|&at| s.entries[at].open);
        if let Some(at) = best {
            s.next = (at + 1) % n;
            return Some(s.entries[at].addr);
        }
        s.entries.iter().min_by_key(|e| e.retry_at).map(|e| e.addr)
    }

    /// `addr` refused a connection or failed its handshake: it sits out, longer each time.
    pub fn failed(&self, addr: SocketAddr, now: Instant) {
        let mut s = self.lock();
        if let Some(e) = s.entries.iter_mut().find(|e| e.addr == addr) {
            e.failures = e.failures.saturating_add(1);
            let backoff = FIRST_BACKOFF
                .saturating_mul(1 << e.failures.saturating_sub(1).min(6))
                .min(MAX_BACKOFF);
            e.retry_at = Some(now + backoff);
        }
    }

    /// A connection to `addr` succeeded: the address is good again, and counts the connection
    /// until the lease is dropped.
    pub fn lease(self: &Arc<Self>, addr: SocketAddr) -> AddressLease {
        let mut s = self.lock();
        if let Some(e) = s.entries.iter_mut().find(|e| e.addr == addr) {
            e.failures = 0;
            e.retry_at = None;
            e.open += 1;
        }
        AddressLease {
            book: self.clone(),
            addr,
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

    /// The addresses usable now.
    pub fn usable(&self, now: Instant) -> Vec<SocketAddr> {
        let s = self.lock();
        s.entries
            .iter()
            .filter(|e| e.retry_at.is_none_or(|t| t <= now))
            .map(|e| e.addr)
            .collect()
    }

    /// Addresses known, and those usable now (for `/readyz` and `check`).
    pub fn counts(&self, now: Instant) -> (usize, usize) {
        let s = self.lock();
        let usable = s
            .entries
            .iter()
            .filter(|e| e.retry_at.is_none_or(|t| t <= now))
            .count();
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

/// One open connection to one of the endpoint's addresses: counted while it lives.
#[derive(Debug)]
pub struct AddressLease {
    book: Arc<AddressBook>,
    pub addr: SocketAddr,
}

impl Drop for AddressLease {
    fn drop(&mut self) {
        let mut s = self.book.lock();
        if let Some(e) = s.entries.iter_mut().find(|e| e.addr == self.addr) {
            e.open = e.open.saturating_sub(1);
        }
    }
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
                retry_at: None,
                open: 0,
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
        book.failed(addr(2), t0);
        let picks: Vec<_> = (0..4).map(|_| book.choose(t0).unwrap()).collect();
        assert!(!picks.contains(&addr(2)), "{picks:?}");
        assert_eq!(book.counts(t0), (3, 2));
        // Back after its back-off, and for good after a success.
        let later = t0 + FIRST_BACKOFF;
        assert!((0..3).any(|_| book.choose(later) == Some(addr(2))));
        book.failed(addr(2), later);
        book.failed(addr(2), later);
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
        book.learned_peers(&[addr(2).ip(), addr(3).ip()], t0);
        assert_eq!(book.counts(t0).0, 3, "addr 2 once");
        book.failed(addr(1), t0);
        book.resolved(vec![addr(1)], t0);
        assert_eq!(
            book.counts(t0),
            (3, 2),
            "1 kept its back-off; 2 stays as a peer"
        );
        book.learned_peers(&[], t0);
        assert_eq!(book.counts(t0).0, 1);
    }

    #[test]
    fn with_every_address_out_the_soonest_back_is_tried() {
        let book = AddressBook::new("cassandra.example:9142");
        let t0 = Instant::now();
        book.resolved(vec![addr(1), addr(2)], t0);
        book.failed(addr(1), t0);
        book.failed(addr(1), t0);
        book.failed(addr(2), t0);
        assert_eq!(book.choose(t0), Some(addr(2)));
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
        book.failed(addr(2), t0);
        leases.retain(|l| l.addr != addr(2));
        for _ in 0..2 {
            leases.push(book.lease(book.choose(t0).unwrap()));
        }
        assert_eq!(book.connections()[1], (addr(2), 0));
        // Back: it is chosen first until it has as many as the others.
        let later = t0 + FIRST_BACKOFF;
        assert_eq!(book.choose(later), Some(addr(2)));
        assert_eq!(book.usable(later).len(), 3);
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
}
