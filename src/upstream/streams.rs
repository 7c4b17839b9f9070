//! Per-connection bookkeeping for multiplexing: which upstream stream ids are in flight, for
//! whom, and how fast requests may be sent. Pure data structures, unit-tested without sockets.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Notify};

use crate::frame::header::HEADER_LEN;
use crate::frame::Frame;
use crate::queue::FrameQueue;

/// The bytes of unwritten responses clients may pin: each (`--max-client-buffer`) and all
/// together (`--max-total-client-buffer`), so neither one slow reader nor many can take the
/// process past its memory limit.
#[derive(Debug)]
pub struct ClientBuffers {
    per_client: usize,
    total: usize,
    used: AtomicUsize,
}

impl ClientBuffers {
    pub fn new(per_client: usize, total: usize) -> Arc<ClientBuffers> {
        Arc::new(ClientBuffers {
            per_client: per_client.max(1),
            total: total.max(1),
            used: AtomicUsize::new(0),
        })
    }

    /// Bytes pinned by every client together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Responses waiting to be written to one client, with the bytes they hold.
///
/// Upstream readers serve many clients and must never wait for one, so a client that stops
/// reading cannot be slowed down from here: once its unwritten responses pass its share it is
/// marked overflowed and its session closes the connection, which bounds the memory clients
/// can pin. A client's share is `per_client`, and less while all clients together hold
/// `total`: then any client already holding a response is cut on its next one.
#[derive(Debug)]
pub struct ClientInbox {
    queue: FrameQueue,
    queued: AtomicUsize,
    buffers: Arc<ClientBuffers>,
    overflowed: AtomicBool,
    wake: Notify,
}

impl Drop for ClientInbox {
    fn drop(&mut self) {
        // Responses never written go with the inbox: their bytes are free for others.
        let left = self.queued.load(Ordering::Acquire);
        self.buffers.used.fetch_sub(left, Ordering::AcqRel);
    }
}

impl ClientInbox {
    pub fn new(buffers: Arc<ClientBuffers>) -> Arc<ClientInbox> {
        Arc::new(ClientInbox {
            queue: FrameQueue::new(),
            queued: AtomicUsize::new(0),
            buffers,
            overflowed: AtomicBool::new(false),
            wake: Notify::new(),
        })
    }

    /// Moves every queued response to the end of `into` (see `FrameQueue::take_all`).
    pub fn take_all(&self, into: &mut Vec<Frame>) {
        self.queue.take_all(into);
    }

    /// Resolves after a response arrives in an empty inbox (spurious wake-ups are possible).
    pub fn arrived(&self) -> tokio::sync::futures::Notified<'_> {
        self.queue.notified()
    }

    fn push(&self, frame: Frame) {
        let len = HEADER_LEN + frame.body.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        let all = self.buffers.used.fetch_add(len, Ordering::AcqRel);
        // One response is always accepted, however large (the frame limit bounds it).
        let over = before + len > self.buffers.per_client || all + len > self.buffers.total;
        if before > 0 && over {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.buffers.used.fetch_sub(len, Ordering::AcqRel);
            if !self.overflowed.swap(true, Ordering::AcqRel) {
                // Every waiter: the session's loop and a write it is blocked in each wait.
                self.wake.notify_waiters();
            }
            return;
        }
        // Never closed: the session owning the inbox is its only consumer.
        let _ = self.queue.push(frame);
    }

    /// The session has written (or dropped) `frame`: its bytes no longer count.
    pub fn written(&self, frame: &Frame) {
        let len = HEADER_LEN + frame.body.len();
        self.queued.fetch_sub(len, Ordering::AcqRel);
        self.buffers.used.fetch_sub(len, Ordering::AcqRel);
    }

    /// Bytes of responses not yet written to the client.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Resolves once a response had to be dropped because the client was not reading. Any
    /// number may wait at once (`notify_waiters` stores no permit: each registers before it
    /// looks at the flag, so an overflow in between is not missed).
    pub async fn overflowed(&self) {
        loop {
            let notified = self.wake.notified();
            if self.is_overflowed() {
                return;
            }
            notified.await;
        }
    }
}

/// Where a response goes once its upstream stream id comes back.
#[derive(Debug)]
pub enum ReplyTo {
    /// A client connection; the response is given the client's own stream id.
    Client {
        inbox: Arc<ClientInbox>,
        stream: i16,
    },
    /// The proxy itself (heartbeats, re-prepares).
    Internal(oneshot::Sender<Frame>),
}

impl ReplyTo {
    /// Delivers `frame` to its requester. A client that has gone away is not an error.
    pub fn deliver(self, mut frame: Frame) {
        match self {
            ReplyTo::Client { inbox, stream } => {
                frame.header.stream = stream;
                inbox.push(frame);
            }
            ReplyTo::Internal(tx) => {
                let _ = tx.send(frame);
            }
        }
    }

    /// The client's stream id, if this is a client request.
    pub fn client_stream(&self) -> Option<i16> {
        match self {
            ReplyTo::Client { stream, .. } => Some(*stream),
            ReplyTo::Internal(_) => None,
        }
    }
}

/// A request in flight on an upstream connection.
#[derive(Debug)]
pub struct Pending {
    /// The request as sent (uncompressed), kept for a transparent retry or re-prepare.
    pub request: Frame,
    pub reply: ReplyTo,
    pub sent_at: Instant,
    /// How many times the proxy has already retried this request.
    pub attempt: u8,
}

impl Pending {
    pub fn new(request: Frame, reply: ReplyTo) -> Pending {
        Pending::received_at(request, reply, Instant::now())
    }

    /// A client request read at `at`: frames that arrived in one socket read share one clock
    /// reading (one per request was a visible share of the profile).
    pub fn received_at(request: Frame, reply: ReplyTo, at: Instant) -> Pending {
        Pending {
            request,
            reply,
            sent_at: at,
            attempt: 0,
        }
    }
}

#[derive(Debug)]
enum Slot {
    Free,
    Busy(Pending),
    /// Answered locally after a timeout; the id is reused only once the late response arrives.
    Orphaned,
}

/// Stream ids of one upstream connection.
#[derive(Debug)]
pub struct StreamTable {
    slots: Vec<Slot>,
    free: Vec<i16>,
    busy: usize,
}

impl StreamTable {
    /// `capacity` ids, 0..capacity (at most 32768, the protocol's limit).
    pub fn new(capacity: usize) -> StreamTable {
        let capacity = capacity.clamp(1, 32768);
        StreamTable {
            slots: (0..capacity).map(|_| Slot::Free).collect(),
            // Pop from the end: low ids first, which keeps a lightly used table compact.
            free: (0..capacity as i32).rev().map(|i| i as i16).collect(),
            busy: 0,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.busy
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Registers `p`; returns its stream id, or gives it back when every id is taken.
    pub fn insert(&mut self, p: Pending) -> Result<i16, Pending> {
        let Some(id) = self.free.pop() else {
            return Err(p);
        };
        self.slots[id as usize] = Slot::Busy(p);
        self.busy += 1;
        Ok(id)
    }

    /// The request a response on `stream` answers; `None` for unknown or orphaned ids.
    pub fn take(&mut self, stream: i16) -> Option<Pending> {
        let slot = self.slots.get_mut(usize::try_from(stream).ok()?)?;
        match std::mem::replace(slot, Slot::Free) {
            Slot::Busy(p) => {
                self.busy -= 1;
                self.free.push(stream);
                Some(p)
            }
            Slot::Orphaned => {
                self.free.push(stream);
                None
            }
            Slot::Free => None,
        }
    }

    /// Everything in flight (the connection died).
    pub fn drain(&mut self) -> Vec<Pending> {
        let mut out = Vec::with_capacity(self.busy);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Busy(p) = std::mem::replace(slot, Slot::Free) {
                out.push(p);
                self.free.push(i as i16);
            }
        }
        self.busy = 0;
        out
    }

    /// Requests older than `timeout`; their ids stay reserved until the upstream answers.
    pub fn expire(&mut self, now: Instant, timeout: Duration) -> Vec<Pending> {
        let mut out = Vec::new();
        for slot in self.slots.iter_mut() {
            let expired = matches!(slot, Slot::Busy(p) if now.duration_since(p.sent_at) >= timeout);
            if expired {
                if let Slot::Busy(p) = std::mem::replace(slot, Slot::Orphaned) {
                    self.busy -= 1;
                    out.push(p);
                }
            }
        }
        out
    }
}

/// A token bucket: `rate` requests per second with a burst of a tenth of a second, so no
/// one-second window anywhere sees more than about 1.1 × rate.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` of 0 means unlimited.
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        let burst = (f64::from(rate) / 10.0).max(1.0);
        TokenBucket {
            rate: f64::from(rate),
            burst,
            tokens: burst,
            last: now,
        }
    }

    pub fn unlimited(&self) -> bool {
        self.rate == 0.0
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.unlimited() {
            return true;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until one token is available.
    pub fn wait_time(&mut self, now: Instant) -> Duration {
        if self.unlimited() {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::messages;
    use crate::frame::ProtocolVersion;

    fn pending() -> (Pending, oneshot::Receiver<Frame>) {
        let (tx, rx) = oneshot::channel();
        (
            Pending::new(
                messages::options(ProtocolVersion::V4, 0),
                ReplyTo::Internal(tx),
            ),
            rx,
        )
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_overflows_its_inbox() {
        let inbox = ClientInbox::new(ClientBuffers::new(100, 1 << 20));
        let big = Frame::new(
            messages::ready(ProtocolVersion::V4, 0).header,
            bytes::Bytes::from(vec![0u8; 300]),
        );
        let reply = |s| ReplyTo::Client {
            inbox: inbox.clone(),
            stream: s,
        };
        reply(1).deliver(big.clone()); // the first one always fits
        assert!(!inbox.is_overflowed());
        reply(2).deliver(messages::ready(ProtocolVersion::V4, 0)); // 300+ bytes already queued: dropped
        assert!(inbox.is_overflowed());
        inbox.overflowed().await; // resolves at once
        let mut got = Vec::new();
        inbox.take_all(&mut got);
        assert_eq!(got.len(), 1, "the overflowing response was not queued");
        assert_eq!(got[0].stream(), 1);
        inbox.written(&got[0]);
        assert_eq!(inbox.queued_bytes(), 0);
    }

    /// The session waits for an overflow in its loop and, while blocked writing to the client,
    /// in that write too: both must wake (with one woken, a session stuck writing to a client
    /// that reads nothing was never cut).
    #[test]
    fn every_waiter_sees_the_overflow() {
        use std::future::Future;
        let inbox = ClientInbox::new(ClientBuffers::new(100, 1 << 20));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let (loop_wait, write_wait) = (inbox.overflowed(), inbox.overflowed());
        tokio::pin!(loop_wait, write_wait);
        assert!(loop_wait.as_mut().poll(&mut cx).is_pending());
        assert!(write_wait.as_mut().poll(&mut cx).is_pending());
        let big = Frame::new(
            messages::ready(ProtocolVersion::V4, 0).header,
            bytes::Bytes::from(vec![0u8; 300]),
        );
        for stream in [1, 2] {
            ReplyTo::Client {
                inbox: inbox.clone(),
                stream,
            }
            .deliver(big.clone());
        }
        assert!(inbox.is_overflowed());
        assert!(loop_wait.as_mut().poll(&mut cx).is_ready());
        assert!(write_wait.as_mut().poll(&mut cx).is_ready(), "both woken");
        let later = inbox.overflowed();
        tokio::pin!(later);
        assert!(later.poll(&mut cx).is_ready(), "and any later one");
    }

    /// Many slow readers, each within its own limit, cannot pin more than the total: once all
    /// together hold it, a client already holding a response is cut on its next one; bytes of
    /// a closed client's inbox count no more.
    #[test]
    fn all_clients_together_stay_within_the_total() {
        let buffers = ClientBuffers::new(1 << 20, 1000);
        let frame = Frame::new(
            messages::ready(ProtocolVersion::V4, 0).header,
            bytes::Bytes::from(vec![0u8; 291]),
        ); // 300 bytes with its header
        let inboxes: Vec<_> = (0..4).map(|_| ClientInbox::new(buffers.clone())).collect();
        let deliver = |i: usize| {
            ReplyTo::Client {
                inbox: inboxes[i].clone(),
                stream: 1,
            }
            .deliver(frame.clone())
        };
        for i in 0..4 {
            deliver(i); // a first response always fits: 1200 bytes in all
        }
        assert_eq!(buffers.used(), 1200);
        deliver(0);
        assert!(
            inboxes[0].is_overflowed(),
            "over the total, holding one already"
        );
        assert_eq!(buffers.used(), 1200);
        drop(inboxes);
        assert_eq!(buffers.used(), 0, "closed clients' bytes are free again");
    }

    #[test]
    fn ids_are_allocated_and_recycled() {
        let mut t = StreamTable::new(2);
        let a = t.insert(pending().0).unwrap();
        let b = t.insert(pending().0).unwrap();
        assert_eq!((a, b), (0, 1));
        assert!(t.insert(pending().0).is_err());
        assert!(t.take(a).is_some());
        assert!(t.take(a).is_none(), "a response for a free id is ignored");
        assert_eq!(t.insert(pending().0).unwrap(), 0);
        assert_eq!(t.in_flight(), 2);
        assert!(t.take(-1).is_none() && t.take(500).is_none());
    }

    #[test]
    fn expired_ids_wait_for_the_late_response() {
        let mut t = StreamTable::new(1);
        let id = t.insert(pending().0).unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(t.expire(later, Duration::from_secs(10)).len(), 1);
        assert_eq!(t.in_flight(), 0);
        assert!(!t.has_free(), "the orphaned id is not reused yet");
        assert!(t.take(id).is_none());
        assert!(t.has_free());
    }

    #[test]
    fn drain_returns_everything() {
        let mut t = StreamTable::new(8);
        for _ in 0..5 {
            t.insert(pending().0).unwrap();
        }
        assert_eq!(t.drain().len(), 5);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn delivery_restores_the_client_stream() {
        let inbox = ClientInbox::new(ClientBuffers::new(1 << 20, 1 << 30));
        let reply = ReplyTo::Client {
            inbox: inbox.clone(),
            stream: 77,
        };
        reply.deliver(messages::ready(ProtocolVersion::V4, 3));
        let mut got = Vec::new();
        inbox.take_all(&mut got);
        assert_eq!(got[0].stream(), 77);
    }

    #[test]
    fn bucket_limits_rate_with_small_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        let burst = (0..100).filter(|_| b.try_take(t0)).count();
        assert_eq!(burst, 10);
        assert!(b.wait_time(t0) > Duration::ZERO);
        let t1 = t0 + Duration::from_millis(500);
        let more = (0..100).filter(|_| b.try_take(t1)).count();
        assert_eq!(more, 10, "refill is capped at the burst");
        let mut free = TokenBucket::new(0, t0);
        assert!((0..10_000).all(|_| free.try_take(t0)));
    }
}
