//! How the pool backs off an upstream that is down in ways our emulator is not by default:
//! one that authenticates and then drops every connection, and clients that keep switching
//! keyspaces while it is unreachable. Attempts stay few, and the pool comes back by itself —
//! and a healthy upstream that closes idle connections, or an outage seen through keyspace
//! connections, does not leave clients refused behind a back-off nobody needs.

mod common;

use std::time::{Duration, Instant};

use common::cql::messages;
use common::cql::{consistency, opcode, Frame};
use common::*;
use keyspaces_emulator::Emulator;
use keyspaces_proxy::upstream::pool::PoolSettings;

fn local(stream: i16) -> Frame {
    messages::query(4, stream, "SELECT key FROM system.local", consistency::ONE)
}

fn use_keyspace(stream: i16, keyspace: &str) -> Frame {
    messages::query(4, stream, &format!("USE {keyspace}"), consistency::ONE)
}

/// A proxy with a small pool (see `small_pool`) in front of `emu`.
async fn small_proxy(emu: &Emulator) -> std::net::SocketAddr {
    let mut opts = ProxyOptions::for_emulator(emu);
    opts.pool = Some(small_pool());
    proxy(emu, opts).await
}

/// A new client's answer to STARTUP: READY, or the error that refused it.
async fn admission(addr: std::net::SocketAddr) -> (Client, Frame) {
    let mut c = Client::connect(addr).await;
    let r = c
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    (c, r)
}

/// Connections the emulator has accepted (refused ones included).
fn connects(emu: &Emulator) -> usize {
    emu.events
        .snapshot()
        .iter()
        .filter(|e| e["event"] == "connect")
        .count()
}

/// Sends `request` until it is answered with rows; false if that never happens within the
/// longest back-off (10 s) and a margin for a slow machine.
async fn comes_back(c: &mut Client, request: impl Fn(i16) -> Frame) -> bool {
    for i in 0..300 {
        if c.call(request(1000 + i)).await.opcode() == opcode::RESULT {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Authenticated handshakes the emulator has seen.
fn handshakes(emu: &Emulator) -> usize {
    emu.events
        .snapshot()
        .iter()
        .filter(|e| e["event"] == "auth" && e["ok"] == true)
        .count()
}

#[tokio::test]
async fn an_upstream_that_drops_connections_after_the_handshake_is_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = small_proxy(&emu).await;
    let mut c = Client::ready(addr).await;
    assert_eq!(c.call(local(1)).await.opcode(), opcode::RESULT);

    // Every connection authenticates, then closes at its first request unanswered: each
    // handshake succeeds, so only the connections dying unused show the upstream is down.
    emu.faults.set_close_after(1);
    // An application's pace (a request every 20 ms, about 3 s), so that the back-off's growth
    // shows: reset by each handshake, it would stay at its first step (100-200 ms).
    let before = handshakes(&emu);
    let started = std::time::Instant::now();
    const REQUESTS: usize = 150;
    for i in 0..REQUESTS {
        let stream = 2 + i as i16;
        let r = c.call(local(stream)).await;
        assert_eq!((r.opcode(), r.stream()), (opcode::ERROR, stream));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = handshakes(&emu) - before;
    println!(
        "{opened} handshakes for {REQUESTS} requests in {:?}",
        started.elapsed()
    );
    // Without back-off, at least one per request; with a back-off that each handshake resets,
    // one per 100-200 ms (about 20). Doubling from 100 ms, about 6 in 3 s, 9 in 20 s.
    assert!(opened <= 12, "{opened} handshakes for {REQUESTS} requests");

    emu.faults.set_close_after(0);
    assert!(comes_back(&mut c, local).await, "the proxy did not recover");
}

#[tokio::test]
async fn an_upstream_that_drops_connections_from_the_start_is_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    // Dropped at the first request after authentication: on a fresh proxy that is its own
    // read of system.peers while connecting, before any client request.
    emu.faults.set_close_after(1);
    let addr = small_proxy(&emu).await;
    let started = std::time::Instant::now();
    const CLIENTS: usize = 100;
    let mut ready = 0;
    for i in 0..CLIENTS {
        let (mut c, r) = admission(addr).await;
        if r.opcode() == opcode::READY {
            ready += 1;
            let r = c.call(local(1 + i as i16)).await;
            assert_eq!(r.opcode(), opcode::ERROR);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = handshakes(&emu);
    println!(
        "{opened} handshakes for {CLIENTS} clients ({ready} let in) in {:?}",
        started.elapsed()
    );
    // A connection that died reading system.peers handed on as ready: hundreds a second.
    assert!(opened <= 12, "{opened} handshakes for {CLIENTS} clients");

    // Back within the longest back-off, for new clients as for requests.
    emu.faults.set_close_after(0);
    let mut admitted = None;
    for _ in 0..300 {
        let (c, r) = admission(addr).await;
        if r.opcode() == opcode::READY {
            admitted = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut c = admitted.expect("a new client is let in once the upstream works");
    assert!(comes_back(&mut c, local).await, "the proxy did not recover");
}

#[tokio::test]
async fn use_during_an_outage_opens_no_connection_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = small_proxy(&emu).await;
    let mut c = Client::ready(addr).await;
    c.run_ok(
        "CREATE KEYSPACE IF NOT EXISTS bk WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;

    emu.faults.set_refuse_connections(true);
    emu.faults.disconnect_all();
    // Wait until the pool knows: a request fails once its connections are gone.
    let mut failing = false;
    for i in 0..100 {
        if c.call(local(1 + i)).await.opcode() == opcode::ERROR {
            failing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failing, "requests fail while Keyspaces refuses connections");

    // Each keyspace a group of its own, none of them with a connection yet: without the
    // upstream's back-off, one connection attempt per USE. At an application's pace (about
    // 2 s), so that the back-off's growth shows.
    let before = connects(&emu);
    const SWITCHES: usize = 40;
    for i in 0..SWITCHES {
        let stream = 200 + i as i16;
        let r = c.call(use_keyspace(stream, &format!("ks{i}"))).await;
        assert_eq!((r.opcode(), r.stream()), (opcode::ERROR, stream));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let attempts = connects(&emu) - before;
    println!("{attempts} connection attempts for {SWITCHES} USEs");
    assert!(
        attempts <= 8,
        "{attempts} connection attempts for {SWITCHES} USEs"
    );

    emu.faults.set_refuse_connections(false);
    assert!(
        comes_back(&mut c, |s| use_keyspace(s, "bk")).await,
        "USE works again once Keyspaces is back"
    );
    assert!(comes_back(&mut c, local).await);
}

#[tokio::test]
async fn idle_connections_the_upstream_closes_are_not_failures() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 2,
        ..small_pool()
    });
    let (addr, pool) = proxy_with_pool(&emu, opts).await;
    let pool = pool.expect("pooled");
    let _first = Client::ready(addr).await;
    // A server that closes idle connections (a load balancer's idle timeout, a connection
    // lifetime): the warm connections, never asked anything, are cut again and again.
    for _ in 0..6 {
        wait_until("the pool is warm", || pool.stats().ready == 2).await;
        emu.faults.disconnect_all();
        wait_until("the proxy saw the cut", || pool.stats().ready < 2).await;
    }
    // Counted as failures, six cuts would hold the pool in a back-off of seconds, refusing
    // new clients; the upstream is healthy, so a new client gets in.
    let (mut c, r) = admission(addr).await;
    assert_eq!(r.opcode(), opcode::READY, "{:?}", r);
    assert_eq!(c.call(local(1)).await.opcode(), opcode::RESULT);
}

#[tokio::test]
async fn clients_without_a_keyspace_come_back_with_the_first_keyspace_connection() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = small_proxy(&emu).await;
    let mut in_keyspace = Client::ready(addr).await;
    in_keyspace
        .run_ok(
            "CREATE KEYSPACE IF NOT EXISTS bk WITH replication = {'class': 'SingleRegionStrategy'}",
        )
        .await;
    in_keyspace.run_ok("USE bk").await;
    let mut plain = Client::ready(addr).await;
    assert_eq!(plain.call(local(1)).await.opcode(), opcode::RESULT);

    // An outage both clients keep asking through: the keyspace connection's failed attempts
    // lengthen the shared back-off as well as their own.
    emu.faults.set_refuse_connections(true);
    emu.faults.disconnect_all();
    let outage = Instant::now();
    let mut stream = 2;
    while outage.elapsed() < Duration::from_secs(3) {
        in_keyspace.call(local(stream)).await;
        plain.call(local(stream)).await;
        stream += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Once the keyspace client is answered the upstream is known to work: the client without
    // a keyspace is answered from its next request on, not refused for the rest of a back-off.
    emu.faults.set_refuse_connections(false);
    let (mut keyspace_back, mut refused_after) = (false, 0);
    for _ in 0..600 {
        stream += 1;
        keyspace_back |= in_keyspace.call(local(stream)).await.opcode() == opcode::RESULT;
        let plain_back = plain.call(local(stream)).await.opcode() == opcode::RESULT;
        if keyspace_back && plain_back {
            break;
        }
        if keyspace_back {
            refused_after += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(keyspace_back, "the keyspace client never came back");
    assert_eq!(
        refused_after, 0,
        "requests without a keyspace refused after the keyspace client was answered"
    );
}

#[tokio::test]
async fn a_use_during_an_outage_leaves_the_keyspace_to_its_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(small_pool());
    let (addr, pool) = proxy_with_pool(&emu, opts).await;
    let pool = pool.expect("pooled");
    let mut held = Client::ready(addr).await;
    held.run_ok(
        "CREATE KEYSPACE IF NOT EXISTS bk WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;
    held.run_ok("USE bk").await;
    let mut other = Client::ready(addr).await;

    emu.faults.set_refuse_connections(true);
    emu.faults.disconnect_all();
    let mut stream = 1;
    while held.call(local(stream)).await.opcode() != opcode::ERROR {
        stream += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another client switching to the same keyspace meanwhile, inside and outside the
    // back-off: its failures must not take the keyspace's group from the session holding it,
    // or the two would end up on two groups (two sets of connections) for one keyspace.
    for i in 0..10 {
        let r = other.call(use_keyspace(100 + i, "bk")).await;
        assert_eq!(r.opcode(), opcode::ERROR);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let lifted = emu.events.snapshot().len();
    emu.faults.set_refuse_connections(false);
    assert!(comes_back(&mut held, local).await);
    assert!(comes_back(&mut other, |s| use_keyspace(s, "bk")).await);
    assert!(comes_back(&mut other, local).await);
    wait_until("no connect under way", || pool.stats().connecting == 0).await;
    // Connections for bk are the ones a USE of bk reaches (the proxy opens them with one).
    let opened_for_bk: std::collections::HashSet<u64> = emu.events.snapshot()[lifted..]
        .iter()
        .filter(|e| e["event"] == "request" && e["cql"] == "USE \"bk\"")
        .filter_map(|e| e["conn"].as_u64())
        .collect();
    assert_eq!(
        opened_for_bk.len(),
        1,
        "connections opened for bk after the outage"
    );
}
