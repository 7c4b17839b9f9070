//! native_protocol_v4.spec §5: LZ4 bodies carry their decompressed length as a 4-byte
//! big-endian prefix; Snappy bodies are raw Snappy.

use bytes::Bytes;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Lz4,
    Snappy,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompressionError {
    #[error("Unsupported compression algorithm {0}")]
    Unsupported(String),
    #[error("Compressed frame but no compression was negotiated")]
    NotNegotiated,
    #[error("Cannot decompress the frame body")]
    Malformed,
    #[error("Decompressed body would be {0} bytes, over the frame limit")]
    TooLarge(usize),
}

impl std::str::FromStr for Compression {
    type Err = CompressionError;

    /// The STARTUP option's value; Cassandra's StartupMessage compares it case-insensitively.
    fn from_str(s: &str) -> Result<Self, CompressionError> {
        match s.to_ascii_lowercase().as_str() {
            "" => Ok(Compression::None),
            "lz4" => Ok(Compression::Lz4),
            "snappy" => Ok(Compression::Snappy),
            _ => Err(CompressionError::Unsupported(s.to_owned())),
        }
    }
}

impl Compression {
    pub fn name(self) -> Option<&'static str> {
        match self {
            Compression::None => None,
            Compression::Lz4 => Some("lz4"),
            Compression::Snappy => Some("snappy"),
        }
    }

    pub fn compress(self, body: &[u8]) -> Option<Bytes> {
        match self {
            Compression::None => None,
            Compression::Lz4 => {
                let mut out = (body.len() as u32).to_be_bytes().to_vec();
                out.extend_from_slice(&lz4_flex::block::compress(body));
                Some(Bytes::from(out))
            }
            Compression::Snappy => snap::raw::Encoder::new()
                .compress_vec(body)
                .ok()
                .map(Bytes::from),
        }
    }

    pub fn decompress(self, body: &[u8], max: usize) -> Result<Bytes, CompressionError> {
        match self {
            Compression::None => Err(CompressionError::NotNegotiated),
            Compression::Lz4 => {
                let (len, rest) = body
                    .split_at_checked(4)
                    .ok_or(CompressionError::Malformed)?;
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                if len > max {
                    return Err(CompressionError::TooLarge(len));
                }
                match lz4_flex::block::decompress(rest, len) {
                    Ok(out) if out.len() == len => Ok(Bytes::from(out)),
                    _ => Err(CompressionError::Malformed),
                }
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let body = b"SELECT * FROM system.local".repeat(20);
        for c in [Compression::Lz4, Compression::Snappy] {
            let packed = c.compress(&body).unwrap();
            assert_eq!(c.decompress(&packed, 1 << 20).unwrap(), &body[..]);
            assert_eq!(
                c.decompress(&packed, 10),
                Err(CompressionError::TooLarge(body.len()))
            );
        }
        assert_eq!(
            Compression::Lz4.decompress(&[0, 0, 0, 9, 1], 64),
            Err(CompressionError::Malformed)
        );
    }
}
