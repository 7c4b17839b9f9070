//! Fault injection, adjustable while the emulator runs (tests hold the `Arc<Faults>`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;

#[derive(Debug)]
pub struct Faults {
    /// Bumped per fault; the target is one connection's id, or every connection.
    disconnect: watch::Sender<(u64, Option<u64>)>,
    latency_ms: AtomicU64,
    close_after: AtomicU64,
    refuse_connections: AtomicBool,
    fail_auth: AtomicBool,
    handshake_delay_ms: AtomicU64,
    cut_response_at: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            disconnect: watch::Sender::new((0, None)),
            latency_ms: AtomicU64::new(0),
            close_after: AtomicU64::new(0),
            refuse_connections: AtomicBool::new(false),
            fail_auth: AtomicBool::new(false),
            handshake_delay_ms: AtomicU64::new(0),
            cut_response_at: AtomicU64::new(0),
        }
    }
}

impl Faults {
    /// Drops every open connection at once, mid-request if need be.
    pub fn disconnect_all(&self) {
        self.disconnect
            .send_modify(|(n, target)| (*n, *target) = (*n + 1, None));
    }
    /// Drops one connection (its id in the event log), mid-request if need be: nothing queued
    /// on it is written any more.
    pub fn disconnect(&self, conn: u64) {
        self.disconnect
            .send_modify(|(n, target)| (*n, *target) = (*n + 1, Some(conn)));
    }
    pub fn disconnects(&self) -> watch::Receiver<(u64, Option<u64>)> {
        self.disconnect.subscribe()
    }
    /// Added before every request's answer.
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms.load(Ordering::Relaxed))
    }
    /// Each connection is closed, unanswered, at its Nth request after authentication (0 = never).
    pub fn set_close_after(&self, n: u64) {
        self.close_after.store(n, Ordering::Relaxed);
    }
    pub fn close_after(&self) -> u64 {
        self.close_after.load(Ordering::Relaxed)
    }
    /// New connections are accepted and closed at once.
    pub fn set_refuse_connections(&self, on: bool) {
        self.refuse_connections.store(on, Ordering::Relaxed);
    }
    pub fn refuse_connections(&self) -> bool {
        self.refuse_connections.load(Ordering::Relaxed)
    }
    /// Every authentication attempt fails, whatever the credentials.
    pub fn set_fail_auth(&self, on: bool) {
        self.fail_auth.store(on, Ordering::Relaxed);
    }
    pub fn fail_auth(&self) -> bool {
        self.fail_auth.load(Ordering::Relaxed)
    }
    /// Delay before answering STARTUP.
    pub fn set_handshake_delay(&self, d: Duration) {
        self.handshake_delay_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn handshake_delay(&self) -> Duration {
        Duration::from_millis(self.handshake_delay_ms.load(Ordering::Relaxed))
    }
    /// From its Nth request after authentication on, a connection answers with half a frame and
    /// closes (0 = never).
    pub fn set_cut_response_at(&self, n: u64) {
        self.cut_response_at.store(n, Ordering::Relaxed);
    }
    pub fn cut_response_at(&self) -> u64 {
        self.cut_response_at.load(Ordering::Relaxed)
    }
}
