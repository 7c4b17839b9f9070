//! The 9-byte envelope header shared by protocol v3, v4 and the pre-authentication part of v5.
//!
//! The proxy routes on the header alone; bodies stay opaque `Bytes` unless a handler asks for them.

use super::version::ProtocolVersion;
use bytes::{Buf, BufMut};

pub const HEADER_LEN: usize = 9;

/// The bit that marks a frame as travelling server → client.
pub const RESPONSE_BIT: u8 = 0x80;

/// Frame flags (spec §2.2).
pub mod flags {
    pub const COMPRESSION: u8 = 0x01;
    pub const TRACING: u8 = 0x02;
    pub const CUSTOM_PAYLOAD: u8 = 0x04;
    pub const WARNING: u8 = 0x08;
}

/// Opcodes (spec §2.4). Kept as plain `u8` constants: unknown opcodes must pass through untouched.
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

    /// A short name for logs and metric labels (bounded set).
    pub fn name(op: u8) -> &'static str {
        match op {
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
            _ => "UNKNOWN",
        }
    }

    /// Opcodes a client may send; anything else from a client is a protocol violation.
    pub fn is_request(op: u8) -> bool {
        matches!(
            op,
            STARTUP | OPTIONS | QUERY | PREPARE | EXECUTE | REGISTER | BATCH | AUTH_RESPONSE
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The raw version byte, direction bit included.
    pub version: u8,
    pub flags: u8,
    pub stream: i16,
    pub opcode: u8,
    /// Body length as sent; the codec checks it against the body it delivers.
    pub length: u32,
}

impl Header {
    pub fn request(version: ProtocolVersion, stream: i16, opcode: u8) -> Self {
        Header {
            version: version.wire(),
            flags: 0,
            stream,
            opcode,
            length: 0,
        }
    }

    pub fn response(version: ProtocolVersion, stream: i16, opcode: u8) -> Self {
        Header {
            version: version.wire() | RESPONSE_BIT,
            flags: 0,
            stream,
            opcode,
            length: 0,
        }
    }

    /// The protocol version without the direction bit, as the peer sent it.
    pub fn protocol_version(&self) -> u8 {
        self.version & !RESPONSE_BIT
    }

    /// The version an answer to this frame is written in: its own if spoken here, else the
    /// nearest one spoken (a peer that sent an unusable frame still gets a readable error).
    pub fn answer_version(&self) -> ProtocolVersion {
        ProtocolVersion::nearest(self.protocol_version())
    }

    /// The version, if it is one spoken here.
    pub fn version(&self) -> Option<ProtocolVersion> {
        ProtocolVersion::from_wire(self.protocol_version())
    }

    pub fn is_response(&self) -> bool {
        self.version & RESPONSE_BIT != 0
    }

    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Reads a header from the first nine bytes of `src`; `None` if fewer are there.
    pub fn parse(mut src: &[u8]) -> Option<Header> {
        if src.len() < HEADER_LEN {
            return None;
        }
        Some(Header {
            version: src.get_u8(),
            flags: src.get_u8(),
            stream: src.get_i16(),
            opcode: src.get_u8(),
            length: src.get_u32(),
        })
    }

    pub fn write(&self, dst: &mut impl BufMut) {
        dst.put_u8(self.version);
        dst.put_u8(self.flags);
        dst.put_i16(self.stream);
        dst.put_u8(self.opcode);
        dst.put_u32(self.length);
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        self.write(&mut &mut out[..]);
        out
    }
}

/// Whether `buf` starts with a complete frame: its header, then the body length it declares.
/// Readers use it to tell frames that came with the previous socket read (and share its clock
/// reading) from those that need a new one.
pub fn holds_whole_frame(buf: &[u8]) -> bool {
    Header::parse(buf).is_some_and(|h| buf.len() - HEADER_LEN >= h.length as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frame_needs_the_header_and_the_declared_body() {
        let frame = [0x84, 0, 0, 1, 0x08, 0, 0, 0, 3, 0xaa, 0xbb, 0xcc];
        assert!(holds_whole_frame(&frame));
        assert!(holds_whole_frame(&[&frame[..], &[0x84, 0][..]].concat()));
        assert!(!holds_whole_frame(&frame[..11]), "body cut short");
        assert!(!holds_whole_frame(&frame[..8]), "header cut short");
        assert!(!holds_whole_frame(&[]));
    }

    #[test]
    fn round_trip() {
        let h = Header {
            version: 0x84,
            flags: flags::TRACING,
            stream: -1,
            opcode: opcode::EVENT,
            length: 0x0102_0304,
        };
        let bytes = h.to_bytes();
        assert_eq!(bytes, [0x84, 0x02, 0xff, 0xff, 0x0c, 1, 2, 3, 4]);
        assert_eq!(Header::parse(&bytes), Some(h));
        assert!(h.is_response());
        assert_eq!(h.protocol_version(), 4);
    }

    #[test]
    fn short_input_is_none() {
        assert_eq!(Header::parse(&[4, 0, 0, 1, 1, 0, 0, 0]), None);
    }
}
