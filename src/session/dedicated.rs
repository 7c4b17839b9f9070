//! Dedicated mode: each client connection gets its own upstream connection (for debugging,
//! and for comparing against the pool). Stream ids pass through unchanged.

use std::net::IpAddr;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::codec::FramedRead;

use super::{ClientFramed, ClientIo};
use crate::context::ProxyContext;
use crate::frame::FrameCodec;
use crate::handshake::Accepted;
use crate::metrics::ErrorCode;
use crate::route::{Route, Router};
use crate::upstream::UpstreamConnection;
use crate::writer::{write_frames, QUEUE_DEPTH};

pub(super) async fn forward(
    ctx: &ProxyContext,
    client: ClientFramed,
    accepted: Accepted,
    upstream: UpstreamConnection,
    proxy_ip: IpAddr,
) {
    let mut router = Router::new(
        accepted.version,
        accepted.compression,
        upstream.compression,
        proxy_ip,
        ctx.max_frame_len,
    )
    .host_id_seed(&ctx.host_id_seed);

    let mut client = ClientIo::split(client, ctx.max_frame_len);
    let client_tx = client.tx.clone();

    let upstream_parts = upstream.framed.into_parts();
    let (up_read, up_write) = tokio::io::split(upstream_parts.io);
    let mut upstream_in = FramedRead::new(up_read, FrameCodec::new(ctx.max_frame_len));
    upstream_in
        .read_buffer_mut()
        .extend_from_slice(&upstream_parts.read_buf);
    let (up_tx, up_rx) = mpsc::channel(QUEUE_DEPTH);
    let upstream_writer = tokio::spawn(write_frames(up_rx, up_write));

    let stop = ctx.shutdown.begun();
    tokio::pin!(stop);
    let (mut in_flight, mut draining) = (0usize, false);
    loop {
        if draining && in_flight == 0 {
            break;
        }
        tokio::select! {
            _ = &mut stop, if !draining => draining = true,
            next = client.next(), if !draining => {
                let Some(frame) = next else { break };
                match router.on_client_frame(frame) {
                    Route::Upstream(f) | Route::Use { frame: f, .. } => {
                        in_flight += 1;
                        if up_tx.send(f).await.is_err() {
                            break;
                        }
                    }
                    Route::Client(f) => {
                        if client_tx.send(f).await.is_err() {
                            break;
                        }
                    }
                    Route::Close(f) => {
                        let _ = client_tx.send(f).await;
                        break;
                    }
                }
            }
            next = upstream_in.next() => {
                let frame = match next {
                    Some(Ok(f)) => f,
                    None => {
                        tracing::warn!("upstream closed the connection");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "upstream read failed");
                        break;
                    }
                };
                if frame.stream() >= 0 {
                    in_flight = in_flight.saturating_sub(1);
                }
                if frame.opcode() == crate::frame::opcode::ERROR {
                    count_upstream_error(&frame);
                }
                match router.on_upstream_frame(frame) {
                    Ok(Some(f)) => {
                        if client_tx.send(f).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "undecodable upstream frame");
                        break;
                    }
                }
            }
        }
    }
    drop(up_tx);
    drop(client_tx);
    client.finish().await;
    upstream_writer.abort();
}

/// Upstream ERRORs by code (compressed bodies are not decoded just for this).
fn count_upstream_error(frame: &crate::frame::Frame) {
    use crate::frame::messages::error_code;
    use crate::metrics::{metrics, Metrics};
    if frame.header.has_flag(crate::frame::flags::COMPRESSION) {
        return;
    }
    if let Ok(e) = crate::frame::messages::ErrorInfo::parse(&frame.body) {
        Metrics::count(
            &metrics().upstream_errors,
            ErrorCode {
                code: error_code::name(e.code),
            },
        );
    }
}
