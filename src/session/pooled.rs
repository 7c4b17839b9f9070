//! Pooled mode: the client's requests are multiplexed over the shared upstream pool. Responses
//! come back through a per-client queue; this task rewrites what it must and writes them to the
//! client itself, coalescing whatever is ready into one write (no writer task per client).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::client_stream::ClientWriter;
use super::{next_client_frame, split_client, upstream_error_frame, ClientFramed, ProxyContext};
use crate::frame::compression::compressed;
use crate::frame::header::holds_whole_frame;
use crate::frame::{Compression, Frame};
use crate::handshake::Accepted;
use crate::metrics::{metrics, Metrics};
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
    mut group: Arc<Group>,
    proxy_ip: IpAddr,
) {
    let guard = ctx.consistency_guard.then(|| pool.prepared.clone());
    let mut router = Router::new(
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
    let (mut frames, write) = split_client(client, ctx.max_frame_len);
    let mut out: FrameWriter<ClientWriter> =
        FrameWriter::new(write, Some(metrics().client_sent_bytes.clone()));
    // Bounded twice: no more than `max_client_in_flight` requests are read ahead of their
    // answers, and a client whose unwritten answers pass its share of `client_buffers` is dropped.
    let inbox = ClientInbox::new(ctx.client_buffers.clone());
    let mut shutdown = ctx.shutdown.clone();
    // Created once: a fresh watch future on every loop turn costs more than the work it guards.
    let stop = super::stopping(&mut shutdown);
    tokio::pin!(stop);
    let (mut in_flight, mut draining) = (0usize, false);
    let mut affinity = Affinity::default();
    // Polled across turns: a fresh `Notified` each turn would register and unregister a waiter.
    let overflow = inbox.overflowed();
    tokio::pin!(overflow);
    // Re-armed after each wake-up; a response that arrives in between is not missed.
    let arrived = inbox.arrived();
    tokio::pin!(arrived);
    // Reused across batches: taking the inbox swaps vectors, allocating nothing.
    let mut batch: Vec<Frame> = Vec::new();
    // When the socket read that brought the current request completed.
    let mut read_at = Instant::now();
    loop {
        if draining && in_flight == 0 {
            break;
        }
        let may_read = !draining && in_flight < ctx.max_client_in_flight;
        let buffered = holds_whole_frame(frames.read_buffer());
        tokio::select! {
            _ = &mut stop, if !draining => draining = true,
            _ = &mut overflow => {
                not_reading(&inbox);
                break;
            }
            next = next_client_frame(&mut frames), if may_read => {
                let frame = match next {
                    Ok(f) => f,
                    Err(why) => {
                        if let Some(f) = why {
                            let _ = out.push(&f).await;
                            let _ = out.flush().await;
                        }
                        break;
                    }
                };
                if !buffered {
                    read_at = Instant::now();
                }
                let pending = |f: Frame| {
                    let reply = ReplyTo::Client { inbox: inbox.clone(), stream: f.stream() };
                    Pending::received_at(f, reply, read_at)
                };
                let local = match router.on_client_frame(frame) {
                    Route::Upstream(f) => {
                        in_flight += 1;
                        affinity.client_in_flight = in_flight;
                        // Most requests go out here, without building the waiting future.
                        if let Err(p) = pool.try_dispatch_pinned(&group, pending(f), &mut affinity) {
                            pool.dispatch_waiting(&group, p).await;
                        }
                        continue;
                    }
                    Route::Use { keyspace, frame } => match switch_keyspace(&pool, accepted.version, &keyspace).await {
                        Ok(g) => {
                            group = g;
                            in_flight += 1;
                            pool.dispatch_from(&group, pending(frame), &mut affinity).await;
                            continue;
                        }
                        Err(f) => compressed(f.with_stream(frame.stream()), accepted.compression),
                    },
                    Route::Client(f) => f,
                    Route::Close(f) => {
                        let _ = out.push(&f).await;
                        let _ = out.flush().await;
                        break;
                    }
                };
                if !wrote(&inbox, out.push(&local)).await || !wrote(&inbox, out.flush()).await {
                    break;
                }
            }
            _ = &mut arrived => {
                arrived.set(inbox.arrived());
                inbox.take_all(&mut batch);
                let mut failed = false;
                let mut yielded = false;
                while !batch.is_empty() {
                    for frame in batch.drain(..) {
                        in_flight = in_flight.saturating_sub(1);
                        inbox.written(&frame);
                        match router.on_upstream_frame(frame) {
                            // Small answers are only copied into the batch: no write, nothing to wait on.
                            Ok(Some(f)) if out.buffer(&f) => {}
                            Ok(Some(f)) => failed = !wrote(&inbox, out.push(&f)).await,
                            Ok(None) => {}
                            Err(e) => tracing::warn!(error = %e, "undecodable upstream frame"),
                        }
                        if failed {
                            break;
                        }
                    }
                    if failed || yielded || in_flight == 0 {
                        break;
                    }
                    // More answers are on their way: let the upstream readers run once so
                    // they go out in this write instead of one syscall each.
                    yielded = true;
                    tokio::task::yield_now().await;
                    inbox.take_all(&mut batch);
                }
                batch.clear();
                if failed || !wrote(&inbox, out.flush()).await {
                    if inbox.is_overflowed() {
                        not_reading(&inbox);
                    }
                    break;
                }
            }
        }
    }
    let _ = out.shutdown().await;
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
    Metrics::count(&metrics().client_closed, vec![("reason", "not_reading")]);
}

async fn switch_keyspace(pool: &Pool, version: u8, keyspace: &str) -> Result<Arc<Group>, Frame> {
    pool.group(version, Some(keyspace))
        .await
        .map_err(|e| upstream_error_frame(version, 0, &e))
}
