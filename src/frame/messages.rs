//! The few message bodies the proxy builds or reads itself; everything else passes through.

use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::Frame;
use super::header::{flags, opcode, Header};
use super::types::{BodyError, BodyResult, Reader, WriteExt};
use super::version::ProtocolVersion;

/// Error codes (spec §9) that the proxy or the emulator produce or react to.
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

    /// A short, bounded name for any code (spec §9), for metric labels and logs.
    pub fn name(code: i32) -> &'static str {
        match code {
            0x0000 => "server_error",
            0x000A => "protocol_error",
            0x0100 => "bad_credentials",
            0x1000 => "unavailable",
            0x1001 => "overloaded",
            0x1002 => "is_bootstrapping",
            0x1003 => "truncate_error",
            0x1100 => "write_timeout",
            0x1200 => "read_timeout",
            0x1300 => "read_failure",
            0x1400 => "function_failure",
            0x1500 => "write_failure",
            0x2000 => "syntax_error",
            0x2100 => "unauthorized",
            0x2200 => "invalid",
            0x2300 => "config_error",
            0x2400 => "already_exists",
            0x2500 => "unprepared",
            _ => "other",
        }
    }
}

/// Consistency levels (spec §3) as they appear on the wire.
pub mod consistency {
    pub const ANY: u16 = 0x0000;
    pub const ONE: u16 = 0x0001;
    pub const QUORUM: u16 = 0x0004;
    pub const LOCAL_QUORUM: u16 = 0x0006;
    pub const LOCAL_ONE: u16 = 0x000A;

    pub fn name(cl: u16) -> &'static str {
        match cl {
            0x0000 => "ANY",
            0x0001 => "ONE",
            0x0002 => "TWO",
            0x0003 => "THREE",
            0x0004 => "QUORUM",
            0x0005 => "ALL",
            0x0006 => "LOCAL_QUORUM",
            0x0007 => "EACH_QUORUM",
            0x0008 => "SERIAL",
            0x0009 => "LOCAL_SERIAL",
            0x000A => "LOCAL_ONE",
            _ => "UNKNOWN",
        }
    }
}

/// The text Keyspaces (and Cassandra 3.11) sends for a version it does not speak. The Node driver
/// downgrades only when it sees exactly this.
pub fn unsupported_version_message(version: u8) -> String {
    format!(
        "Invalid or unsupported protocol version ({version}); supported versions are (3/v3, 4/v4)"
    )
}

pub const PASSWORD_AUTHENTICATOR: &str = "org.apache.cassandra.auth.PasswordAuthenticator";

fn response(version: ProtocolVersion, stream: i16, op: u8, body: Bytes) -> Frame {
    Frame::new(Header::response(version, stream, op), body)
}

fn request(version: ProtocolVersion, stream: i16, op: u8, body: Bytes) -> Frame {
    Frame::new(Header::request(version, stream, op), body)
}

/// An ERROR as an upstream would send it, for tests; the proxy's own go through `ErrorReply`.
#[cfg(test)]
pub(crate) fn error(version: ProtocolVersion, stream: i16, code: i32, message: &str) -> Frame {
    error_with(version, stream, code, message, &[])
}

/// The encoding behind `ErrorReply` (and test upstreams): the extra fields some codes carry
/// (timeouts, unavailable, unprepared) come already encoded.
pub(crate) fn error_with(
    version: ProtocolVersion,
    stream: i16,
    code: i32,
    message: &str,
    extra: &[u8],
) -> Frame {
    let mut b = BytesMut::with_capacity(8 + message.len() + extra.len());
    b.put_i32(code);
    b.put_string(message);
    b.put_slice(extra);
    response(version, stream, opcode::ERROR, b.freeze())
}

pub fn ready(version: ProtocolVersion, stream: i16) -> Frame {
    response(version, stream, opcode::READY, Bytes::new())
}

pub fn supported(version: ProtocolVersion, stream: i16, options: &[(&str, &[&str])]) -> Frame {
    let mut b = BytesMut::new();
    b.put_string_multimap(options);
    response(version, stream, opcode::SUPPORTED, b.freeze())
}

pub fn authenticate(version: ProtocolVersion, stream: i16, authenticator: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_string(authenticator);
    response(version, stream, opcode::AUTHENTICATE, b.freeze())
}

pub fn auth_challenge(version: ProtocolVersion, stream: i16, token: Option<&[u8]>) -> Frame {
    let mut b = BytesMut::new();
    b.put_bytes_value(token);
    response(version, stream, opcode::AUTH_CHALLENGE, b.freeze())
}

pub fn auth_success(version: ProtocolVersion, stream: i16, token: Option<&[u8]>) -> Frame {
    let mut b = BytesMut::new();
    b.put_bytes_value(token);
    response(version, stream, opcode::AUTH_SUCCESS, b.freeze())
}

pub fn result_void(version: ProtocolVersion, stream: i16) -> Frame {
    response(
        version,
        stream,
        opcode::RESULT,
        Bytes::from_static(&[0, 0, 0, 1]),
    )
}

pub fn result_set_keyspace(version: ProtocolVersion, stream: i16, keyspace: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(3);
    b.put_string(keyspace);
    response(version, stream, opcode::RESULT, b.freeze())
}

pub fn startup(version: ProtocolVersion, stream: i16, options: &[(&str, &str)]) -> Frame {
    let mut b = BytesMut::new();
    b.put_string_map(options);
    request(version, stream, opcode::STARTUP, b.freeze())
}

pub fn options(version: ProtocolVersion, stream: i16) -> Frame {
    request(version, stream, opcode::OPTIONS, Bytes::new())
}

pub fn auth_response(version: ProtocolVersion, stream: i16, token: &[u8]) -> Frame {
    let mut b = BytesMut::new();
    b.put_bytes_value(Some(token));
    request(version, stream, opcode::AUTH_RESPONSE, b.freeze())
}

/// A QUERY with no values at the given consistency (heartbeats, tests, `check`).
pub fn query(version: ProtocolVersion, stream: i16, cql: &str, consistency: u16) -> Frame {
    let mut b = BytesMut::new();
    b.put_long_string(cql);
    b.put_u16(consistency);
    b.put_u8(0);
    request(version, stream, opcode::QUERY, b.freeze())
}

/// A PREPARE of `cql` (re-preparing after UNPREPARED; the load tool).
pub fn prepare(version: ProtocolVersion, stream: i16, cql: &str) -> Frame {
    let mut b = BytesMut::new();
    b.put_long_string(cql);
    request(version, stream, opcode::PREPARE, b.freeze())
}

/// The message part of a body: what follows the tracing id, warnings and custom payload that
/// the header's flags announce. Compressed bodies must be decompressed first.
#[inline]
pub fn message_body<'a>(header: &Header, body: &'a [u8]) -> BodyResult<&'a [u8]> {
    // Almost every frame has no prefix: read several times per request, this stays inline.
    if header.flags & (flags::TRACING | flags::WARNING | flags::CUSTOM_PAYLOAD) == 0 {
        return Ok(body);
    }
    prefixed_message_body(header, body)
}

fn prefixed_message_body<'a>(header: &Header, body: &'a [u8]) -> BodyResult<&'a [u8]> {
    // v3 has neither (Cassandra refuses a v3 frame flagged with a custom payload): a v3 peer
    // setting them means something else by the bytes, which must not be read, or forwarded, as
    // if it did.
    let spoken = ProtocolVersion::nearest(header.protocol_version());
    if !spoken.has_payloads_and_warnings()
        && header.flags & (flags::CUSTOM_PAYLOAD | flags::WARNING) != 0
    {
        return Err(BodyError::Invalid(
            "custom payload and warning flags need protocol v4",
        ));
    }
    let mut r = Reader::new(body);
    if header.is_response() {
        if header.has_flag(flags::TRACING) {
            r.uuid()?;
        }
        if header.has_flag(flags::WARNING) {
            r.string_list()?;
        }
    }
    if header.has_flag(flags::CUSTOM_PAYLOAD) {
        r.skip_bytes_map()?;
    }
    Ok(r.remaining())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: i32,
    pub message: String,
}

impl ErrorInfo {
    pub fn parse(body: &[u8]) -> BodyResult<ErrorInfo> {
        let mut r = Reader::new(body);
        Ok(ErrorInfo {
            code: r.i32()?,
            message: r.string()?.to_owned(),
        })
    }
}

pub fn parse_startup(body: &[u8]) -> BodyResult<HashMap<&str, &str>> {
    Reader::new(body).string_map()
}

pub fn parse_supported(body: &[u8]) -> BodyResult<HashMap<&str, Vec<&str>>> {
    Reader::new(body).string_multimap()
}

pub fn parse_authenticate(body: &[u8]) -> BodyResult<&str> {
    Reader::new(body).string()
}

/// The token of AUTH_RESPONSE, AUTH_CHALLENGE or AUTH_SUCCESS (null reads as empty).
pub fn parse_auth_token(body: &[u8]) -> BodyResult<&[u8]> {
    Ok(Reader::new(body).bytes()?.unwrap_or(&[]))
}

/// Splits a PLAIN SASL token `authzid \0 user \0 password`.
pub fn parse_plain_token(token: &[u8]) -> BodyResult<(&str, &[u8])> {
    let mut parts = token.splitn(3, |b| *b == 0);
    let _authzid = parts.next().ok_or(BodyError::Invalid("PLAIN token"))?;
    let user = parts.next().ok_or(BodyError::Invalid("PLAIN token"))?;
    let password = parts.next().ok_or(BodyError::Invalid("PLAIN token"))?;
    let user = std::str::from_utf8(user).map_err(|_| BodyError::InvalidUtf8("user name"))?;
    Ok((user, password))
}

pub fn plain_token(user: &str, password: &str) -> Vec<u8> {
    let mut t = Vec::with_capacity(2 + user.len() + password.len());
    t.push(0);
    t.extend_from_slice(user.as_bytes());
    t.push(0);
    t.extend_from_slice(password.as_bytes());
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_frame_layout() {
        let f = error(ProtocolVersion::V4, 7, error_code::PROTOCOL_ERROR, "x");
        assert_eq!(
            hex::encode(f.to_bytes()),
            "8400000700000000070000000a000178"
        );
        let info = ErrorInfo::parse(&f.body).unwrap();
        assert_eq!(info.code, error_code::PROTOCOL_ERROR);
        assert_eq!(info.message, "x");
    }

    #[test]
    fn version_error_text_matches_keyspaces() {
        assert_eq!(
            unsupported_version_message(5),
            "Invalid or unsupported protocol version (5); supported versions are (3/v3, 4/v4)"
        );
    }

    #[test]
    fn plain_token_round_trip() {
        let t = plain_token("alice", "s3cret");
        assert_eq!(parse_plain_token(&t).unwrap(), ("alice", &b"s3cret"[..]));
        assert!(parse_plain_token(b"nonul").is_err());
    }

    #[test]
    fn message_body_skips_tracing_and_warnings() {
        let mut b = BytesMut::new();
        b.put_slice(&[9; 16]);
        b.put_string_list(&["careful"]);
        b.put_i32(1);
        let mut h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        h.flags = flags::TRACING | flags::WARNING;
        assert_eq!(message_body(&h, &b).unwrap(), &[0, 0, 0, 1]);
    }
}
