//! The query engine: kassandra's in-memory CQL server, with Keyspaces' system tables and its
//! rules (consistency levels, no peers_v2) on top.

use std::collections::HashMap;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};
use kassandra::cql::query::QueryString;
use kassandra::frame::consistency::Consistency;
use kassandra::frame::request::query::Query;
use kassandra::frame::request::{Request, RequestOpcode};
use kassandra::frame::response::error::Error as KError;
use kassandra::frame::response::result::QueryResult;
use kassandra::frame::response::Response;
use kassandra::frame::FrameFlags;
use kassandra::KassandraSession;
use keyspaces_proxy::frame::messages::{consistency, error_code, ErrorInfo};
use keyspaces_proxy::frame::opcode;
use keyspaces_proxy::frame::request::parse_query;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    Read,
    Write,
    Schema,
    Use,
}

/// What a statement did, so the connection can track its keyspace and the limiter its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub opcode: u8,
    pub body: Bytes,
    pub kind: StatementKind,
    /// Set when a `USE` succeeded.
    pub keyspace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Partitioner {
    Murmur3,
    Random,
    /// `com.amazonaws.cassandra.DefaultPartitioner`: drivers warn and build no token map.
    Default,
}

impl Partitioner {
    pub fn class_name(self) -> &'static str {
        match self {
            Partitioner::Murmur3 => "org.apache.cassandra.dht.Murmur3Partitioner",
            Partitioner::Random => "org.apache.cassandra.dht.RandomPartitioner",
            Partitioner::Default => "com.amazonaws.cassandra.DefaultPartitioner",
        }
    }
}

/// What `system.local` and `system.peers` say.
#[derive(Debug, Clone)]
pub struct Topology {
    pub region: String,
    pub partitioner: Partitioner,
    pub local_address: IpAddr,
    pub peers: Vec<IpAddr>,
}

pub struct Engine {
    session: Mutex<KassandraSession>,
    prepared_kinds: Mutex<HashMap<Bytes, StatementKind>>,
    enforce_consistency: bool,
}

fn kind_of(q: &QueryString) -> StatementKind {
    match q {
        QueryString::Select(_) => StatementKind::Read,
        QueryString::Insert(_) | QueryString::Delete(_) => StatementKind::Write,
        QueryString::Use { .. } => StatementKind::Use,
        QueryString::CreateKeyspace(_)
        | QueryString::CreateTable(_)
        | QueryString::CreateType(_) => StatementKind::Schema,
    }
}

fn error_reply(code: i32, message: &str, kind: StatementKind) -> Reply {
    let f = keyspaces_proxy::frame::messages::error(4, 0, code, message);
    Reply {
        opcode: opcode::ERROR,
        body: f.body,
        kind,
        keyspace: None,
    }
}

fn kassandra_error(e: KError, kind: StatementKind) -> Reply {
    let mut b = BytesMut::new();
    Response::Error(e)
        .serialize(&mut b, &mut FrameFlags::empty())
        .ok();
    Reply {
        opcode: opcode::ERROR,
        body: b.freeze(),
        kind,
        keyspace: None,
    }
}

fn result_reply(r: QueryResult, kind: StatementKind) -> Reply {
    let keyspace = match &r {
        QueryResult::SetKeyspace(s) => Some(s.keyspace_name.clone()),
        _ => None,
    };
    let mut b = BytesMut::new();
    if let Err(e) = r.serialize(&mut b) {
        return error_reply(
            error_code::SERVER_ERROR,
            &format!("cannot encode result: {e}"),
            kind,
        );
    }
    Reply {
        opcode: opcode::RESULT,
        body: b.freeze(),
        kind,
        keyspace,
    }
}

/// Keyspaces' consistency rules: writes only at LOCAL_QUORUM; reads at ONE, LOCAL_ONE or
/// LOCAL_QUORUM.
pub fn consistency_violation(kind: StatementKind, cl: u16) -> Option<String> {
    let (allowed, list): (&[u16], &str) = match kind {
        StatementKind::Write => (&[consistency::LOCAL_QUORUM], "LOCAL_QUORUM"),
        StatementKind::Read => (
            &[
                consistency::ONE,
                consistency::LOCAL_ONE,
                consistency::LOCAL_QUORUM,
            ],
            "ONE, LOCAL_ONE, LOCAL_QUORUM",
        ),
        StatementKind::Schema | StatementKind::Use => return None,
    };
    if allowed.contains(&cl) {
        return None;
    }
    Some(format!(
        "Consistency level {} is not supported for this operation. Supported consistency levels are: {list}",
        consistency::name(cl)
    ))
}

fn wire_consistency(c: Consistency) -> u16 {
    i16::from(c) as u16
}

fn mentions_peers_v2(cql: &str) -> bool {
    cql.to_ascii_lowercase()
        .replace('"', "")
        .contains("system.peers_v2")
}

impl Engine {
    pub fn new(topology: &Topology, enforce_consistency: bool) -> Result<Engine, String> {
        let engine = Engine {
            session: Mutex::new(KassandraSession::new()),
            prepared_kinds: Mutex::new(HashMap::new()),
            enforce_consistency,
        };
        for stmt in system_rows(topology) {
            let q = Query::simple(&stmt).map_err(|e| format!("{stmt}: {e:?}"))?;
            engine
                .lock()
                .process(q)
                .map_err(|e| format!("{stmt}: {e:?}"))?;
        }
        Ok(engine)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KassandraSession> {
        // kassandra panics on a few unimplemented types; a poisoned lock still holds good data.
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kind of a request, for rate limiting, without executing it.
    pub fn classify(&self, op: u8, body: &[u8]) -> StatementKind {
        match op {
            opcode::QUERY => match parse_query(body) {
                Ok(q) if keyspaces_proxy::statement::is_select(q.text) => StatementKind::Read,
                _ => StatementKind::Write,
            },
            opcode::EXECUTE => {
                let id = keyspaces_proxy::frame::request::parse_execute(body)
                    .map(|e| Bytes::copy_from_slice(e.id));
                id.ok()
                    .and_then(|id| {
                        self.prepared_kinds
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(&id)
                            .copied()
                    })
                    .unwrap_or(StatementKind::Read)
            }
            _ => StatementKind::Write,
        }
    }

    /// Runs QUERY, PREPARE, EXECUTE or BATCH `body` in `keyspace` (the connection's USE).
    pub fn handle(&self, op: u8, body: &[u8], keyspace: Option<&str>) -> Reply {
        let outcome = catch_unwind(AssertUnwindSafe(|| self.handle_inner(op, body, keyspace)));
        outcome.unwrap_or_else(|_| {
            error_reply(
                error_code::SERVER_ERROR,
                "the emulator's engine cannot run this statement",
                StatementKind::Read,
            )
        })
    }

    fn handle_inner(&self, op: u8, body: &[u8], keyspace: Option<&str>) -> Reply {
        let Ok(req_op) = RequestOpcode::try_from(op) else {
            return error_reply(
                error_code::PROTOCOL_ERROR,
                "unsupported opcode",
                StatementKind::Read,
            );
        };
        if op == opcode::QUERY || op == opcode::PREPARE {
            if let Ok(text) = keyspaces_proxy::frame::types::Reader::new(body).long_string() {
                if mentions_peers_v2(text) {
                    return error_reply(
                        error_code::INVALID,
                        "unconfigured table peers_v2",
                        StatementKind::Read,
                    );
                }
            }
        }
        let request = match Request::deserialize(req_op, body, FrameFlags::empty()) {
            Ok(r) => r,
            Err(e) => return kassandra_error(e, StatementKind::Read),
        };
        let mut session = self.lock();
        // kassandra keeps one current keyspace; set this connection's before every statement.
        // An empty name makes unqualified statements fail as they would without USE.
        session.use_keyspace(keyspace.unwrap_or(""));
        match request {
            Request::Query(q) => {
                let kind = kind_of(&q.query);
                if let Some(msg) = self.check_consistency(kind, q.parameters.consistency) {
                    return error_reply(error_code::INVALID, &msg, kind);
                }
                match session.process(q) {
                    Ok(r) => result_reply(r, kind),
                    Err(e) => kassandra_error(e, kind),
                }
            }
            Request::Prepare(q) => {
                let kind = kind_of(&q);
                // Ids derive from keyspace and text, as Cassandra's do, so a re-prepare after
                // UNPREPARED yields the id the client already holds.
                let text = keyspaces_proxy::frame::request::parse_prepare(body).unwrap_or_default();
                match session.prepare_with_id(q, statement_id(keyspace, text)) {
                    Ok(r) => {
                        if let QueryResult::Prepared(p) = &r {
                            self.prepared_kinds
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(Bytes::copy_from_slice(&p.id.to_be_bytes()), kind);
                        }
                        result_reply(r, StatementKind::Read)
                    }
                    Err(e) => kassandra_error(e, kind),
                }
            }
            Request::Execute(e) => {
                if !self.is_prepared(e.id) {
                    return unprepared(e.id);
                }
                let kind = self
                    .prepared_kinds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(e.id)
                    .copied()
                    .unwrap_or(StatementKind::Read);
                if let Some(msg) = self.check_consistency(kind, e.parameters.consistency) {
                    return error_reply(error_code::INVALID, &msg, kind);
                }
                match session.execute(e) {
                    Ok(r) => result_reply(r, kind),
                    Err(err) => kassandra_error(err, kind),
                }
            }
            Request::Batch(b) => {
                for s in &b.statements {
                    if let kassandra::frame::request::batch::BatchStatement::Prepared {
                        id, ..
                    } = s
                    {
                        if !self.is_prepared(id) {
                            return unprepared(id);
                        }
                    }
                }
                if let Some(msg) = self.check_consistency(StatementKind::Write, b.consistency) {
                    return error_reply(error_code::INVALID, &msg, StatementKind::Write);
                }
                match session.process_batch(b) {
                    Ok(r) => result_reply(r, StatementKind::Write),
                    Err(e) => kassandra_error(e, StatementKind::Write),
                }
            }
            _ => error_reply(
                error_code::PROTOCOL_ERROR,
                "unexpected request",
                StatementKind::Read,
            ),
        }
    }

    fn is_prepared(&self, id: &[u8]) -> bool {
        self.prepared_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(id)
    }

    /// Forgets every prepared statement, as a Keyspaces node that restarted would: the next
    /// EXECUTE of any of them is answered UNPREPARED.
    pub fn forget_prepared(&self) {
        self.prepared_kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    fn check_consistency(&self, kind: StatementKind, c: Consistency) -> Option<String> {
        if !self.enforce_consistency {
            return None;
        }
        consistency_violation(kind, wire_consistency(c))
    }
}

fn statement_id(keyspace: Option<&str>, text: &str) -> u128 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(keyspace.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    u128::from_be_bytes(id)
}

fn unprepared(id: &[u8]) -> Reply {
    use keyspaces_proxy::frame::types::WriteExt;
    let mut extra = Vec::new();
    extra.put_short_bytes(id);
    let message = format!("Prepared query with ID {} not found", hex::encode(id));
    let f = keyspaces_proxy::frame::messages::error_with(
        4,
        0,
        error_code::UNPREPARED,
        &message,
        &extra,
    );
    Reply {
        opcode: opcode::ERROR,
        body: f.body,
        kind: StatementKind::Read,
        keyspace: None,
    }
}

/// The INSERTs that make `system.local` and `system.peers` look like Keyspaces'.
fn system_rows(t: &Topology) -> Vec<String> {
    let tokens = "['-9223372036854775808', '-3074457345618258603', '3074457345618258602']";
    let mut stmts = vec![format!(
        "INSERT INTO system.local (key, bootstrapped, broadcast_address, cluster_name, cql_version, \
         data_center, host_id, listen_address, native_protocol_version, partitioner, rack, \
         release_version, rpc_address, rpc_port, schema_version, tokens) VALUES ('local', \
         'COMPLETED', '{addr}', 'Amazon Keyspaces', '3.4.4', '{dc}', \
         '6b8c3e4d-0f6a-4c6e-9a52-1f0f7a1b0000', '{addr}', '4', '{part}', '{dc}', '3.11.2', \
         '{addr}', 9142, '0d2b2d8c-3b8a-4f0e-9d8e-5b8f2e7e0001', {tokens})",
        addr = t.local_address,
        dc = t.region,
        part = t.partitioner.class_name(),
    )];
    for (i, peer) in t.peers.iter().enumerate() {
        stmts.push(format!(
            "INSERT INTO system.peers (peer, data_center, host_id, rack, release_version, \
             rpc_address, schema_version, tokens) VALUES ('{peer}', '{dc}', \
             '6b8c3e4d-0f6a-4c6e-9a52-1f0f7a1b{i:04x}', '{dc}', '3.11.2', '{peer}', \
             '0d2b2d8c-3b8a-4f0e-9d8e-5b8f2e7e0001', {tokens})",
            dc = t.region,
            i = i + 1,
        ));
    }
    stmts
}

/// ERROR bodies for throttling, as Keyspaces reports exceeding the per-connection rate.
pub fn throttled(kind: StatementKind) -> Reply {
    let mut extra = BytesMut::new();
    use bytes::BufMut;
    use keyspaces_proxy::frame::types::WriteExt;
    extra.put_u16(consistency::LOCAL_QUORUM);
    extra.put_i32(0);
    extra.put_i32(2);
    let (code, message) = match kind {
        StatementKind::Write | StatementKind::Schema => {
            extra.put_string("SIMPLE");
            (
                error_code::WRITE_TIMEOUT,
                "Operation timed out - received only 0 responses.",
            )
        }
        StatementKind::Read | StatementKind::Use => {
            extra.put_u8(0);
            (
                error_code::READ_TIMEOUT,
                "Operation timed out - received only 0 responses.",
            )
        }
    };
    let f = keyspaces_proxy::frame::messages::error_with(4, 0, code, message, &extra);
    Reply {
        opcode: opcode::ERROR,
        body: f.body,
        kind,
        keyspace: None,
    }
}

/// The error message in an ERROR reply (tests).
pub fn error_message(reply: &Reply) -> Option<ErrorInfo> {
    (reply.opcode == opcode::ERROR)
        .then(|| ErrorInfo::parse(&reply.body).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use keyspaces_proxy::frame::messages;
    use keyspaces_proxy::frame::result::Rows;

    use super::*;

    fn engine() -> Engine {
        let t = Topology {
            region: "us-east-1".into(),
            partitioner: Partitioner::Murmur3,
            local_address: "127.0.0.1".parse().unwrap(),
            peers: (1..=9)
                .map(|i| format!("127.0.1.{i}").parse().unwrap())
                .collect(),
        };
        Engine::new(&t, true).unwrap()
    }

    fn run(e: &Engine, cql: &str, cl: u16, ks: Option<&str>) -> Reply {
        let f = messages::query(4, 1, cql, cl);
        e.handle(opcode::QUERY, &f.body, ks)
    }

    #[test]
    fn system_tables_look_like_keyspaces() {
        let e = engine();
        let r = run(&e, "SELECT cluster_name, release_version, partitioner, data_center FROM system.local WHERE key='local'", consistency::ONE, None);
        assert_eq!(r.opcode, opcode::RESULT, "{:?}", error_message(&r));
        let rows = Rows::parse(&r.body).unwrap();
        let cells = rows.cells().unwrap();
        assert_eq!(cells[0][0], Some(&b"Amazon Keyspaces"[..]));
        assert_eq!(cells[0][1], Some(&b"3.11.2"[..]));
        assert_eq!(cells[0][3], Some(&b"us-east-1"[..]));
        let r = run(&e, "SELECT * FROM system.peers", consistency::ONE, None);
        assert_eq!(Rows::parse(&r.body).unwrap().rows_count, 9);
        let r = run(&e, "SELECT * FROM system.peers_v2", consistency::ONE, None);
        assert_eq!(
            error_message(&r).unwrap().message,
            "unconfigured table peers_v2"
        );
    }

    #[test]
    fn keyspaces_consistency_rules() {
        let e = engine();
        for q in [
            "CREATE KEYSPACE ks1 WITH replication = {'class': 'SingleRegionStrategy'}",
            "CREATE TABLE ks1.t (k int, c int, v text, PRIMARY KEY (k, c))",
        ] {
            let r = run(&e, q, consistency::ONE, None);
            assert_eq!(r.opcode, opcode::RESULT, "{q}: {:?}", error_message(&r));
        }
        let r = run(
            &e,
            "INSERT INTO ks1.t (k, c, v) VALUES (1, 1, 'a')",
            consistency::LOCAL_ONE,
            None,
        );
        assert_eq!(
            error_message(&r).unwrap().message,
            "Consistency level LOCAL_ONE is not supported for this operation. Supported consistency levels are: LOCAL_QUORUM"
        );
        let r = run(
            &e,
            "INSERT INTO t (k, c, v) VALUES (1, 1, 'a')",
            consistency::LOCAL_QUORUM,
            Some("ks1"),
        );
        assert_eq!(r.opcode, opcode::RESULT, "{:?}", error_message(&r));
        let r = run(
            &e,
            "SELECT * FROM ks1.t WHERE k = 1",
            consistency::QUORUM,
            None,
        );
        assert!(error_message(&r)
            .unwrap()
            .message
            .contains("QUORUM is not supported"));
        let r = run(
            &e,
            "SELECT * FROM ks1.t WHERE k = 1",
            consistency::LOCAL_ONE,
            None,
        );
        assert_eq!(Rows::parse(&r.body).unwrap().rows_count, 1);
    }

    #[test]
    fn use_is_per_connection() {
        let e = engine();
        run(
            &e,
            "CREATE KEYSPACE ks2 WITH replication = {'class': 'SingleRegionStrategy'}",
            6,
            None,
        );
        let r = run(&e, "USE ks2", consistency::ONE, None);
        assert_eq!(r.keyspace.as_deref(), Some("ks2"));
        run(
            &e,
            "CREATE TABLE ks2.t (k int PRIMARY KEY, v text)",
            6,
            None,
        );
        let r = run(&e, "SELECT * FROM t", consistency::ONE, None);
        assert_eq!(r.opcode, opcode::ERROR);
        let r = run(&e, "SELECT * FROM t", consistency::ONE, Some("ks2"));
        assert_eq!(r.opcode, opcode::RESULT);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let e = engine();
        assert_eq!(
            e.handle(opcode::QUERY, &[0xff, 0xff], None).opcode,
            opcode::ERROR
        );
        assert_eq!(run(&e, "NOT CQL AT ALL", 1, None).opcode, opcode::ERROR);
    }
}
