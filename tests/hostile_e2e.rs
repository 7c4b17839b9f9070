//! Hostile clients over real sockets. For every case the offending connection gets a CQL ERROR
//! or a clean close, a bystander client that stays connected throughout keeps working, and a
//! fresh client can still connect. Pipelining, back-pressure and clients that do not read are in
//! `hostile_load_e2e.rs`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::cql::messages::{self, ErrorInfo};
use common::cql::{error_code, opcode, Frame, Header};
use common::hostile::*;
use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn malformed_frames_before_and_after_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.max_frame_len = 1 << 20;
    let addr = proxy(&emu, opts).await;
    let mut bystander = Client::ready(addr).await;

    // A truncated header, then the client closes its side: the proxy closes too.
    let mut c = Client::connect(addr).await;
    c.send_raw(&[0x04, 0x00, 0x00]).await;
    c.framed_mut().get_mut().shutdown().await.unwrap();
    assert!(matches!(outcome(&mut c).await, Outcome::Closed));
    others_fine(addr, &mut bystander, "truncated header").await;

    // Length fields: 2^31-1, "negative" (top bit set), just over the configured limit.
    for (case, len) in [
        ("length 2^31-1", i32::MAX as u32),
        ("negative length", 0x8000_0000u32),
        ("length -1", u32::MAX),
        ("over the frame limit", (1 << 20) + 1),
    ] {
        for started in [false, true] {
            let mut c = if started {
                Client::ready(addr).await
            } else {
                Client::connect(addr).await
            };
            c.send_raw(&header(0, 3, opcode::QUERY, len)).await;
            let o = outcome(&mut c).await;
            protocol_error(&o, case);
            closes(&mut c, case).await;
            others_fine(addr, &mut bystander, case).await;
        }
    }

    // Length 0: an empty STARTUP is refused; an empty QUERY is answered with an error and
    // the connection stays usable.
    let mut c = Client::connect(addr).await;
    c.send_raw(&header(0, 1, opcode::STARTUP, 0)).await;
    protocol_error(&outcome(&mut c).await, "empty STARTUP");
    let mut c = Client::ready(addr).await;
    c.send_raw(&header(0, 2, opcode::QUERY, 0)).await;
    assert_error_or_close(&outcome(&mut c).await, "empty QUERY");
    others_fine(addr, &mut bystander, "length 0").await;

    // Unknown opcodes, before and after the handshake.
    let mut c = Client::connect(addr).await;
    c.send_raw(&raw_frame(0x77, 1, 0, b"")).await;
    protocol_error(&outcome(&mut c).await, "unknown opcode before STARTUP");
    let mut c = Client::ready(addr).await;
    c.send_raw(&raw_frame(0x77, 1, 0, b"")).await;
    protocol_error(&outcome(&mut c).await, "unknown opcode");
    closes(&mut c, "unknown opcode").await;

    // Response-direction frames from a client.
    for started in [false, true] {
        let mut c = if started {
            Client::ready(addr).await
        } else {
            Client::connect(addr).await
        };
        c.send_raw(&messages::ready(4, 5).to_bytes()).await;
        protocol_error(&outcome(&mut c).await, "response frame");
        closes(&mut c, "response frame").await;
    }

    // Another protocol version in the middle of a v4 connection.
    let mut c = Client::ready(addr).await;
    c.send(messages::query(3, 4, "SELECT key FROM system.local", 1))
        .await;
    protocol_error(&outcome(&mut c).await, "v3 frame on a v4 connection");
    closes(&mut c, "version switch").await;

    // The compressed flag without negotiated compression.
    let mut c = Client::ready(addr).await;
    let mut q = local(6);
    q.header.flags |= 0x01;
    c.send(q).await;
    protocol_error(&outcome(&mut c).await, "compressed flag");
    closes(&mut c, "compressed flag").await;

    // A request before STARTUP: an error, and the connection can still start properly.
    let mut c = Client::connect(addr).await;
    protocol_error(&outcome_of(&mut c, local(1)).await, "QUERY before STARTUP");
    let r = c
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    assert_eq!(r.opcode(), opcode::READY);

    // Garbage after a valid STARTUP.
    let mut c = Client::connect(addr).await;
    let mut bytes = messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")])
        .to_bytes()
        .to_vec();
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    c.send_raw(&bytes).await;
    let first = outcome(&mut c).await;
    assert!(
        matches!(&first, Outcome::Other(f) if f.opcode() == opcode::READY),
        "{first:?}"
    );
    // Whatever the garbage decodes to, it ends in an error or a close, never a hang.
    loop {
        match c.recv().await {
            None => break,
            Some(f) if f.opcode() == opcode::ERROR => continue,
            Some(f) => panic!("garbage produced {f:?}"),
        }
    }
    others_fine(addr, &mut bystander, "garbage").await;

    // A STARTUP map with 20,000 entries (~200 KB) passes the 64 KiB pre-login frame limit: refused
    // by its header, before any of it is read. One with 5,000 entries fits: like Cassandra, the
    // proxy ignores options it does not know and the connection works.
    let startup_with = |n: usize| {
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("K{i}").into_bytes()).collect();
        let mut entries: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (&k[..], &b"v"[..])).collect();
        entries.push((b"CQL_VERSION", b"3.0.0"));
        raw_frame(opcode::STARTUP, 1, 0, &string_map(&entries))
    };
    let mut c = Client::connect(addr).await;
    c.send_raw(&startup_with(20_000)).await;
    match outcome(&mut c).await {
        Outcome::Error(e) if e.code == error_code::PROTOCOL_ERROR => {
            assert!(e.message.contains("exceeds the limit"), "{e:?}")
        }
        other => panic!("20,000-entry STARTUP: expected a protocol error, got {other:?}"),
    }
    closes(&mut c, "20,000-entry STARTUP").await;
    let mut c = Client::connect(addr).await;
    c.send_raw(&startup_with(5_000)).await;
    let o = outcome(&mut c).await;
    assert!(
        matches!(&o, Outcome::Other(f) if f.opcode() == opcode::READY),
        "5,000-entry STARTUP: {o:?}"
    );
    let r = c.call(local(2)).await;
    assert_eq!(r.opcode(), opcode::RESULT, "a query after it: {r:?}");
    others_fine(addr, &mut bystander, "many STARTUP options").await;
    let mut lying = 1u16.to_be_bytes().to_vec();
    lying.extend_from_slice(&u16::MAX.to_be_bytes());
    lying.extend_from_slice(b"CQL_VERSION");
    let mut c = Client::connect(addr).await;
    c.send_raw(&raw_frame(opcode::STARTUP, 1, 0, &lying)).await;
    protocol_error(&outcome(&mut c).await, "string longer than its frame");

    // Invalid UTF-8: in STARTUP, in a QUERY string, in a PLAIN token.
    let mut c = Client::connect(addr).await;
    c.send_raw(&raw_frame(
        opcode::STARTUP,
        1,
        0,
        &string_map(&[(b"CQL_VERSION", b"3.\xff\xfe")]),
    ))
    .await;
    protocol_error(&outcome(&mut c).await, "invalid UTF-8 in STARTUP");
    let mut c = Client::ready(addr).await;
    let mut body = 14u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"SELECT \xc3\x28 FROM");
    body.extend_from_slice(&1u16.to_be_bytes());
    body.push(0);
    c.send_raw(&raw_frame(opcode::QUERY, 9, 0, &body)).await;
    assert_error_or_close(&outcome(&mut c).await, "invalid UTF-8 in QUERY");
    others_fine(addr, &mut bystander, "invalid UTF-8").await;
}

async fn outcome_of(c: &mut Client, f: Frame) -> Outcome {
    c.send(f).await;
    outcome(c).await
}

#[tokio::test]
async fn password_mode_refuses_malformed_plain_tokens() {
    use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:app-pw\n").unwrap());
    let addr = proxy(&emu, opts).await;
    for token in [
        &b""[..],
        b"\0",
        b"no-separators",
        b"\0app\0\xff\xfe",
        b"\0\xc3\x28\0app-pw",
    ] {
        let mut c = Client::connect(addr).await;
        let r = c
            .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        assert_eq!(r.opcode(), opcode::AUTHENTICATE);
        let o = outcome_of(&mut c, messages::auth_response(4, 0, token)).await;
        assert_error_or_close(&o, "bad PLAIN token");
    }
    let mut c = Client::connect(addr).await;
    c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    let r = c
        .call(messages::auth_response(
            4,
            0,
            &messages::plain_token("app", "app-pw"),
        ))
        .await;
    assert_eq!(r.opcode(), opcode::AUTH_SUCCESS);
}

#[tokio::test]
async fn slow_handshakes_are_cut_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.handshake_timeout = Duration::from_millis(800);
    let addr = proxy(&emu, opts).await;
    let mut bystander = Client::ready(addr).await;

    // Slowloris: a STARTUP one byte at a time, 100 ms apart (6 s for the frame).
    let startup = messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]).to_bytes();
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let mut sent_all = true;
    for b in startup.iter() {
        if slow.write_all(&[*b]).await.is_err() {
            sent_all = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut probe = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::ZERO, slow.peek(&mut probe)).await {
            sent_all = false;
            break;
        }
    }
    assert!(
        !sent_all,
        "the trickled handshake was cut before it finished"
    );

    // OPTIONS every 100 ms, never a STARTUP: also cut.
    let mut chatty = Client::connect(addr).await;
    let mut answered = 0;
    loop {
        chatty.send(messages::options(4, 1)).await;
        match chatty.recv().await {
            Some(f) if f.opcode() == opcode::SUPPORTED => answered += 1,
            _ => break,
        }
        assert!(answered < 60, "OPTIONS kept the handshake open");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    others_fine(addr, &mut bystander, "slow handshakes").await;
}

/// A ready client, once the proxy has a connection slot for it.
async fn ready_once_a_slot_is_free(addr: SocketAddr) -> Client {
    for _ in 0..100 {
        let mut c = Client::connect(addr).await;
        c.send(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        if let Outcome::Other(f) = outcome(&mut c).await {
            assert_eq!(f.opcode(), opcode::READY);
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no connection slot came free");
}

#[tokio::test]
async fn resets_and_the_connection_limit_leave_others_alone() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.max_connections = 6;
    let (addr, pool) = proxy_with_pool(&emu, opts).await;
    let pool = pool.unwrap();
    let mut bystander = Client::ready(addr).await;

    // Resets mid-handshake, mid-frame and with requests in flight.
    for stage in 0..3 {
        let s = TcpStream::connect(addr).await.unwrap();
        let mut c = Client::from_stream(s);
        if stage >= 1 {
            c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
                .await;
        }
        if stage == 1 {
            c.send_raw(&header(0, 1, opcode::QUERY, 100)).await;
        }
        if stage == 2 {
            let mut batch = Vec::new();
            for i in 0..2000i16 {
                batch.extend_from_slice(&local(i).to_bytes());
            }
            c.send_raw(&batch).await;
        }
        c.reset();
    }
    others_fine(addr, &mut bystander, "resets").await;
    // Answers for reset clients are dropped; nothing stays in flight.
    for _ in 0..100 {
        if pool.stats().streams_in_use == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pool.stats().streams_in_use, 0);

    // The limit: the bystander plus five more; the seventh is closed on accept. A reset
    // client's session holds its slot until the proxy has read the reset or failed to answer it,
    // which may come after its last request left the pool.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(ready_once_a_slot_is_free(addr).await);
    }
    let mut extra = Client::connect(addr).await;
    extra.send(messages::options(4, 0)).await;
    assert!(matches!(outcome(&mut extra).await, Outcome::Closed));
    let r = bystander.call(local(3)).await;
    assert_eq!(r.opcode(), opcode::RESULT);
    drop(held);
    // Slots come back once clients leave.
    let mut again = None;
    for _ in 0..100 {
        let mut c = Client::connect(addr).await;
        c.send(messages::options(4, 0)).await;
        if let Outcome::Other(f) = outcome(&mut c).await {
            assert_eq!(f.opcode(), opcode::SUPPORTED);
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.is_some(), "a slot was freed");
}

#[tokio::test]
async fn header_helper_matches_the_codec() {
    let h = Header::request(4, 3, opcode::QUERY);
    let mut expected = h;
    expected.length = 10;
    assert_eq!(
        header(0, 3, opcode::QUERY, 10),
        expected.to_bytes().to_vec()
    );
}

/// Before authentication a frame may be at most 64 KiB whatever `--max-frame-len` says, a
/// failed login closes the connection, and unauthenticated connections have their own cap.
#[tokio::test]
async fn unauthenticated_clients_are_bounded() {
    use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:app-pw\n").unwrap());
    opts.max_frame_len = 256 << 20;
    opts.max_handshaking = 2;
    let addr = proxy(&emu, opts).await;

    // A 1 MiB AUTH_RESPONSE announced before authentication: refused from its header.
    let mut c = Client::connect(addr).await;
    let r = c
        .call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    assert_eq!(r.opcode(), opcode::AUTHENTICATE);
    c.send_raw(&header(0, 1, opcode::AUTH_RESPONSE, 1 << 20))
        .await;
    protocol_error(&outcome(&mut c).await, "1 MiB before authentication");
    closes(&mut c, "1 MiB before authentication").await;

    // A wrong password: the error, then the close (no second guess on this socket).
    let mut c = Client::connect(addr).await;
    c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
        .await;
    let r = c
        .call(messages::auth_response(
            4,
            0,
            &messages::plain_token("app", "guess"),
        ))
        .await;
    assert_eq!(
        ErrorInfo::parse(&r.body).unwrap().code,
        error_code::BAD_CREDENTIALS
    );
    closes(&mut c, "after a failed login").await;

    // Two clients sit in their handshake; a third is closed at once.
    let idle: Vec<Client> = vec![Client::connect(addr).await, Client::connect(addr).await];
    // Once the two hold their slots, the next client is closed: probe until that is seen.
    let mut closed_at_once = false;
    for _ in 0..200 {
        let mut probe = Client::connect(addr).await;
        probe.send(messages::options(4, 0)).await;
        if probe.recv().await.is_none() {
            closed_at_once = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        closed_at_once,
        "a client over the handshaking cap is closed"
    );
    drop(idle);
    // Once the idle ones are gone, a new client is served and may send large frames after login.
    let mut c = ready_with_password(addr).await;
    let big = "x".repeat(200 << 10);
    let r = c
        .call(messages::query(
            4,
            5,
            &format!("SELECT * FROM system.local WHERE key = '{big}'"),
            1,
        ))
        .await;
    assert_ne!(
        ErrorInfo::parse(&r.body).map(|e| e.code).ok(),
        Some(error_code::PROTOCOL_ERROR),
        "the full --max-frame-len applies after authentication"
    );
}

async fn ready_with_password(addr: SocketAddr) -> Client {
    for _ in 0..200 {
        let mut c = Client::connect(addr).await;
        c.send(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        match c.recv().await {
            Some(r) if r.opcode() == opcode::AUTHENTICATE => {
                let r = c
                    .call(messages::auth_response(
                        4,
                        0,
                        &messages::plain_token("app", "app-pw"),
                    ))
                    .await;
                assert_eq!(r.opcode(), opcode::AUTH_SUCCESS);
                return c;
            }
            // Still over the handshaking cap while the idle clients' closes are processed.
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("never served after the idle clients left");
}

/// Password guessing: a few failures per minute per source and user, then refusals that cost
/// no check at all — even of the right password — until the budget refills.
#[tokio::test]
async fn guesses_are_limited_per_source_and_user() {
    use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.client_auth = ClientAuth::Password(UserStore::parse("app:app-pw\n").unwrap());
    opts.login_failures_per_minute = 3;
    let addr = proxy(&emu, opts).await;
    let login = |password: &'static str| async move {
        let mut c = Client::connect(addr).await;
        c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        c.call(messages::auth_response(
            4,
            0,
            &messages::plain_token("app", password),
        ))
        .await
    };
    for guess in ["a", "b", "c"] {
        let e = ErrorInfo::parse(&login(guess).await.body).unwrap();
        assert_eq!(
            e.message,
            "Provided username app and/or password are incorrect"
        );
    }
    let r = login("app-pw").await;
    let e = ErrorInfo::parse(&r.body).unwrap();
    assert_eq!(e.code, error_code::BAD_CREDENTIALS);
    assert!(
        e.message
            .contains("too many failed logins for this user or from this address; try again in"),
        "{}",
        e.message
    );
}

/// Found by review: guesses at `app` from other addresses locked `app`'s own application out,
/// and a driver opening its pool (many logins at once) ran into the source's budget. Logins
/// with the same credentials at once share one check; a live session's credentials pass
/// without touching the budgets; a new login after the guessing is still refused.
#[tokio::test]
async fn guessing_locks_out_neither_sessions_nor_a_pool_opening() {
    use keyspaces_proxy::auth::client::{ClientAuth, UserStore};
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    let phc = keyspaces_proxy::auth::passwords::hash_password(b"app-pw");
    opts.client_auth = ClientAuth::Password(UserStore::parse(&format!("app:{phc}\n")).unwrap());
    opts.login_failures_per_minute = 3;
    let addr = proxy(&emu, opts).await;
    let login = |from: [u8; 4], password: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((std::net::Ipv4Addr::from(from), 0).into())
            .unwrap();
        let mut c = Client::from_stream(socket.connect(addr).await.unwrap());
        c.call(messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]))
            .await;
        let token = messages::plain_token("app", password);
        c.call(messages::auth_response(4, 0, &token)).await
    };
    // A pool opening: 12 logins at once from one address, four times the budget.
    let opening: Vec<_> = (0..12)
        .map(|_| tokio::spawn(login([127, 0, 0, 1], "app-pw")))
        .collect();
    for l in opening {
        let r = l.await.unwrap();
        assert_eq!(
            r.opcode(),
            opcode::AUTH_SUCCESS,
            "{:?}",
            ErrorInfo::parse(&r.body)
        );
    }
    // Someone guesses at app from elsewhere until its budget is gone.
    for guess in ["a", "b", "c", "d"] {
        let _ = login([127, 0, 0, 2], guess).await;
    }
    // Further guesses, from anywhere, are refused unchecked...
    let guess = login([127, 0, 0, 3], "e").await;
    let e = ErrorInfo::parse(&guess.body).unwrap();
    assert!(
        e.message.contains("too many failed logins"),
        "{}",
        e.message
    );
    // ...while the application's reconnects, carrying its session's credentials, get in.
    for from in [[127, 0, 0, 1], [127, 0, 0, 4]] {
        let again = login(from, "app-pw").await;
        assert_eq!(again.opcode(), opcode::AUTH_SUCCESS);
    }
}
