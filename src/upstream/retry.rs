//! The pool's side of re-preparing, for an UNPREPARED answer the CQL policy (`crate::policy`)
//! found worth it: which connection prepares the statement again, the round trip, and the
//! request sent once more.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::mux::MuxConn;
use super::pool::Pool;
use super::streams::{Pending, ReplyTo};
use crate::frame::Frame;
use crate::metrics::metrics;
use crate::policy::prepared::PreparedStatement;

impl Pool {
    /// The connection a statement prepared in its keyspace should be re-prepared on.
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

    /// Re-prepares the statement behind an UNPREPARED answer and retries the request once;
    /// relays the answer when that cannot be done.
    pub(super) async fn reprepare_and_retry(
        &self,
        conn: Arc<MuxConn>,
        mut pending: Pending,
        unprepared: Frame,
    ) {
        let Some(reprepare) = self.policy.reprepare(&unprepared) else {
            pending.reply.deliver(unprepared);
            return;
        };
        let Some(target) = self.reprepare_target(&conn, &reprepare.statement).await else {
            pending.reply.deliver(unprepared);
            return;
        };
        let (tx, rx) = oneshot::channel();
        let prepare = reprepare.prepare(conn.version);
        if target
            .send(Pending::new(prepare, ReplyTo::Internal(tx)))
            .is_err()
        {
            pending.reply.deliver(unprepared);
            return;
        }
        let reply = tokio::time::timeout(self.settings.request_timeout, rx).await;
        let same_id = matches!(&reply, Ok(Ok(f)) if reprepare.is_done_by(f, conn.version));
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
}
