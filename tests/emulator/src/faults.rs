//! Fault injection, adjustable while the emulator runs (tests hold the `Arc<Faults>`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::wire::writer::Out;

/// Which connections a disconnect fault cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    All,
    Conn(u64),
    Local(SocketAddr),
}

impl Cut {
    pub fn hits(self, conn: u64, local: SocketAddr) -> bool {
        match self {
            Cut::All => true,
            Cut::Conn(id) => id == conn,
            Cut::Local(addr) => addr == local,
        }
    }
}

#[derive(Debug)]
pub struct Faults {
    /// Bumped per fault, with the connections it cuts.
    disconnect: watch::Sender<(u64, Cut)>,
    latency_us: AtomicU64,
    close_after: AtomicU64,
    refuse_connections: AtomicBool,
    /// Addresses taken out of service: a connection accepted there just before is cut too.
    closed: std::sync::Mutex<Vec<SocketAddr>>,
    fail_auth: AtomicBool,
    handshake_delay_ms: AtomicU64,
    cut_response_at: AtomicU64,
    parked: std::sync::Mutex<Parked>,
}

/// Answers withheld by `hold_answers`: a test can count what a client of the emulator has
/// outstanding at once (a proxy's back-pressure) without racing a timer.
#[derive(Default)]
struct Parked {
    on: bool,
    answers: Vec<(mpsc::Sender<Out>, Out)>,
    most: usize,
}

impl std::fmt::Debug for Parked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parked")
            .field("on", &self.on)
            .field("answers", &self.answers.len())
            .field("most", &self.most)
            .finish()
    }
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            disconnect: watch::Sender::new((0, Cut::All)),
            latency_us: AtomicU64::new(0),
            close_after: AtomicU64::new(0),
            refuse_connections: AtomicBool::new(false),
            closed: std::sync::Mutex::new(Vec::new()),
            fail_auth: AtomicBool::new(false),
            handshake_delay_ms: AtomicU64::new(0),
            cut_response_at: AtomicU64::new(0),
            parked: std::sync::Mutex::new(Parked::default()),
        }
    }
}

impl Faults {
    /// Drops every open connection at once, mid-request if need be.
    pub fn disconnect_all(&self) {
        self.cut(Cut::All);
    }
    /// Drops one connection (its id in the event log), mid-request if need be: nothing queued
    /// on it is written any more.
    pub fn disconnect(&self, conn: u64) {
        self.cut(Cut::Conn(conn));
    }
    /// Drops every connection accepted on `local` (one of the emulator's addresses), and
    /// any accepted there later, until `reopen_local`.
    pub fn disconnect_local(&self, local: SocketAddr) {
        self.closed_addresses().push(local);
        self.cut(Cut::Local(local));
    }
    pub fn reopen_local(&self, local: SocketAddr) {
        self.closed_addresses().retain(|a| *a != local);
    }
    pub fn is_closed(&self, local: SocketAddr) -> bool {
        self.closed_addresses().contains(&local)
    }
    fn closed_addresses(&self) -> std::sync::MutexGuard<'_, Vec<SocketAddr>> {
        self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn cut(&self, which: Cut) {
        self.disconnect
            .send_modify(|(n, target)| (*n, *target) = (*n + 1, which));
    }
    pub fn disconnects(&self) -> watch::Receiver<(u64, Cut)> {
        self.disconnect.subscribe()
    }
    /// Added before every request's answer.
    pub fn set_latency(&self, d: Duration) {
        self.latency_us.store(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
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
    fn parked(&self) -> std::sync::MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// From now on every answer is withheld until `release_answers`.
    pub fn hold_answers(&self) {
        self.parked().on = true;
    }
    /// Sends every withheld answer, in the order they were withheld, and stops withholding.
    pub async fn release_answers(&self) {
        let answers = {
            let mut p = self.parked();
            p.on = false;
            std::mem::take(&mut p.answers)
        };
        for (to, out) in answers {
            // A writer that is gone (its connection was cut) drops the answer.
            let _ = to.send(out).await;
        }
    }
    /// Answers withheld right now.
    pub fn held_answers(&self) -> usize {
        self.parked().answers.len()
    }
    /// The most answers withheld at once since the emulator started.
    pub fn most_held_answers(&self) -> usize {
        self.parked().most
    }
    /// Withholds `out` if answers are being held; gives it back otherwise.
    pub fn park(&self, to: &mpsc::Sender<Out>, out: Out) -> Result<(), Out> {
        let mut p = self.parked();
        if !p.on {
            return Err(out);
        }
        p.answers.push((to.clone(), out));
        p.most = p.most.max(p.answers.len());
        Ok(())
    }
}
