//! What the hostile-client suites share: how a hostile connection ended, raw frames with any
//! header, and the check that a bystander and a newcomer are still served.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::cql::messages::{self, ErrorInfo};
use super::cql::{consistency, error_code, opcode, Frame};
use super::Client;

/// What a hostile connection ended with.
#[derive(Debug)]
pub enum Outcome {
    Error(ErrorInfo),
    Closed,
    Other(Frame),
}

pub async fn outcome(c: &mut Client) -> Outcome {
    match c.recv().await {
        None => Outcome::Closed,
        Some(f) if f.opcode() == opcode::ERROR => {
            Outcome::Error(ErrorInfo::parse(&f.body).unwrap())
        }
        Some(f) => Outcome::Other(f),
    }
}

pub fn assert_error_or_close(o: &Outcome, case: &str) {
    assert!(
        matches!(o, Outcome::Error(_) | Outcome::Closed),
        "{case}: expected an ERROR or a close, got {o:?}"
    );
}

pub fn protocol_error(o: &Outcome, case: &str) {
    match o {
        Outcome::Error(e) => assert_eq!(e.code, error_code::PROTOCOL_ERROR, "{case}: {e:?}"),
        other => panic!("{case}: expected a protocol error, got {other:?}"),
    }
}

/// After an ERROR that closes, the connection ends cleanly (EOF, no hang).
pub async fn closes(c: &mut Client, case: &str) {
    loop {
        match c.recv().await {
            None => return,
            Some(f) if f.opcode() == opcode::ERROR => continue,
            Some(f) => panic!("{case}: expected the connection to close, got {f:?}"),
        }
    }
}

pub fn local(stream: i16) -> Frame {
    messages::query(4, stream, "SELECT key FROM system.local", consistency::ONE)
}

/// The next frame on a split client connection; the test fails if none comes within 30 s.
pub async fn next_answer(
    frames: &mut futures_util::stream::SplitStream<
        tokio_util::codec::Framed<TcpStream, super::cql::Codec>,
    >,
) -> Frame {
    tokio::time::timeout(
        Duration::from_secs(30),
        futures_util::StreamExt::next(frames),
    )
    .await
    .expect("answers keep coming")
    .expect("connection open")
    .unwrap()
}

/// The bystander and a newcomer both still get answers.
pub async fn others_fine(addr: SocketAddr, bystander: &mut Client, case: &str) {
    let r = bystander.call(local(7)).await;
    assert_eq!(r.opcode(), opcode::RESULT, "{case}: bystander");
    assert_eq!(r.stream(), 7);
    let mut fresh = Client::ready(addr).await;
    assert_eq!(
        fresh.call(local(1)).await.opcode(),
        opcode::RESULT,
        "{case}: newcomer"
    );
}

/// A v4 request header with any length field.
pub fn header(flags: u8, stream: i16, op: u8, length: u32) -> Vec<u8> {
    let mut h = vec![0x04, flags];
    h.extend_from_slice(&stream.to_be_bytes());
    h.push(op);
    h.extend_from_slice(&length.to_be_bytes());
    h
}

pub fn string_map(entries: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut b = (entries.len() as u16).to_be_bytes().to_vec();
    for (k, v) in entries {
        b.extend_from_slice(&(k.len() as u16).to_be_bytes());
        b.extend_from_slice(k);
        b.extend_from_slice(&(v.len() as u16).to_be_bytes());
        b.extend_from_slice(v);
    }
    b
}

pub fn raw_frame(op: u8, stream: i16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = header(flags, stream, op, body.len() as u32);
    f.extend_from_slice(body);
    f
}
