//! The query engine: kassandra's in-memory CQL server, with Keyspaces' system tables and its
//! rules (consistency levels, no peers_v2) on top, as KEYSPACES.md, "Protocol" describes them.
//! Not modelled from that section: batch size limits, 1 MB rows/pages, the 100-IN limit and
//! asynchronous DDL (kassandra itself refuses to prepare DDL, as Keyspaces does).

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

use crate::wire::request::Request as WireRequest;
use crate::wire::response::{self, ErrorInfo};
use crate::wire::{consistency, error_code, opcode};

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

// The partitioners system.local may name, one per account (KEYSPACES.md, "Protocol").
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
    Reply {
        opcode: opcode::ERROR,
        body: response::error(code, message),
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

/// Keyspaces' consistency rules (KEYSPACES.md, "Protocol"): writes only at LOCAL_QUORUM; reads
/// at ONE, LOCAL_ONE or LOCAL_QUORUM. DDL and USE are not checked: ASSUMPTION, it names no rule.
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
    // Invalid (0x2200) and the example text of KEYSPACES.md, "Protocol"; the read list's wording
    // is ASSUMPTION (the example shows only the write case).
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
    pub fn classify(&self, request: &WireRequest<'_>) -> StatementKind {
        match request {
            WireRequest::Query(text, _) if is_select(text) => StatementKind::Read,
            WireRequest::Execute(id, _) => self
                .prepared_kinds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(*id)
                .copied()
                .unwrap_or(StatementKind::Read),
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
            if let Some(text) = leading_long_string(body) {
                // No peers_v2 (KEYSPACES.md, "Protocol"). Invalid and this text are Cassandra
                // 3.11's for an unknown table (ASSUMPTION: Keyspaces' answer is undocumented).
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
                // ASSUMPTION (KEYSPACES.md is silent): ids derive from keyspace and text, as
                // Cassandra's MD5 ids do, so a re-prepare after UNPREPARED yields the same id.
                let text = leading_long_string(body).unwrap_or_default();
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

    /// Forgets every prepared statement: the next EXECUTE of any of them is answered UNPREPARED.
    /// ASSUMPTION: Keyspaces can forget ids as a restarted Cassandra node does (KEYSPACES.md is
    /// silent).
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

/// UNPREPARED (native_protocol_v4.spec §9) with the start of the text of Cassandra's
/// PreparedQueryNotFoundException; Keyspaces' text is undocumented (ASSUMPTION).
fn unprepared(id: &[u8]) -> Reply {
    let message = format!("Prepared query with ID {} not found", hex::encode(id));
    Reply {
        opcode: opcode::ERROR,
        body: response::unprepared(id, &message),
        kind: StatementKind::Read,
        keyspace: None,
    }
}

/// The [long string] a QUERY or PREPARE body starts with.
fn leading_long_string(body: &[u8]) -> Option<&str> {
    let (len, rest) = body.split_at_checked(4)?;
    let len = usize::try_from(i32::from_be_bytes([len[0], len[1], len[2], len[3]])).ok()?;
    std::str::from_utf8(rest.get(..len)?).ok()
}

/// Whether a statement reads: its first word, past whitespace and comments, is SELECT.
fn is_select(cql: &str) -> bool {
    let mut rest = cql.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("--").or_else(|| rest.strip_prefix("//")) {
            rest = r
                .split_once('\n')
                .map_or("", |(_, after)| after)
                .trim_start();
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r
                .split_once("*/")
                .map_or("", |(_, after)| after)
                .trim_start();
        } else {
            break;
        }
    }
    rest.get(..6)
        .is_some_and(|w| w.eq_ignore_ascii_case("select"))
        && !rest[6..].starts_with(|c: char| c.is_alphanumeric() || c == '_')
}

/// The INSERTs that make `system.local` and `system.peers` look like Keyspaces' (KEYSPACES.md,
/// "Protocol": cluster_name, data_center = rack = region, release_version, partitioner, peers).
fn system_rows(t: &Topology) -> Vec<String> {
    // ASSUMPTION: tokens, host ids and schema_version are made up (KEYSPACES.md gives none);
    // every row has the same tokens. cql_version 3.4.4 and protocol 4: KEYSPACES.md, "Protocol".
    // rpc_port 9142: KEYSPACES.md, "Endpoints" (not the emulator's own port).
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
    // ASSUMPTION: peers' rpc_address is their address so drivers can follow them; KEYSPACES.md,
    // "Protocol" says it was null in 2020.
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

/// ERROR bodies for throttling: Keyspaces reports exceeding the per-connection rate as
/// Read/WriteTimeout (KEYSPACES.md, "Throughput limits and errors"); the fields are ASSUMPTIONs.
pub fn throttled(kind: StatementKind) -> Reply {
    // Cassandra's RequestTimeoutException text. ASSUMPTION (KEYSPACES.md names only the error
    // types): LOCAL_QUORUM whatever the request's level, 0 of 2, SIMPLE even for batches and DDL.
    let message = "Operation timed out - received only 0 responses.";
    let (code, extra) = match kind {
        StatementKind::Write | StatementKind::Schema => (
            error_code::WRITE_TIMEOUT,
            response::timeout_fields(consistency::LOCAL_QUORUM, 0, 2, Some("SIMPLE")),
        ),
        StatementKind::Read | StatementKind::Use => (
            error_code::READ_TIMEOUT,
            response::timeout_fields(consistency::LOCAL_QUORUM, 0, 2, None),
        ),
    };
    Reply {
        opcode: opcode::ERROR,
        body: response::error_with(code, message, &extra),
        kind,
        keyspace: None,
    }
}

/// The error message in an ERROR reply (tests).
pub fn error_message(reply: &Reply) -> Option<ErrorInfo> {
    (reply.opcode == opcode::ERROR)
        .then(|| ErrorInfo::parse(&reply.body))
        .flatten()
}

#[cfg(test)]
mod tests {
    use bytes::Buf;

    use crate::wire::request::build;

    use super::*;

    /// A Rows RESULT (spec §4.2.5.2), read just far enough for these tests.
    struct Rows {
        rows_count: usize,
        cells: Vec<Vec<Option<Vec<u8>>>>,
    }

    fn skip_type(b: &mut &[u8]) {
        match b.get_u16() {
            0x0000 => {
                let n = b.get_u16() as usize;
                b.advance(n);
            }
            0x0020 | 0x0022 => skip_type(b),
            0x0021 => {
                skip_type(b);
                skip_type(b);
            }
            0x0031 => {
                for _ in 0..b.get_u16() {
                    skip_type(b);
                }
            }
            0x0030 => {
                for _ in 0..2 {
                    let n = b.get_u16() as usize;
                    b.advance(n);
                }
                for _ in 0..b.get_u16() {
                    let n = b.get_u16() as usize;
                    b.advance(n);
                    skip_type(b);
                }
            }
            _ => {}
        }
    }

    impl Rows {
        fn parse(mut b: &[u8]) -> Rows {
            assert_eq!(b.get_i32(), 2, "not a Rows result");
            let flags = b.get_i32();
            let columns = b.get_i32() as usize;
            if flags & 0x02 != 0 {
                let n = b.get_i32() as usize;
                b.advance(n);
            }
            let global = flags & 0x01 != 0;
            if global {
                for _ in 0..2 {
                    let n = b.get_u16() as usize;
                    b.advance(n);
                }
            }
            if flags & 0x04 == 0 {
                for _ in 0..columns {
                    let names = if global { 1 } else { 3 };
                    for _ in 0..names {
                        let n = b.get_u16() as usize;
                        b.advance(n);
                    }
                    skip_type(&mut b);
                }
            }
            let rows_count = b.get_i32() as usize;
            let mut cells = Vec::new();
            for _ in 0..rows_count {
                let mut row = Vec::new();
                for _ in 0..columns {
                    let n = b.get_i32();
                    row.push((n >= 0).then(|| {
                        let v = b[..n as usize].to_vec();
                        b.advance(n as usize);
                        v
                    }));
                }
                cells.push(row);
            }
            Rows { rows_count, cells }
        }
    }

    #[test]
    fn only_select_reads() {
        for q in [
            "SELECT 1",
            " select * from t",
            "/* c */ -- x\n SeLeCt k FROM t",
        ] {
            assert!(is_select(q), "{q}");
        }
        for q in ["SELECTED", "INSERT INTO t", "-- SELECT", "/* SELECT"] {
            assert!(!is_select(q), "{q}");
        }
    }

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
        e.handle(opcode::QUERY, &build::query(cql, cl), ks)
    }

    #[test]
    fn system_tables_look_like_keyspaces() {
        let e = engine();
        let r = run(&e, "SELECT cluster_name, release_version, partitioner, data_center FROM system.local WHERE key='local'", consistency::ONE, None);
        assert_eq!(r.opcode, opcode::RESULT, "{:?}", error_message(&r));
        let cells = Rows::parse(&r.body).cells;
        assert_eq!(cells[0][0].as_deref(), Some(&b"Amazon Keyspaces"[..]));
        assert_eq!(cells[0][1].as_deref(), Some(&b"3.11.2"[..]));
        assert_eq!(cells[0][3].as_deref(), Some(&b"us-east-1"[..]));
        let r = run(&e, "SELECT * FROM system.peers", consistency::ONE, None);
        assert_eq!(Rows::parse(&r.body).rows_count, 9);
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
        assert_eq!(Rows::parse(&r.body).rows_count, 1);
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
