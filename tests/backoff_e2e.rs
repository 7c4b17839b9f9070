//! How the pool backs off an upstream that is down in ways our emulator is not by default:
//! one that authenticates and then drops every connection, and clients that keep switching
//! keyspaces while it is unreachable. Attempts stay few, and the pool comes back by itself.

mod common;

use std::time::Duration;

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

fn small_pool() -> PoolSettings {
    PoolSettings {
        min_connections: 1,
        max_connections: 2,
        max_rate_per_connection: 0,
        request_timeout: Duration::from_millis(400),
        ..PoolSettings::default()
    }
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
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(small_pool());
    let addr = proxy(&emu, opts).await;
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
async fn use_during_an_outage_opens_no_connection_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(small_pool());
    let addr = proxy(&emu, opts).await;
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
