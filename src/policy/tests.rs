//! The policy's decisions, answer by answer.
use bytes::{BufMut, Bytes, BytesMut};

use super::prepared::PreparedStatement;
use super::*;
use crate::frame::messages::{self, consistency, error_code, message_body};
use crate::frame::request::parse_prepare;
use crate::frame::result::test_bodies::prepared_rpc_address_body;
use crate::frame::types::WriteExt;
use crate::frame::Header;
use crate::frame::ProtocolVersion;
use crate::topology::SystemTable;

/// A v4 PREPARED answer for `id`: no bind variables, one result column of `system.local`.
fn prepared_answer(stream: i16, id: &[u8]) -> Frame {
    Frame::new(
        Header::response(ProtocolVersion::V4, stream, opcode::RESULT),
        prepared_rpc_address_body(id),
    )
}

fn unprepared_answer(stream: i16, id: &[u8]) -> Frame {
    let mut extra = Vec::new();
    extra.put_short_bytes(id);
    messages::error_with(
        ProtocolVersion::V4,
        stream,
        error_code::UNPREPARED,
        "gone",
        &extra,
    )
}

fn execute(stream: i16, id: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    b.put_short_bytes(id);
    b.put_u16(consistency::LOCAL_QUORUM);
    b.put_u8(0);
    Frame::new(
        Header::request(ProtocolVersion::V4, stream, opcode::EXECUTE),
        b.freeze(),
    )
}

/// An unlogged BATCH of one prepared statement without values.
fn batch(stream: i16, id: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_u16(1);
    b.put_u8(1);
    b.put_short_bytes(id);
    b.put_u16(0);
    b.put_u16(consistency::LOCAL_QUORUM);
    b.put_u8(0);
    Frame::new(
        Header::request(ProtocolVersion::V4, stream, opcode::BATCH),
        b.freeze(),
    )
}

/// What the pool asks of the policy for `answer` on a v4 connection opened for `keyspace`.
fn decide(
    policy: &CqlPolicy,
    request: &Frame,
    attempt: u8,
    answer: &Frame,
    keyspace: Option<&Arc<str>>,
) -> Answer {
    let body = message_body(&answer.header, &answer.body).unwrap_or_default();
    let scope = Scope {
        version: ProtocolVersion::V4,
        keyspace,
    };
    policy.on_answer(request, attempt, answer, body, scope)
}

fn learnt(policy: &CqlPolicy, id: &[u8], query: &str) {
    policy.prepared().insert(
        Bytes::copy_from_slice(id),
        PreparedStatement {
            query: Arc::from(query),
            keyspace: None,
            system: None,
        },
    );
}

#[test]
fn a_prepared_answer_is_learnt_with_the_system_table_it_reads() {
    let policy = CqlPolicy::new(8);
    let ks: Arc<str> = Arc::from("system");
    let prepare = messages::prepare(ProtocolVersion::V4, 1, "SELECT rpc_address FROM local");
    let got = decide(&policy, &prepare, 0, &prepared_answer(1, b"id1"), Some(&ks));
    assert_eq!(got, Answer::Relay);
    let s = policy.prepared().get(b"id1").expect("learnt");
    assert_eq!(s.query.as_ref(), "SELECT rpc_address FROM local");
    assert_eq!(s.keyspace.as_deref(), Some("system"));
    let (table, columns) = s.system.expect("reads system.local");
    assert_eq!(table, SystemTable::Local);
    assert_eq!(columns.expect("result columns")[0].name, "rpc_address");

    // An ordinary statement is learnt too, for re-preparing and retry safety.
    let prepare = messages::prepare(ProtocolVersion::V4, 2, "INSERT INTO t (a) VALUES (?)");
    decide(&policy, &prepare, 0, &prepared_answer(2, b"id2"), None);
    let s = policy.prepared().get(b"id2").expect("learnt");
    assert_eq!(s.keyspace, None);
    assert_eq!(s.system, None);
}

#[test]
fn only_a_prepare_teaches() {
    let policy = CqlPolicy::new(8);
    let query = messages::query(ProtocolVersion::V4, 1, "SELECT * FROM t", consistency::ONE);
    decide(&policy, &query, 0, &prepared_answer(1, b"id1"), None);
    let prepare = messages::prepare(ProtocolVersion::V4, 2, "SELECT * FROM t");
    decide(
        &policy,
        &prepare,
        0,
        &messages::result_void(ProtocolVersion::V4, 2),
        None,
    );
    assert!(policy.prepared().is_empty());
}

#[test]
fn unprepared_is_prepared_again_once() {
    let policy = CqlPolicy::new(8);
    let gone = unprepared_answer(1, b"id1");
    for request in [execute(1, b"id1"), batch(1, b"id1")] {
        assert_eq!(decide(&policy, &request, 0, &gone, None), Answer::Reprepare);
        // Already retried (after re-preparing, or elsewhere after a connection died).
        assert_eq!(decide(&policy, &request, 1, &gone, None), Answer::Relay);
    }
    let query = messages::query(ProtocolVersion::V4, 1, "SELECT * FROM t", consistency::ONE);
    assert_eq!(decide(&policy, &query, 0, &gone, None), Answer::Relay);
    let overloaded = messages::error(ProtocolVersion::V4, 1, error_code::OVERLOADED, "busy");
    assert_eq!(
        decide(&policy, &execute(1, b"id1"), 0, &overloaded, None),
        Answer::Relay
    );
}

#[test]
fn a_reprepare_sends_the_learnt_query_and_checks_the_id() {
    let policy = CqlPolicy::new(8);
    assert_eq!(policy.reprepare(&unprepared_answer(1, b"id1")), None);
    learnt(&policy, b"id1", "SELECT * FROM t WHERE k = ?");
    let reprepare = policy
        .reprepare(&unprepared_answer(1, b"id1"))
        .expect("known");
    let prepare = reprepare.prepare(ProtocolVersion::V4);
    assert_eq!(prepare.opcode(), opcode::PREPARE);
    assert_eq!(
        parse_prepare(&prepare.body).unwrap(),
        "SELECT * FROM t WHERE k = ?"
    );
    assert!(reprepare.is_done_by(&prepared_answer(0, b"id1"), ProtocolVersion::V4));
    assert!(!reprepare.is_done_by(&prepared_answer(0, b"other"), ProtocolVersion::V4));
    assert!(!reprepare.is_done_by(&unprepared_answer(0, b"id1"), ProtocolVersion::V4));
    // A warning in front of the result (v4) does not hide the id.
    let plain = prepared_answer(0, b"id1");
    let mut warned = BytesMut::new();
    warned.put_string_list(&["a warning"]);
    warned.extend_from_slice(&plain.body);
    let mut header = plain.header;
    header.flags |= crate::frame::flags::WARNING;
    let warned = Frame::new(header, warned.freeze());
    assert!(reprepare.is_done_by(&warned, ProtocolVersion::V4));
}

#[test]
fn only_reads_are_retry_safe() {
    let policy = CqlPolicy::new(8);
    let query = |cql: &str| messages::query(ProtocolVersion::V4, 1, cql, consistency::ONE);
    assert!(policy.is_retry_safe(&query("SELECT * FROM t")));
    assert!(!policy.is_retry_safe(&query("INSERT INTO t (a) VALUES (1)")));
    assert!(policy.is_retry_safe(&messages::options(ProtocolVersion::V4, 1)));
    assert!(policy.is_retry_safe(&messages::prepare(
        ProtocolVersion::V4,
        1,
        "INSERT INTO t (a) VALUES (?)"
    )));
    learnt(&policy, b"read", "SELECT * FROM t WHERE k = ?");
    learnt(&policy, b"write", "UPDATE t SET a = ? WHERE k = ?");
    assert!(policy.is_retry_safe(&execute(1, b"read")));
    assert!(!policy.is_retry_safe(&execute(1, b"write")));
    assert!(!policy.is_retry_safe(&execute(1, b"unknown")));
    assert!(!policy.is_retry_safe(&batch(1, b"read")));
}

#[test]
fn unprepared_id_is_read_from_the_error() {
    let f = unprepared_answer(0, b"\x01\x02");
    assert_eq!(unprepared_id(&f.body).unwrap().as_ref(), b"\x01\x02");
    assert!(
        unprepared_id(&messages::error(ProtocolVersion::V4, 0, error_code::INVALID, "x").body)
            .is_none()
    );
}
