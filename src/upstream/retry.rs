//! The pool's CQL policy for answers that need more than relaying: an UNPREPARED answer is
//! re-prepared and the request retried once, and a request whose connection died is sent
//! again only when that is safe (reads).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::mux::MuxConn;
use super::pool::Pool;
use super::prepared::PreparedStatement;
use super::streams::{Pending, ReplyTo};
use crate::frame::messages::{self, error_code, message_body, ErrorInfo};
use crate::frame::request::{parse_execute, parse_query};
use crate::frame::result::Prepared;
use crate::frame::types::Reader;
use crate::frame::{opcode, Frame};
use crate::metrics::metrics;
use crate::statement::is_select;

impl Pool {
    /// The group a statement prepared in `keyspace` should be re-prepared on.
    async fn reprepare_target(
        &self,
        conn: &Arc<MuxConn>,
        statement: &PreparedStatement,
    ) -> Option<Arc<MuxConn>> {
        if conn.is_ready() && conn.keyspace == statement.keyspace {
            return Some(conn.clone());
        }
        let group = self
            .group(conn.version, statement.keyspace.as_deref())
            .await
            .ok()?;
        group.pick()
    }

    /// Re-prepares the statement behind an UNPREPARED answer and retries the request once.
    pub(super) async fn reprepare_and_retry(
        &self,
        conn: Arc<MuxConn>,
        mut pending: Pending,
        unprepared: Frame,
    ) {
        let id = message_body(&unprepared.header, &unprepared.body)
            .ok()
            .and_then(unprepared_id);
        let statement = id.as_deref().and_then(|id| self.prepared.get(id));
        let (Some(id), Some(statement)) = (id, statement) else {
            pending.reply.deliver(unprepared);
            return;
        };
        let Some(target) = self.reprepare_target(&conn, &statement).await else {
            pending.reply.deliver(unprepared);
            return;
        };
        let (tx, rx) = oneshot::channel();
        let prepare = messages::prepare(conn.version, 0, &statement.query);
        if target
            .send(Pending::new(prepare, ReplyTo::Internal(tx)))
            .is_err()
        {
            pending.reply.deliver(unprepared);
            return;
        }
        let reply = tokio::time::timeout(self.settings.request_timeout, rx).await;
        let same_id = matches!(&reply, Ok(Ok(f)) if f.opcode() == opcode::RESULT
            && Prepared::parse(&f.body, conn.version).is_ok_and(|p| p.id == id));
        if !same_id {
            pending.reply.deliver(unprepared);
            return;
        }
        tracing::debug!(
            conn = target.id,
            "re-prepared a statement after UNPREPARED; retrying"
        );
        metrics().reprepares.inc();
        pending.attempt += 1;
        pending.sent_at = Instant::now();
        if let Err(p) = target.send(pending) {
            p.reply.deliver(unprepared);
        }
    }

    /// Whether a request may be sent again after its connection died: reads only.
    pub(super) fn is_retry_safe(&self, request: &Frame) -> bool {
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

/// The statement id in an UNPREPARED error body.
pub fn unprepared_id(body: &[u8]) -> Option<Bytes> {
    let mut r = Reader::new(body);
    if r.i32().ok()? != error_code::UNPREPARED {
        return None;
    }
    r.string().ok()?;
    Some(Bytes::copy_from_slice(r.short_bytes().ok()?))
}

pub(super) fn is_unprepared(frame: &Frame) -> bool {
    frame.opcode() == opcode::ERROR
        && message_body(&frame.header, &frame.body)
            .and_then(ErrorInfo::parse)
            .is_ok_and(|e| e.code == error_code::UNPREPARED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unprepared_id_is_read_from_the_error() {
        use crate::frame::types::WriteExt;
        let mut extra = Vec::new();
        extra.put_short_bytes(b"\x01\x02");
        let f = messages::error_with(4, 0, error_code::UNPREPARED, "gone", &extra);
        assert_eq!(unprepared_id(&f.body).unwrap().as_ref(), b"\x01\x02");
        assert!(is_unprepared(&f));
        assert!(unprepared_id(&messages::error(4, 0, error_code::INVALID, "x").body).is_none());
    }
}
