//! What the pool does with what its connections report: an answer is relayed (or its
//! statement re-prepared first), a connection's first answer clears the back-off of every
//! group of its version, a connection dropped at its first question counts as a failed
//! connect, and the requests of a lost connection are retried elsewhere when that is safe,
//! else answered.

use std::sync::Arc;
use std::time::Instant;

use super::connection::UpstreamError;
use super::group::{Group, GroupKey};
use super::mux::{Closure, ConnOwner, MuxConn};
use super::pool::{Pool, MAX_READ_RETRIES};
use super::streams::{Pending, ReplyTo};
use crate::frame::messages::message_body;
use crate::frame::ErrorReply;
use crate::frame::{opcode, Frame};
use crate::metrics::metrics;
use crate::policy::{Answer, Scope};

impl Pool {
    /// The group `conn` belongs to, if it is still in the pool.
    fn group_of(&self, conn: &MuxConn) -> Option<Arc<Group>> {
        let key = GroupKey {
            version: conn.version,
            keyspace: conn.keyspace.clone(),
        };
        self.groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned()
    }
}

impl ConnOwner for Pool {
    fn on_response(&self, conn: &Arc<MuxConn>, frame: Frame, received: Instant) {
        if frame.stream() < 0 {
            return; // events: never relayed
        }
        let Some(pending) = conn.take(frame.stream()) else {
            return;
        };
        if pending.reply.client_stream().is_some() {
            metrics().request_done(
                pending.request.opcode(),
                received.saturating_duration_since(pending.sent_at),
            );
        }
        // Tracing ids, warnings and custom payloads come before the message proper (v4 §2.2).
        let body = message_body(&frame.header, &frame.body).unwrap_or_default();
        if frame.opcode() == opcode::RESULT {
            conn.close_if_keyspace_switched(body);
        }
        let scope = Scope {
            version: conn.version,
            keyspace: conn.keyspace.as_ref(),
        };
        let answer = self
            .policy
            .on_answer(&pending.request, pending.attempt, &frame, body, scope);
        match answer {
            Answer::Relay => pending.reply.deliver(frame),
            Answer::Reprepare => {
                let (pool, conn) = (self.arc(), conn.clone());
                tokio::spawn(async move { pool.reprepare_and_retry(conn, pending, frame).await });
            }
        }
    }

    /// The upstream works: every group of the connection's protocol version may connect again
    /// at once. Keyspace groups' failures lengthen their version's back-off (`Pool::group`), so
    /// after an outage the first of them to get through must clear it for the others too, or
    /// clients without a keyspace would be refused for the rest of a back-off nobody needs.
    fn on_first_answer(&self, conn: &Arc<MuxConn>) {
        let groups: Vec<Arc<Group>> = self
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|g| g.key.version == conn.version)
            .cloned()
            .collect();
        for g in groups {
            g.record_success();
        }
    }

    fn on_closed(&self, conn: &Arc<MuxConn>, in_flight: Vec<Pending>, how: Closure) {
        let group = self.group_of(conn);
        if let Some(g) = &group {
            if how.failed_unused() {
                // As a failed connection attempt: the group backs off and the address sits out.
                let reference = crate::reference::Reference::new();
                let e = Arc::new(UpstreamError::ClosedUnanswered);
                tracing::warn!(%reference, conn = conn.id, address = %conn.address.addr, error = %e, "upstream connection failed");
                let now = Instant::now();
                g.record_failure(conn.created, now, e, reference);
                self.target
                    .addresses
                    .dial_failed(conn.address.addr, conn.created, now);
            }
            g.remove_dead_and_drained();
            g.changed.notify_waiters();
        }
        for mut p in in_flight {
            if matches!(p.reply, ReplyTo::Internal(_)) {
                continue;
            }
            match &group {
                Some(g)
                    if p.attempt < MAX_READ_RETRIES && self.policy.is_retry_safe(&p.request) =>
                {
                    p.attempt += 1;
                    p.sent_at = Instant::now();
                    let p = match g.pick_elsewhere(conn.address.addr) {
                        Some(other) => match other.send(p) {
                            Ok(()) => continue,
                            Err(p) => p,
                        },
                        None => p,
                    };
                    let (pool, g) = (self.arc(), g.clone());
                    tokio::spawn(async move { pool.dispatch(&g, p).await });
                }
                _ => {
                    let f =
                        ErrorReply::connection_lost().frame(p.request.header.answer_version(), 0);
                    p.reply.deliver(f);
                }
            }
        }
    }
}
