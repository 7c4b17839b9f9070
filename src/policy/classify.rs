//! What the pool tells from a statement's text: which system table a prepared statement reads,
//! learnt once from the PREPARE its id answers so that every client session can rewrite its
//! EXECUTEs, and whether a request only reads, so may be sent again after its connection died.

use std::sync::Arc;

use super::prepared::PreparedStatement;
use super::{CqlPolicy, Scope};
use crate::frame::messages::message_body;
use crate::frame::request::{parse_execute, parse_prepare, parse_query};
use crate::frame::result::{kind, result_kind, Prepared};
use crate::frame::{opcode, Frame};
use crate::statement::is_select;
use crate::topology::classify;

impl CqlPolicy {
    /// Records what the id of a PREPARED answer (`answer_body`) stands for: the query `request`
    /// prepared, the keyspace it resolves against, and the system table it reads, with the
    /// result columns an EXECUTE with skip_metadata needs to be rewritten.
    pub(super) fn learn(&self, request: &Frame, answer_body: &[u8], scope: Scope<'_>) {
        if result_kind(answer_body).ok() != Some(kind::PREPARED) {
            return;
        }
        let query = message_body(&request.header, &request.body).and_then(parse_prepare);
        let (Ok(p), Ok(query)) = (Prepared::parse(answer_body, scope.version), query) else {
            return;
        };
        let system = classify(query, scope.keyspace.map(|k| &**k))
            .map(|t| (t, p.result_columns.map(Arc::from)));
        self.prepared.insert(
            p.id,
            PreparedStatement {
                query: Arc::from(query),
                keyspace: scope.keyspace.cloned(),
                system,
            },
        );
    }

    /// Whether a request may be sent again after its connection died: reads only, since a
    /// write may have been applied before the connection went.
    pub(crate) fn is_retry_safe(&self, request: &Frame) -> bool {
        let Ok(body) = message_body(&request.header, &request.body) else {
            return false;
        };
        match request.opcode() {
            opcode::OPTIONS | opcode::PREPARE => true,
            opcode::QUERY => parse_query(body).is_ok_and(|q| is_select(q.text)),
            opcode::EXECUTE => parse_execute(body)
                .ok()
                .and_then(|e| self.prepared.get(e.id))
                .is_some_and(|s| is_select(&s.query)),
            _ => false,
        }
    }
}
