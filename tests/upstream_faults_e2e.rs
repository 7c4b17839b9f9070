//! Faults on the Keyspaces side: bad TLS peers, failing credential providers, connections cut
//! mid-response, stalls and throttling. The client always gets an answer (never a hang) and the
//! proxy recovers once the fault is gone.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use common::cql::messages::{self, ErrorInfo};
use common::cql::{consistency, error_code, opcode, Frame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::upstream::pool::PoolSettings;
use keyspaces_proxy::upstream::UpstreamAuth;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn startup() -> Frame {
    messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")])
}

fn local(stream: i16) -> Frame {
    messages::query(4, stream, "SELECT key FROM system.local", consistency::ONE)
}

/// The error a fresh client gets at STARTUP.
async fn startup_error(addr: std::net::SocketAddr) -> ErrorInfo {
    let mut c = Client::connect(addr).await;
    error_of(&c.call(startup()).await)
}

/// A one-shot fake upstream: accepts, hands the first bytes it reads to `reply`, writes what
/// it returns, and closes. Returns its address and what the proxy sent first.
async fn fake_upstream(
    reply: fn(&[u8]) -> Vec<u8>,
) -> (String, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = s.read(&mut buf).await.unwrap_or(0);
        let _ = s.write_all(&reply(&buf[..n])).await;
        let _ = tx.send(buf[..n].to_vec());
        let _ = s.shutdown().await;
    });
    (addr, rx)
}

/// A ServerHello choosing TLS 1.1 (0x0302), which must be refused.
fn tls11_server_hello(_: &[u8]) -> Vec<u8> {
    let mut hello = vec![0x03, 0x02];
    hello.extend_from_slice(&[7u8; 32]);
    hello.extend_from_slice(&[0x00, 0x00, 0x2f, 0x00]); // no session id, AES128-SHA, no compression
    let mut hs = vec![0x02, 0x00, 0x00, hello.len() as u8];
    hs.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x02, 0x00, hs.len() as u8];
    record.extend_from_slice(&hs);
    record
}

/// The versions a ClientHello offers in its supported_versions extension.
fn offered_versions(hello: &[u8]) -> Vec<u16> {
    let mut p = 5 + 4 + 2 + 32; // record header, handshake header, legacy version, random
    p += 1 + hello[p] as usize; // session id
    p += 2 + u16::from_be_bytes([hello[p], hello[p + 1]]) as usize; // cipher suites
    p += 1 + hello[p] as usize; // compression methods
    let end = p + 2 + u16::from_be_bytes([hello[p], hello[p + 1]]) as usize;
    p += 2;
    while p + 4 <= end {
        let kind = u16::from_be_bytes([hello[p], hello[p + 1]]);
        let len = u16::from_be_bytes([hello[p + 2], hello[p + 3]]) as usize;
        if kind == 0x002b {
            let list = &hello[p + 5..p + 4 + len];
            return list
                .chunks(2)
                .map(|v| u16::from_be_bytes([v[0], v[1]]))
                .collect();
        }
        p += 4 + len;
    }
    Vec::new()
}

#[tokio::test]
async fn bad_tls_peers_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;

    // Not TLS at all.
    let (endpoint, _) = fake_upstream(|_| b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.endpoint = Some(endpoint);
    let e = startup_error(proxy(&emu, opts).await).await;
    assert_eq!(e.code, error_code::SERVER_ERROR);
    assert!(e.message.contains("TLS"), "{}", e.message);

    // A server that picks TLS 1.1; and what the proxy offered in the first place.
    let (endpoint, hello) = fake_upstream(tls11_server_hello).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.endpoint = Some(endpoint);
    let e = startup_error(proxy(&emu, opts).await).await;
    assert_eq!(e.code, error_code::SERVER_ERROR);
    assert!(e.message.contains("TLS"), "{}", e.message);
    let hello = hello.await.unwrap();
    assert_eq!(hello[0], 0x16, "a TLS handshake record");
    let mut offered = offered_versions(&hello);
    offered.sort();
    assert_eq!(
        offered,
        vec![0x0303, 0x0304],
        "only TLS 1.2 and 1.3 are offered"
    );

    // An expired certificate from the right CA.
    let expired_dir = tempfile::tempdir().unwrap();
    let expired = emulator(expired_dir.path(), |c| c.expired_certificate = true).await;
    let e = startup_error(proxy(&expired, ProxyOptions::for_emulator(&expired)).await).await;
    assert_eq!(e.code, error_code::SERVER_ERROR);
    assert!(
        e.message.to_lowercase().contains("expired"),
        "{}",
        e.message
    );
    assert!(!expired
        .events
        .snapshot()
        .iter()
        .any(|e| e["event"] == "auth"));
}

/// Answers once, then fails or never answers.
#[derive(Debug)]
struct Broken {
    hang: bool,
}

impl ProvideCredentials for Broken {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        if self.hang {
            return future::ProvideCredentials::new(std::future::pending());
        }
        future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::provider_error(
                "no credentials anywhere",
            ),
        ))
    }
}

#[tokio::test]
async fn failing_or_hanging_credential_providers_give_errors_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    for (hang, expected) in [(false, "no credentials anywhere"), (true, "did not answer")] {
        let mut opts = ProxyOptions::for_emulator(&emu);
        opts.auth = UpstreamAuth::SigV4 {
            credentials: CredentialCache::with_timeout(
                SharedCredentialsProvider::new(Broken { hang }),
                Duration::from_millis(300),
            ),
            region: REGION.into(),
        };
        let addr = proxy(&emu, opts).await;
        let e = startup_error(addr).await;
        // An authentication error: drivers report it at once instead of retrying for ever.
        assert_eq!(e.code, error_code::BAD_CREDENTIALS);
        // The provider's own words stay in the proxy's log; the client gets a reference.
        assert!(
            e.message.contains("AWS credentials") && e.message.contains("reference"),
            "{}",
            e.message
        );
        assert!(!e.message.contains(expected), "{}", e.message);
    }
}

/// Retries `local` until the proxy answers with rows again.
async fn recovers(c: &mut Client) {
    for _ in 0..100 {
        if c.call(local(1)).await.opcode() == opcode::RESULT {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the proxy did not recover");
}

#[tokio::test]
async fn upstream_cut_mid_response_and_stalls_answer_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        max_connections: 1,
        ..small_pool()
    });
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    c.run_ok(
        "CREATE KEYSPACE IF NOT EXISTS f WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;
    c.run_ok("CREATE TABLE IF NOT EXISTS f.t (k int PRIMARY KEY, v int)")
        .await;

    // Every answer is cut in half: reads (retried once) and writes both end in an error frame
    // for the client, on the request's own stream.
    emu.faults.set_cut_response_at(1);
    for q in [
        local(2),
        messages::query(
            4,
            3,
            "INSERT INTO f.t (k, v) VALUES (1, 1)",
            consistency::LOCAL_QUORUM,
        ),
    ] {
        let stream = q.stream();
        let r = c.call(q).await;
        let e = error_of(&r);
        assert_eq!(r.stream(), stream);
        assert!(
            matches!(e.code, error_code::SERVER_ERROR | error_code::OVERLOADED),
            "{e:?}"
        );
    }
    assert!(emu
        .events
        .snapshot()
        .iter()
        .any(|e| e["event"] == "fault_cut_response"));
    emu.faults.set_cut_response_at(0);
    recovers(&mut c).await;

    // A stall: the proxy's request timeout answers, and the late answer is dropped.
    emu.faults.hold_answers();
    let e = error_of(&c.call(local(4)).await);
    assert_eq!(e.code, error_code::SERVER_ERROR);
    assert!(
        e.message.contains("no answer from Keyspaces"),
        "{}",
        e.message
    );
    assert_eq!(emu.faults.held_answers(), 1, "the stalled request's answer");
    // A different question while the late answer is still held: had the proxy given its
    // upstream stream id to this one, the late answer would be taken for its answer. One
    // upstream connection answers in order, so the late one goes out first.
    let other = messages::query(
        4,
        5,
        "SELECT release_version FROM system.local",
        consistency::ONE,
    );
    c.send(other).await;
    wait_until("the second question held too", || {
        emu.faults.held_answers() == 2
    })
    .await;
    emu.faults.release_answers().await;
    let r = c.recv().await.expect("an answer");
    assert_eq!((r.opcode(), r.stream()), (opcode::RESULT, 5));
    let rows = common::cql::result::Rows::parse(&r.body).unwrap();
    let columns: Vec<_> = rows.columns.unwrap().into_iter().map(|c| c.name).collect();
    assert_eq!(
        columns,
        ["release_version"],
        "its own answer, not the late one"
    );
    let r = c.call(local(6)).await;
    assert_eq!(
        (r.opcode(), r.stream()),
        (opcode::RESULT, 6),
        "nothing else came"
    );
}

#[tokio::test]
async fn throttling_errors_pass_through_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| c.rate_limit = 50).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 1,
        max_connections: 1,
        max_rate_per_connection: 0,
        ..PoolSettings::default()
    });
    let addr = proxy(&emu, opts).await;

    // The same burst directly and through the proxy; the throttling errors are byte-identical.
    let mut direct = direct_tls(&emu).await;
    let proxied = Client::ready(addr).await;
    let mut proxied = proxied.into_framed();
    let mut bodies = Vec::new();
    for (i, conn) in [0, 1].into_iter().enumerate() {
        let mut throttled = None;
        for s in 0..200i16 {
            let q = local(s);
            if conn == 0 {
                direct.feed(q).await.unwrap();
            } else {
                proxied.feed(q).await.unwrap();
            }
        }
        if conn == 0 {
            direct.flush().await.unwrap();
        } else {
            proxied.flush().await.unwrap();
        }
        for _ in 0..200 {
            let f = if conn == 0 {
                direct.next().await.unwrap().unwrap()
            } else {
                proxied.next().await.unwrap().unwrap()
            };
            if f.opcode() == opcode::ERROR {
                throttled.get_or_insert(f.body.clone());
            }
        }
        bodies.push(throttled.unwrap_or_else(|| panic!("path {i} was never throttled")));
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(
        ErrorInfo::parse(&bodies[1]).unwrap().code,
        error_code::READ_TIMEOUT
    );
}

/// What one request of the mixed load was.
#[derive(Clone, Copy)]
enum Op {
    Write(u32),
    Read(u32),
}

fn insert(stream: i16, k: u32) -> Frame {
    let cql = format!("INSERT INTO lb.t (k, v) VALUES ({k}, 'v{k}')");
    messages::query(4, stream, &cql, consistency::LOCAL_QUORUM)
}

fn select(stream: i16, k: u32) -> Frame {
    let cql = format!("SELECT v FROM lb.t WHERE k = {k}");
    messages::query(4, stream, &cql, consistency::LOCAL_QUORUM)
}

/// The one text cell of a single-row answer.
fn single_value(f: &Frame) -> Option<String> {
    let rows = common::cql::result::Rows::parse(&f.body).ok()?;
    let cells = rows.cells().ok()?;
    let cell = cells.first()?.first().copied().flatten()?;
    String::from_utf8(cell.to_vec()).ok()
}

/// Writes fresh keys and reads back acknowledged ones, `window` in flight, until `stop`.
/// Returns the keys whose writes were acknowledged; panics on a read that is not answered
/// with its own row (a lost read) and on any write error but "may or may not have been
/// applied" (what a write cut with its connection gets).
async fn mixed_load(
    mut c: Client,
    first_key: u32,
    window: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (Vec<u32>, usize) {
    let mut acked: Vec<u32> = Vec::new();
    let mut ops: Vec<Option<Op>> = vec![None; window];
    let (mut next_key, mut answered, mut in_flight) = (first_key, 0usize, 0usize);
    // Every other request reads back an acknowledged key, the others write a fresh one.
    let mut sent = 0usize;
    let mut request = |stream: usize, acked: &[u32], next_key: &mut u32| -> (Op, Frame) {
        sent += 1;
        let s = stream as i16;
        match acked.get(sent.wrapping_mul(7919) % acked.len().max(1)) {
            Some(&k) if sent.is_multiple_of(2) => (Op::Read(k), select(s, k)),
            _ => {
                *next_key += 1;
                (Op::Write(*next_key), insert(s, *next_key))
            }
        }
    };
    for (stream, op) in ops.iter_mut().enumerate() {
        let (o, f) = request(stream, &acked, &mut next_key);
        *op = Some(o);
        c.framed_mut().feed(f).await.unwrap();
        in_flight += 1;
    }
    c.framed_mut().flush().await.unwrap();
    while in_flight > 0 {
        let f = tokio::time::timeout(Duration::from_secs(30), c.framed_mut().next())
            .await
            .expect("every request is answered")
            .expect("the client connection stays open")
            .unwrap();
        in_flight -= 1;
        answered += 1;
        let stream = f.stream() as usize;
        match ops[stream]
            .take()
            .expect("an answer to a request in flight")
        {
            Op::Write(k) if f.opcode() == opcode::RESULT => acked.push(k),
            Op::Write(k) => {
                let e = error_of(&f);
                assert!(
                    e.code == error_code::SERVER_ERROR && e.message.contains("may or may not"),
                    "write {k}: {e:?}"
                );
            }
            Op::Read(k) => assert_eq!(
                single_value(&f),
                Some(format!("v{k}")),
                "read of {k} lost or answered with another row: {:?}",
                ErrorInfo::parse(&f.body)
            ),
        }
        if !*stop.borrow() {
            let (o, f) = request(stream, &acked, &mut next_key);
            ops[stream] = Some(o);
            c.send(f).await;
            in_flight += 1;
        }
    }
    (acked, answered)
}

/// One of the endpoint's addresses goes away mid-load (listener closed, its connections cut):
/// no read is lost and every acknowledged write is stored; the others carry the load, and the
/// address is used again once it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_lost_mid_load_loses_nothing_and_is_used_again_when_back() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| {
        c.listen_on_peers = true;
        c.peers = 3;
    })
    .await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 8,
        max_rate_per_connection: 0,
        ..PoolSettings::default()
    });
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    c.run_ok("CREATE KEYSPACE lb WITH replication = {'class': 'SingleRegionStrategy'}")
        .await;
    c.run_ok("CREATE TABLE lb.t (k int PRIMARY KEY, v text)")
        .await;
    let lost = emu.peer_addrs[1];
    let on_lost = |events: &[serde_json::Value]| -> HashSet<u64> {
        events
            .iter()
            .filter(|e| e["event"] == "connect" && e["local"] == lost.to_string().as_str())
            .filter_map(|e| e["conn"].as_u64())
            .collect()
    };
    let requests_on = |events: &[serde_json::Value], conns: &HashSet<u64>| {
        events
            .iter()
            .filter(|e| e["event"] == "request")
            .filter(|e| e["conn"].as_u64().is_some_and(|id| conns.contains(&id)))
            .count()
    };
    // Upstream connections authenticated and not closed since.
    let live = |events: &[serde_json::Value]| -> HashSet<u64> {
        let mut open = HashSet::new();
        for e in events {
            let id = e["conn"].as_u64().unwrap_or(0);
            if e["event"] == "auth" && e["ok"] == true {
                open.insert(id);
            } else if e["event"] == "disconnect" {
                open.remove(&id);
            }
        }
        open
    };
    wait_until("the pool warm, two connections on the address", || {
        let events = emu.events.snapshot();
        live(&events).len() >= 8 && live(&events).intersection(&on_lost(&events)).count() >= 2
    })
    .await;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut loads = Vec::new();
    for i in 0..4u32 {
        let client = Client::ready(addr).await;
        loads.push(tokio::spawn(mixed_load(
            client,
            i * 1_000_000,
            32,
            stopped.clone(),
        )));
    }
    // Mid-load: wait until the address carries requests, then take it away.
    let before = on_lost(&emu.events.snapshot());
    wait_until("requests on the address", || {
        requests_on(&emu.events.snapshot(), &before) > 200
    })
    .await;
    emu.close_address(lost).await;
    let cut_at = emu.events.snapshot().len();
    wait_until("load carried on after the cut", || {
        let events = emu.events.snapshot();
        events[cut_at..]
            .iter()
            .filter(|e| e["event"] == "request")
            .count()
            > 2_000
    })
    .await;
    stop.send(true).unwrap();
    let mut acked = Vec::new();
    for load in loads {
        let (keys, answered) = load.await.unwrap();
        assert!(answered > 0);
        acked.extend(keys);
    }
    let events = emu.events.snapshot();
    assert!(
        events.iter().any(|e| e["event"] == "fault_disconnect"),
        "connections on the address were cut mid-load"
    );
    for k in &acked {
        let r = c.call(select(1, *k)).await;
        assert_eq!(
            single_value(&r),
            Some(format!("v{k}")),
            "acknowledged write {k}"
        );
    }

    wait_until("the pool whole again, on the other addresses", || {
        live(&emu.events.snapshot()).len() >= 8
    })
    .await;
    let events = emu.events.snapshot();
    assert!(live(&events).is_disjoint(&on_lost(&events)));

    // Back: the pool moves connections there again, and clients' requests follow.
    let earlier = on_lost(&emu.events.snapshot());
    emu.reopen_address(lost).await.unwrap();
    let fresh = |events: &[serde_json::Value]| -> HashSet<u64> {
        let new: HashSet<u64> = on_lost(events).difference(&earlier).copied().collect();
        events
            .iter()
            .filter(|e| e["event"] == "auth" && e["ok"] == true)
            .filter_map(|e| e["conn"].as_u64())
            .filter(|id| new.contains(id))
            .collect()
    };
    wait_until("a new connection to the returned address", || {
        !fresh(&emu.events.snapshot()).is_empty()
    })
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut loads = Vec::new();
    for i in 0..8u32 {
        let client = Client::ready(addr).await;
        loads.push(tokio::spawn(mixed_load(
            client,
            (10 + i) * 1_000_000,
            4,
            stopped.clone(),
        )));
    }
    wait_until("requests on the returned address", || {
        let events = emu.events.snapshot();
        requests_on(&events, &fresh(&events)) > 100
    })
    .await;
    stop.send(true).unwrap();
    for load in loads {
        load.await.unwrap();
    }
}

/// A server unlike the emulator's default: every answer in two TLS records (header, then
/// body), TLS 1.2 only, 300 µs per request. Pipelined reads and writes through the pool come
/// back whole, each to its own request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_split_across_records_by_a_slow_tls12_server_arrive_whole() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| {
        c.split_answers = true;
        c.tls_versions = keyspaces_emulator::tls::TlsVersions::Tls12;
    })
    .await;
    emu.faults.set_latency(Duration::from_micros(300));
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::ready(addr).await;
    c.run_ok("CREATE KEYSPACE lb WITH replication = {'class': 'SingleRegionStrategy'}")
        .await;
    c.run_ok("CREATE TABLE lb.t (k int PRIMARY KEY, v text)")
        .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut loads = Vec::new();
    for i in 0..3u32 {
        loads.push(tokio::spawn(mixed_load(
            Client::ready(addr).await,
            i * 1_000_000,
            16,
            stopped.clone(),
        )));
    }
    wait_until("a few thousand answers", || {
        emu.events
            .snapshot()
            .iter()
            .filter(|e| e["event"] == "request")
            .count()
            > 3_000
    })
    .await;
    stop.send(true).unwrap();
    for load in loads {
        let (acked, answered) = load.await.unwrap();
        assert!(answered > 0 && !acked.is_empty());
    }
}

/// One of the endpoint's addresses accepts TCP and never says a word: it costs each
/// connection a quarter of the connect timeout at most, then sits out, and the pool fills on
/// the address that answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_address_sits_out_instead_of_stalling_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| {
        c.listen_on_peers = false;
        c.peers = 1;
    })
    .await;
    // The listed peer: accepts, holds the connection, answers nothing.
    let silent = TcpListener::bind(std::net::SocketAddr::new(
        keyspaces_emulator::peer_addresses(1)[0],
        emu.addr.port(),
    ))
    .await
    .unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 4,
        ..PoolSettings::default()
    });
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    wait_until("four connections on the address that answers", || {
        emu.events
            .snapshot()
            .iter()
            .filter(|e| e["event"] == "auth" && e["ok"] == true)
            .count()
            >= 4
    })
    .await;
    let tried = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&tried),
        "the silent address was tried {tried} times"
    );
    for i in 0..20 {
        assert_eq!(c.call(local(i)).await.opcode(), opcode::RESULT);
    }
}
