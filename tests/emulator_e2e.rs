//! The emulator on its own, as a direct client (a SigV4 plugin) would see it: the test client's
//! own frames, and the proxy's signer standing in for the plugin's against the emulator's
//! independent verifier.

mod common;

use std::time::SystemTime;

use common::cql::messages::{self, ErrorInfo};
use common::cql::{consistency, error_code, opcode, Codec, Frame};
use common::*;
use futures_util::{SinkExt, StreamExt};
use keyspaces_proxy::auth::sigv4;
use keyspaces_proxy::upstream::tls::{client_config, server_name};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

type Tls = Framed<tokio_rustls::client::TlsStream<TcpStream>, Codec>;

async fn tls_client(emu: &keyspaces_emulator::Emulator) -> Tls {
    tls_client_via(emu, emu.addr).await
}

/// A TLS client of `emu` that dials `addr` (the emulator, or something in front of it).
async fn tls_client_via(emu: &keyspaces_emulator::Emulator, addr: std::net::SocketAddr) -> Tls {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(Some(&emu.ca_pem)).unwrap());
    let tls = connector
        .connect(
            server_name("cassandra.us-east-1.amazonaws.com").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    Framed::new(tls, Codec::default())
}

async fn call(c: &mut Tls, f: Frame) -> Frame {
    c.send(f).await.unwrap();
    c.next().await.unwrap().unwrap()
}

async fn sigv4_login(c: &mut Tls, secret: &str) -> Frame {
    let a = call(c, messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")])).await;
    assert_eq!(
        messages::parse_authenticate(&a.body).unwrap(),
        messages::PASSWORD_AUTHENTICATOR
    );
    let ch = call(c, messages::auth_response(4, 0, sigv4::INITIAL_RESPONSE)).await;
    assert_eq!(ch.opcode(), opcode::AUTH_CHALLENGE);
    let token = messages::parse_auth_token(&ch.body).unwrap().to_vec();
    let text = String::from_utf8(token.clone()).unwrap();
    assert!(text.starts_with("nonce=") && text.len() == 6 + 32, "{text}");
    let nonce = sigv4::parse_challenge(&token).unwrap();
    let resp = sigv4::signed_response(&sigv4::SigningParams {
        access_key_id: AKID,
        secret_access_key: secret,
        session_token: None,
        region: REGION,
        nonce,
        time: SystemTime::now(),
    });
    call(c, messages::auth_response(4, 0, resp.as_bytes())).await
}

#[tokio::test]
async fn sigv4_success_failure_and_retry_on_same_socket() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut c = tls_client(&emu).await;
    let bad = sigv4_login(&mut c, "wrong").await;
    let e = ErrorInfo::parse(&bad.body).unwrap();
    assert_eq!(
        (e.code, e.message.as_str()),
        (
            error_code::BAD_CREDENTIALS,
            "Authentication failure: Invalid signature"
        )
    );
    // The connection stays open: a new SigV4 round works.
    let ch = call(
        &mut c,
        messages::auth_response(4, 0, sigv4::INITIAL_RESPONSE),
    )
    .await;
    assert_eq!(ch.opcode(), opcode::AUTH_CHALLENGE);
    let mut c = tls_client(&emu).await;
    assert_eq!(
        sigv4_login(&mut c, SECRET).await.opcode(),
        opcode::AUTH_SUCCESS
    );
    let events = emu.events.snapshot();
    let auths: Vec<_> = events.iter().filter(|e| e["event"] == "auth").collect();
    assert_eq!(auths[0]["reason"], "invalid_signature");
    assert_eq!(auths.last().unwrap()["ok"], true);
    assert!(!serde_json::to_string(&events).unwrap().contains(SECRET));
}

#[tokio::test]
async fn requests_before_auth_and_v5_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut c = tls_client(&emu).await;
    let r = call(
        &mut c,
        messages::query(4, 3, "SELECT * FROM system.local", 1),
    )
    .await;
    assert_eq!(r.opcode(), opcode::ERROR);
    assert_eq!(r.stream(), 3);
    let r = call(&mut c, messages::startup(5, 4, &[("CQL_VERSION", "3.0.0")])).await;
    let e = ErrorInfo::parse(&r.body).unwrap();
    assert_eq!(e.code, error_code::PROTOCOL_ERROR);
    assert_eq!(
        e.message,
        "Invalid or unsupported protocol version (5); supported versions are (3/v3, 4/v4)"
    );
    assert_eq!(r.stream(), 4);
    let ok = call(&mut c, messages::options(4, 5)).await;
    assert_eq!(ok.opcode(), opcode::SUPPORTED);
}

#[tokio::test]
async fn plaintext_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut tcp = TcpStream::connect(emu.addr).await.unwrap();
    tcp.write_all(&messages::options(4, 0).to_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    // No CQL answer: at most a TLS alert (0x15), then the close.
    assert!(n == 0 || buf[0] == 0x15, "got {:?}", &buf[..n]);
}

#[tokio::test]
async fn per_connection_rate_cap_answers_with_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |cfg| cfg.rate_limit = 5).await;
    let mut c = tls_client(&emu).await;
    assert_eq!(
        sigv4_login(&mut c, SECRET).await.opcode(),
        opcode::AUTH_SUCCESS
    );
    // One write of 30 reads then 10 writes: they land in one or two of the cap's one-second
    // windows, however slow the machine, so at most 10 pass. What is refused is refused as
    // Keyspaces does: reads with ReadTimeout, writes with WriteTimeout.
    const READS: i16 = 30;
    const WRITES: i16 = 10;
    for i in 0..READS + WRITES {
        let cql = if i < READS {
            "SELECT key FROM system.local"
        } else {
            "INSERT INTO x.y (a) VALUES (1)"
        };
        c.feed(messages::query(4, i, cql, consistency::LOCAL_QUORUM))
            .await
            .unwrap();
    }
    c.flush().await.unwrap();
    let (mut passed, mut refused_reads, mut refused_writes) = (0, 0, 0);
    for _ in 0..READS + WRITES {
        let r = c.next().await.unwrap().unwrap();
        let is_read = r.stream() < READS;
        let code = (r.opcode() == opcode::ERROR).then(|| ErrorInfo::parse(&r.body).unwrap().code);
        match (code, is_read) {
            (None, true) => passed += 1,
            (Some(error_code::READ_TIMEOUT), true) => refused_reads += 1,
            (Some(error_code::WRITE_TIMEOUT), false) => refused_writes += 1,
            // A write that passed the cap reaches a keyspace that does not exist.
            (Some(error_code::INVALID), false) => passed += 1,
            other => panic!("stream {}: {other:?}", r.stream()),
        }
    }
    assert!((5..=10).contains(&passed), "passed the cap: {passed}");
    assert!(refused_reads >= 20, "reads refused: {refused_reads}");
    assert!(refused_writes >= 5, "writes refused: {refused_writes}");
}

#[tokio::test]
async fn faults_can_be_changed_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    emu.faults.set_fail_auth(true);
    let mut c = tls_client(&emu).await;
    assert_eq!(sigv4_login(&mut c, SECRET).await.opcode(), opcode::ERROR);
    emu.faults.set_fail_auth(false);
    emu.faults.set_close_after(2);
    let mut c = tls_client(&emu).await;
    assert_eq!(
        sigv4_login(&mut c, SECRET).await.opcode(),
        opcode::AUTH_SUCCESS
    );
    let r = call(
        &mut c,
        messages::query(4, 1, "SELECT key FROM system.local", 1),
    )
    .await;
    assert_eq!(r.opcode(), opcode::RESULT);
    c.send(messages::query(4, 2, "SELECT key FROM system.local", 1))
        .await
        .unwrap();
    assert!(
        c.next().await.is_none_or(|r| r.is_err()),
        "closed by the fault"
    );
}

#[tokio::test]
async fn tls_material_is_reused_across_starts() {
    let dir = tempfile::tempdir().unwrap();
    let first = emulator(dir.path(), |_| {}).await;
    let ca = std::fs::read(&first.ca_pem).unwrap();
    drop(first);
    let second = emulator(dir.path(), |_| {}).await;
    assert_eq!(std::fs::read(&second.ca_pem).unwrap(), ca);
    // The re-issued or reused server certificate still chains to the same CA.
    let mut c = tls_client(&second).await;
    assert_eq!(
        call(&mut c, messages::options(4, 0)).await.opcode(),
        opcode::SUPPORTED
    );
}

/// Counts the TLS records the server sends, by content type, on their way to the client.
async fn record_counting_relay(
    upstream: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let types = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = types.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
        // Server to client, a record at a time: a 5-byte header (type, version, length).
        loop {
            let mut header = [0u8; 5];
            if sr.read_exact(&mut header).await.is_err() {
                return;
            }
            let len = u16::from_be_bytes([header[3], header[4]]) as usize;
            let mut body = vec![0u8; len];
            if sr.read_exact(&mut body).await.is_err() {
                return;
            }
            seen.lock().unwrap().push(header[0]);
            if cw.write_all(&header).await.is_err() || cw.write_all(&body).await.is_err() {
                return;
            }
        }
    });
    (addr, types)
}

/// The options that make the emulator unlike itself: answers split into two TLS records
/// (header, then body), a chosen TLS version, latency in microseconds.
#[tokio::test]
async fn split_answers_tls_versions_and_microsecond_latency() {
    const APPLICATION_DATA: u8 = 23;
    for (versions, expected) in [
        (
            keyspaces_emulator::tls::TlsVersions::Tls12,
            rustls::ProtocolVersion::TLSv1_2,
        ),
        (
            keyspaces_emulator::tls::TlsVersions::Tls13,
            rustls::ProtocolVersion::TLSv1_3,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let emu = emulator(dir.path(), |c| {
            c.split_answers = true;
            c.tls_versions = versions;
        })
        .await;
        emu.faults
            .set_latency(std::time::Duration::from_micros(700));
        let (relay, records) = record_counting_relay(emu.addr).await;
        let mut c = tls_client_via(&emu, relay).await;
        assert_eq!(c.get_ref().get_ref().1.protocol_version(), Some(expected));
        assert_eq!(
            sigv4_login(&mut c, SECRET).await.opcode(),
            opcode::AUTH_SUCCESS
        );
        let before = records.lock().unwrap().len();
        let started = std::time::Instant::now();
        let n = 10;
        for _ in 0..n {
            let q = messages::query(4, 3, "SELECT key FROM system.local", consistency::ONE);
            assert_eq!(call(&mut c, q).await.opcode(), opcode::RESULT);
        }
        // Latency is added, never taken away: a lower bound holds on any machine.
        assert!(started.elapsed() >= std::time::Duration::from_micros(700 * n));
        let after: Vec<u8> = records.lock().unwrap()[before..].to_vec();
        let data = after.iter().filter(|t| **t == APPLICATION_DATA).count();
        assert!(data >= 2 * n as usize, "{expected:?}: {after:?}");
    }
}
