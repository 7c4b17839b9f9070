//! The test client's side of the CQL native protocol, written from the v4 spec
//! (`native_protocol_v4.spec` §2 framing, §3 notations, §4 messages) for the tests alone. It
//! takes nothing from the proxy crate: an encoding mistake in the proxy must not be mirrored in
//! the client that checks it. Deliberately permissive when reading (any version byte, any
//! opcode) so a test sees exactly what the proxy sent.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// §2: version, flags, stream, opcode, length.
pub const HEADER_LEN: usize = 9;

/// §2.4.
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
}

/// §2.2.
pub mod flags {
    pub const COMPRESSION: u8 = 0x01;
    pub const TRACING: u8 = 0x02;
    pub const CUSTOM_PAYLOAD: u8 = 0x04;
    pub const WARNING: u8 = 0x08;
}

/// §3 `[consistency]`.
pub mod consistency {
    pub const ANY: u16 = 0x0000;
    pub const ONE: u16 = 0x0001;
    pub const QUORUM: u16 = 0x0004;
    pub const ALL: u16 = 0x0005;
    pub const LOCAL_QUORUM: u16 = 0x0006;
    pub const SERIAL: u16 = 0x0008;
    pub const LOCAL_SERIAL: u16 = 0x0009;
    pub const LOCAL_ONE: u16 = 0x000A;
}

/// §9.
pub mod error_code {
    pub const SERVER_ERROR: i32 = 0x0000;
    pub const PROTOCOL_ERROR: i32 = 0x000A;
    pub const BAD_CREDENTIALS: i32 = 0x0100;
    pub const UNAVAILABLE: i32 = 0x1000;
    pub const OVERLOADED: i32 = 0x1001;
    pub const WRITE_TIMEOUT: i32 = 0x1100;
    pub const READ_TIMEOUT: i32 = 0x1200;
    pub const SYNTAX_ERROR: i32 = 0x2000;
    pub const UNAUTHORIZED: i32 = 0x2100;
    pub const INVALID: i32 = 0x2200;
    pub const CONFIG_ERROR: i32 = 0x2300;
    pub const UNPREPARED: i32 = 0x2500;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// As on the wire: 0x80 marks a response.
    pub version: u8,
    pub flags: u8,
    pub stream: i16,
    pub opcode: u8,
    /// Only what `to_bytes` writes; a frame's own length is its body's.
    pub length: u32,
}

impl Header {
    pub fn request(version: u8, stream: i16, opcode: u8) -> Header {
        Header {
            version: version & 0x7f,
            flags: 0,
            stream,
            opcode,
            length: 0,
        }
    }

    pub fn response(version: u8, stream: i16, opcode: u8) -> Header {
        Header {
            version: 0x80 | version,
            ..Header::request(version, stream, opcode)
        }
    }

    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.version;
        b[1] = self.flags;
        b[2..4].copy_from_slice(&self.stream.to_be_bytes());
        b[4] = self.opcode;
        b[5..9].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub body: Bytes,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("opcode", &opcode::name(self.header.opcode))
            .field("header", &self.header)
            .field("body", &self.body)
            .finish()
    }
}

impl Frame {
    pub fn new(header: Header, body: Bytes) -> Frame {
        Frame { header, body }
    }

    pub fn opcode(&self) -> u8 {
        self.header.opcode
    }

    pub fn stream(&self) -> i16 {
        self.header.stream
    }

    pub fn has_flag(&self, flag: u8) -> bool {
        self.header.has_flag(flag)
    }

    pub fn with_stream(mut self, stream: i16) -> Frame {
        self.header.stream = stream;
        self
    }

    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + self.body.len());
        Codec::default().encode(self.clone(), &mut out).ok();
        out.freeze()
    }
}

/// Frames over a byte stream (§2.5: the length counts the body only).
#[derive(Debug)]
pub struct Codec {
    pub max_body: usize,
}

impl Default for Codec {
    fn default() -> Codec {
        Codec {
            max_body: 256 << 20,
        }
    }
}

impl Decoder for Codec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> std::io::Result<Option<Frame>> {
        if src.len() < HEADER_LEN {
            return Ok(None);
        }
        let length = u32::from_be_bytes([src[5], src[6], src[7], src[8]]);
        if length as usize > self.max_body {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a {length}-byte body"),
            ));
        }
        if src.len() < HEADER_LEN + length as usize {
            return Ok(None);
        }
        let mut h = src.split_to(HEADER_LEN);
        let header = Header {
            version: h.get_u8(),
            flags: h.get_u8(),
            stream: h.get_i16(),
            opcode: h.get_u8(),
            length,
        };
        let body = src.split_to(length as usize).freeze();
        Ok(Some(Frame { header, body }))
    }
}

impl Encoder<Frame> for Codec {
    type Error = std::io::Error;

    fn encode(&mut self, f: Frame, out: &mut BytesMut) -> std::io::Result<()> {
        let header = Header {
            length: f.body.len() as u32,
            ..f.header
        };
        out.put_slice(&header.to_bytes());
        out.put_slice(&f.body);
        Ok(())
    }
}

/// §3 notations, written.
pub fn put_string(b: &mut BytesMut, s: &str) {
    b.put_u16(s.len() as u16);
    b.put_slice(s.as_bytes());
}

pub fn put_long_string(b: &mut BytesMut, s: &str) {
    b.put_i32(s.len() as i32);
    b.put_slice(s.as_bytes());
}

pub fn put_short_bytes(b: &mut BytesMut, v: &[u8]) {
    b.put_u16(v.len() as u16);
    b.put_slice(v);
}

pub fn put_bytes(b: &mut BytesMut, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            b.put_i32(v.len() as i32);
            b.put_slice(v);
        }
        None => b.put_i32(-1),
    }
}

/// §3 notations, read; `None` when the body ends early or says something impossible.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn string(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }

    pub fn short_bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    pub fn bytes(&mut self) -> Option<Option<&'a [u8]>> {
        let n = self.i32()?;
        if n < 0 {
            return Some(None);
        }
        self.take(n as usize).map(Some)
    }

    /// §4.2.5.2 `[option]` for a column type, skipped (custom, collections, UDTs and tuples
    /// nest).
    fn skip_type(&mut self) -> Option<()> {
        match self.u16()? {
            0x0000 => {
                self.string()?;
            }
            0x0020 | 0x0022 => self.skip_type()?,
            0x0021 => {
                self.skip_type()?;
                self.skip_type()?;
            }
            0x0030 => {
                self.string()?;
                self.string()?;
                for _ in 0..self.u16()? {
                    self.string()?;
                    self.skip_type()?;
                }
            }
            0x0031 => {
                for _ in 0..self.u16()? {
                    self.skip_type()?;
                }
            }
            _ => {}
        }
        Some(())
    }
}

/// Request messages (§4.1) and what the tests read from responses (§4.2).
pub mod messages {
    use super::*;

    pub const PASSWORD_AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

    fn request(version: u8, stream: i16, op: u8, body: BytesMut) -> Frame {
        Frame::new(Header::request(version, stream, op), body.freeze())
    }

    pub fn startup(version: u8, stream: i16, options: &[(&str, &str)]) -> Frame {
        let mut b = BytesMut::new();
        b.put_u16(options.len() as u16);
        for (k, v) in options {
            put_string(&mut b, k);
            put_string(&mut b, v);
        }
        request(version, stream, opcode::STARTUP, b)
    }

    pub fn options(version: u8, stream: i16) -> Frame {
        request(version, stream, opcode::OPTIONS, BytesMut::new())
    }

    /// A QUERY with no values, no paging, default flags (§4.1.4).
    pub fn query(version: u8, stream: i16, cql: &str, consistency: u16) -> Frame {
        let mut b = BytesMut::new();
        put_long_string(&mut b, cql);
        b.put_u16(consistency);
        b.put_u8(0);
        request(version, stream, opcode::QUERY, b)
    }

    pub fn prepare(version: u8, stream: i16, cql: &str) -> Frame {
        let mut b = BytesMut::new();
        put_long_string(&mut b, cql);
        request(version, stream, opcode::PREPARE, b)
    }

    /// An EXECUTE with positional values (§4.1.6, flag 0x01).
    pub fn execute(version: u8, stream: i16, id: &[u8], cl: u16, values: &[&[u8]]) -> Frame {
        let mut b = BytesMut::new();
        put_short_bytes(&mut b, id);
        b.put_u16(cl);
        b.put_u8(0x01);
        b.put_u16(values.len() as u16);
        for v in values {
            put_bytes(&mut b, Some(v));
        }
        request(version, stream, opcode::EXECUTE, b)
    }

    pub fn register(version: u8, stream: i16, events: &[&str]) -> Frame {
        let mut b = BytesMut::new();
        b.put_u16(events.len() as u16);
        for e in events {
            put_string(&mut b, e);
        }
        request(version, stream, opcode::REGISTER, b)
    }

    pub fn auth_response(version: u8, stream: i16, token: &[u8]) -> Frame {
        let mut b = BytesMut::new();
        put_bytes(&mut b, Some(token));
        request(version, stream, opcode::AUTH_RESPONSE, b)
    }

    /// SASL PLAIN (RFC 4616) with an empty authorization id.
    pub fn plain_token(user: &str, password: &str) -> Vec<u8> {
        [b"\0", user.as_bytes(), b"\0", password.as_bytes()].concat()
    }

    /// A server's READY: what a client must never send.
    pub fn ready(version: u8, stream: i16) -> Frame {
        Frame::new(
            Header::response(version, stream, opcode::READY),
            Bytes::new(),
        )
    }

    /// The authenticator class an AUTHENTICATE names.
    pub fn parse_authenticate(body: &[u8]) -> Option<&str> {
        Reader(body).string()
    }

    /// The token of an AUTH_CHALLENGE or AUTH_SUCCESS.
    pub fn parse_auth_token(body: &[u8]) -> Option<&[u8]> {
        Reader(body).bytes().flatten()
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct ErrorInfo {
        pub code: i32,
        pub message: String,
    }

    impl ErrorInfo {
        pub fn parse(body: &[u8]) -> Result<ErrorInfo, String> {
            let mut r = Reader(body);
            let code = r.i32().ok_or("no error code")?;
            let message = r.string().ok_or("no error message")?.to_owned();
            Ok(ErrorInfo { code, message })
        }
    }
}

/// RESULT bodies (§4.2.5).
pub mod result {
    use super::*;

    pub const ROWS: i32 = 0x0002;
    pub const PREPARED: i32 = 0x0004;

    #[derive(Debug, Clone)]
    pub struct Column {
        pub name: String,
    }

    #[derive(Debug)]
    pub struct Rows<'a> {
        pub columns: Option<Vec<Column>>,
        pub columns_count: usize,
        pub rows_count: usize,
        pub paging_state: Option<&'a [u8]>,
        rows: &'a [u8],
    }

    impl<'a> Rows<'a> {
        pub fn parse(body: &'a [u8]) -> Result<Rows<'a>, String> {
            let mut r = Reader(body);
            let kind = r.i32().ok_or("no result kind")?;
            if kind != ROWS {
                return Err(format!("result kind {kind}, not Rows"));
            }
            let flags = r.i32().ok_or("no metadata flags")?;
            let columns_count = r.i32().ok_or("no column count")? as usize;
            let paging_state = if flags & 0x0002 != 0 {
                r.bytes().ok_or("no paging state")?
            } else {
                None
            };
            let columns = if flags & 0x0004 != 0 {
                None
            } else {
                let global = flags & 0x0001 != 0;
                if global {
                    r.string().ok_or("no keyspace")?;
                    r.string().ok_or("no table")?;
                }
                let mut columns = Vec::with_capacity(columns_count);
                for _ in 0..columns_count {
                    if !global {
                        r.string().ok_or("no keyspace")?;
                        r.string().ok_or("no table")?;
                    }
                    let name = r.string().ok_or("no column name")?.to_owned();
                    r.skip_type().ok_or("no column type")?;
                    columns.push(Column { name });
                }
                Some(columns)
            };
            let rows_count = r.i32().ok_or("no row count")? as usize;
            Ok(Rows {
                columns,
                columns_count,
                rows_count,
                paging_state,
                rows: r.0,
            })
        }

        /// Every row's cells, in column order (`None` for null).
        pub fn cells(&self) -> Result<Vec<Vec<Option<&'a [u8]>>>, String> {
            let mut r = Reader(self.rows);
            (0..self.rows_count)
                .map(|_| {
                    (0..self.columns_count)
                        .map(|_| r.bytes().ok_or_else(|| "a row ends early".to_owned()))
                        .collect()
                })
                .collect()
        }
    }

    /// The statement id of a Prepared result.
    pub fn prepared_id(body: &[u8]) -> Result<Vec<u8>, String> {
        let mut r = Reader(body);
        match r.i32() {
            Some(PREPARED) => {}
            other => return Err(format!("result kind {other:?}, not Prepared")),
        }
        Ok(r.short_bytes().ok_or("no statement id")?.to_vec())
    }
}

/// Body compression as negotiated in STARTUP (§5): lz4 with the uncompressed length first,
/// or a raw snappy block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4,
    Snappy,
}

impl Compression {
    pub fn name(self) -> &'static str {
        match self {
            Compression::Lz4 => "lz4",
            Compression::Snappy => "snappy",
        }
    }

    pub fn compress(self, mut f: Frame) -> Frame {
        let body = match self {
            Compression::Lz4 => {
                let mut b = (f.body.len() as u32).to_be_bytes().to_vec();
                b.extend(lz4_flex::block::compress(&f.body));
                b
            }
            Compression::Snappy => snap::raw::Encoder::new()
                .compress_vec(&f.body)
                .expect("snappy compresses any body"),
        };
        f.header.flags |= flags::COMPRESSION;
        f.body = body.into();
        f
    }

    pub fn decompress(self, mut f: Frame) -> Result<Frame, String> {
        if !f.has_flag(flags::COMPRESSION) {
            return Ok(f);
        }
        let body = match self {
            Compression::Lz4 => {
                let (len, block) = f.body.split_at_checked(4).ok_or("no lz4 length")?;
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                lz4_flex::block::decompress(block, len).map_err(|e| e.to_string())?
            }
            Compression::Snappy => snap::raw::Decoder::new()
                .decompress_vec(&f.body)
                .map_err(|e| e.to_string())?,
        };
        f.header.flags &= !flags::COMPRESSION;
        f.body = body.into();
        Ok(f)
    }
}
