//! The CQL native protocol (v3/v4) as the emulator speaks it, written from the protocol
//! specification (native_protocol_v4.spec) and Cassandra's own Java decoders — never from the
//! proxy's code, so that one encoding mistake cannot hide in both (see CONTRIBUTING: tests that
//! can fail).

pub mod compression;
pub mod request;
pub mod response;
pub mod writer;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::Decoder;

pub use compression::Compression;

/// native_protocol_v4.spec §2.4: the opcodes.
pub mod opcode {
    pub const ERROR: u8 = 0x00;
    pub const STARTUP: u8 = 0x01;
    pub const READY: u8 = 0x02;
    pub const AUTHENTICATE: u8 = 0x03;
    pub const OPTIONS: u8 = 0x05;
    pub const SUPPORTED: u8 = 0x06;
    pub const QUERY: u8 = 0x07;
    pub const RESULT: u8 = 0x08;
    pub const PREPARE: u8 = 0x09;
    pub const EXECUTE: u8 = 0x0A;
    pub const REGISTER: u8 = 0x0B;
    pub const EVENT: u8 = 0x0C;
    pub const BATCH: u8 = 0x0D;
    pub const AUTH_CHALLENGE: u8 = 0x0E;
    pub const AUTH_RESPONSE: u8 = 0x0F;
    pub const AUTH_SUCCESS: u8 = 0x10;

    pub fn name(op: u8) -> String {
        let known = match op {
            ERROR => "ERROR",
            STARTUP => "STARTUP",
            READY => "READY",
            AUTHENTICATE => "AUTHENTICATE",
            OPTIONS => "OPTIONS",
            SUPPORTED => "SUPPORTED",
            QUERY => "QUERY",
            RESULT => "RESULT",
            PREPARE => "PREPARE",
            EXECUTE => "EXECUTE",
            REGISTER => "REGISTER",
            EVENT => "EVENT",
            BATCH => "BATCH",
            AUTH_CHALLENGE => "AUTH_CHALLENGE",
            AUTH_RESPONSE => "AUTH_RESPONSE",
            AUTH_SUCCESS => "AUTH_SUCCESS",
            _ => return format!("opcode 0x{op:02x}"),
        };
        known.to_owned()
    }
}

/// native_protocol_v4.spec §9: error codes.
pub mod error_code {
    pub const SERVER_ERROR: i32 = 0x0000;
    pub const PROTOCOL_ERROR: i32 = 0x000A;
    pub const BAD_CREDENTIALS: i32 = 0x0100;
    pub const WRITE_TIMEOUT: i32 = 0x1100;
    pub const READ_TIMEOUT: i32 = 0x1200;
    pub const INVALID: i32 = 0x2200;
    pub const UNAUTHORIZED: i32 = 0x2100;
    pub const UNPREPARED: i32 = 0x2500;
}

/// native_protocol_v4.spec §3 [consistency].
pub mod consistency {
    pub const ONE: u16 = 0x0001;
    pub const QUORUM: u16 = 0x0004;
    pub const LOCAL_QUORUM: u16 = 0x0006;
    pub const SERIAL: u16 = 0x0008;
    pub const LOCAL_SERIAL: u16 = 0x0009;
    pub const LOCAL_ONE: u16 = 0x000A;

    pub fn name(cl: u16) -> String {
        const NAMES: [&str; 11] = [
            "ANY",
            "ONE",
            "TWO",
            "THREE",
            "QUORUM",
            "ALL",
            "LOCAL_QUORUM",
            "EACH_QUORUM",
            "SERIAL",
            "LOCAL_SERIAL",
            "LOCAL_ONE",
        ];
        NAMES
            .get(cl as usize)
            .map(|s| (*s).to_owned())
            .unwrap_or_else(|| format!("consistency 0x{cl:04x}"))
    }

    pub fn is_known(cl: u16) -> bool {
        cl <= LOCAL_ONE
    }
}

/// native_protocol_v4.spec §2.2: the header flags.
pub mod flags {
    pub const COMPRESSION: u8 = 0x01;
    pub const TRACING: u8 = 0x02;
    pub const CUSTOM_PAYLOAD: u8 = 0x04;
    pub const WARNING: u8 = 0x08;
}

pub const HEADER_LEN: usize = 9;

/// One frame: the 9-byte header's fields and the (still compressed, if flagged) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The version byte as sent, direction bit included.
    pub version: u8,
    pub flags: u8,
    pub stream: i16,
    pub opcode: u8,
    pub body: Bytes,
}

impl Frame {
    pub fn response(version: u8, stream: i16, opcode: u8, body: Bytes) -> Frame {
        Frame {
            version: 0x80 | (version & 0x7f),
            flags: 0,
            stream,
            opcode,
            body,
        }
    }

    pub fn protocol_version(&self) -> u8 {
        self.version & 0x7f
    }

    pub fn is_response(&self) -> bool {
        self.version & 0x80 != 0
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(HEADER_LEN + self.body.len());
        out.put_u8(self.version);
        out.put_u8(self.flags);
        out.put_i16(self.stream);
        out.put_u8(self.opcode);
        out.put_u32(self.body.len() as u32);
        out.put_slice(&self.body);
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    // Cassandra's Frame.Decoder text; it answers Invalid on the frame's stream and reads on,
    // where the emulator answers PROTOCOL_ERROR on stream 0 and closes (connection.rs).
    #[error("Request is too big: length {len} exceeds maximum allowed length {max}")]
    TooLong { len: usize, max: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Splits a byte stream into frames with the 9-byte header of v3 and v4 (native_protocol_v4.spec
/// §2), which v5 also uses until it is negotiated (native_protocol_v5.spec §2.3.1) — so a v5
/// client's STARTUP is read, and the connection answers it with the error that makes drivers
/// downgrade.
pub struct FrameDecoder {
    pub max_frame_len: usize,
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = FramingError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, FramingError> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[5], src[6], src[7], src[8]]) as usize;
        if len > self.max_frame_len {
            return Err(FramingError::TooLong {
                len,
                max: self.max_frame_len,
            });
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        let mut head = src.split_to(HEADER_LEN);
        let body = src.split_to(len).freeze();
        Ok(Some(Frame {
            version: head.get_u8(),
            flags: head.get_u8(),
            stream: head.get_i16(),
            opcode: head.get_u8(),
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_any_byte() {
        let f = Frame {
            version: 4,
            flags: 0,
            stream: 7,
            opcode: opcode::OPTIONS,
            body: Bytes::from_static(b"abc"),
        };
        let whole = f.to_bytes();
        for cut in 0..whole.len() {
            let mut d = FrameDecoder { max_frame_len: 64 };
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(d.decode(&mut buf).unwrap(), None, "cut at {cut}");
            buf.extend_from_slice(&whole[cut..]);
            assert_eq!(d.decode(&mut buf).unwrap(), Some(f.clone()));
        }
    }

    #[test]
    fn refuses_long_frames() {
        let mut d = FrameDecoder { max_frame_len: 2 };
        let mut long = BytesMut::from(&[4u8, 0, 0, 1, 7, 0, 0, 0, 3][..]);
        assert!(matches!(
            d.decode(&mut long),
            Err(FramingError::TooLong { len: 3, .. })
        ));
    }
}
