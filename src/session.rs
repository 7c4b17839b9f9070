//! One client connection: the handshake, then the forwarding loop between the client and its
//! upstream connection. A failure here ends this connection only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{Framed, FramedRead};
use tracing::Instrument;

use crate::auth::client::ClientAuth;
use crate::frame::messages::{self, error_code, unsupported_version_message};
use crate::frame::{Frame, FrameCodec, FrameDecodeError, FrameError};
use crate::handshake::{Accepted, ClientHandshake, Step};
use crate::route::{Route, Router};
use crate::upstream::{UpstreamConnection, UpstreamError, UpstreamTarget};
use crate::writer::{write_frames, QUEUE_DEPTH};

/// What every session shares.
#[derive(Debug)]
pub struct ProxyContext {
    pub upstream: UpstreamTarget,
    pub client_auth: Arc<ClientAuth>,
    /// The address to advertise in `system.local`; by default the one the client dialled.
    pub advertise_address: Option<IpAddr>,
    pub max_frame_len: usize,
    pub handshake_timeout: Duration,
}

type ClientFramed = Framed<TcpStream, FrameCodec>;

/// Serves one accepted client connection to the end.
pub async fn run(ctx: Arc<ProxyContext>, socket: TcpStream, peer: SocketAddr) {
    let span = tracing::info_span!("client", %peer);
    async move {
        let _ = socket.set_nodelay(true);
        let proxy_ip = match (ctx.advertise_address, socket.local_addr()) {
            (Some(ip), _) => ip,
            (None, Ok(local)) => local.ip(),
            (None, Err(_)) => IpAddr::from([127, 0, 0, 1]),
        };
        let mut client = Framed::new(socket, FrameCodec::new(ctx.max_frame_len));
        match handshake(&ctx, &mut client).await {
            Ok(Some((accepted, upstream))) => {
                tracing::debug!(
                    version = accepted.version,
                    user = accepted.user.as_deref(),
                    "client ready"
                );
                forward(&ctx, client, accepted, upstream, proxy_ip).await;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "client handshake ended"),
        }
        tracing::debug!("client connection closed");
    }
    .instrument(span)
    .await
}

/// The error a client sees for a frame the decoder refused.
fn decode_error_frame(e: &FrameError) -> Frame {
    match e {
        FrameError::TooLarge { header, .. } => messages::error(
            header.protocol_version().clamp(3, 4),
            header.stream,
            error_code::PROTOCOL_ERROR,
            &format!("Invalid frame: {e}"),
        ),
        FrameError::LegacyVersion { version } => messages::error(
            4,
            0,
            error_code::PROTOCOL_ERROR,
            &unsupported_version_message(*version),
        ),
    }
}

/// What the client sees when the upstream could not be opened.
pub fn upstream_error_frame(version: u8, stream: i16, e: &UpstreamError) -> Frame {
    match e {
        UpstreamError::AuthRejected(info) => {
            messages::error(version, stream, error_code::BAD_CREDENTIALS, &info.message)
        }
        UpstreamError::Credentials(_) => messages::error(
            version,
            stream,
            error_code::BAD_CREDENTIALS,
            &format!("keyspaces-proxy: {e}"),
        ),
        _ => messages::error(
            version,
            stream,
            error_code::SERVER_ERROR,
            &format!("keyspaces-proxy cannot reach Keyspaces: {e}"),
        ),
    }
}

async fn handshake(
    ctx: &ProxyContext,
    client: &mut ClientFramed,
) -> std::io::Result<Option<(Accepted, UpstreamConnection)>> {
    let mut hs = ClientHandshake::new(ctx.client_auth.clone());
    loop {
        let next = match tokio::time::timeout(ctx.handshake_timeout, client.next()).await {
            Ok(n) => n,
            Err(_) => {
                tracing::debug!("client handshake timed out");
                return Ok(None);
            }
        };
        let frame = match next {
            None => return Ok(None),
            Some(Ok(f)) => f,
            Some(Err(FrameDecodeError::Frame(e))) => {
                client.send(decode_error_frame(&e)).await?;
                return Ok(None);
            }
            Some(Err(FrameDecodeError::Io(e))) => return Err(e),
        };
        match hs.on_frame(&frame) {
            Step::Reply(r) => client.send(r).await?,
            Step::Close(r) => {
                client.send(r).await?;
                return Ok(None);
            }
            Step::Connect(accepted) => {
                return match ctx
                    .upstream
                    .connect(accepted.version, accepted.compression)
                    .await
                {
                    Ok(up) => {
                        client.send(accepted.success.clone()).await?;
                        Ok(Some((accepted, up)))
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream connection failed");
                        let reply =
                            upstream_error_frame(accepted.version, accepted.success.stream(), &e);
                        client.send(reply).await?;
                        Ok(None)
                    }
                };
            }
        }
    }
}

async fn forward(
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
    );

    let client_parts = client.into_parts();
    let (client_read, client_write) = client_parts.io.into_split();
    let mut client_in = FramedRead::new(client_read, FrameCodec::new(ctx.max_frame_len));
    client_in
        .read_buffer_mut()
        .extend_from_slice(&client_parts.read_buf);
    let (client_tx, client_rx) = mpsc::channel(QUEUE_DEPTH);
    let client_writer = tokio::spawn(write_frames(client_rx, client_write));

    let upstream_parts = upstream.framed.into_parts();
    let (up_read, up_write) = tokio::io::split(upstream_parts.io);
    let mut upstream_in = FramedRead::new(up_read, FrameCodec::new(ctx.max_frame_len));
    upstream_in
        .read_buffer_mut()
        .extend_from_slice(&upstream_parts.read_buf);
    let (up_tx, up_rx) = mpsc::channel(QUEUE_DEPTH);
    let upstream_writer = tokio::spawn(write_frames(up_rx, up_write));

    loop {
        tokio::select! {
            next = client_in.next() => {
                let frame = match next {
                    None => break,
                    Some(Ok(f)) => f,
                    Some(Err(FrameDecodeError::Frame(e))) => {
                        let _ = client_tx.send(decode_error_frame(&e)).await;
                        break;
                    }
                    Some(Err(FrameDecodeError::Io(e))) => {
                        tracing::debug!(error = %e, "client read failed");
                        break;
                    }
                };
                match router.on_client_frame(frame) {
                    Route::Upstream(f) => {
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
    // Let queued replies (an error that explains the close) reach the client, but not forever.
    let _ = tokio::time::timeout(Duration::from_secs(5), client_writer).await;
    upstream_writer.abort();
}
