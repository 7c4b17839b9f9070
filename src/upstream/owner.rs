//! What an upstream connection reports to whoever owns it (the pool; a recorder in tests).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mux::MuxConn;
use super::streams::Pending;
use crate::frame::Frame;

/// What a connection reports to whoever owns it.
pub trait ConnOwner: Send + Sync + 'static {
    /// `received` is when the read that brought `frame` completed.
    fn on_response(&self, conn: &Arc<MuxConn>, frame: Frame, received: Instant);
    /// The first frame the upstream sent after the handshake has arrived: the connection
    /// works, not only its handshake.
    fn on_first_answer(&self, conn: &Arc<MuxConn>);
    fn on_closed(&self, conn: &Arc<MuxConn>, in_flight: Vec<Pending>, how: Closure);
}

/// How a connection ended, for the owner's back-off: an upstream that authenticates and then
/// drops every connection at its first request is as down as one that refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closure {
    /// The upstream closed it or the read failed (not `MuxConn::close`).
    pub by_upstream: bool,
    /// Anything was sent on it after the handshake (a request or a heartbeat).
    pub asked: bool,
    /// Anything came from the upstream after the handshake.
    pub answered: bool,
    /// From the end of its handshake to its close.
    pub lived: Duration,
}

/// A connection that lived longer than this before it was dropped unanswered was not refused:
/// it met an idle timeout or a server's connection lifetime, and a request may just have
/// crossed the close.
const DIED_YOUNG: Duration = Duration::from_secs(2);

impl Closure {
    /// Whether the connection ended the way a failed connection attempt does: new, asked, and
    /// dropped by the upstream without a word. A warm connection closed unasked, or one that
    /// had lived a while, says nothing about the upstream's health.
    pub fn failed_unused(self) -> bool {
        self.by_upstream && self.asked && !self.answered && self.lived < DIED_YOUNG
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closure(by_upstream: bool, asked: bool, answered: bool, lived_ms: u64) -> Closure {
        Closure {
            by_upstream,
            asked,
            answered,
            lived: Duration::from_millis(lived_ms),
        }
    }

    #[test]
    fn only_a_new_connection_dropped_at_its_first_question_is_a_failed_connect() {
        // Authenticated, asked, dropped unanswered at once: the upstream is not working.
        assert!(closure(true, true, false, 5).failed_unused());
        // Warm and never asked (an idle timeout), or answered before: the upstream works.
        assert!(!closure(true, false, false, 5).failed_unused());
        assert!(!closure(true, true, true, 5).failed_unused());
        // An old connection whose close a request crossed: a lifetime or idle limit.
        assert!(!closure(true, true, false, 60_000).failed_unused());
        // Closed by the proxy (drained, shrunk, a keyspace switch).
        assert!(!closure(false, true, false, 5).failed_unused());
    }
}
