//! The pool's upkeep against the emulator, each shown by what reaches the emulator: heartbeats
//! on idle connections (and a connection whose heartbeat goes unanswered replaced), shrinking
//! once the load has gone, and re-signing before the credentials behind a connection expire.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use common::cql::messages::{self, ErrorInfo};
use common::cql::{consistency, opcode, Frame};
use common::*;
use keyspaces_emulator::SigV4Key;
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::upstream::pool::PoolSettings;
use keyspaces_proxy::upstream::UpstreamAuth;
use serde_json::Value;

fn events(emu: &keyspaces_emulator::Emulator, kind: &str) -> Vec<Value> {
    emu.events
        .snapshot()
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

/// Upstream connections that authenticated, by id, with the key that signed them.
fn authenticated(emu: &keyspaces_emulator::Emulator) -> HashMap<u64, String> {
    events(emu, "auth")
        .iter()
        .filter(|e| e["ok"] == true)
        .map(|e| {
            (
                e["conn"].as_u64().unwrap(),
                e["who"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn disconnected(emu: &keyspaces_emulator::Emulator) -> HashSet<u64> {
    events(emu, "disconnect")
        .iter()
        .map(|e| e["conn"].as_u64().unwrap())
        .collect()
}

/// OPTIONS requests each upstream connection received (the pool's heartbeat).
fn options_by_conn(emu: &keyspaces_emulator::Emulator) -> HashMap<u64, usize> {
    let mut out = HashMap::new();
    for e in events(emu, "request") {
        if e["opcode"] == "OPTIONS" {
            *out.entry(e["conn"].as_u64().unwrap()).or_default() += 1;
        }
    }
    out
}

fn read(stream: i16) -> Frame {
    messages::query(
        4,
        stream,
        "SELECT key FROM system.local",
        consistency::LOCAL_ONE,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_heartbeaten_and_a_silent_one_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 2,
        heartbeat_interval: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
        ..PoolSettings::default()
    });
    let (_addr, pool) = proxy_with_pool(&emu, opts).await;
    pool.unwrap()
        .group(ProtocolVersion::V4, None)
        .await
        .unwrap();
    wait_until("two connections authenticated", || {
        authenticated(&emu).len() >= 2
    })
    .await;
    let first: HashSet<u64> = authenticated(&emu).into_keys().collect();
    // No client sends anything: every OPTIONS is the pool's.
    wait_until("two heartbeats on each idle connection", || {
        let seen = options_by_conn(&emu);
        first.iter().all(|c| seen.get(c).copied().unwrap_or(0) >= 2)
    })
    .await;

    // A connection that stops answering is closed by the proxy at the heartbeat's deadline and
    // replaced; the emulator cuts nothing.
    emu.faults.hold_answers();
    wait_until("silent connections closed by the proxy", || {
        first.is_subset(&disconnected(&emu))
    })
    .await;
    wait_until("replacements authenticated", || {
        authenticated(&emu)
            .keys()
            .filter(|c| !first.contains(c))
            .count()
            >= 2
    })
    .await;
    assert!(events(&emu, "fault_disconnect").is_empty());
    emu.faults.release_answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_grown_under_load_shrinks_to_its_minimum_once_idle() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 1,
        grow_at_in_flight: 4,
        shrink_window: Duration::from_secs(1),
        heartbeat_interval: Duration::from_secs(3600),
        ..PoolSettings::default()
    });
    let (addr, pool) = proxy_with_pool(&emu, opts).await;
    let pool = pool.unwrap();
    // Slow answers keep requests in flight, so the load shows as depth.
    emu.faults.set_latency(Duration::from_millis(20));
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        let mut c = Client::ready(addr).await;
        load.push(tokio::spawn(async move {
            let mut answered = 0usize;
            while !stop.load(Ordering::Relaxed) {
                for s in 0..16 {
                    c.send(read(s)).await;
                }
                for _ in 0..16 {
                    assert_eq!(c.recv().await.unwrap().opcode(), opcode::RESULT);
                    answered += 1;
                }
            }
            answered
        }));
    }
    wait_until("the pool grown past two", || pool.stats().ready >= 3).await;
    let grown = pool.stats().ready;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    emu.faults.set_latency(Duration::ZERO);
    wait_until("the idle pool back at its minimum", || {
        let s = pool.stats();
        s.ready == 1 && s.draining == 0
    })
    .await;
    // The connections let go were closed by the proxy, not cut by the emulator.
    wait_until("the drained connections closed", || {
        disconnected(&emu).len() >= grown - 1
    })
    .await;
    let mut c = Client::ready(addr).await;
    assert_eq!(c.call(read(1)).await.opcode(), opcode::RESULT);
}

/// The first credentials expire in a little over five minutes (soon enough to be recycled at
/// once under the default five-minute margin), the next ones in an hour.
#[derive(Debug, Default)]
struct ExpiringSoon {
    calls: AtomicUsize,
}

impl ProvideCredentials for ExpiringSoon {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let (akid, left) = match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => ("AKIDSOON", Duration::from_secs(302)),
            _ => ("AKIDLATER", Duration::from_secs(3600)),
        };
        let expiry = SystemTime::now() + left;
        future::ProvideCredentials::ready(Ok(Credentials::new(
            akid,
            SECRET,
            None,
            Some(expiry),
            "expiring",
        )))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_re_signed_before_their_credentials_expire() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    emu.set_credentials(
        ["AKIDSOON", "AKIDLATER"]
            .map(|k| SigV4Key {
                access_key_id: k.into(),
                secret_access_key: SECRET.into(),
                session_token: None,
            })
            .to_vec(),
    );
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.auth = UpstreamAuth::SigV4 {
        credentials: CredentialCache::new(SharedCredentialsProvider::new(ExpiringSoon::default())),
        region: REGION.into(),
    };
    opts.pool = Some(PoolSettings {
        min_connections: 2,
        recycle_before_expiry: Duration::from_secs(300),
        ..PoolSettings::default()
    });
    let (addr, _pool) = proxy_with_pool(&emu, opts).await;
    // Reads throughout the recycling: none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..2 {
        let stop = stop.clone();
        let mut c = Client::ready(addr).await;
        load.push(tokio::spawn(async move {
            let mut answered = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let r = c.call(read(3)).await;
                assert_eq!(
                    r.opcode(),
                    opcode::RESULT,
                    "{:?}",
                    ErrorInfo::parse(&r.body)
                );
                answered += 1;
            }
            answered
        }));
    }
    let signed_by = |key: &str| -> HashSet<u64> {
        authenticated(&emu)
            .into_iter()
            .filter(|(_, who)| who == key)
            .map(|(c, _)| c)
            .collect()
    };
    wait_until("connections signed with the expiring key", || {
        !signed_by("AKIDSOON").is_empty()
    })
    .await;
    wait_until("every expiring connection replaced and closed", || {
        signed_by("AKIDLATER").len() >= 2 && signed_by("AKIDSOON").is_subset(&disconnected(&emu))
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        assert!(l.await.unwrap() > 0);
    }
    assert!(events(&emu, "fault_disconnect").is_empty());
}
