//! Preparing a statement again when an upstream connection answers UNPREPARED for it (one that
//! never saw it prepared, or forgot it): the pool knows the statement's text, so it can prepare
//! it there and send the request once more without the client noticing. Decided here; the pool
//! picks the connection and makes the round trip.

use bytes::Bytes;

use super::prepared::PreparedStatement;
use super::CqlPolicy;
use crate::frame::messages::{self, error_code, message_body};
use crate::frame::result::Prepared;
use crate::frame::types::Reader;
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Frame};

/// Whether an ERROR with `code`, answering a request of opcode `request_op` already retried
/// `attempt` times, is worth preparing again for: the first UNPREPARED of an EXECUTE or BATCH.
/// Once only, so an id Keyspaces keeps refusing reaches the driver, which prepares it itself.
pub(super) fn is_worth_repreparing(request_op: u8, attempt: u8, code: i32) -> bool {
    attempt == 0
        && matches!(request_op, opcode::EXECUTE | opcode::BATCH)
        && code == error_code::UNPREPARED
}

/// A statement to prepare again before the request that met UNPREPARED is sent once more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reprepare {
    id: Bytes,
    pub(crate) statement: PreparedStatement,
}

impl Reprepare {
    /// The PREPARE to send, on a connection of the statement's keyspace.
    pub(crate) fn prepare(&self, version: ProtocolVersion) -> Frame {
        messages::prepare(version, 0, &self.statement.query)
    }

    /// Whether `reply` to that PREPARE gave the statement its id back: the retried request names
    /// the id, so any other answer leaves it as unprepared as before. Warnings and custom
    /// payloads before the result (v4) are skipped, as for any answer.
    pub(crate) fn is_done_by(&self, reply: &Frame, version: ProtocolVersion) -> bool {
        reply.opcode() == opcode::RESULT
            && message_body(&reply.header, &reply.body)
                .is_ok_and(|body| Prepared::parse(body, version).is_ok_and(|p| p.id == self.id))
    }
}

impl CqlPolicy {
    /// What to prepare again for an UNPREPARED answer; `None` when the pool never saw its id
    /// prepared, and the answer is relayed for the driver to prepare the statement itself.
    pub(crate) fn reprepare(&self, unprepared: &Frame) -> Option<Reprepare> {
        let id = message_body(&unprepared.header, &unprepared.body)
            .ok()
            .and_then(unprepared_id)?;
        let statement = self.prepared.get(&id)?;
        Some(Reprepare { id, statement })
    }
}

/// The statement id in an UNPREPARED error body.
pub fn unprepared_id(body: &[u8]) -> Option<Bytes> {
    let mut r = Reader::new(body);
    if r.i32().ok()? != error_code::UNPREPARED {
        return None;
    }
    r.string().ok()?;
    Some(Bytes::copy_from_slice(r.short_bytes().ok()?))
}
