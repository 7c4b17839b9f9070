//! Criterion benches of the per-frame work: header decode, pass-through of 1 KiB and 1 MiB
//! bodies, compressed frames, the SigV4 signer and the system.local rewrite.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use keyspaces_proxy::auth::sigv4::{signed_response, SigningParams};
use keyspaces_proxy::frame::codec::encode_into;
use keyspaces_proxy::frame::compression::{compressed, transcode};
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::frame::{opcode, Compression, Frame, FrameCodec, Header};
use keyspaces_proxy::route::{Route, Router};
use keyspaces_proxy::topology::{rewrite_result, SystemTable};
use tokio_util::codec::Decoder;

fn wire(body_len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(9 + body_len);
    Header::response(ProtocolVersion::V4, 7, opcode::RESULT).write(&mut b);
    let len = b.len();
    b[len - 4..].copy_from_slice(&(body_len as u32).to_be_bytes());
    b.put_bytes(0x5a, body_len);
    b
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let header = wire(0).freeze();
    g.bench_function("header_decode", |b| {
        b.iter(|| Header::parse(black_box(&header)))
    });
    for (name, size) in [("pass_through_1KiB", 1024), ("pass_through_1MiB", 1 << 20)] {
        let input = wire(size);
        g.throughput(Throughput::Bytes(size as u64));
        // Decode (a view of the read buffer) and re-frame as the writer does for the client:
        // small bodies are batched, large ones are written from their own buffer.
        let mut out = BytesMut::with_capacity(64 * 1024);
        g.bench_function(name, |b| {
            b.iter_batched(
                || input.clone(),
                |mut buf| {
                    let f = FrameCodec::new(keyspaces_proxy::frame::codec::DEFAULT_MAX_FRAME_LEN)
                        .decode(&mut buf)
                        .unwrap()
                        .unwrap();
                    out.clear();
                    if f.body.len() < 16 * 1024 {
                        encode_into(&f, &mut out);
                    } else {
                        out.extend_from_slice(&f.header.to_bytes());
                    }
                    black_box(out.len() + f.body.len())
                },
                BatchSize::LargeInput,
            )
        });
    }
    let plain = Frame::new(
        Header::response(ProtocolVersion::V4, 1, opcode::RESULT),
        Bytes::from(vec![7u8; 16 * 1024]),
    );
    let lz4 = compressed(plain.clone(), Compression::Lz4);
    g.throughput(Throughput::Bytes(16 * 1024));
    g.bench_function("lz4_decompress_16KiB", |b| {
        b.iter(|| {
            transcode(
                black_box(lz4.clone()),
                Compression::Lz4,
                Compression::None,
                1 << 20,
            )
            .unwrap()
        })
    });
    g.bench_function("lz4_compress_16KiB", |b| {
        b.iter(|| compressed(black_box(plain.clone()), Compression::Lz4))
    });
    g.finish();
}

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    let mut router = Router::new(
        ProtocolVersion::V4,
        Compression::None,
        Compression::None,
        "127.0.0.1".parse().unwrap(),
        1 << 28,
    );
    let mut body = BytesMut::new();
    body.put_u16(16);
    body.put_bytes(1, 16);
    body.put_slice(&[0, 6, 0x03, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1]);
    let execute = Frame::new(
        Header::request(ProtocolVersion::V4, 3, opcode::EXECUTE),
        body.freeze(),
    );
    g.bench_function("execute_request", |b| {
        b.iter(
            || match router.on_client_frame(black_box(execute.clone())) {
                Route::Upstream(f) => f,
                _ => unreachable!(),
            },
        )
    });
    let result = Frame::new(
        Header::response(ProtocolVersion::V4, 3, opcode::RESULT),
        Bytes::from(vec![0u8; 256]),
    );
    g.bench_function("result_response", |b| {
        b.iter(|| router.on_upstream_frame(black_box(result.clone())).unwrap())
    });
    g.finish();
}

fn sigv4(c: &mut Criterion) {
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    c.bench_function("sigv4_signed_response", |b| {
        b.iter(|| {
            signed_response(black_box(&SigningParams {
                access_key_id: "AKIAIOSFODNN7EXAMPLE",
                secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                session_token: None,
                region: "us-east-1",
                nonce: "0c0b0c6f3946d14ce1a49a8f8c86a888",
                time,
            }))
        })
    });
}

fn topology(c: &mut Criterion) {
    let body = Bytes::from(
        hex::decode(include_str!("../tests/data/system_local_result.hex").trim()).unwrap(),
    );
    let header = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    c.bench_function("system_local_rewrite", |b| {
        b.iter(|| rewrite_result(&header, black_box(&body), SystemTable::Local, None, ip).unwrap())
    });
}

criterion_group!(benches, codec, routing, sigv4, topology);
criterion_main!(benches);
