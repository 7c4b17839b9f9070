//! The connection's writer task: frames queued by the reader (and by delayed answers) are
//! encoded into one buffer and written together, so many small answers cost one syscall.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::Frame;

/// Answers a connection may queue before its reader waits (a slow client slows its reader).
pub const QUEUE_DEPTH: usize = 1024;

/// What the connection's writer task is given.
pub enum Out {
    Frame(Frame),
    /// Write these bytes (part of a frame), then close: a connection lost mid-response.
    Cut(Bytes),
    /// Flush what is queued, then close: a server that gives up on the connection.
    Close,
}

/// With `split`, each answer goes out on its own, header and body in separate writes (over
/// TLS, separate records) with the given gap between them, as servers unlike this one do;
/// otherwise queued answers are batched into one write.
pub async fn write_out<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Out>,
    mut w: W,
    split: Option<std::time::Duration>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    if let Some(gap) = split {
        while let Some(o) = rx.recv().await {
            let (bytes, close) = match o {
                Out::Frame(f) => {
                    f.encode(&mut buf);
                    (buf.split().freeze(), false)
                }
                Out::Cut(bytes) => (bytes, true),
                Out::Close => (Bytes::new(), true),
            };
            let at = bytes.len().min(super::HEADER_LEN);
            for (i, part) in [&bytes[..at], &bytes[at..]].into_iter().enumerate() {
                if i == 1 && !gap.is_zero() {
                    // Blocking on purpose: the gap is work, not waiting (tokio's timer would
                    // also round it up to a millisecond).
                    std::thread::sleep(gap);
                }
                if !part.is_empty()
                    && (w.write_all(part).await.is_err() || w.flush().await.is_err())
                {
                    return;
                }
            }
            if close {
                break;
            }
        }
        let _ = w.shutdown().await;
        return;
    }
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut batched = 0;
        let mut close = None;
        while let Some(o) = next.take() {
            match o {
                Out::Frame(f) => f.encode(&mut buf),
                Out::Cut(bytes) => {
                    buf.extend_from_slice(&bytes);
                    close = Some(());
                    break;
                }
                Out::Close => {
                    close = Some(());
                    break;
                }
            }
            batched += 1;
            if batched < QUEUE_DEPTH {
                next = rx.try_recv().ok();
            }
        }
        if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
            return;
        }
        buf.clear();
        if close.is_some() {
            break;
        }
    }
    let _ = w.shutdown().await;
}
