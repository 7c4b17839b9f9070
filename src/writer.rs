//! A write task per socket that coalesces frames: whatever is queued is written with one
//! syscall (or one TLS record batch), and large bodies are written from their own buffer
//! instead of being copied into the batch.

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::frame::codec::{encode_envelope, encode_into};
use crate::frame::header::HEADER_LEN;
use crate::frame::Frame;
use crate::queue::{CloseOnDrop, FrameQueue};

/// Bodies at least this large skip the batch buffer.
const DIRECT_WRITE_MIN: usize = 16 * 1024;
/// Flush a batch once it holds this much.
const BATCH_MAX: usize = 256 * 1024;

/// Queue depth per connection: bounded, so a client that never reads its responses stalls its
/// own upstream reads (TCP backpressure) rather than growing memory.
pub const QUEUE_DEPTH: usize = 1024;

/// Coalesces frames onto one writer: small frames are gathered into one buffer and written with
/// one call; large bodies are written from their own buffer instead of being copied.
pub struct FrameWriter<W> {
    w: W,
    // Allocated on first use and released after a burst made it large: an idle connection
    // should cost a few hundred bytes, not a 64 KiB buffer.
    batch: BytesMut,
    counter: Option<Counter>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(w: W, counter: Option<Counter>) -> Self {
        FrameWriter {
            w,
            batch: BytesMut::new(),
            counter,
        }
    }

    /// Adds a small frame to the batch when that needs no write; false (nothing done) when the
    /// frame is large or the batch full, and `push` must take it.
    pub fn buffer(&mut self, frame: &Frame) -> bool {
        let len = HEADER_LEN + frame.body.len();
        if frame.body.len() >= DIRECT_WRITE_MIN || self.batch.len() + len >= BATCH_MAX {
            return false;
        }
        if let Some(c) = &self.counter {
            c.inc_by(len as u64);
        }
        encode_into(frame, &mut self.batch);
        true
    }

    /// Queues one frame, writing out what is queued when needed.
    pub async fn push(&mut self, frame: &Frame) -> std::io::Result<()> {
        if let Some(c) = &self.counter {
            c.inc_by((HEADER_LEN + frame.body.len()) as u64);
        }
        if frame.body.len() >= DIRECT_WRITE_MIN {
            encode_envelope(frame, &mut self.batch);
            self.w.write_all(&self.batch).await?;
            self.batch.clear();
            self.w.write_all(&frame.body).await?;
        } else {
            encode_into(frame, &mut self.batch);
            if self.batch.len() >= BATCH_MAX {
                self.w.write_all(&self.batch).await?;
                self.batch.clear();
            }
        }
        Ok(())
    }

    /// Writes out everything queued and flushes the stream.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.batch.is_empty() {
            self.w.write_all(&self.batch).await?;
            self.batch.clear();
        }
        if self.batch.capacity() > BATCH_MAX {
            self.batch = BytesMut::new();
        }
        self.w.flush().await
    }

    /// Writes bytes that are not a frame, after whatever is queued (test peers cutting a frame).
    pub async fn write_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.flush().await?;
        self.w.write_all(bytes).await?;
        self.w.flush().await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.w.shutdown().await
    }
}

/// Writes frames from `queue` to `w` until a write fails (or the task is aborted), each backlog
/// with one flush; the queue refuses frames once this has ended.
pub async fn write_queued<W: AsyncWrite + Unpin>(
    queue: std::sync::Arc<FrameQueue>,
    w: W,
) -> std::io::Result<()> {
    let _closed = CloseOnDrop(&queue);
    let mut out = FrameWriter::new(w, None);
    let mut batch = Vec::new();
    loop {
        queue.take_all(&mut batch);
        if batch.is_empty() {
            queue.notified().await;
            continue;
        }
        for f in batch.drain(..) {
            out.push(&f).await?;
        }
        out.flush().await?;
    }
}

/// Writes frames from `rx` to `w` until the channel closes or a write fails.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    rx: mpsc::Receiver<Frame>,
    w: W,
) -> std::io::Result<()> {
    write_frames_counted(rx, w, None).await
}

/// As `write_frames`, adding the bytes written to `counter`.
pub async fn write_frames_counted<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Frame>,
    w: W,
    counter: Option<Counter>,
) -> std::io::Result<()> {
    let mut out = FrameWriter::new(w, counter);
    while let Some(first) = rx.recv().await {
        out.push(&first).await?;
        // Everything already queued goes out with the same flush.
        for _ in 0..1024 {
            match rx.try_recv() {
                Ok(f) => out.push(&f).await?,
                Err(_) => break,
            }
        }
        out.flush().await?;
    }
    out.shutdown().await
}

#[cfg(test)]
mod tests {
    use crate::frame::ProtocolVersion;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::frame::messages;

    #[tokio::test]
    async fn writes_small_and_large_frames_in_order() {
        let (tx, rx) = mpsc::channel(8);
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let task = tokio::spawn(write_frames(rx, a));
        let big = messages::result_void(ProtocolVersion::V4, 2);
        let big = Frame::new(big.header, Bytes::from(vec![7u8; 40_000]));
        let frames = [
            messages::ready(ProtocolVersion::V4, 1),
            big,
            messages::ready(ProtocolVersion::V4, 3),
        ];
        let mut expected = Vec::new();
        for f in &frames {
            expected.extend_from_slice(&f.to_bytes());
            tx.send(f.clone()).await.unwrap();
        }
        drop(tx);
        task.await.unwrap().unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn buffer_takes_small_frames_only_and_keeps_the_order_with_push() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, None);
        let small = messages::ready(ProtocolVersion::V4, 1);
        let big = Frame::new(small.header, Bytes::from(vec![7u8; DIRECT_WRITE_MIN]));
        assert!(w.buffer(&small));
        assert!(
            !w.buffer(&big),
            "a large body is written from its own buffer"
        );
        w.push(&big).await.unwrap();
        assert!(w.buffer(&small));
        w.flush().await.unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        let expected = [small.to_bytes(), big.to_bytes(), small.to_bytes()].concat();
        assert_eq!(got, expected);

        let (a, _b) = tokio::io::duplex(1 << 20);
        let mut w = FrameWriter::new(a, None);
        let mid = Frame::new(small.header, Bytes::from(vec![1u8; DIRECT_WRITE_MIN - 1]));
        let mut taken = 0;
        while w.buffer(&mid) {
            taken += 1;
        }
        assert!(
            taken * (HEADER_LEN + mid.body.len()) < BATCH_MAX,
            "the batch never passes its cap"
        );
    }
}
