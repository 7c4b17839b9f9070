//! A hostile upstream: arbitrary frames answering system-table queries, PREPAREs and EXECUTEs,
//! plus the challenge and UNPREPARED parsers the upstream side relies on.
#![no_main]

use bytes::{BufMut, BytesMut};
use keyspaces_proxy::auth::sigv4::{parse_challenge, SignedResponse};
use keyspaces_proxy::frame::messages::{self, consistency};
use keyspaces_proxy::frame::{opcode, Compression, Frame, FrameCodec, Header};
use keyspaces_proxy::policy::unprepared_id;
use keyspaces_proxy::route::Router;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use keyspaces_proxy::frame::ProtocolVersion;

fuzz_target!(|data: &[u8]| {
    let _ = parse_challenge(data);
    let _ = SignedResponse::parse(data);
    let _ = unprepared_id(data);
    let compression = if data.first().is_some_and(|b| b & 1 == 1) { Compression::Lz4 } else { Compression::None };
    let mut router = Router::new(ProtocolVersion::V4, Compression::Snappy, compression, "127.0.0.1".parse().unwrap(), 1 << 20);
    // Requests whose answers the router inspects, on streams 0..4.
    let _ = router.on_client_frame(messages::query(ProtocolVersion::V4, 0, "SELECT * FROM system.local", consistency::ONE));
    let _ = router.on_client_frame(messages::query(ProtocolVersion::V4, 1, "SELECT * FROM system.peers", consistency::ONE));
    let mut prep = BytesMut::new();
    prep.put_i32(27);
    prep.put_slice(b"SELECT * FROM system.local");
    let _ = router.on_client_frame(Frame::new(Header::request(ProtocolVersion::V4, 2, opcode::PREPARE), prep.freeze()));
    let mut buf = BytesMut::from(data);
    let mut codec = FrameCodec::new(1 << 20);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        let _ = router.on_upstream_frame(frame);
    }
});
