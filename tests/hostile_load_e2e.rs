//! Hostile clients that load their own connection: tens of thousands of pipelined requests,
//! back-pressure at `--max-client-in-flight`, a bad frame behind good ones, clients that never
//! read. The offending connection gets its answers and a CQL ERROR or a clean close, and a
//! bystander keeps working; memory is bounded by the configured limits.

mod common;

use std::time::Duration;

use common::cql::messages;
use common::cql::{consistency, error_code, opcode};
use common::hostile::*;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn more_than_32768_pipelined_requests_are_all_answered() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.max_client_in_flight = 512;
    let addr = proxy(&emu, opts).await;
    let mut bystander = Client::ready(addr).await;

    let c = Client::ready(addr).await;
    let (mut sink, mut frames) = futures_util::StreamExt::split(c.into_framed());
    const TOTAL: usize = 40_000;
    // Every stream id, then reused ids while earlier ones may still be in flight.
    let writer = tokio::spawn(async move {
        use futures_util::SinkExt;
        for i in 0..TOTAL {
            let stream = (i % 32_768) as i16;
            sink.feed(messages::options(4, stream)).await.unwrap();
            sink.feed(local(stream)).await.unwrap();
        }
        sink.flush().await.unwrap();
        sink
    });
    let mut results = 0;
    let mut supported = 0;
    while results + supported < 2 * TOTAL {
        let f = next_answer(&mut frames).await;
        match f.opcode() {
            opcode::RESULT => results += 1,
            opcode::SUPPORTED => supported += 1,
            other => panic!("unexpected {}", opcode::name(other)),
        }
    }
    assert_eq!((results, supported), (TOTAL, TOTAL));
    let _sink = writer.await.unwrap();
    others_fine(addr, &mut bystander, "40,000 pipelined").await;
}

/// `--max-client-in-flight`: a client that pipelines more than its limit is not read past
/// it; the rest waits in its socket (TCP back-pressure) until answers come back. The emulator
/// withholds every answer, so what the proxy has forwarded is counted, not timed.
#[tokio::test]
async fn reading_stops_at_max_client_in_flight() {
    const LIMIT: usize = 64;
    const SENT: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.max_client_in_flight = LIMIT;
    let addr = proxy(&emu, opts).await;
    let mut bystander = Client::ready(addr).await;
    let upstream = |stream: i16| {
        messages::query(
            4,
            stream,
            "SELECT v FROM ks.t WHERE k = 1",
            consistency::ONE,
        )
    };
    assert_eq!(bystander.call(upstream(1)).await.opcode(), opcode::ERROR);

    emu.faults.hold_answers();
    let c = Client::ready(addr).await;
    let (mut sink, mut frames) = futures_util::StreamExt::split(c.into_framed());
    {
        use futures_util::SinkExt;
        // ~50 KB: the kernel's socket buffers take it all, read by the proxy or not.
        for i in 0..SENT {
            sink.feed(upstream(i as i16)).await.unwrap();
        }
        sink.flush().await.unwrap();
    }
    wait_until("the limit forwarded", || emu.faults.held_answers() >= LIMIT).await;
    // Sent after every byte of the pipeline: once it is forwarded, the proxy has had its
    // chance to read on; had it, more than the limit would be withheld.
    bystander.send(upstream(2)).await;
    wait_until("the bystander forwarded", || {
        emu.faults.held_answers() > LIMIT
    })
    .await;
    assert_eq!(
        emu.faults.held_answers(),
        LIMIT + 1,
        "forwarded: the client's limit and the bystander's one"
    );

    emu.faults.release_answers().await;
    let mut answered = 0;
    while answered < SENT {
        let f = next_answer(&mut frames).await;
        assert_eq!(
            f.opcode(),
            opcode::ERROR,
            "the emulator's answer: no such table"
        );
        answered += 1;
    }
    assert_eq!(bystander.recv().await.map(|f| f.stream()), Some(2));
    assert_eq!(
        emu.faults.most_held_answers(),
        LIMIT + 1,
        "never more outstanding than the limit"
    );
    others_fine(addr, &mut bystander, "pipelining past the limit").await;
}

/// A bad frame behind good ones in the same write costs only itself: the requests before it
/// are answered, each on its own stream, then the bad one gets its ERROR and the connection
/// closes.
#[tokio::test]
async fn a_bad_frame_behind_good_ones_costs_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let addr = proxy(&emu, ProxyOptions::for_emulator(&emu)).await;
    let upstream_read = |stream| {
        let cql = "SELECT keyspace_name FROM system_schema.keyspaces";
        messages::query(4, stream, cql, consistency::ONE)
    };
    for (case, bad) in [
        ("unknown opcode", raw_frame(0x77, 99, 0, b"")),
        ("length -1", header(0, 99, opcode::QUERY, u32::MAX)),
    ] {
        let mut c = Client::ready(addr).await;
        let mut bytes = Vec::new();
        for stream in 1..=10 {
            bytes.extend_from_slice(&upstream_read(stream).to_bytes());
        }
        bytes.extend_from_slice(&bad);
        c.send_raw(&bytes).await;
        let mut answered = Vec::new();
        loop {
            match outcome(&mut c).await {
                Outcome::Other(f) => answered.push(f.stream()),
                Outcome::Error(e) => {
                    assert_eq!(e.code, error_code::PROTOCOL_ERROR, "{case}: {e:?}");
                    break;
                }
                Outcome::Closed => panic!("{case}: closed before the ERROR"),
            }
        }
        answered.sort();
        assert_eq!(answered, (1..=10).collect::<Vec<_>>(), "{case}");
        closes(&mut c, case).await;
    }
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_at_its_buffer_limit() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let mut opts = ProxyOptions::for_emulator(&emu);
    opts.max_client_buffer = 1 << 20;
    let addr = proxy(&emu, opts).await;
    let mut bystander = Client::ready(addr).await;

    let mut setup = Client::ready(addr).await;
    for cql in [
        "CREATE KEYSPACE IF NOT EXISTS hostile WITH replication = {'class': 'SingleRegionStrategy'}",
        "CREATE TABLE IF NOT EXISTS hostile.big (k int PRIMARY KEY, v text)",
    ] {
        setup.run_ok(cql).await;
    }
    let value = "x".repeat(200_000);
    setup
        .run_ok(&format!(
            "INSERT INTO hostile.big (k, v) VALUES (1, '{value}')"
        ))
        .await;

    // 400 requests for 200 KB each (80 MB of answers) and not a byte read. A small receive
    // window fills the socket first: the session blocks writing before the inbox overflows.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut lazy = socket.connect(addr).await.unwrap();
    lazy.write_all(&messages::startup(4, 0, &[("CQL_VERSION", "3.0.0")]).to_bytes())
        .await
        .unwrap();
    let select = messages::query(
        4,
        0,
        "SELECT v FROM hostile.big WHERE k = 1",
        consistency::LOCAL_ONE,
    );
    let mut batch = Vec::new();
    for i in 0..400i16 {
        batch.extend_from_slice(&select.clone().with_stream(i).to_bytes());
    }
    lazy.write_all(&batch).await.unwrap();

    // The proxy gives up on it while it still reads nothing (its session is then blocked in a
    // write to it, and must notice there); meanwhile everyone else is served.
    others_fine(addr, &mut bystander, "non-reading client").await;
    let not_reading = || {
        keyspaces_proxy::metrics::metrics()
            .encode()
            .lines()
            .any(|l| {
                l.starts_with(
                    "keyspaces_proxy_client_connections_closed_by_proxy_total{reason=\"not_reading\"}",
                ) && !l.ends_with(" 0")
            })
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while !not_reading() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("cut while it read nothing");
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match tokio::time::timeout(Duration::from_secs(30), lazy.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got += n,
            Err(_) => panic!("the non-reading client was never closed"),
        }
    }
    assert!(
        got < 400 * 200_000,
        "closed before all answers were buffered ({got} bytes)"
    );
    others_fine(addr, &mut bystander, "after the close").await;
}
