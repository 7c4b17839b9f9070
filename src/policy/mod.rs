//! The CQL policy of the shared upstream pool: what it learns from the statements and answers
//! passing through it, and what an answer calls for. The pool chooses connections; the policy
//! decides, without I/O, what a PREPARE answer teaches, when an UNPREPARED answer is worth
//! preparing again and whether a request may be sent twice. The pool then acts on the decision,
//! as a session acts on the router's steps.

use std::sync::Arc;

use crate::frame::messages::{error_code, ErrorInfo};
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Frame};
use crate::metrics::{metrics, ErrorCode, Metrics};

mod classify;
pub mod prepared;
pub(crate) mod reprepare;
#[cfg(test)]
mod tests;

pub use self::reprepare::unprepared_id;

/// The connection an answer came on, as far as statements care: the protocol version its
/// bodies are written in and the keyspace its unqualified table names resolve against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub(crate) version: ProtocolVersion,
    pub(crate) keyspace: Option<&'a Arc<str>>,
}

/// What the pool does with an upstream answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Hand it to whoever asked.
    Relay,
    /// The connection does not know the statement: prepare it again (`CqlPolicy::reprepare`)
    /// and send the request once more, relaying the answer if that cannot be done.
    Reprepare,
}

#[derive(Debug)]
pub(crate) struct CqlPolicy {
    prepared: Arc<prepared::PreparedCache>,
}

impl CqlPolicy {
    pub(crate) fn new(max_prepared: usize) -> CqlPolicy {
        CqlPolicy {
            prepared: Arc::new(prepared::PreparedCache::new(max_prepared)),
        }
    }

    /// The statements learnt so far. Client sessions read them too: their routers classify
    /// EXECUTEs and guard consistency by what any connection of the pool prepared.
    pub(crate) fn prepared(&self) -> &Arc<prepared::PreparedCache> {
        &self.prepared
    }

    /// What `answer` to `request` (already retried `attempt` times) calls for, learning the
    /// statement behind a PREPARED answer and counting error codes on the way. `answer_body` is
    /// the answer's message, past tracing ids, warnings and custom payloads: the pool reads it
    /// once for everything it checks. On every answer's path, so nothing is parsed, locked or
    /// allocated unless the answer is an ERROR or the result of a PREPARE.
    pub(crate) fn on_answer(
        &self,
        request: &Frame,
        attempt: u8,
        answer: &Frame,
        answer_body: &[u8],
        scope: Scope<'_>,
    ) -> Answer {
        match answer.opcode() {
            opcode::ERROR => {
                let Ok(e) = ErrorInfo::parse(answer_body) else {
                    return Answer::Relay;
                };
                let m = metrics();
                Metrics::count(
                    &m.upstream_errors,
                    ErrorCode {
                        code: error_code::name(e.code),
                    },
                );
                if reprepare::is_worth_repreparing(request.opcode(), attempt, e.code) {
                    Answer::Reprepare
                } else {
                    Answer::Relay
                }
            }
            opcode::RESULT if request.opcode() == opcode::PREPARE => {
                self.learn(request, answer_body, scope);
                Answer::Relay
            }
            _ => Answer::Relay,
        }
    }
}
