//! Body compression as negotiated in STARTUP (v3/v4): LZ4 with a 4-byte big-endian length
//! prefix, or raw Snappy. Each side of the proxy has its own setting; a frame is transcoded
//! only when the two differ or when the proxy must read it.

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::Frame;
use super::header::flags;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Snappy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompressionError {
    #[error("unsupported compression algorithm {0:?}")]
    Unsupported(String),
    #[error("compressed body is malformed")]
    Malformed,
    #[error("decompressed body of {0} bytes exceeds the frame limit")]
    TooLarge(usize),
    #[error("frame is compressed but no compression was negotiated")]
    NotNegotiated,
}

impl Compression {
    /// From the STARTUP option `COMPRESSION` (case-insensitive, as Cassandra accepts it).
    pub fn from_option(name: Option<&str>) -> Result<Compression, CompressionError> {
        match name.map(str::to_ascii_lowercase).as_deref() {
            None | Some("") => Ok(Compression::None),
            Some("lz4") => Ok(Compression::Lz4),
            Some("snappy") => Ok(Compression::Snappy),
            Some(other) => Err(CompressionError::Unsupported(other.to_owned())),
        }
    }

    pub fn name(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some("lz4"),
            Compression::Snappy => Some("snappy"),
        }
    }

    pub fn decompress(self, body: &[u8], max: usize) -> Result<Bytes, CompressionError> {
        match self {
            Compression::None => Err(CompressionError::NotNegotiated),
            Compression::Lz4 => {
                if body.len() < 4 {
                    return Err(CompressionError::Malformed);
                }
                let len = u32::from_be_bytes([body[0], body[1], body[2], body[3]]) as usize;
                if len > max {
                    return Err(CompressionError::TooLarge(len));
                }
                let out = lz4_flex::block::decompress(&body[4..], len)
                    .map_err(|_| CompressionError::Malformed)?;
                if out.len() != len {
                    return Err(CompressionError::Malformed);
                }
                Ok(Bytes::from(out))
            }
            Compression::Snappy => {
                let len =
                    snap::raw::decompress_len(body).map_err(|_| CompressionError::Malformed)?;
                if len > max {
                    return Err(CompressionError::TooLarge(len));
                }
                snap::raw::Decoder::new()
                    .decompress_vec(body)
                    .map(Bytes::from)
                    .map_err(|_| CompressionError::Malformed)
            }
        }
    }

    pub fn compress(self, body: &[u8]) -> Bytes {
        match self {
            Compression::None => Bytes::copy_from_slice(body),
            Compression::Lz4 => {
                let block = lz4_flex::block::compress(body);
                let mut out = BytesMut::with_capacity(4 + block.len());
                out.put_u32(body.len() as u32);
                out.put_slice(&block);
                out.freeze()
            }
            Compression::Snappy => match snap::raw::Encoder::new().compress_vec(body) {
                Ok(v) => Bytes::from(v),
                // Only inputs over ~4 GiB fail; such a body never fits a frame anyway.
                Err(_) => Bytes::copy_from_slice(body),
            },
        }
    }
}

/// Returns `frame` with its body uncompressed (a no-op for uncompressed frames).
pub fn decompressed(
    frame: Frame,
    algo: Compression,
    max: usize,
) -> Result<Frame, CompressionError> {
    if !frame.header.has_flag(flags::COMPRESSION) {
        return Ok(frame);
    }
    let body = algo.decompress(&frame.body, max)?;
    let mut header = frame.header;
    header.flags &= !flags::COMPRESSION;
    Ok(Frame::new(header, body))
}

/// Returns `frame` compressed with `algo` (empty bodies stay uncompressed: the flag is per frame).
pub fn compressed(frame: Frame, algo: Compression) -> Frame {
    if algo == Compression::None
        || frame.body.is_empty()
        || frame.header.has_flag(flags::COMPRESSION)
    {
        return frame;
    }
    let body = algo.compress(&frame.body);
    let mut header = frame.header;
    header.flags |= flags::COMPRESSION;
    Frame::new(header, body)
}

/// Moves a frame from one side's compression to the other's, touching the body only if needed.
pub fn transcode(
    frame: Frame,
    from: Compression,
    to: Compression,
    max: usize,
) -> Result<Frame, CompressionError> {
    if from == to {
        if from == Compression::None && frame.header.has_flag(flags::COMPRESSION) {
            return Err(CompressionError::NotNegotiated);
        }
        return Ok(frame);
    }
    Ok(compressed(decompressed(frame, from, max)?, to))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::header::{opcode, Header};
    use crate::frame::ProtocolVersion;

    fn result_frame(body: &[u8]) -> Frame {
        Frame::new(
            Header::response(ProtocolVersion::V4, 3, opcode::RESULT),
            Bytes::copy_from_slice(body),
        )
    }

    #[test]
    fn lz4_uses_big_endian_length_prefix() {
        let c = Compression::Lz4.compress(b"hello hello hello hello");
        assert_eq!(&c[..4], &[0, 0, 0, 23]);
        assert_eq!(
            &Compression::Lz4.decompress(&c, 1024).unwrap()[..],
            b"hello hello hello hello"
        );
    }

    #[test]
    fn lz4_claimed_length_is_bounded() {
        let mut c = Compression::Lz4.compress(b"abc").to_vec();
        c[0] = 0x7f;
        assert!(matches!(
            Compression::Lz4.decompress(&c, 1 << 20),
            Err(CompressionError::TooLarge(_))
        ));
        assert_eq!(
            Compression::Lz4.decompress(&[0, 0, 0, 9, 0xff], 1024),
            Err(CompressionError::Malformed)
        );
    }

    #[test]
    fn transcodes_between_sides() {
        let body: Vec<u8> = (0..2000u32).flat_map(|i| (i % 7).to_be_bytes()).collect();
        let f = result_frame(&body);
        let lz = transcode(f.clone(), Compression::None, Compression::Lz4, 1 << 20).unwrap();
        assert!(lz.header.has_flag(flags::COMPRESSION));
        assert!(lz.body.len() < body.len());
        let sn = transcode(lz, Compression::Lz4, Compression::Snappy, 1 << 20).unwrap();
        let plain = transcode(sn, Compression::Snappy, Compression::None, 1 << 20).unwrap();
        assert_eq!(plain, f);
    }

    #[test]
    fn compressed_flag_without_negotiation_is_an_error() {
        let mut f = result_frame(b"x");
        f.header.flags |= flags::COMPRESSION;
        assert_eq!(
            transcode(f, Compression::None, Compression::None, 10),
            Err(CompressionError::NotNegotiated)
        );
    }

    #[test]
    fn option_names() {
        assert_eq!(
            Compression::from_option(Some("LZ4")).unwrap(),
            Compression::Lz4
        );
        assert!(Compression::from_option(Some("zstd")).is_err());
    }
}
