//! One multiplexed, authenticated upstream connection shared by many clients: requests from
//! anyone get a free upstream stream id; responses are routed back by it.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use futures_util::StreamExt;
use tokio::io::AsyncRead;
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

use super::connection::{UpstreamError, UpstreamTarget};
pub use super::owner::{Closure, ConnOwner};
use super::streams::{Pending, StreamTable, TokenBucket};
use crate::frame::codec::next_buffered;
use crate::frame::messages::{self, consistency, ErrorInfo};
use crate::frame::result::{kind, result_kind};
use crate::frame::types::Reader;
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Compression, FrameCodec};
use crate::metrics::metrics;
use crate::queue::FrameQueue;
use crate::writer::write_queued;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnState {
    Ready = 0,
    /// Takes no new requests; closes once the last one is answered.
    Draining = 1,
    Dead = 2,
}

pub struct MuxConn {
    pub id: u64,
    pub version: ProtocolVersion,
    pub keyspace: Option<Arc<str>>,
    pub created: Instant,
    /// The endpoint address it is connected to.
    pub address: super::addresses::AddressLease,
    /// When the credentials that signed this connection expire (STS), if they do.
    pub credentials_expiry: Option<SystemTime>,
    /// Unbounded: at most one queued frame per stream id in the table.
    writer: Arc<FrameQueue>,
    table: Mutex<StreamTable>,
    bucket: Mutex<TokenBucket>,
    in_flight: AtomicUsize,
    /// Stream ids free to use (mirrors the table, read without its lock).
    free: AtomicUsize,
    /// No rate budget: the bucket is never consulted.
    unlimited: bool,
    state: AtomicU8,
    sent: AtomicU64,
    /// Client sessions whose requests prefer this connection (see `upstream::affinity`).
    affine: AtomicUsize,
    cancel: CancellationToken,
    /// Set with `cancel`: read once per answer, where the token's own check takes a lock.
    closing: AtomicBool,
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn")
            .field("id", &self.id)
            .field("keyspace", &self.keyspace)
            .field("in_flight", &self.in_flight())
            .field("state", &self.state())
            .finish()
    }
}

/// Everything needed to open a connection for a pool.
pub struct OpenParams {
    pub id: u64,
    pub version: ProtocolVersion,
    pub keyspace: Option<Arc<str>>,
    pub max_streams: usize,
    pub max_rate: u32,
}

impl MuxConn {
    /// Connects, authenticates, switches to `keyspace` if any, and starts the I/O tasks.
    pub async fn open(
        target: &UpstreamTarget,
        params: OpenParams,
        owner: Arc<dyn ConnOwner>,
    ) -> Result<Arc<MuxConn>, UpstreamError> {
        let mut up = target.connect(params.version, Compression::None).await?;
        if let Some(ks) = &params.keyspace {
            use_keyspace(&mut up.framed, params.version, ks).await?;
        }
        let credentials_expiry = match &target.auth {
            super::UpstreamAuth::SigV4 { credentials, .. } => {
                credentials.expires_in().map(|d| SystemTime::now() + d)
            }
            super::UpstreamAuth::Plain { .. } => None,
        };
        let parts = up.framed.into_parts();
        let (read, write) = tokio::io::split(parts.io);
        let mut reader = FramedRead::new(read, FrameCodec::new(target.max_frame_len));
        reader.read_buffer_mut().extend_from_slice(&parts.read_buf);
        let queue = Arc::new(FrameQueue::new());
        let conn = Arc::new(MuxConn::new(
            params,
            up.address,
            credentials_expiry,
            queue.clone(),
        ));
        let writer = tokio::spawn(write_queued(queue, write));
        let me = conn.clone();
        tokio::spawn(async move {
            let how = relay_answers(&me, &mut reader, owner.as_ref()).await;
            me.mark_dead();
            writer.abort();
            let in_flight = me.drain_table();
            owner.on_closed(&me, in_flight, how);
        });
        Ok(conn)
    }

    /// A connection whose frames go to `writer`, with no I/O of its own yet.
    fn new(
        params: OpenParams,
        address: super::addresses::AddressLease,
        credentials_expiry: Option<SystemTime>,
        writer: Arc<FrameQueue>,
    ) -> MuxConn {
        let now = Instant::now();
        MuxConn {
            id: params.id,
            version: params.version,
            keyspace: params.keyspace,
            created: now,
            address,
            credentials_expiry,
            writer,
            table: Mutex::new(StreamTable::new(params.max_streams)),
            bucket: Mutex::new(TokenBucket::new(params.max_rate, now)),
            in_flight: AtomicUsize::new(0),
            free: AtomicUsize::new(params.max_streams.clamp(1, 32768)),
            unlimited: params.max_rate == 0,
            state: AtomicU8::new(ConnState::Ready as u8),
            sent: AtomicU64::new(0),
            affine: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            closing: AtomicBool::new(false),
        }
    }

    /// A connection to `addr` with no socket and no I/O task, for tests of what it decides:
    /// what it sends is left in the returned queue, and `mark_dead` stands for its socket
    /// closing.
    #[cfg(test)]
    pub(super) fn detached(
        params: OpenParams,
        addr: std::net::SocketAddr,
    ) -> (Arc<MuxConn>, Arc<FrameQueue>) {
        let book = Arc::new(super::addresses::AddressBook::new("127.0.0.1:9142"));
        let queue = Arc::new(FrameQueue::new());
        let conn = MuxConn::new(params, book.lease(addr), None, queue.clone());
        (Arc::new(conn), queue)
    }

    /// A detached, ready v4 connection with no keyspace, 8 stream ids and no rate budget, to
    /// `addr`: what the pool's choosing tests need.
    #[cfg(test)]
    pub(super) fn idle_for_tests(id: u64, addr: std::net::SocketAddr) -> Arc<MuxConn> {
        let params = OpenParams {
            id,
            version: crate::frame::ProtocolVersion::V4,
            keyspace: None,
            max_streams: 8,
            max_rate: 0,
        };
        MuxConn::detached(params, addr).0
    }

    /// The socket has closed: no more requests, and the address counts it no more.
    fn mark_dead(&self) {
        self.state.store(ConnState::Dead as u8, Ordering::Release);
        self.address.release();
    }

    /// Every request in flight, taken out of the table (the connection has died).
    fn drain_table(&self) -> Vec<Pending> {
        let mut t = self.lock_table();
        let drained = t.drain();
        self.mirror(&t);
        drained
    }

    fn mirror(&self, t: &StreamTable) {
        self.in_flight.store(t.in_flight(), Ordering::Release);
        self.free.store(t.free_count(), Ordering::Release);
    }

    fn lock_table(&self) -> MutexGuard<'_, StreamTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ConnState {
        match self.state.load(Ordering::Acquire) {
            0 => ConnState::Ready,
            1 => ConnState::Draining,
            _ => ConnState::Dead,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state() == ConnState::Ready
    }

    pub fn drain(&self) {
        let _ = self.state.compare_exchange(
            ConnState::Ready as u8,
            ConnState::Draining as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.cancel.cancel();
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn affine(&self) -> usize {
        self.affine.load(Ordering::Relaxed)
    }

    pub(super) fn pin(&self) {
        self.affine.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn unpin(&self) {
        self.affine.fetch_sub(1, Ordering::Relaxed);
    }

    /// Requests sent so far (for rate accounting).
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Takes a send permit from the rate limiter, if one is available now.
    pub fn try_acquire(&self) -> bool {
        if self.unlimited {
            return true;
        }
        self.bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_take(Instant::now())
    }

    pub fn wait_time(&self) -> std::time::Duration {
        self.bucket
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .wait_time(Instant::now())
    }

    pub fn has_free_stream(&self) -> bool {
        self.free.load(Ordering::Acquire) > 0
    }

    /// Sends a request; gives it back if this connection cannot take it.
    pub fn send(&self, pending: Pending) -> Result<(), Pending> {
        if self.state() == ConnState::Dead {
            return Err(pending);
        }
        let mut frame = pending.request.clone();
        let id = {
            let mut t = self.lock_table();
            let id = t.insert(pending)?;
            self.mirror(&t);
            id
        };
        frame.header.stream = id;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let sent = self.writer.push(frame).map_err(|_| ());
        if sent.is_err() {
            // The writer is gone: stop choosing this connection at once (the pool would otherwise
            // retry on it until the reader notices), close it, and take our request back.
            self.drain();
            self.close();
            let mut t = self.lock_table();
            let p = t.take(id);
            self.mirror(&t);
            return p.map_or(Ok(()), Err);
        }
        Ok(())
    }

    /// The request a response answers, removing it from the table.
    pub fn take(&self, stream: i16) -> Option<Pending> {
        let mut t = self.lock_table();
        let p = t.take(stream);
        self.mirror(&t);
        p
    }

    /// The backstop behind the router's `USE` handling (`result`: a RESULT's message body): a
    /// SET_KEYSPACE answer naming another
    /// keyspace than this connection was opened for means some request switched the keyspace
    /// of every client sharing it. However it was spelt, the connection leaves rotation at
    /// once; its in-flight requests fail (reads are retried elsewhere) rather than be answered
    /// from the wrong keyspace.
    pub fn close_if_keyspace_switched(&self, result: &[u8]) {
        if result_kind(result).ok() != Some(kind::SET_KEYSPACE) {
            return;
        }
        let switched_to = result
            .get(4..)
            .and_then(|rest| Reader::new(rest).string().ok());
        if switched_to.is_some() && switched_to == self.keyspace.as_deref() {
            return;
        }
        metrics().keyspace_switches.inc();
        tracing::error!(
            conn = self.id,
            opened_for = self.keyspace.as_deref().unwrap_or("-"),
            "a request switched a shared upstream connection's keyspace; closing it"
        );
        self.close();
    }

    /// Requests in flight longer than `timeout` (answered by the caller).
    pub fn expire(&self, timeout: std::time::Duration) -> Vec<Pending> {
        let mut t = self.lock_table();
        let out = t.expire(Instant::now(), timeout);
        self.mirror(&t);
        out
    }
}

/// Hands every frame the upstream sends to `owner` until the connection fails, closes, or is
/// closed by us (`MuxConn::close`).
async fn relay_answers<R: AsyncRead + Unpin>(
    me: &Arc<MuxConn>,
    reader: &mut FramedRead<R, FrameCodec>,
    owner: &dyn ConnOwner,
) -> Closure {
    let mut answered = false;
    let ended = |by_upstream, answered| Closure {
        by_upstream,
        asked: me.sent() > 0,
        answered,
        lived: me.created.elapsed(),
    };
    // Polled across frames: a fresh one per frame would register a waiter each time.
    let cancelled = me.cancel.clone().cancelled_owned();
    tokio::pin!(cancelled);
    let mut received = Instant::now();
    loop {
        // An answer that closed the connection (it switched the keyspace) ends it here: the
        // frames that came after it in the same read are not relayed.
        if me.closing.load(Ordering::Acquire) {
            return ended(false, answered);
        }
        // Frames already whole in the buffer came with the same read: they are taken without a
        // `select!` turn each, and one clock reading serves them all (read per frame, it was a
        // visible share of the profile).
        let next = match next_buffered(reader) {
            Some(next) => Some(next),
            None => {
                let next = tokio::select! {
                    next = reader.next() => next,
                    _ = &mut cancelled => return ended(false, answered),
                };
                received = Instant::now();
                next
            }
        };
        match next {
            Some(Ok(frame)) => {
                if !answered {
                    answered = true;
                    owner.on_first_answer(me);
                }
                owner.on_response(me, frame, received)
            }
            Some(Err(e)) => {
                tracing::warn!(conn = me.id, error = %e, "upstream read failed");
                return ended(true, answered);
            }
            None => {
                tracing::info!(conn = me.id, "upstream closed the connection");
                return ended(true, answered);
            }
        }
    }
}

async fn use_keyspace(
    framed: &mut super::connection::UpstreamFramed,
    version: ProtocolVersion,
    keyspace: &str,
) -> Result<(), UpstreamError> {
    let quoted = format!("USE \"{}\"", keyspace.replace('"', "\"\""));
    let f = super::connection::roundtrip(
        framed,
        messages::query(version, 0, &quoted, consistency::ONE),
    )
    .await?;
    if f.opcode() == opcode::RESULT && result_kind(&f.body).ok() == Some(kind::SET_KEYSPACE) {
        return Ok(());
    }
    Err(match ErrorInfo::parse(&f.body) {
        Ok(info) if f.opcode() == opcode::ERROR => UpstreamError::UseFailed(info),
        _ => UpstreamError::Protocol(format!("unexpected {} to USE", opcode::name(f.opcode()))),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use crate::frame::Frame;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;
    use crate::frame::messages;
    use crate::upstream::streams::ReplyTo;

    fn conn(max_streams: usize, keyspace: Option<&str>) -> (Arc<MuxConn>, Arc<FrameQueue>) {
        let params = OpenParams {
            id: 1,
            version: ProtocolVersion::V4,
            keyspace: keyspace.map(Arc::from),
            max_streams,
            max_rate: 0,
        };
        MuxConn::detached(params, SocketAddr::from(([127, 0, 1, 1], 9142)))
    }

    /// A request the client sent on its stream `stream`.
    fn request(stream: i16) -> Pending {
        let (tx, _) = oneshot::channel();
        Pending::new(
            messages::options(ProtocolVersion::V4, stream),
            ReplyTo::Internal(tx),
        )
    }

    /// The frames the connection handed to its writer.
    fn written(queue: &FrameQueue) -> Vec<Frame> {
        let mut frames = Vec::new();
        queue.take_all(&mut frames);
        frames
    }

    #[test]
    fn a_request_goes_out_on_a_stream_id_that_its_answer_finds_it_by() {
        let (c, queue) = conn(8, None);
        c.send(request(42)).unwrap();
        c.send(request(43)).unwrap();
        let streams: Vec<i16> = written(&queue).iter().map(Frame::stream).collect();
        assert_eq!(streams, [0, 1], "upstream ids, not the clients'");
        assert_eq!((c.in_flight(), c.sent()), (2, 2));
        let answered = c.take(1).expect("in flight on stream 1");
        assert_eq!(
            answered.request.stream(),
            43,
            "the request as the client sent it"
        );
        assert!(c.take(1).is_none(), "answered once");
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn a_full_table_gives_the_request_back() {
        let (c, queue) = conn(1, None);
        c.send(request(1)).unwrap();
        assert!(!c.has_free_stream());
        let back = c.send(request(2)).expect_err("no stream id left");
        assert_eq!(back.request.stream(), 2);
        assert_eq!(written(&queue).len(), 1);
        assert_eq!((c.in_flight(), c.sent()), (1, 1));
    }

    #[test]
    fn a_dead_connection_refuses_requests_and_gives_back_those_in_flight() {
        let (c, _queue) = conn(4, None);
        c.send(request(1)).unwrap();
        c.mark_dead();
        assert_eq!(c.state(), ConnState::Dead);
        assert!(c.send(request(2)).is_err());
        let lost = c.drain_table();
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].request.stream(), 1);
        assert_eq!((c.in_flight(), c.has_free_stream()), (0, true));
        c.drain();
        assert_eq!(c.state(), ConnState::Dead, "draining never revives it");
    }

    #[test]
    fn a_connection_whose_writer_is_gone_leaves_rotation_and_gives_the_request_back() {
        let (c, queue) = conn(4, None);
        queue.close();
        let back = c
            .send(request(7))
            .expect_err("nothing writes to the socket");
        assert_eq!(back.request.stream(), 7);
        assert_eq!(c.state(), ConnState::Draining);
        assert!(c.cancel.is_cancelled(), "closed");
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_draining_connection_is_not_ready_but_still_sends_what_it_is_given() {
        let (c, queue) = conn(4, None);
        assert!(c.is_ready());
        c.drain();
        assert_eq!(c.state(), ConnState::Draining);
        assert!(!c.is_ready());
        // Only a dead one refuses: a request that chose it just before it drained still goes.
        c.send(request(1)).unwrap();
        assert_eq!(written(&queue).len(), 1);
    }

    #[test]
    fn an_expired_request_keeps_its_id_until_the_late_answer() {
        let (c, _queue) = conn(1, None);
        c.send(request(5)).unwrap();
        assert!(c.expire(Duration::from_secs(60)).is_empty());
        let expired = c.expire(Duration::ZERO);
        assert_eq!(expired.len(), 1);
        assert_eq!(expired[0].request.stream(), 5);
        assert_eq!(c.in_flight(), 0);
        assert!(!c.has_free_stream(), "its id waits for the late answer");
        assert!(c.take(0).is_none(), "the late answer goes nowhere");
        assert!(c.has_free_stream());
    }

    /// Records the streams it is handed and, as the pool does, closes a connection whose
    /// keyspace an answer switched.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<i16>>);

    impl ConnOwner for Recorder {
        fn on_response(&self, conn: &Arc<MuxConn>, frame: Frame, _: Instant) {
            conn.close_if_keyspace_switched(&frame.body);
            self.0.lock().unwrap().push(frame.stream());
        }
        fn on_first_answer(&self, _: &Arc<MuxConn>) {}
        fn on_closed(&self, _: &Arc<MuxConn>, _: Vec<Pending>, _: Closure) {}
    }

    #[tokio::test]
    async fn answers_after_a_keyspace_switch_in_the_same_read_are_not_relayed() {
        use tokio::io::AsyncWriteExt;
        let (c, _queue) = conn(4, Some("shop"));
        let v4 = ProtocolVersion::V4;
        let mut bytes = Vec::new();
        for f in [
            messages::result_void(v4, 0),
            messages::result_set_keyspace(v4, 1, "other"),
            messages::result_void(v4, 2),
        ] {
            bytes.extend_from_slice(&f.to_bytes());
        }
        let (mut upstream, rx) = tokio::io::duplex(1 << 16);
        upstream.write_all(&bytes).await.unwrap();
        let mut reader = FramedRead::new(rx, FrameCodec::new(1 << 20));
        let owner = Recorder::default();
        tokio::time::timeout(
            Duration::from_secs(5),
            relay_answers(&c, &mut reader, &owner),
        )
        .await
        .expect("ends at the switch");
        assert_eq!(*owner.0.lock().unwrap(), [0, 1], "nothing after the switch");
    }

    /// Whether a connection opened for `opened_for` closes on the RESULT `result`.
    fn closes_on(opened_for: Option<&str>, result: Frame) -> bool {
        let (c, _queue) = conn(4, opened_for);
        c.close_if_keyspace_switched(&result.body);
        c.cancel.is_cancelled()
    }

    #[test]
    fn a_switch_to_another_keyspace_closes_the_connection() {
        let set = |ks| messages::result_set_keyspace(ProtocolVersion::V4, 0, ks);
        assert!(closes_on(Some("shop"), set("other")));
        assert!(closes_on(None, set("shop")), "a shared connection has none");
        assert!(!closes_on(Some("shop"), set("shop")));
        assert!(!closes_on(
            Some("shop"),
            messages::result_void(ProtocolVersion::V4, 0)
        ));
    }
}
