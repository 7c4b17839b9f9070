//! Pooled mode: the client's requests are multiplexed over the shared upstream pool. Responses
//! come back through a per-client queue; this task rewrites what it must and writes them to the
//! client itself, coalescing whatever is ready into one write (no writer task per client).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::codec::FramedRead;

use super::client_stream::{ClientReader, ClientWriter};
use super::head_start::HeadStart;
use super::{buffered_client_frame, next_client_frame, split_client, ClientFramed};
use crate::context::ProxyContext;
use crate::frame::compression::compressed;
use crate::frame::header::holds_whole_frame;
use crate::frame::ProtocolVersion;
use crate::frame::{Compression, Frame, FrameCodec};
use crate::handshake::Accepted;
use crate::metrics::{metrics, Metrics, Reason};
use crate::route::{Route, Router};
use crate::upstream::affinity::Affinity;
use crate::upstream::pool::{Group, Pool};
use crate::upstream::streams::{ClientInbox, Pending, ReplyTo};
use crate::writer::FrameWriter;

pub(super) async fn forward(
    ctx: &ProxyContext,
    client: ClientFramed,
    accepted: Accepted,
    pool: Arc<Pool>,
    group: Arc<Group>,
    proxy_ip: IpAddr,
) {
    // Bounded twice: no more than `max_client_in_flight` requests are read ahead of their
    // answers, and a client whose unwritten answers pass its share of `client_buffers` is dropped.
    let inbox = ClientInbox::new(ctx.client_buffers.clone());
    PooledSession::new(ctx, client, &accepted, pool, group, proxy_ip, &inbox)
        .run()
        .await;
}

/// Requests routed from one read before `run` looks at answers and shutdown again.
const READ_BATCH: usize = 64;

/// Whether the session goes on after a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
}

/// One client connection multiplexed over the shared pool. The futures `run` waits on borrow
/// `ctx` and `inbox`, which this only refers to, so they can stay pinned across loop turns
/// while every handler takes `&mut self`.
struct PooledSession<'a> {
    ctx: &'a ProxyContext,
    /// Where the pool delivers this client's answers; every request in flight holds a clone.
    inbox: &'a Arc<ClientInbox>,
    router: Router,
    frames: FramedRead<ClientReader, FrameCodec>,
    out: FrameWriter<ClientWriter>,
    pool: Arc<Pool>,
    /// The connections of the client's current keyspace (`USE` changes it).
    group: Arc<Group>,
    affinity: Affinity,
    head_start: HeadStart,
    /// Requests sent upstream and not answered yet.
    in_flight: usize,
    /// Shutdown has begun, or the client sent something that ends its connection: nothing more
    /// is read, and the session ends once `in_flight` is 0.
    draining: bool,
    /// Why the connection ends, written after the answers to what the client sent before it.
    farewell: Option<Frame>,
    /// Reused across batches: taking the inbox swaps vectors, allocating nothing.
    batch: Vec<Frame>,
    /// When the socket read that brought the current request completed.
    read_at: Instant,
    version: ProtocolVersion,
    compression: Compression,
}

impl<'a> PooledSession<'a> {
    fn new(
        ctx: &'a ProxyContext,
        client: ClientFramed,
        accepted: &Accepted,
        pool: Arc<Pool>,
        group: Arc<Group>,
        proxy_ip: IpAddr,
        inbox: &'a Arc<ClientInbox>,
    ) -> PooledSession<'a> {
        let guard = ctx.consistency_guard.then(|| pool.prepared.clone());
        let router = Router::new(
            accepted.version,
            accepted.compression,
            Compression::None,
            proxy_ip,
            ctx.max_frame_len,
        )
        .host_id_seed(&ctx.host_id_seed)
        .split_use(true)
        .prepared(Some(pool.prepared.clone()))
        .consistency_guard(guard);
        let (frames, write) = split_client(client, ctx.max_frame_len);
        PooledSession {
            ctx,
            inbox,
            router,
            frames,
            out: FrameWriter::new(write, Some(metrics().client_sent_bytes.clone())),
            pool,
            group,
            affinity: Affinity::default(),
            head_start: HeadStart::new(&ctx.last_read),
            in_flight: 0,
            draining: false,
            farewell: None,
            batch: Vec::new(),
            read_at: Instant::now(),
            version: accepted.version,
            compression: accepted.compression,
        }
    }

    /// Serves the client until it leaves, fails, stops reading its answers, or has drained
    /// after shutdown began.
    async fn run(mut self) {
        // Copied out so the futures below borrow the context and the inbox, not `self`.
        let (ctx, inbox) = (self.ctx, self.inbox);
        // Created once: a fresh shutdown future each turn costs more than the work it guards.
        let stop = ctx.shutdown.begun();
        tokio::pin!(stop);
        // Polled across turns: a fresh `Notified` each turn would register and unregister a
        // waiter.
        let overflow = inbox.overflowed();
        tokio::pin!(overflow);
        // Re-armed after each wake-up; a response that arrives in between is not missed.
        let arrived = inbox.arrived();
        tokio::pin!(arrived);
        loop {
            if self.draining && self.in_flight == 0 {
                break;
            }
            let (may_read, draining) = (self.may_read(), self.draining);
            // Looked at before reading: a frame that is already buffered came with an earlier
            // socket read and shares its clock reading.
            let buffered = holds_whole_frame(self.frames.read_buffer());
            let flow = tokio::select! {
                _ = &mut stop, if !draining => self.drain(),
                _ = &mut overflow => self.on_overflow(),
                next = next_client_frame(&mut self.frames), if may_read => match next {
                    Ok(request) => self.on_requests(request, buffered).await,
                    Err(why) => self.close(why),
                },
                _ = &mut arrived => {
                    arrived.set(inbox.arrived());
                    self.flush_answers().await
                }
            };
            if flow == Flow::Close {
                break;
            }
        }
        self.finish().await;
    }

    /// Back-pressure: a client with `max_client_in_flight` requests unanswered is not read (TCP
    /// pushes back on it), nor one that is draining.
    fn may_read(&self) -> bool {
        !self.draining && self.in_flight < self.ctx.max_client_in_flight
    }

    fn drain(&mut self) -> Flow {
        self.draining = true;
        Flow::Continue
    }

    fn on_overflow(&self) -> Flow {
        not_reading(self.inbox);
        Flow::Close
    }

    /// Routes `first`, then the requests already whole in the read buffer behind it (up to
    /// `READ_BATCH`): they came with the same socket read, and a trip through `run`'s `select!`
    /// each cost more than routing them.
    async fn on_requests(&mut self, first: Frame, buffered: bool) -> Flow {
        let mut flow = self.on_request(first, buffered).await;
        for _ in 1..READ_BATCH {
            if flow != Flow::Continue || !self.may_read() {
                break;
            }
            flow = match buffered_client_frame(&mut self.frames) {
                None => break,
                Some(Ok(request)) => self.on_request(request, true).await,
                Some(Err(why)) => self.close(why),
            };
        }
        flow
    }

    /// Routes one client request: to the pool (answered later through the inbox), to another
    /// keyspace's connections (`USE`), or answered here.
    async fn on_request(&mut self, request: Frame, buffered: bool) -> Flow {
        if !buffered {
            self.read_at = Instant::now();
            self.head_start.read(&self.ctx.last_read, self.read_at);
        }
        let answer = match self.router.on_client_frame(request) {
            Route::Upstream(f) => {
                self.in_flight += 1;
                self.affinity.client_in_flight = self.in_flight;
                let pending = self.pending(f);
                let (pool, group) = (&self.pool, &self.group);
                // Most requests go out here, without building the waiting future.
                if let Err(p) = pool.try_dispatch_pinned(group, pending, &mut self.affinity) {
                    pool.dispatch_waiting(group, p).await;
                }
                if self
                    .head_start
                    .after_routing(self.in_flight, || group.in_flight())
                {
                    tokio::task::yield_now().await;
                }
                return Flow::Continue;
            }
            Route::Use { keyspace, frame } => {
                match switch_keyspace(&self.pool, self.version, &keyspace).await {
                    Ok(group) => {
                        self.group = group;
                        self.in_flight += 1;
                        let pending = self.pending(frame);
                        self.pool
                            .dispatch_from(&self.group, pending, &mut self.affinity)
                            .await;
                        return Flow::Continue;
                    }
                    Err(f) => compressed(f.with_stream(frame.stream()), self.compression),
                }
            }
            Route::Client(f) => f,
            Route::Close(f) => return self.close(Some(f)),
        };
        let inbox = self.inbox;
        if !wrote(inbox, self.out.push(&answer)).await || !wrote(inbox, self.out.flush()).await {
            return Flow::Close;
        }
        Flow::Continue
    }

    /// The pool's record of `request`: its answer comes back to this client's inbox.
    fn pending(&self, request: Frame) -> Pending {
        let reply = ReplyTo::Client {
            inbox: Arc::clone(self.inbox),
            stream: request.stream(),
        };
        Pending::received_at(request, reply, self.read_at)
    }

    /// Writes every answer that has arrived, with one flush: takes the inbox, rewrites each
    /// answer through the router, and yields once so answers on their way join the same write.
    async fn flush_answers(&mut self) -> Flow {
        let inbox = self.inbox;
        inbox.take_all(&mut self.batch);
        let mut failed = false;
        let mut yielded = false;
        while !self.batch.is_empty() {
            for frame in self.batch.drain(..) {
                self.in_flight = self.in_flight.saturating_sub(1);
                inbox.written(&frame);
                match self.router.on_upstream_frame(frame) {
                    // Small answers are only copied into the batch: no write, nothing to wait on.
                    Ok(Some(f)) if self.out.buffer(&f) => {}
                    Ok(Some(f)) => failed = !wrote(inbox, self.out.push(&f)).await,
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "undecodable upstream frame"),
                }
                if failed {
                    break;
                }
            }
            if failed || yielded || self.in_flight == 0 {
                break;
            }
            // More answers are on their way: let the upstream readers run once so
            // they go out in this write instead of one syscall each.
            yielded = true;
            tokio::task::yield_now().await;
            inbox.take_all(&mut self.batch);
        }
        self.batch.clear();
        if failed || !wrote(inbox, self.out.flush()).await {
            if inbox.is_overflowed() {
                not_reading(inbox);
            }
            return Flow::Close;
        }
        Flow::Continue
    }

    /// Ends the session, telling the client why when there is something to tell: after the
    /// answers to the requests it sent before (they are on their way upstream), so a bad frame
    /// costs the client only itself. A client that has gone (`None`) is not waited for.
    fn close(&mut self, why: Option<Frame>) -> Flow {
        let Some(f) = why else {
            return Flow::Close;
        };
        self.farewell = Some(f);
        if self.in_flight > 0 {
            self.draining = true;
            return Flow::Continue;
        }
        Flow::Close
    }

    async fn finish(mut self) {
        let inbox = self.inbox;
        if let Some(f) = self.farewell.take() {
            let _ = wrote(inbox, self.out.push(&f)).await && wrote(inbox, self.out.flush()).await;
        }
        let _ = self.out.shutdown().await;
    }
}

/// Runs one write to the client; false if it failed or the client's inbox overflowed while it
/// was blocked (a client that does not read would otherwise hold this task forever).
async fn wrote(
    inbox: &ClientInbox,
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> bool {
    tokio::select! {
        biased;
        r = write => r.is_ok(),
        _ = inbox.overflowed() => false,
    }
}

fn not_reading(inbox: &ClientInbox) {
    tracing::warn!(
        queued_bytes = inbox.queued_bytes(),
        "closing a client that does not read its responses (--max-client-buffer reached)"
    );
    Metrics::count(
        &metrics().client_closed,
        Reason {
            reason: "not_reading",
        },
    );
}

async fn switch_keyspace(
    pool: &Pool,
    version: ProtocolVersion,
    keyspace: &str,
) -> Result<Arc<Group>, Frame> {
    pool.group(version, Some(keyspace))
        .await
        .map_err(|e| e.reply().frame(version, 0))
}
