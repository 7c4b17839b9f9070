//! The router's decisions, frame by frame.
use bytes::{BufMut, BytesMut};

use super::*;

fn is_compressed(frame: &Frame) -> bool {
    frame.header.has_flag(crate::frame::flags::COMPRESSION)
}
use crate::frame::result::test_bodies::{prepared_rpc_address_body, rows_body};
use crate::frame::result::{metadata_flags, Rows, TYPE_INET};
use crate::frame::types::WriteExt;
use crate::frame::Header;
use crate::frame::ProtocolVersion;

fn router(c: Compression) -> Router {
    Router::new(
        ProtocolVersion::V4,
        c,
        Compression::None,
        "127.0.0.7".parse().unwrap(),
        1 << 20,
    )
}

fn local_result(stream: i16) -> Frame {
    let body = rows_body(
        "local",
        &[("rpc_address", TYPE_INET)],
        &[vec![Some(&[127, 0, 0, 1])]],
        None,
    );
    Frame::new(
        Header::response(ProtocolVersion::V4, stream, opcode::RESULT),
        body,
    )
}

fn rpc_of(f: &Frame) -> Vec<u8> {
    Rows::parse(&f.body).unwrap().cells().unwrap()[0][0]
        .unwrap()
        .to_vec()
}

fn execute_frame(stream: i16, id: &[u8]) -> Frame {
    let mut body = BytesMut::new();
    body.put_short_bytes(id);
    body.put_u16(6);
    body.put_u8(0);
    Frame::new(
        Header::request(ProtocolVersion::V4, stream, opcode::EXECUTE),
        body.freeze(),
    )
}

#[test]
fn executes_are_classified_by_the_pools_statements() {
    let cache = Arc::new(PreparedCache::new(8));
    // Prepared through another client connection of the same pool.
    cache.insert(
        Bytes::from_static(b"local-id"),
        crate::policy::prepared::PreparedStatement {
            query: Arc::from("SELECT rpc_address FROM system.local"),
            keyspace: None,
            system: Some((SystemTable::Local, None)),
        },
    );
    let mut r = router(Compression::None)
        .split_use(true)
        .prepared(Some(cache.clone()));
    assert!(matches!(
        r.on_client_frame(execute_frame(7, b"local-id")),
        Route::Upstream(_)
    ));
    let rewritten = r.on_upstream_frame(local_result(7)).unwrap().unwrap();
    assert_eq!(
        rpc_of(&rewritten),
        vec![127, 0, 0, 7],
        "the proxy's own address"
    );

    // An id nobody prepared through this pool: the driver is told to prepare it again.
    let Route::Client(f) = r.on_client_frame(execute_frame(8, b"unseen")) else {
        panic!()
    };
    assert_eq!(f.stream(), 8);
    assert_eq!(
        crate::policy::unprepared_id(&f.body).as_deref(),
        Some(&b"unseen"[..])
    );
    // Dedicated mode (no pool) forwards it: its connection is the client's own.
    let mut dedicated = router(Compression::None);
    assert!(matches!(
        dedicated.on_client_frame(execute_frame(9, b"unseen")),
        Route::Upstream(_)
    ));
}

#[test]
fn ordinary_queries_pass_untouched() {
    let mut r = router(Compression::None);
    let q = messages::query(ProtocolVersion::V4, 5, "SELECT * FROM ks.t", 6);
    assert_eq!(r.on_client_frame(q.clone()), Route::Upstream(q));
    let res = local_result(5);
    assert_eq!(r.on_upstream_frame(res.clone()).unwrap(), Some(res));
}

#[test]
fn system_local_query_is_rewritten() {
    let mut r = router(Compression::None);
    r.on_client_frame(messages::query(
        ProtocolVersion::V4,
        5,
        "SELECT * FROM system.local",
        1,
    ));
    let out = r.on_upstream_frame(local_result(5)).unwrap().unwrap();
    assert_eq!(rpc_of(&out), vec![127, 0, 0, 7]);
}

#[test]
fn prepared_system_local_with_skip_metadata_is_rewritten() {
    let mut r = router(Compression::None);
    let mut prep = BytesMut::new();
    prep.put_long_string("SELECT rpc_address FROM system.local");
    let prep = Frame::new(
        Header::request(ProtocolVersion::V4, 2, opcode::PREPARE),
        prep.freeze(),
    );
    assert!(matches!(r.on_client_frame(prep), Route::Upstream(_)));
    r.on_upstream_frame(Frame::new(
        Header::response(ProtocolVersion::V4, 2, opcode::RESULT),
        prepared_rpc_address_body(b"id1"),
    ))
    .unwrap();

    let mut ex = BytesMut::new();
    ex.put_short_bytes(b"id1");
    ex.put_u16(1);
    ex.put_u8(0x02);
    r.on_client_frame(Frame::new(
        Header::request(ProtocolVersion::V4, 3, opcode::EXECUTE),
        ex.freeze(),
    ));
    let mut rows = BytesMut::new();
    rows.put_i32(kind::ROWS);
    rows.put_i32(metadata_flags::NO_METADATA);
    rows.put_i32(1);
    rows.put_i32(1);
    rows.put_bytes_value(Some(&[127, 9, 9, 9]));
    let out = r
        .on_upstream_frame(Frame::new(
            Header::response(ProtocolVersion::V4, 3, opcode::RESULT),
            rows.freeze(),
        ))
        .unwrap()
        .unwrap();
    assert_eq!(
        Rows::parse(&out.body).unwrap().cells().unwrap()[0][0],
        Some(&[127u8, 0, 0, 7][..])
    );
}

#[test]
fn register_and_options_are_answered_locally() {
    let mut r = router(Compression::None);
    let reg = Frame::new(
        Header::request(ProtocolVersion::V4, 1, opcode::REGISTER),
        Bytes::from_static(&[0, 0]),
    );
    let Route::Client(f) = r.on_client_frame(reg) else {
        panic!()
    };
    assert_eq!(f.opcode(), opcode::READY);
    let Route::Client(f) = r.on_client_frame(messages::options(ProtocolVersion::V4, 2)) else {
        panic!()
    };
    assert_eq!(f.opcode(), opcode::SUPPORTED);
}

#[test]
fn events_from_upstream_are_dropped() {
    let mut r = router(Compression::None);
    let ev = Frame::new(
        Header::response(ProtocolVersion::V4, -1, opcode::EVENT),
        Bytes::from_static(b"x"),
    );
    assert_eq!(r.on_upstream_frame(ev).unwrap(), None);
}

#[test]
fn client_compression_is_handled_by_the_proxy() {
    let mut r = router(Compression::Lz4);
    let q = compressed(
        messages::query(ProtocolVersion::V4, 5, "SELECT * FROM system.local", 1),
        Compression::Lz4,
    );
    let Route::Upstream(up) = r.on_client_frame(q) else {
        panic!()
    };
    assert!(!is_compressed(&up));
    let out = r.on_upstream_frame(local_result(5)).unwrap().unwrap();
    assert!(is_compressed(&out));
    let plain = decompressed(out, Compression::Lz4, 1 << 20).unwrap();
    assert_eq!(rpc_of(&plain), vec![127, 0, 0, 7]);
}

#[test]
fn use_is_split_out_in_pooled_mode() {
    let mut r = router(Compression::None).split_use(true);
    let Route::Use { keyspace, frame } =
        r.on_client_frame(messages::query(ProtocolVersion::V4, 3, "USE \"Ks\"", 1))
    else {
        panic!()
    };
    assert_eq!((keyspace.as_str(), frame.stream()), ("Ks", 3));
    let mut plain = router(Compression::None);
    assert!(matches!(
        plain.on_client_frame(messages::query(ProtocolVersion::V4, 3, "USE ks", 1)),
        Route::Upstream(_)
    ));
}

fn error_code_of(route: Route) -> i32 {
    match route {
        Route::Client(f) => {
            assert_eq!(f.opcode(), opcode::ERROR);
            messages::ErrorInfo::parse(&f.body).unwrap().code
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn use_spellings_that_are_not_exact_never_go_upstream() {
    let mut r = router(Compression::None).split_use(true);
    for cql in [
        "USE ks other",
        "USE ks.t",
        "\u{feff}USE ks",
        "use ks; SELECT 1",
    ] {
        let route = r.on_client_frame(messages::query(ProtocolVersion::V4, 5, cql, 1));
        assert_eq!(error_code_of(route), error_code::INVALID, "{cql:?}");
    }
    let Route::Use { keyspace, .. } = r.on_client_frame(messages::query(
        ProtocolVersion::V4,
        5,
        "USE ks -- the orders keyspace",
        1,
    )) else {
        panic!("a comment after an exact USE is fine")
    };
    assert_eq!(keyspace, "ks");
    let prepare = |cql: &str| {
        let mut body = bytes::BytesMut::new();
        body.put_long_string(cql);
        Frame::new(
            Header::request(ProtocolVersion::V4, 6, opcode::PREPARE),
            body.freeze(),
        )
    };
    for cql in ["USE ks", "USE ks extra"] {
        let route = r.on_client_frame(prepare(cql));
        assert_eq!(error_code_of(route), error_code::INVALID, "{cql:?}");
    }
    assert!(matches!(
        r.on_client_frame(prepare("SELECT * FROM t")),
        Route::Upstream(_)
    ));
}

#[test]
fn negative_streams_get_a_protocol_error() {
    let mut r = router(Compression::None).split_use(true);
    let route = r.on_client_frame(messages::query(
        ProtocolVersion::V4,
        -7,
        "SELECT * FROM t",
        1,
    ));
    let Route::Client(f) = &route else {
        panic!("{route:?}")
    };
    assert_eq!(f.stream(), -7);
    assert_eq!(error_code_of(route), error_code::PROTOCOL_ERROR);
}

#[test]
fn v3_frames_cannot_carry_a_custom_payload() {
    let mut r = Router::new(
        ProtocolVersion::V3,
        Compression::None,
        Compression::None,
        "127.0.0.7".parse().unwrap(),
        1 << 20,
    );
    // A v4-style payload in front of a valid QUERY: v3 has no payloads, so Cassandra would
    // read the payload bytes as the query (or refuse the frame) and close the connection.
    let query = messages::query(ProtocolVersion::V3, 5, "SELECT * FROM t", 1);
    let mut body = vec![0, 1, 0, 1, b'k', 0, 0, 0, 1, b'v'];
    body.extend_from_slice(&query.body);
    let mut f = Frame::new(query.header, body.into());
    f.header.flags |= crate::frame::header::flags::CUSTOM_PAYLOAD;
    f.header.length = f.body.len() as u32;
    let route = r.on_client_frame(f);
    assert_eq!(error_code_of(route), error_code::PROTOCOL_ERROR);
}

#[test]
fn consistency_guard_raises_writes() {
    let mut r = router(Compression::None).consistency_guard(Some(Arc::new(PreparedCache::new(4))));
    let Route::Upstream(f) = r.on_client_frame(messages::query(
        ProtocolVersion::V4,
        3,
        "DELETE FROM t WHERE k = 1",
        1,
    )) else {
        panic!()
    };
    assert_eq!(
        parse_query(&f.body).unwrap().consistency,
        messages::consistency::LOCAL_QUORUM
    );
}

#[test]
fn wrong_version_or_direction_closes() {
    let mut r = router(Compression::None);
    assert!(matches!(
        r.on_client_frame(messages::query(ProtocolVersion::V3, 1, "x", 1)),
        Route::Close(_)
    ));
    assert!(matches!(
        r.on_client_frame(messages::ready(ProtocolVersion::V4, 1)),
        Route::Close(_)
    ));
    let unknown = Frame::new(Header::request(ProtocolVersion::V4, 1, 0x42), Bytes::new());
    assert!(matches!(r.on_client_frame(unknown), Route::Close(_)));
}
