//! The upstream pool against the emulator: lifting the per-connection cap, USE isolation,
//! transparent re-prepare, upstream loss, credential rotation and warm connects.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_credential_types::provider::{future, ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use common::cql::messages::{self, ErrorInfo};
use common::cql::result::Rows;
use common::cql::{consistency, error_code, flags, opcode, Frame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use keyspaces_emulator::SigV4Key;
use keyspaces_proxy::auth::credentials::CredentialCache;
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::upstream::pool::PoolSettings;
use keyspaces_proxy::upstream::UpstreamAuth;
use serde_json::Value;

/// Sends `total` copies of `request`, keeping `window` in flight; returns every response.
async fn pipeline(c: &mut Client, request: &Frame, total: usize, window: usize) -> Vec<Frame> {
    let framed = c.framed_mut();
    let (mut sent, mut out) = (0usize, Vec::with_capacity(total));
    while sent < window.min(total) {
        framed
            .feed(request.clone().with_stream(sent as i16))
            .await
            .unwrap();
        sent += 1;
    }
    framed.flush().await.unwrap();
    while out.len() < total {
        let f = tokio::time::timeout(Duration::from_secs(30), framed.next())
            .await
            .expect("every request is answered")
            .expect("connection open")
            .unwrap();
        let stream = f.stream();
        out.push(f);
        if sent < total {
            framed
                .send(request.clone().with_stream(stream))
                .await
                .unwrap();
            sent += 1;
        }
    }
    out
}

fn error_codes(frames: &[Frame]) -> Vec<i32> {
    frames
        .iter()
        .filter(|f| f.opcode() == opcode::ERROR)
        .map(|f| ErrorInfo::parse(&f.body).unwrap().code)
        .collect()
}

fn events_of<'a>(events: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> {
    let kind = kind.to_owned();
    events.iter().filter(move |e| e["event"] == kind.as_str())
}

/// Waits (on the emulator's log, not a clock) until `n` upstream connections authenticated.
async fn until_authenticated(emu: &keyspaces_emulator::Emulator, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while events_of(&emu.events.snapshot(), "auth").count() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} upstream connections never authenticated"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn local_query() -> Frame {
    messages::query(4, 0, "SELECT key FROM system.local", consistency::LOCAL_ONE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_connection_is_spread_past_the_per_connection_cap() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| c.rate_limit = 500).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    // Half the emulator's cap: its windows count arrivals, so requests the proxy paced into
    // one second can land in the next after a stall. 250 of margin is a 600 ms stall.
    opts.pool = Some(PoolSettings {
        max_rate_per_connection: 250,
        ..PoolSettings::default()
    });
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    let total = 6000; // four times the cap for 3 s
    let started = Instant::now();
    let responses = pipeline(&mut c, &local_query(), total, 256).await;
    let rate = total as f64 / started.elapsed().as_secs_f64();
    eprintln!("one client connection through the pool: {rate:.0} req/s (emulator cap 500/s per connection)");
    assert_eq!(
        error_codes(&responses),
        Vec::<i32>::new(),
        "no throttling through the pool"
    );
    let events = emu.events.snapshot();
    let upstream_conns: HashSet<_> = events_of(&events, "request")
        .map(|e| e["conn"].clone())
        .collect();
    assert!(
        upstream_conns.len() >= 5,
        "spread over {} upstream connections",
        upstream_conns.len()
    );

    // The same load on one direct connection hits the cap.
    let mut direct = tls_client(&emu).await;
    let throttled = direct_pipeline(&mut direct, 1500).await;
    assert!(throttled > 0, "a direct connection is throttled");
}

/// A proxy whose pool has no rate budget (so only queue depth and pinning decide where requests
/// go), with `settings` for the rest.
async fn proxy_without_rate_limit(
    emu: &keyspaces_emulator::Emulator,
    settings: PoolSettings,
) -> std::net::SocketAddr {
    let mut opts = ProxyOptions::for_emulator(emu);
    opts.pool = Some(PoolSettings {
        max_rate_per_connection: 0,
        ..settings
    });
    proxy(emu, opts).await
}

/// A deep queue grows the pool, one connection at a time and never past its limit, even when
/// thousands of requests see the pressure before the first new connection is under way (a
/// single-threaded runtime, where the spawned connect runs only after the burst).
#[tokio::test]
async fn a_deep_queue_grows_the_pool_within_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let settings = PoolSettings {
        grow_at_in_flight: 4,
        max_connections: 4,
        ..PoolSettings::default()
    };
    let addr = proxy_without_rate_limit(&emu, settings).await;
    let mut c = Client::ready(addr).await;
    let responses = pipeline(&mut c, &local_query(), 20_000, 256).await;
    assert_eq!(error_codes(&responses), Vec::<i32>::new());
    let events = emu.events.snapshot();
    let authenticated: HashSet<_> = events_of(&events, "auth")
        .map(|e| e["conn"].clone())
        .collect();
    let used: HashSet<_> = events_of(&events, "request")
        .map(|e| e["conn"].clone())
        .collect();
    assert!(
        authenticated.len() <= 4,
        "{} upstream connections opened, limit 4",
        authenticated.len()
    );
    assert!(
        used.len() >= 3,
        "the queue spread over {} connections",
        used.len()
    );
}

/// A client's requests stay on one upstream connection while it has room, so its bursts are
/// not split into a piece per connection (see `upstream::affinity`); two clients still share.
#[tokio::test]
async fn a_client_stays_on_one_upstream_connection_while_it_has_room() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let settings = PoolSettings {
        min_connections: 4,
        grow_at_in_flight: 64,
        ..PoolSettings::default()
    };
    let addr = proxy_without_rate_limit(&emu, settings).await;
    let mut c = Client::ready(addr).await;
    // The warm connections are up, so there is a choice.
    until_authenticated(&emu, 4).await;
    let before = emu.events.snapshot().len();
    let responses = pipeline(&mut c, &local_query(), 3000, 32).await;
    assert_eq!(error_codes(&responses), Vec::<i32>::new());
    let events = emu.events.snapshot();
    let authenticated = events_of(&events, "auth").count();
    let used: HashSet<_> = events_of(&events[before..], "request")
        .map(|e| e["conn"].clone())
        .collect();
    assert!(authenticated >= 2, "{authenticated} warm connections");
    assert_eq!(used.len(), 1, "one client's requests went over {used:?}");
}

/// Clients are spread one per connection: when the pool grows under four clients sharing two
/// connections, the new connections take clients over, and afterwards each client keeps to
/// its own connection.
#[tokio::test]
async fn clients_are_re_spread_one_per_connection_when_the_pool_grows() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let settings = PoolSettings {
        min_connections: 2,
        max_connections: 4,
        grow_at_in_flight: 16,
        ..PoolSettings::default()
    };
    let addr = proxy_without_rate_limit(&emu, settings).await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::ready(addr).await);
    }
    until_authenticated(&emu, 2).await;
    // Each client sends its own statement, so the emulator's log tells them apart.
    let query = |i: usize| {
        messages::query(
            4,
            0,
            &format!("SELECT key FROM system.local /* client {i} */"),
            consistency::LOCAL_ONE,
        )
    };
    // Round 1 grows the pool (two clients, 64 in flight, per connection); round 2 is measured.
    let mut marks = Vec::new();
    for _round in 0..2 {
        marks.push(emu.events.snapshot().len());
        let tasks: Vec<_> = clients
            .drain(..)
            .enumerate()
            .map(|(i, mut c)| {
                let q = query(i);
                tokio::spawn(async move {
                    let responses = pipeline(&mut c, &q, 3000, 32).await;
                    (c, error_codes(&responses))
                })
            })
            .collect();
        for t in tasks {
            let (c, errors) = t.await.unwrap();
            assert_eq!(errors, Vec::<i32>::new());
            clients.push(c);
        }
    }
    let events = emu.events.snapshot();
    let opened = events_of(&events, "auth").count();
    assert_eq!(opened, 4, "the pool grew to its limit");
    let mut seen = HashSet::new();
    for i in 0..4 {
        let cql = format!("SELECT key FROM system.local /* client {i} */");
        let conns: HashSet<_> = events_of(&events[marks[1]..], "request")
            .filter(|e| e["cql"] == cql.as_str())
            .map(|e| e["conn"].clone())
            .collect();
        assert_eq!(conns.len(), 1, "client {i} used {conns:?}");
        assert!(
            seen.insert(conns.into_iter().next().unwrap()),
            "two clients share a connection"
        );
    }
}

type Tls = DirectTls;

async fn tls_client(emu: &keyspaces_emulator::Emulator) -> Tls {
    direct_tls(emu).await
}

/// Sends `total` pipelined reads on one direct connection; returns how many were throttled.
async fn direct_pipeline(c: &mut Tls, total: usize) -> usize {
    for i in 0..total {
        c.feed(local_query().with_stream((i % 30000) as i16))
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    let mut throttled = 0;
    for _ in 0..total {
        let f = c.next().await.unwrap().unwrap();
        if f.opcode() == opcode::ERROR
            && ErrorInfo::parse(&f.body).unwrap().code == error_code::READ_TIMEOUT
        {
            throttled += 1;
        }
    }
    throttled
}

async fn run(c: &mut Client, cql: &str) -> Frame {
    let r = c
        .call(messages::query(4, 1, cql, consistency::LOCAL_QUORUM))
        .await;
    assert_eq!(
        r.opcode(),
        opcode::RESULT,
        "{cql}: {:?}",
        ErrorInfo::parse(&r.body)
    );
    r
}

fn single_text(f: &Frame) -> String {
    let rows = Rows::parse(&f.body).unwrap();
    String::from_utf8(rows.cells().unwrap()[0][0].unwrap().to_vec()).unwrap()
}

#[tokio::test]
async fn use_changes_only_that_clients_keyspace() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut setup = Client::ready(addr).await;
    for ks in ["ks_a", "ks_b"] {
        run(
            &mut setup,
            &format!("CREATE KEYSPACE {ks} WITH replication = {{'class': 'SingleRegionStrategy'}}"),
        )
        .await;
        run(
            &mut setup,
            &format!("CREATE TABLE {ks}.t (k int PRIMARY KEY, v text)"),
        )
        .await;
        run(
            &mut setup,
            &format!("INSERT INTO {ks}.t (k, v) VALUES (1, '{ks}')"),
        )
        .await;
    }
    let (mut a, mut b) = (Client::ready(addr).await, Client::ready(addr).await);
    run(&mut a, "USE ks_a").await;
    run(&mut b, "USE ks_b").await;
    for _ in 0..3 {
        assert_eq!(
            single_text(&run(&mut a, "SELECT v FROM t WHERE k = 1").await),
            "ks_a"
        );
        assert_eq!(
            single_text(&run(&mut b, "SELECT v FROM t WHERE k = 1").await),
            "ks_b"
        );
    }
    // A client that never said USE still has no keyspace.
    let r = setup
        .call(messages::query(
            4,
            1,
            "SELECT v FROM t WHERE k = 1",
            consistency::LOCAL_ONE,
        ))
        .await;
    assert_eq!(r.opcode(), opcode::ERROR);
    // A USE only ever reaches connections opened for that keyspace (their first request is
    // the proxy's own USE), never a shared connection.
    let events = emu.events.snapshot();
    let mut by_conn: std::collections::HashMap<String, Vec<&Value>> = Default::default();
    for e in events_of(&events, "request") {
        by_conn.entry(e["conn"].to_string()).or_default().push(e);
    }
    let is_use = |e: &Value| {
        e["cql"]
            .as_str()
            .is_some_and(|q| q.to_ascii_uppercase().starts_with("USE"))
    };
    for (conn, reqs) in &by_conn {
        if reqs.iter().skip(1).any(|e| is_use(e)) {
            assert!(
                is_use(reqs[0]),
                "connection {conn} got a client USE without being a keyspace connection"
            );
        }
    }
}

fn prepare(cql: &str) -> Frame {
    messages::prepare(4, 2, cql)
}

fn execute(id: &[u8], values: &[&[u8]]) -> Frame {
    messages::execute(4, 3, id, consistency::LOCAL_QUORUM, values)
}

fn prepared_id(f: &Frame) -> Vec<u8> {
    common::cql::result::prepared_id(&f.body).unwrap()
}

#[tokio::test]
async fn unprepared_is_re_prepared_without_the_client_noticing() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::ready(addr).await;
    run(
        &mut c,
        "CREATE KEYSPACE rp WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;
    run(&mut c, "CREATE TABLE rp.t (k int PRIMARY KEY, v text)").await;
    run(&mut c, "USE rp").await;
    let insert = prepared_id(&c.call(prepare("INSERT INTO t (k, v) VALUES (?, ?)")).await);
    let select = prepared_id(&c.call(prepare("SELECT v FROM t WHERE k = ?")).await);
    let key = 7i32.to_be_bytes();
    assert_eq!(
        c.call(execute(&insert, &[&key, b"before"])).await.opcode(),
        opcode::RESULT
    );

    emu.forget_prepared();
    let w = c.call(execute(&insert, &[&key, b"after"])).await;
    assert_eq!(
        w.opcode(),
        opcode::RESULT,
        "{:?}",
        ErrorInfo::parse(&w.body)
    );
    emu.forget_prepared();
    let r = c.call(execute(&select, &[&key])).await;
    assert_eq!(
        r.opcode(),
        opcode::RESULT,
        "{:?}",
        ErrorInfo::parse(&r.body)
    );
    assert_eq!(single_text(&r), "after");
    // Traced: the emulator puts a tracing id in front of the UNPREPARED body (as in front of
    // every answer to a traced request); the proxy still reads it and re-prepares.
    emu.forget_prepared();
    let mut traced = execute(&select, &[&key]);
    traced.header.flags |= flags::TRACING;
    let r = c.call(traced).await;
    assert_eq!(r.opcode(), opcode::RESULT, "{:?}", r.body);
    assert!(r.header.has_flag(flags::TRACING));
    let rows = Rows::parse(&r.body[16..]).unwrap();
    assert_eq!(rows.cells().unwrap()[0][0], Some(&b"after"[..]));
    let events = emu.events.snapshot();
    let prepares = events_of(&events, "request")
        .filter(|e| e["opcode"] == "PREPARE")
        .count();
    assert_eq!(
        prepares, 5,
        "two client PREPAREs and three transparent re-prepares"
    );
}

/// A bystander's read in flight on a connection that is lost is sent again on the other,
/// healthy connection: the client gets its rows, not an error.
#[tokio::test]
async fn a_read_cut_with_its_connection_is_answered_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let settings = PoolSettings {
        min_connections: 2,
        max_connections: 2,
        ..PoolSettings::default()
    };
    let addr = proxy_without_rate_limit(&emu, settings).await;
    let mut c = Client::ready(addr).await;
    assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);
    until_authenticated(&emu, 2).await;
    let before = events_of(&emu.events.snapshot(), "request").count();
    // The next answer is held back until its connection is cut.
    emu.faults.set_latency(Duration::from_secs(600));
    c.send(local_query()).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let first = loop {
        let events = emu.events.snapshot();
        if let Some(e) = events_of(&events, "request").nth(before) {
            break e["conn"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the read never reached the emulator"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    emu.faults.set_latency(Duration::ZERO);
    emu.faults.disconnect(first);
    let r = tokio::time::timeout(Duration::from_secs(60), c.recv())
        .await
        .expect("answered")
        .expect("the client connection stays open");
    assert_eq!(
        r.opcode(),
        opcode::RESULT,
        "{:?}",
        ErrorInfo::parse(&r.body)
    );
    let events = emu.events.snapshot();
    let conns: Vec<u64> = events_of(&events, "request")
        .skip(before)
        .map(|e| e["conn"].as_u64().unwrap())
        .collect();
    assert_eq!(conns.len(), 2, "sent once, then once more");
    assert_ne!(conns[0], conns[1], "the retry went to the other connection");
    assert_eq!(
        events_of(&events, "fault_disconnect").count(),
        1,
        "only one was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_loss_mid_load_answers_every_request_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Arc::new(emulator(dir.path(), |_| {}).await);
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::ready(addr).await;
    run(
        &mut c,
        "CREATE KEYSPACE kill WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;
    run(&mut c, "CREATE TABLE kill.t (k int PRIMARY KEY, v text)").await;
    let killer = {
        let emu = emu.clone();
        tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(40)).await;
                emu.faults.disconnect_all();
            }
        })
    };
    let write = messages::query(
        4,
        0,
        "INSERT INTO kill.t (k, v) VALUES (1, 'x')",
        consistency::LOCAL_QUORUM,
    );
    let total = 20_000;
    let responses = pipeline(&mut c, &write, total, 128).await;
    killer.await.unwrap();
    assert_eq!(responses.len(), total, "every request answered, none hung");
    let errors = error_codes(&responses);
    assert!(
        errors
            .iter()
            .all(|c| *c == error_code::SERVER_ERROR || *c == error_code::OVERLOADED),
        "{errors:?}"
    );
    let disconnects = events_of(&emu.events.snapshot(), "fault_disconnect").count();
    assert!(disconnects > 0, "the fault fired mid-load");
    eprintln!(
        "{} of {total} writes failed when their connection was cut",
        errors.len()
    );
    // A connection attempt cut by the fault puts the pool in a short back-off, during which
    // requests fail fast; it then reconnects by itself and everything works again. Waited for
    // up to three times the longest back-off: on a slow machine more attempts are caught
    // mid-handshake by the cuts.
    let mut back = false;
    let cut_off = Instant::now();
    let deadline = cut_off + Duration::from_secs(30);
    while Instant::now() < deadline {
        if c.call(local_query()).await.opcode() == opcode::RESULT {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "the pool reconnects by itself");
    eprintln!("back {:?} after the load", cut_off.elapsed());
    let reads = pipeline(&mut c, &local_query(), 2000, 64).await;
    assert_eq!(error_codes(&reads), Vec::<i32>::new());
}

#[tokio::test]
async fn every_upstream_down_fails_fast_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::ready(addr).await;
    emu.faults.set_refuse_connections(true);
    emu.faults.disconnect_all();
    let mut saw_error = false;
    for _ in 0..20 {
        let r = c.call(local_query()).await;
        if r.opcode() == opcode::ERROR {
            assert_eq!(
                ErrorInfo::parse(&r.body).unwrap().code,
                error_code::OVERLOADED
            );
            saw_error = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_error, "requests fail while Keyspaces is unreachable");
    // A new client is refused with the reason, not left hanging.
    let mut late = Client::connect(addr).await;
    let r = late
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    assert_eq!(r.opcode(), opcode::ERROR);

    emu.faults.set_refuse_connections(false);
    let mut recovered = false;
    for _ in 0..200 {
        if c.call(local_query()).await.opcode() == opcode::RESULT {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        recovered,
        "the same client connection works again once Keyspaces is back"
    );
}

#[derive(Debug, Clone)]
struct Rotating(Arc<Mutex<(String, String)>>);

impl ProvideCredentials for Rotating {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let (akid, secret) = self.0.lock().unwrap().clone();
        future::ProvideCredentials::ready(Ok(Credentials::new(
            akid, secret, None, None, "rotating",
        )))
    }
}

#[tokio::test]
async fn rotated_credentials_are_used_by_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let keys = Arc::new(Mutex::new((AKID.to_owned(), SECRET.to_owned())));
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.auth = UpstreamAuth::SigV4 {
        credentials: CredentialCache::new(SharedCredentialsProvider::new(Rotating(keys.clone()))),
        region: REGION.into(),
    };
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);

    emu.set_credentials(vec![SigV4Key {
        access_key_id: "AKIDROTATED".into(),
        secret_access_key: "rotated-secret".into(),
        session_token: None,
    }]);
    *keys.lock().unwrap() = ("AKIDROTATED".into(), "rotated-secret".into());
    emu.faults.disconnect_all();
    let mut ok = false;
    for _ in 0..100 {
        if c.call(local_query()).await.opcode() == opcode::RESULT {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "requests work again with the rotated key");
    let events = emu.events.snapshot();
    let auths: Vec<_> = events.iter().filter(|e| e["event"] != "request").collect();
    assert!(
        auths
            .iter()
            .any(|e| e["who"] == "AKIDROTATED" && e["ok"] == true),
        "{auths:?}"
    );
}

#[tokio::test]
async fn warm_pool_answers_startup_without_an_upstream_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let (addr, pool) = proxy_with_pool(&emu, ProxyOptions::for_emulator(&emu)).await;
    let pool = pool.unwrap();
    pool.group(ProtocolVersion::V4, None).await.unwrap();
    let connects = || events_of(&emu.events.snapshot(), "connect").count();
    let before = connects();
    for _ in 0..5 {
        let mut c = Client::ready(addr).await;
        assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);
    }
    assert!(
        connects() <= before + 1,
        "clients reuse the warm connections"
    );
}

#[tokio::test]
async fn dedicated_mode_is_still_available() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu).dedicated()).await;
    let mut c = Client::ready(addr).await;
    run(
        &mut c,
        "CREATE KEYSPACE ded WITH replication = {'class': 'SingleRegionStrategy'}",
    )
    .await;
    run(&mut c, "USE ded").await;
    assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);
    assert_eq!(events_of(&emu.events.snapshot(), "connect").count(), 1);
}

/// Keyspaces' endpoint is several load balancers, listed in its system.peers: the pool spreads
/// its connections over all of them, keeping the endpoint's name for TLS and SigV4. (Dead
/// addresses are what most other tests meet: their emulators list peers they do not listen on.)
#[tokio::test]
async fn connections_spread_over_every_address_the_endpoint_offers() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |c| {
        c.listen_on_peers = true;
        c.peers = 3;
    })
    .await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 8,
        ..PoolSettings::default()
    });
    let addr = proxy(&emu, opts).await;
    let mut c = Client::ready(addr).await;
    let _ = pipeline(&mut c, &local_query(), 64, 8).await;
    until_authenticated(&emu, 8).await;
    let events = emu.events.snapshot();
    let locals: HashSet<String> = events_of(&events, "connect")
        .filter_map(|e| {
            e["local"]
                .as_str()
                .map(|l| l.split(':').next().unwrap_or("").to_owned())
        })
        .collect();
    let expected: HashSet<String> = std::iter::once(emu.addr.ip().to_string())
        .chain(emu.peer_addrs.iter().map(|a| a.ip().to_string()))
        .collect();
    assert_eq!(locals, expected, "every address is used");
    assert!(
        events_of(&events, "auth").all(|e| e["ok"] == true),
        "the endpoint's name signed every handshake"
    );
}

/// A connection that died no longer counts against its address, even while a client that
/// used it (and still holds its handle) stays connected: new connections and the metrics go
/// by what is open.
#[tokio::test]
async fn a_dead_connection_stops_counting_against_its_address() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.pool = Some(PoolSettings {
        min_connections: 1,
        ..PoolSettings::default()
    });
    let ctx = context(&emu, opts);
    let book = ctx.upstream.addresses.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keyspaces_proxy::server::serve(
        listener,
        Arc::new(ctx),
        100,
        Duration::from_secs(5),
    ));
    let mut c = Client::ready(addr).await;
    assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);
    let open = || book.connections().iter().map(|(_, n)| n).sum::<usize>();
    assert!(open() >= 1);
    emu.faults.set_refuse_connections(true);
    emu.faults.disconnect_all();
    let deadline = Instant::now() + Duration::from_secs(60);
    while open() > 0 {
        assert!(
            Instant::now() < deadline,
            "still counted: {:?}",
            book.connections()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(c);
}

/// Four busy clients (64 in flight each) on a pool that starts with two connections: sharing
/// a connection, their bursts queue behind each other, so the pool grows until each has its
/// own — well before the per-connection depth limit (256) that a single client must reach.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_clients_sharing_connections_get_one_each() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy_without_rate_limit(&emu, PoolSettings::default()).await;
    let mut loads = Vec::new();
    for _ in 0..4 {
        let mut c = Client::ready(addr).await;
        loads.push(tokio::spawn(async move {
            error_codes(&pipeline(&mut c, &local_query(), 16_000, 64).await)
        }));
    }
    for load in loads {
        assert_eq!(load.await.unwrap(), Vec::<i32>::new());
    }
    let authenticated = events_of(&emu.events.snapshot(), "auth").count();
    assert!(
        (4..=6).contains(&authenticated),
        "{authenticated} upstream connections for four busy clients"
    );
}

/// Clients that arrive while the group has no ready connection (here after every upstream
/// connection was cut, against an upstream slow to handshake) share the connects under way
/// instead of each opening its own: the pool stays within its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_arriving_with_no_connection_ready_share_the_connects() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let settings = PoolSettings {
        min_connections: 1,
        max_connections: 2,
        ..PoolSettings::default()
    };
    let addr = proxy_without_rate_limit(&emu, settings).await;
    let mut first = Client::ready(addr).await;
    assert_eq!(first.call(local_query()).await.opcode(), opcode::RESULT);
    let before = events_of(&emu.events.snapshot(), "auth").count();
    emu.faults.set_handshake_delay(Duration::from_millis(500));
    emu.faults.disconnect_all();
    let arrivals: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = Client::ready(addr).await;
                c.call(local_query()).await.opcode()
            })
        })
        .collect();
    for a in arrivals {
        assert_eq!(a.await.unwrap(), opcode::RESULT);
    }
    let opened = events_of(&emu.events.snapshot(), "auth").count() - before;
    assert!(
        opened <= 2,
        "{opened} upstream connections opened for 20 arriving clients"
    );
}

/// Many clients with a few requests in flight each, sharing two connections 128 deep: each
/// waits behind the others' requests, so the pool grows until they are spread out — and stops
/// once the connections are no deeper on average than sharing costs nothing at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pipelining_clients_sharing_deep_connections_spread_out() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy_without_rate_limit(&emu, PoolSettings::default()).await;
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(Client::ready(addr).await);
    }
    let loads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(
                async move { error_codes(&pipeline(&mut c, &local_query(), 3_000, 8).await) },
            )
        })
        .collect();
    for load in loads {
        assert_eq!(load.await.unwrap(), Vec::<i32>::new());
    }
    let authenticated = events_of(&emu.events.snapshot(), "auth").count();
    assert!(
        (3..=6).contains(&authenticated),
        "{authenticated} upstream connections for 32 clients of 8 each"
    );
}

/// One busy client (400 in flight) among many light ones (one request at a time each): the
/// pool stays as it is — light clients re-pinning beside the busy one must not grow it a
/// connection at a time, nor to the busy client's depth over the shared depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn light_clients_beside_a_busy_one_do_not_grow_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy_without_rate_limit(&emu, PoolSettings::default()).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut light = Vec::new();
    for _ in 0..20 {
        let mut c = Client::ready(addr).await;
        let stopped = stopped.clone();
        light.push(tokio::spawn(async move {
            while !*stopped.borrow() {
                assert_eq!(c.call(local_query()).await.opcode(), opcode::RESULT);
            }
        }));
    }
    let mut busy = Client::ready(addr).await;
    assert_eq!(
        error_codes(&pipeline(&mut busy, &local_query(), 30_000, 400).await),
        Vec::<i32>::new()
    );
    stop.send(true).unwrap();
    for l in light {
        l.await.unwrap();
    }
    let authenticated = events_of(&emu.events.snapshot(), "auth").count();
    assert!(authenticated <= 3, "{authenticated} upstream connections");
}
