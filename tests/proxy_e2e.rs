//! The proxy between a frame-level client and the emulator, over real sockets and TLS.

mod common;

use common::cql::messages::{self, ErrorInfo};
use common::cql::result::Rows;
use common::cql::{consistency, error_code, opcode, Compression, Frame, Header};
use common::*;
use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
use keyspaces_proxy::upstream::UpstreamAuth;

#[tokio::test]
async fn driver_style_handshake_and_topology() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::connect(addr).await;

    // Drivers probe v5 first; the socket must stay usable after the refusal.
    let e = error_of(&c.call(messages::options(5, 0)).await);
    assert_eq!(e.code, error_code::PROTOCOL_ERROR);
    assert!(e.message.contains(
        "Invalid or unsupported protocol version (5); supported versions are (3/v3, 4/v4)"
    ));
    let sup = c.call(messages::options(4, 0)).await;
    assert_eq!(sup.opcode(), opcode::SUPPORTED);
    let r = c
        .call(messages::startup(4, 1, &[("CQL_VERSION", "3.0.0")]))
        .await;
    assert_eq!(r.opcode(), opcode::READY);

    let reg = Frame::new(
        Header::request(4, 2, opcode::REGISTER),
        bytes::Bytes::from_static(&[0, 0]),
    );
    assert_eq!(c.call(reg).await.opcode(), opcode::READY);

    let local = c
        .call(messages::query(
            4,
            3,
            "SELECT * FROM system.local WHERE key='local'",
            consistency::ONE,
        ))
        .await;
    let rows = Rows::parse(&local.body).unwrap();
    let cols = rows.columns.clone().unwrap();
    let cells = &rows.cells().unwrap()[0];
    let cell = |name: &str| cells[cols.iter().position(|c| c.name == name).unwrap()];
    assert_eq!(cell("rpc_address"), Some(&[127u8, 0, 0, 1][..]));
    assert_eq!(cell("cluster_name"), Some(&b"Amazon Keyspaces"[..]));
    assert_eq!(
        cell("partitioner"),
        Some(&b"org.apache.cassandra.dht.Murmur3Partitioner"[..])
    );

    let peers = c
        .call(messages::query(
            4,
            4,
            "SELECT peer, rpc_address FROM system.peers",
            consistency::ONE,
        ))
        .await;
    assert_eq!(Rows::parse(&peers.body).unwrap().rows_count, 0);

    let v2 = c
        .call(messages::query(
            4,
            5,
            "SELECT * FROM system.peers_v2",
            consistency::ONE,
        ))
        .await;
    assert!(error_of(&v2).message.contains("unconfigured table"));

    // The upstream was signed with SigV4 and never saw REGISTER.
    let events = emu.events.snapshot();
    assert!(events
        .iter()
        .any(|e| e["event"] == "auth" && e["mode"] == "sigv4" && e["ok"] == true));
    assert!(!events.iter().any(|e| e["opcode"] == "REGISTER"));
}

#[tokio::test]
async fn upstream_auth_failure_reaches_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.auth = sigv4("not-the-secret");
    let addr = proxy(&emu, opts).await;
    let mut c = Client::connect(addr).await;
    let e = error_of(
        &c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await,
    );
    assert_eq!(e.code, error_code::BAD_CREDENTIALS);
    assert_eq!(e.message, "Authentication failure: Invalid signature");
}

#[tokio::test]
async fn untrusted_ca_and_wrong_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let stranger = emulator(other.path(), |_| {}).await;

    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.ca = stranger.ca_pem.clone();
    let addr = proxy(&emu, opts).await;
    let mut c = Client::connect(addr).await;
    let e = error_of(
        &c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await,
    );
    assert_eq!(e.code, error_code::SERVER_ERROR);
    assert!(
        e.message.contains("TLS handshake") && e.message.contains("certificate"),
        "{}",
        e.message
    );

    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.server_name = "cassandra.eu-west-1.amazonaws.com".into();
    let addr = proxy(&emu, opts).await;
    let mut c = Client::connect(addr).await;
    let e = error_of(
        &c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await,
    );
    assert!(e.message.contains("certificate"), "{}", e.message);
    assert!(!emu.events.snapshot().iter().any(|e| e["event"] == "auth"));
}

#[tokio::test]
async fn password_clients_and_plain_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:app-pw").unwrap());
    opts.auth = UpstreamAuth::Plain {
        username: "svc".into(),
        password: String::from("svc-pw").into(),
    };
    let addr = proxy(&emu, opts).await;

    let mut c = Client::connect(addr).await;
    let a = c
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    assert_eq!(
        messages::parse_authenticate(&a.body).unwrap(),
        messages::PASSWORD_AUTHENTICATOR
    );
    let e = error_of(
        &c.call(messages::auth_response(
            4,
            1,
            &messages::plain_token("app", "nope"),
        ))
        .await,
    );
    assert_eq!(e.code, error_code::BAD_CREDENTIALS);
    // One try per connection: the next one starts afresh.
    assert!(c.recv().await.is_none(), "closed after the failed login");
    let mut c = Client::connect(addr).await;
    c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    let ok = c
        .call(messages::auth_response(
            4,
            2,
            &messages::plain_token("app", "app-pw"),
        ))
        .await;
    assert_eq!(ok.opcode(), opcode::AUTH_SUCCESS);
    let r = c
        .call(messages::query(
            4,
            3,
            "SELECT release_version FROM system.local",
            consistency::ONE,
        ))
        .await;
    assert_eq!(r.opcode(), opcode::RESULT);
    assert!(emu
        .events
        .snapshot()
        .iter()
        .any(|e| e["event"] == "auth" && e["mode"] == "plain" && e["who"] == "svc"));
}

#[tokio::test]
async fn client_compression_is_served_by_the_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    for algo in [Compression::Lz4, Compression::Snappy] {
        let mut c = Client::connect(addr).await;
        let r = c
            .call(messages::startup(
                4,
                0,
                &[("CQL_VERSION", "3.0.0"), ("COMPRESSION", algo.name())],
            ))
            .await;
        assert_eq!(r.opcode(), opcode::READY);
        let q = algo.compress(messages::query(
            4,
            1,
            "SELECT * FROM system.local",
            consistency::ONE,
        ));
        let r = algo.decompress(c.call(q).await).unwrap();
        let rows = Rows::parse(&r.body).unwrap();
        assert_eq!(rows.rows_count, 1);
    }
}

#[tokio::test]
async fn writes_reads_and_use_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut c = Client::ready(addr).await;
    for q in [
        "CREATE KEYSPACE e2e WITH replication = {'class': 'SingleRegionStrategy'}",
        "CREATE TABLE e2e.t (k int, c int, v text, PRIMARY KEY (k, c))",
        "USE e2e",
        "INSERT INTO t (k, c, v) VALUES (1, 2, 'x')",
    ] {
        let r = c
            .call(messages::query(4, 1, q, consistency::LOCAL_QUORUM))
            .await;
        assert_eq!(
            r.opcode(),
            opcode::RESULT,
            "{q}: {:?}",
            ErrorInfo::parse(&r.body)
        );
    }
    // Keyspaces' write rule comes back unchanged.
    let r = c
        .call(messages::query(
            4,
            1,
            "INSERT INTO t (k, c, v) VALUES (1, 3, 'y')",
            consistency::ONE,
        ))
        .await;
    assert!(error_of(&r)
        .message
        .contains("Supported consistency levels are: LOCAL_QUORUM"));
    let r = c
        .call(messages::query(
            4,
            7,
            "SELECT v FROM t WHERE k = 1",
            consistency::LOCAL_ONE,
        ))
        .await;
    assert_eq!(r.stream(), 7);
    assert_eq!(
        Rows::parse(&r.body).unwrap().cells().unwrap()[0][0],
        Some(&b"x"[..])
    );
}

#[tokio::test]
async fn hostile_frames_close_only_their_connection() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let mut good = Client::ready(addr).await;

    let mut bad = Client::ready(addr).await;
    bad.send(messages::ready(4, 9)).await; // a response-direction frame from a client
    let e = error_of(&bad.recv().await.unwrap());
    assert_eq!(e.code, error_code::PROTOCOL_ERROR);
    assert!(bad.recv().await.is_none(), "connection closed");

    let r = good
        .call(messages::query(
            4,
            1,
            "SELECT key FROM system.local",
            consistency::ONE,
        ))
        .await;
    assert_eq!(r.opcode(), opcode::RESULT);
}

/// Found by review: a connection opened before a SIGHUP logged in with a password the reload
/// had rotated away. Credentials are checked against the users in force at the verdict.
#[tokio::test]
async fn a_reload_applies_to_connections_already_waiting_to_log_in() {
    use keyspaces_proxy::auth::client::Logins;
    use keyspaces_proxy::auth::sessions::SessionCache;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let users = |entry: &str| {
        Arc::new(Logins::new(
            ClientAuth::Password(UserStore::parse(entry).unwrap()),
            SessionCache::new(std::time::Duration::from_secs(600), 100),
        ))
    };
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:old-pw\n").unwrap());
    let ctx = Arc::new(context(&emu, opts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(keyspaces_proxy::server::serve(
        listener,
        ctx.clone(),
        100,
        std::time::Duration::from_secs(5),
    ));
    let login =
        |password: &str| messages::auth_response(4, 1, &messages::plain_token("app", password));
    // One login before the reload leaves a session behind; two clients wait at AUTHENTICATE.
    let mut before = Client::connect(addr).await;
    before
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    before.send(login("old-pw")).await;
    assert_eq!(before.recv().await.unwrap().opcode(), opcode::AUTH_SUCCESS);
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(addr).await;
        let a = c
            .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        assert_eq!(a.opcode(), opcode::AUTHENTICATE);
        waiting.push(c);
    }
    ctx.logins.store(users("app:new-pw\n"));
    waiting[0].send(login("old-pw")).await;
    let e = error_of(&waiting[0].recv().await.unwrap());
    assert_eq!(e.code, error_code::BAD_CREDENTIALS, "{}", e.message);
    waiting[1].send(login("new-pw")).await;
    assert_eq!(
        waiting[1].recv().await.unwrap().opcode(),
        opcode::AUTH_SUCCESS
    );
    // The old password's session went with the old users.
    let mut after = Client::connect(addr).await;
    after
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    after.send(login("old-pw")).await;
    assert_eq!(
        error_of(&after.recv().await.unwrap()).code,
        error_code::BAD_CREDENTIALS
    );
}
