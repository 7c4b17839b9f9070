//! The proxy's request validator against the emulator's decoder, which shares no code with it
//! and reads bodies as strictly as a real server could: whatever the validator lets through to
//! a shared upstream connection, that decoder must read, or a Cassandra-like server would
//! close the connection under every other client. Seeded mutations of valid bodies of every
//! forwarded opcode, v3 and v4 — a deterministic fuzz run on every test run (the libFuzzer
//! target `validator_vs_emulator` explores further).

use bytes::{BufMut, BytesMut};
use keyspaces_emulator::wire::request::decode;
use keyspaces_proxy::frame::header::flags::CUSTOM_PAYLOAD;
use keyspaces_proxy::frame::messages::message_body;
use keyspaces_proxy::frame::validate::validate_request;
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::frame::{opcode, Header};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn long_string(b: &mut BytesMut, s: &str) {
    b.put_i32(s.len() as i32);
    b.put_slice(s.as_bytes());
}

fn short_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u16(v.len() as u16);
    b.put_slice(v);
}

/// Valid bodies with every optional field present somewhere.
fn seeds() -> Vec<(u8, Vec<u8>)> {
    let id = [7u8; 16];
    let mut out = Vec::new();
    // QUERY: named values, page size, paging state, serial consistency, timestamp.
    let mut b = BytesMut::new();
    long_string(&mut b, "SELECT v FROM ks.t WHERE k = :k");
    b.put_u16(0x0006);
    b.put_u8(0x7f);
    b.put_u16(2);
    short_bytes(&mut b, b"k");
    b.put_i32(4);
    b.put_i32(1);
    short_bytes(&mut b, b"x");
    b.put_i32(-2);
    b.put_i32(100);
    b.put_i32(3);
    b.put_slice(b"abc");
    b.put_u16(0x0009);
    b.put_i64(42);
    out.push((opcode::QUERY, b.to_vec()));
    // QUERY: plain.
    let mut b = BytesMut::new();
    long_string(&mut b, "SELECT * FROM system.local");
    b.put_u16(0x0001);
    b.put_u8(0);
    out.push((opcode::QUERY, b.to_vec()));
    // PREPARE.
    let mut b = BytesMut::new();
    long_string(&mut b, "INSERT INTO ks.t (k, v) VALUES (?, ?)");
    out.push((opcode::PREPARE, b.to_vec()));
    // EXECUTE: values, page size, null value.
    let mut b = BytesMut::new();
    short_bytes(&mut b, &id);
    b.put_u16(0x0006);
    b.put_u8(0x05);
    b.put_u16(2);
    b.put_i32(4);
    b.put_i32(9);
    b.put_i32(-1);
    b.put_i32(50);
    out.push((opcode::EXECUTE, b.to_vec()));
    // BATCH: a query and a prepared entry, serial consistency and timestamp.
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_u16(2);
    b.put_u8(0);
    long_string(&mut b, "INSERT INTO ks.t (k, v) VALUES (1, 'a')");
    b.put_u16(0);
    b.put_u8(1);
    short_bytes(&mut b, &id);
    b.put_u16(1);
    b.put_i32(2);
    b.put_slice(b"zz");
    b.put_u16(0x0006);
    b.put_u8(0x30);
    b.put_u16(0x0008);
    b.put_i64(7);
    out.push((opcode::BATCH, b.to_vec()));
    out.push((opcode::OPTIONS, Vec::new()));
    out
}

fn mutate(rng: &mut StdRng, body: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..=3) {
        let len = body.len();
        match rng.random_range(0..6) {
            0 if len > 0 => body[rng.random_range(0..len)] ^= 1 << rng.random_range(0..8),
            1 if len > 0 => body.truncate(rng.random_range(0..len)),
            2 => body.extend((0..rng.random_range(1..=4)).map(|_| rng.random::<u8>())),
            3 if len > 0 => body[rng.random_range(0..len)] = rng.random(),
            4 => {
                let at = rng.random_range(0..=len);
                let junk: Vec<u8> = (0..rng.random_range(1..=4)).map(|_| rng.random()).collect();
                body.splice(at..at, junk);
            }
            // Interesting values where a length or count is likely to sit.
            _ if len >= 4 => {
                let at = rng.random_range(0..=len - 4);
                let v: i32 = [0, -1, -2, -3, 1, i32::MAX, i32::MIN][rng.random_range(0..7)];
                body[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => {}
        }
    }
}

#[test]
fn whatever_the_validator_forwards_a_strict_server_can_decode() {
    let mut rng = StdRng::seed_from_u64(16);
    let seeds = seeds();
    let (mut accepted, mut refused) = (0u32, 0u32);
    for (op, body) in &seeds {
        for version in [3, 4] {
            assert!(
                validate_request(ProtocolVersion::from_wire(version).unwrap(), *op, body).is_ok(),
                "seed {op:#x} v{version}"
            );
            assert!(
                decode(version, 0, *op, body).is_ok(),
                "seed {op:#x} v{version}"
            );
        }
    }
    for _ in 0..200_000 {
        let (op, seed) = &seeds[rng.random_range(0..seeds.len())];
        let version = rng.random_range(3..=4u8);
        let spoken = ProtocolVersion::from_wire(version).unwrap();
        let mut header = Header::request(spoken, 1, *op);
        let mut body = Vec::new();
        // A custom payload in front, announced by the header (v4 only, per the spec).
        if rng.random_range(0..4) == 0 {
            header.flags |= CUSTOM_PAYLOAD;
            body.extend_from_slice(&[0, 1, 0, 1, b'k', 0, 0, 0, 2, b'v', b'w']);
        }
        body.extend_from_slice(seed);
        mutate(&mut rng, &mut body);
        let forwarded =
            message_body(&header, &body).and_then(|message| validate_request(spoken, *op, message));
        if forwarded.is_ok() {
            accepted += 1;
            if let Err(e) = decode(version, header.flags, *op, &body) {
                panic!(
                    "the validator forwards what a strict server closes on ({e}): v{version} \
                     flags {:#x} {} {}",
                    header.flags,
                    keyspaces_proxy::frame::opcode::name(*op),
                    hex::encode(&body)
                );
            }
        } else {
            refused += 1;
        }
    }
    eprintln!("{accepted} mutated bodies forwarded, {refused} refused");
    // Both sides of the boundary were explored.
    assert!(
        accepted > 10_000 && refused > 10_000,
        "{accepted} accepted, {refused} refused"
    );
}
