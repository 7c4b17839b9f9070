//! Envelope codec: splits a byte stream into frames without copying bodies.
//!
//! The decoder reads the nine header bytes and hands the body on as a `Bytes` view of the read
//! buffer (`split_to(..).freeze()`), so a 1 MiB result crosses the proxy without a body copy.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder, FramedRead};

use super::header::{Header, HEADER_LEN};

/// Read-buffer growth step once a connection carries traffic.
const READ_CHUNK: usize = 8 * 1024;

/// The protocol's own ceiling on a body (256 MiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 256 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

impl Frame {
    /// Builds a frame whose header length matches `body`.
    pub fn new(mut header: Header, body: Bytes) -> Frame {
        header.length = body.len() as u32;
        Frame { header, body }
    }

    pub fn stream(&self) -> i16 {
        self.header.stream
    }

    pub fn with_stream(mut self, stream: i16) -> Frame {
        self.header.stream = stream;
        self
    }

    pub fn opcode(&self) -> u8 {
        self.header.opcode
    }

    /// The wire bytes of the whole frame (tests, small control frames).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.body.len());
        self.header.write(&mut out);
        out.put_slice(&self.body);
        out.freeze()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame body of {length} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        header: Header,
        length: u64,
        max: usize,
    },
    #[error("protocol version {version} uses a header format this proxy does not speak")]
    LegacyVersion { version: u8 },
    #[error("the client speaks {0}, not the CQL native protocol")]
    Foreign(ForeignProtocol),
}

/// Protocols recognised by their first byte, so that a client pointed at the wrong port (or
/// configured for TLS against the plaintext one) is told at once instead of waiting out the
/// handshake deadline for a frame that never comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForeignProtocol {
    /// A TLS record header (handshake content type 0x16).
    Tls,
    /// An HTTP method: `GET `, `POST`, `PRI ` (HTTP/2's preface), …
    Http,
}

impl std::fmt::Display for ForeignProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ForeignProtocol::Tls => "TLS",
            ForeignProtocol::Http => "HTTP (or another text protocol)",
        })
    }
}

/// The first four bytes of HTTP/1 requests and of HTTP/2's connection preface.
const HTTP_STARTS: [&[u8; 4]; 10] = [
    b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"OPTI", b"PATC", b"CONN", b"TRAC", b"PRI ",
];

impl ForeignProtocol {
    /// No CQL envelope starts with these bytes: its first byte is the version (3 to 5, DSE's
    /// 0x41 and 0x42 — `A` and `B`, which drivers try first — with the response bit 0x80).
    fn recognise(start: &[u8]) -> Option<ForeignProtocol> {
        // Every frame passes here: CQL's first bytes (3 to 5, 0x41, 0x42, with or without
        // 0x80) leave at this one comparison (the method table cost ~3% of the proxy's CPU).
        match start.first()? {
            0x16 => return Some(ForeignProtocol::Tls),
            b'C' | b'D' | b'G' | b'H' | b'O' | b'P' | b'T' => {}
            _ => return None,
        }
        // Fewer than four bytes decide too when they begin a method: no CQL version byte is an
        // ASCII capital from C to T, and a client that sent `GE` may wait for an answer.
        let seen = &start[..start.len().min(4)];
        HTTP_STARTS
            .iter()
            .any(|m| m.starts_with(seen))
            .then_some(ForeignProtocol::Http)
    }
}

/// Decodes and encodes protocol envelopes. One instance per connection direction.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    max_body: usize,
}

impl FrameCodec {
    pub fn new(max_body: usize) -> Self {
        FrameCodec { max_body }
    }

    /// Changes the largest body accepted from now on (a client's limit grows once it has
    /// authenticated).
    pub fn set_max_body(&mut self, max_body: usize) {
        self.max_body = max_body;
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = FrameDecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FrameDecodeError> {
        let Some(&first) = src.first() else {
            return Ok(None);
        };
        if let Some(foreign) = ForeignProtocol::recognise(src) {
            return Err(FrameError::Foreign(foreign).into());
        }
        // v1/v2 envelopes are 8 bytes long with a one-byte stream id: refuse before misreading them.
        let version = first & 0x7f;
        if version < 3 {
            return Err(FrameError::LegacyVersion { version }.into());
        }
        let Some(header) = Header::parse(src) else {
            src.reserve(HEADER_LEN - src.len());
            return Ok(None);
        };
        let length = header.length as usize;
        if length > self.max_body {
            return Err(FrameError::TooLarge {
                header,
                length: u64::from(header.length),
                max: self.max_body,
            }
            .into());
        }
        let total = HEADER_LEN + length;
        if src.len() < total {
            // Reserve for the whole frame at once, but never more than a bounded step: a peer
            // that announces 256 MiB and sends nothing must not make us allocate 256 MiB.
            src.reserve((total - src.len()).min(1 << 20));
            return Ok(None);
        }
        // The header is parsed already: skipping it and splitting off the body shares the
        // buffer once per frame (two splits and a drop of the header part cost three refcount
        // updates, a visible share of the profile).
        src.advance(HEADER_LEN);
        let body = src.split_to(length).freeze();
        // A connection that carries traffic reads in large chunks; one that sits idle after its
        // handshake keeps the small buffer it started with.
        if src.capacity() - src.len() < READ_CHUNK / 4 {
            src.reserve(READ_CHUNK);
        }
        Ok(Some(Frame { header, body }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        encode_into(&frame, dst);
        Ok(())
    }
}

/// The next frame when the read buffer already holds all of it, decoded without polling the
/// reader: the frames one socket read brought are taken apart in one go, not one trip through
/// the caller's `select!` each (those trips were a tenth of the proxy's CPU under load). `None`
/// when no whole frame is buffered: the reader must read.
pub fn next_buffered<R>(
    reader: &mut FramedRead<R, FrameCodec>,
) -> Option<Result<Frame, FrameDecodeError>> {
    let mut codec = reader.decoder().clone();
    codec.decode(reader.read_buffer_mut()).transpose()
}

/// Appends a frame's wire form to `dst`, fixing the length field from the body.
pub fn encode_into(frame: &Frame, dst: &mut BytesMut) {
    dst.reserve(HEADER_LEN + frame.body.len());
    encode_envelope(frame, dst);
    dst.put_slice(&frame.body);
}

/// Appends only the envelope (header, length from the body) of `frame`: a writer sends a large
/// body from its own buffer right after, instead of copying it.
pub fn encode_envelope(frame: &Frame, dst: &mut BytesMut) {
    let mut header = frame.header;
    header.length = frame.body.len() as u32;
    header.write(dst);
}

/// The decoder's error: either a protocol violation the session answers, or an I/O error.
#[derive(Debug, thiserror::Error)]
pub enum FrameDecodeError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::super::header::opcode;
    use super::*;

    fn decode_hex(hex_frame: &str) -> Result<Option<Frame>, FrameDecodeError> {
        let mut buf = BytesMut::from(&hex::decode(hex_frame).unwrap()[..]);
        FrameCodec::new(DEFAULT_MAX_FRAME_LEN).decode(&mut buf)
    }

    #[test]
    fn decodes_v4_options_request() {
        let f = decode_hex("040000010500000000").unwrap().unwrap();
        assert_eq!(f.header.protocol_version(), 4);
        assert_eq!(f.stream(), 1);
        assert_eq!(f.opcode(), opcode::OPTIONS);
        assert!(f.body.is_empty());
    }

    #[test]
    fn decodes_v3_startup_and_round_trips() {
        // STARTUP {CQL_VERSION: 3.0.0}
        let hex_frame = "0300000001000000160001000b43514c5f56455253494f4e0005332e302e30";
        let f = decode_hex(hex_frame).unwrap().unwrap();
        assert_eq!(f.header.protocol_version(), 3);
        assert_eq!(f.opcode(), opcode::STARTUP);
        assert_eq!(hex::encode(f.to_bytes()), hex_frame);
    }

    #[test]
    fn waits_for_whole_frame_and_leaves_rest() {
        let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME_LEN);
        let mut buf = BytesMut::from(&hex::decode("8400000708000000040000000184").unwrap()[..]);
        let f = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&f.body[..], &[0, 0, 0, 1]);
        assert_eq!(&buf[..], &[0x84]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
    }

    /// What one read brought is taken frame by frame without reading again; a frame cut short
    /// stays in the buffer for the reader, and so does a bad one's error.
    #[tokio::test]
    async fn buffered_frames_are_taken_without_reading_and_a_partial_one_is_left() {
        use futures_util::StreamExt;
        let frames = "840000070800000004000000018400000808000000040000000284000009";
        let bytes = hex::decode(frames).unwrap();
        let (mut tx, rx) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &bytes)
            .await
            .unwrap();
        let mut reader = FramedRead::new(rx, FrameCodec::new(DEFAULT_MAX_FRAME_LEN));
        assert!(next_buffered(&mut reader).is_none(), "nothing read yet");
        let first = reader.next().await.unwrap().unwrap();
        assert_eq!(first.stream(), 7);
        let second = next_buffered(&mut reader).unwrap().unwrap();
        assert_eq!((second.stream(), &second.body[..]), (8, &[0, 0, 0, 2][..]));
        assert!(
            next_buffered(&mut reader).is_none(),
            "the third is cut short"
        );
        assert_eq!(reader.read_buffer().len(), 4, "and stays for the next read");
        let bad = hex::decode("8400000a080000000400000003").unwrap();
        let mut reader = FramedRead::new(tokio::io::empty(), FrameCodec::new(2));
        reader.read_buffer_mut().extend_from_slice(&bad);
        assert!(matches!(
            next_buffered(&mut reader),
            Some(Err(FrameDecodeError::Frame(FrameError::TooLarge { .. })))
        ));
    }

    #[test]
    fn lz4_compressed_v4_result_round_trips() {
        // RESULT (void) compressed with LZ4: flags 0x01, body = BE length 4 + LZ4 block.
        let hex_frame = "840100020800000009000000044000000001";
        let f = decode_hex(hex_frame).unwrap().unwrap();
        assert_eq!(hex::encode(f.to_bytes()), hex_frame);
        let plain =
            crate::frame::compression::decompressed(f, crate::frame::Compression::Lz4, 1024)
                .unwrap();
        assert_eq!(&plain.body[..], &[0, 0, 0, 1]);
    }

    #[test]
    fn compressed_flag_is_carried_not_interpreted() {
        let f = decode_hex("84010002080000000100").unwrap().unwrap();
        assert!(f.header.has_flag(crate::frame::header::flags::COMPRESSION));
        assert_eq!(f.body.len(), 1);
    }

    #[test]
    fn rejects_oversized_and_negative_lengths() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::from(&hex::decode("040000010700000401").unwrap()[..]);
        assert!(matches!(
            codec.decode(&mut buf),
            Err(FrameDecodeError::Frame(FrameError::TooLarge {
                length: 1025,
                ..
            }))
        ));
        // A length with the top bit set is a negative [int] on the wire.
        let mut buf = BytesMut::from(&hex::decode("0400000107ffffffff").unwrap()[..]);
        assert!(matches!(
            FrameCodec::new(DEFAULT_MAX_FRAME_LEN).decode(&mut buf),
            Err(FrameDecodeError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn recognises_tls_and_http_at_the_first_byte() {
        for (bytes, want) in [
            (&[0x16u8][..], ForeignProtocol::Tls),
            (&[0x16, 0x03, 0x01, 0x02, 0x00][..], ForeignProtocol::Tls),
            (&b"GET / HTTP/1.1\r\n"[..], ForeignProtocol::Http),
            (&b"PRI * HTTP/2.0"[..], ForeignProtocol::Http),
            (&b"POST /x"[..], ForeignProtocol::Http),
            (&b"G"[..], ForeignProtocol::Http),
            (&b"GE"[..], ForeignProtocol::Http),
            (&b"PRI"[..], ForeignProtocol::Http),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(
                matches!(
                    FrameCodec::new(DEFAULT_MAX_FRAME_LEN).decode(&mut buf),
                    Err(FrameDecodeError::Frame(FrameError::Foreign(p))) if p == want
                ),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn dse_versions_are_cql_not_text() {
        // The Python driver opens with DSE_V2 (0x42, `B`) and downgrades on the error.
        for first in [0x41u8, 0x42, 0xc2] {
            let mut buf = BytesMut::from(&[first, 0, 0, 0, 5, 0, 0, 0, 0][..]);
            let f = FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
                .decode(&mut buf)
                .unwrap()
                .unwrap();
            assert_eq!(f.header.protocol_version(), first & 0x7f);
        }
    }

    #[test]
    fn rejects_legacy_versions() {
        assert!(matches!(
            decode_hex("0200010500000000"),
            Err(FrameDecodeError::Frame(FrameError::LegacyVersion {
                version: 2
            }))
        ));
    }

    #[test]
    fn body_is_a_view_not_a_copy() {
        let mut buf = BytesMut::with_capacity(9 + 4096);
        buf.put_slice(&[0x84, 0, 0, 1, 8, 0, 0, 0x10, 0]);
        buf.put_bytes(7, 4096);
        let base = buf.as_ptr() as usize;
        let f = FrameCodec::new(DEFAULT_MAX_FRAME_LEN)
            .decode(&mut buf)
            .unwrap()
            .unwrap();
        assert_eq!(f.body.as_ptr() as usize, base + HEADER_LEN);
    }
}
