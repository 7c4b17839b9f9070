//! Pooled mode: the client's requests are multiplexed over the shared upstream pool. Responses
//! come back through a per-client queue, where the router rewrites what it must.

use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::{upstream_error_frame, ClientFramed, ClientIo, ProxyContext};
use crate::frame::Compression;
use crate::handshake::Accepted;
use crate::route::{Route, Router};
use crate::upstream::pool::{Group, Pool};
use crate::upstream::streams::{Pending, ReplyTo};

pub(super) async fn forward(
    ctx: &ProxyContext,
    client: ClientFramed,
    accepted: Accepted,
    mut group: Arc<Group>,
    proxy_ip: IpAddr,
) {
    let Some(pool) = ctx.pool.clone() else { return };
    let guard = ctx.consistency_guard.then(|| pool.prepared.clone());
    let mut router = Router::new(
        accepted.version,
        accepted.compression,
        Compression::None,
        proxy_ip,
        ctx.max_frame_len,
    )
    .split_use(true)
    .consistency_guard(guard);
    let mut client = ClientIo::split(client, ctx.max_frame_len);
    // Unbounded, but bounded in practice by the client's own in-flight requests: while the
    // client is not reading, this loop is blocked on its writer and reads no new requests.
    let (responses_tx, mut responses) = mpsc::unbounded_channel();
    let mut shutdown = ctx.shutdown.clone();
    let (mut in_flight, mut draining) = (0usize, false);
    loop {
        if draining && in_flight == 0 {
            break;
        }
        tokio::select! {
            _ = super::stopping(&mut shutdown), if !draining => draining = true,
            next = client.next(), if !draining => {
                let Some(frame) = next else { break };
                let reply = |stream| ReplyTo::Client { tx: responses_tx.clone(), stream };
                match router.on_client_frame(frame) {
                    Route::Upstream(f) => {
                        in_flight += 1;
                        let r = reply(f.stream());
                        pool.dispatch(&group, Pending::new(f, r)).await;
                    }
                    Route::Use { keyspace, frame } => {
                        match switch_keyspace(&pool, accepted.version, &keyspace).await {
                            Ok(g) => {
                                group = g;
                                in_flight += 1;
                                let r = reply(frame.stream());
                                pool.dispatch(&group, Pending::new(frame, r)).await;
                            }
                            Err(f) => {
                                let f = crate::frame::compression::compressed(f.with_stream(frame.stream()), accepted.compression);
                                if client.tx.send(f).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    Route::Client(f) => {
                        if client.tx.send(f).await.is_err() {
                            break;
                        }
                    }
                    Route::Close(f) => {
                        let _ = client.tx.send(f).await;
                        break;
                    }
                }
            }
            Some(frame) = responses.recv() => {
                in_flight = in_flight.saturating_sub(1);
                match router.on_upstream_frame(frame) {
                    Ok(Some(f)) => {
                        if client.tx.send(f).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "undecodable upstream frame"),
                }
            }
        }
    }
    client.finish().await;
}

async fn switch_keyspace(
    pool: &Pool,
    version: u8,
    keyspace: &str,
) -> Result<Arc<Group>, crate::frame::Frame> {
    pool.group(version, Some(keyspace))
        .await
        .map_err(|e| upstream_error_frame(version, 0, &e))
}
