//! Arbitrary bytes through the frame decoder and every body parser the proxy uses.
#![no_main]

use bytes::BytesMut;
use keyspaces_proxy::frame::messages::{self, ErrorInfo};
use keyspaces_proxy::frame::request::{parse_execute, parse_prepare, parse_query};
use keyspaces_proxy::frame::result::{Prepared, Rows};
use keyspaces_proxy::frame::{Compression, FrameCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut codec = FrameCodec::new(1 << 20);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        for algo in [Compression::Lz4, Compression::Snappy] {
            let _ = algo.decompress(&frame.body, 1 << 20);
        }
        let body = messages::message_body(&frame.header, &frame.body).unwrap_or(&frame.body);
        let _ = parse_query(body);
        let _ = parse_prepare(body);
        let _ = parse_execute(body);
        let _ = messages::parse_startup(body);
        let _ = messages::parse_supported(body);
        let _ = messages::parse_auth_token(body);
        let _ = ErrorInfo::parse(body);
        if let Ok(rows) = Rows::parse(body) {
            let _ = rows.cells();
        }
        let _ = Prepared::parse(body, frame.header.answer_version());
    }
});
