//! What an upstream connection reports to whoever owns it (the pool; a recorder in tests).

use std::sync::Arc;
use std::time::Instant;

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
/// drops every connection before answering is as down as one that refuses them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closure {
    /// The upstream closed it or the read failed (not `MuxConn::close`).
    pub by_upstream: bool,
    /// Anything came from the upstream after the handshake.
    pub answered: bool,
}

impl Closure {
    /// Whether the connection ended the way a failed connection attempt does.
    pub fn failed_unused(self) -> bool {
        self.by_upstream && !self.answered
    }
}
