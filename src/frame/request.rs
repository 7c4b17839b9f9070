//! The prefixes of QUERY, PREPARE and EXECUTE bodies that routing needs; values stay unread.

use super::types::{BodyResult, Reader};

pub mod query_flags {
    pub const VALUES: u8 = 0x01;
    pub const SKIP_METADATA: u8 = 0x02;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPrefix<'a> {
    pub text: &'a str,
    pub consistency: u16,
    pub flags: u8,
}

/// QUERY: `<query: long string><consistency: short><flags: byte>...`
pub fn parse_query(body: &[u8]) -> BodyResult<QueryPrefix<'_>> {
    let mut r = Reader::new(body);
    let text = r.long_string()?;
    let consistency = r.u16()?;
    let flags = r.u8()?;
    Ok(QueryPrefix {
        text,
        consistency,
        flags,
    })
}

/// PREPARE: `<query: long string>` (v5 adds flags and keyspace, ignored here).
pub fn parse_prepare(body: &[u8]) -> BodyResult<&str> {
    Reader::new(body).long_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutePrefix<'a> {
    pub id: &'a [u8],
    pub consistency: u16,
    pub flags: u8,
}

/// EXECUTE (v3/v4): `<id: short bytes><consistency: short><flags: byte>...`
pub fn parse_execute(body: &[u8]) -> BodyResult<ExecutePrefix<'_>> {
    let mut r = Reader::new(body);
    let id = r.short_bytes()?;
    let consistency = r.u16()?;
    let flags = r.u8()?;
    Ok(ExecutePrefix {
        id,
        consistency,
        flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::messages;
    use crate::frame::ProtocolVersion;

    #[test]
    fn query_prefix() {
        let f = messages::query(ProtocolVersion::V4, 1, "SELECT * FROM system.local", 6);
        let q = parse_query(&f.body).unwrap();
        assert_eq!(q.text, "SELECT * FROM system.local");
        assert_eq!(q.consistency, 6);
        assert_eq!(q.flags, 0);
    }

    #[test]
    fn execute_prefix() {
        let body = [0, 2, 0xab, 0xcd, 0, 1, query_flags::SKIP_METADATA];
        let e = parse_execute(&body).unwrap();
        assert_eq!(e.id, &[0xab, 0xcd]);
        assert_eq!(
            e.flags & query_flags::SKIP_METADATA,
            query_flags::SKIP_METADATA
        );
        assert!(parse_execute(&body[..3]).is_err());
    }
}
