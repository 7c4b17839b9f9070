//! Structural validation of request bodies (native protocol v3 and v4, spec §4.1) before they
//! go onto an upstream connection that other clients share. A Cassandra-like server closes the
//! connection on a body it cannot decode (Cassandra 3.11 does on a ProtocolException), which
//! fails every other client's requests in flight there; so a body is walked here first, field by
//! field as the flags say, without copying or building anything, and a malformed one is
//! answered on its own stream instead.
//!
//! Only structure is checked: lengths, UTF-8, known flag bits and enum codes, nothing left over.
//! What a well-formed statement means (its CQL, its values' types) is the server's to judge, and
//! it answers that with an ordinary error.

use super::header::opcode;
use super::types::{BodyError, BodyResult, Reader};
use super::version::ProtocolVersion;

/// Query parameter flags (§4.1.4).
mod query_flags {
    pub(super) const VALUES: u8 = 0x01;
    pub(super) const SKIP_METADATA: u8 = 0x02;
    pub(super) const PAGE_SIZE: u8 = 0x04;
    pub(super) const PAGING_STATE: u8 = 0x08;
    pub(super) const SERIAL_CONSISTENCY: u8 = 0x10;
    pub(super) const DEFAULT_TIMESTAMP: u8 = 0x20;
    pub(super) const NAMES_FOR_VALUES: u8 = 0x40;
    pub(super) const KNOWN: u8 = VALUES
        | SKIP_METADATA
        | PAGE_SIZE
        | PAGING_STATE
        | SERIAL_CONSISTENCY
        | DEFAULT_TIMESTAMP
        | NAMES_FOR_VALUES;
}

/// BATCH flags (§4.1.7): the same bits as the query flags they share.
const BATCH_KNOWN_FLAGS: u8 = query_flags::SERIAL_CONSISTENCY | query_flags::DEFAULT_TIMESTAMP;

/// The highest consistency code (LOCAL_ONE); Cassandra refuses unknown codes with a
/// ProtocolException.
const MAX_CONSISTENCY: u16 = 0x000A;

fn invalid(what: &'static str) -> BodyError {
    BodyError::Invalid(what)
}

fn consistency(r: &mut Reader<'_>) -> BodyResult<()> {
    if r.u16()? > MAX_CONSISTENCY {
        return Err(invalid("unknown consistency level"));
    }
    Ok(())
}

/// A bound value: [bytes] in v3 (any negative length is null); [value] in v4, where -1 is null,
/// -2 unset, and anything lower an error.
/// A [long] timestamp; Cassandra refuses i64::MIN with a ProtocolException.
fn timestamp(r: &mut Reader<'_>) -> BodyResult<()> {
    if r.take(8, "timestamp")? == i64::MIN.to_be_bytes() {
        return Err(invalid("timestamp out of bounds"));
    }
    Ok(())
}

fn value(r: &mut Reader<'_>, version: ProtocolVersion) -> BodyResult<()> {
    let n = r.i32()?;
    match n {
        0.. => r.take(n as usize, "value").map(|_| ()),
        -1 => Ok(()),
        -2 if version.has_unset_values() => Ok(()),
        _ if !version.has_unset_values() => Ok(()),
        _ => Err(invalid("value length below -2")),
    }
}

fn values(r: &mut Reader<'_>, version: ProtocolVersion, named: bool) -> BodyResult<()> {
    let n = r.u16()?;
    for _ in 0..n {
        if named {
            r.string()?;
        }
        value(r, version)?;
    }
    Ok(())
}

/// `<consistency><flags>[values][page size][paging state][serial consistency][timestamp]`.
fn query_parameters(r: &mut Reader<'_>, version: ProtocolVersion) -> BodyResult<()> {
    use query_flags::*;
    consistency(r)?;
    let flags = r.u8()?;
    if flags & !KNOWN != 0 {
        return Err(invalid("unknown query flags"));
    }
    if flags & VALUES != 0 {
        values(r, version, flags & NAMES_FOR_VALUES != 0)?;
    }
    if flags & PAGE_SIZE != 0 && r.i32()? == 0 {
        return Err(invalid("page size 0"));
    }
    if flags & PAGING_STATE != 0 {
        r.bytes()?;
    }
    if flags & SERIAL_CONSISTENCY != 0 {
        consistency(r)?;
    }
    if flags & DEFAULT_TIMESTAMP != 0 {
        timestamp(r)?;
    }
    Ok(())
}

fn batch(r: &mut Reader<'_>, version: ProtocolVersion) -> BodyResult<()> {
    if r.u8()? > 2 {
        return Err(invalid("unknown batch type"));
    }
    let n = r.u16()?;
    for _ in 0..n {
        match r.u8()? {
            0 => {
                r.long_string()?;
            }
            1 => {
                r.short_bytes()?;
            }
            _ => return Err(invalid("unknown batch entry kind")),
        }
        // Names for batch values (flag 0x40) are refused below, so values are never named.
        values(r, version, false)?;
    }
    consistency(r)?;
    let flags = r.u8()?;
    if flags & !BATCH_KNOWN_FLAGS != 0 {
        return Err(invalid("unknown or unsupported batch flags"));
    }
    if flags & query_flags::SERIAL_CONSISTENCY != 0 {
        consistency(r)?;
    }
    if flags & query_flags::DEFAULT_TIMESTAMP != 0 {
        timestamp(r)?;
    }
    Ok(())
}

/// Checks the message body of a request (after any custom payload; uncompressed). Opcodes the
/// proxy never forwards pass: the router answers them itself.
pub fn validate_request(version: ProtocolVersion, op: u8, body: &[u8]) -> BodyResult<()> {
    let mut r = Reader::new(body);
    match op {
        opcode::QUERY => {
            r.long_string()?;
            query_parameters(&mut r, version)?;
        }
        opcode::PREPARE => {
            r.long_string()?;
        }
        opcode::EXECUTE => {
            if r.short_bytes()?.is_empty() {
                return Err(invalid("empty statement id"));
            }
            query_parameters(&mut r, version)?;
        }
        opcode::BATCH => batch(&mut r, version)?,
        opcode::REGISTER => {
            r.string_list()?;
        }
        opcode::OPTIONS => {}
        _ => return Ok(()),
    }
    if !r.is_empty() {
        return Err(invalid("bytes after the end of the message"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};

    use super::*;
    use crate::frame::messages;
    use crate::frame::types::WriteExt;

    fn ok(version: ProtocolVersion, op: u8, body: &[u8]) {
        assert_eq!(validate_request(version, op, body), Ok(()), "{body:02x?}");
    }

    fn bad(version: ProtocolVersion, op: u8, body: &[u8]) {
        assert!(
            validate_request(version, op, body).is_err(),
            "accepted {body:02x?}"
        );
    }

    /// QUERY `SELECT 1` at LOCAL_QUORUM with `flags` and `tail` after them.
    fn query(flags: u8, tail: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_long_string("SELECT 1");
        b.put_u16(6);
        b.put_u8(flags);
        b.put_slice(tail);
        b.to_vec()
    }

    #[test]
    fn the_proxys_own_messages_are_valid() {
        let q = messages::query(ProtocolVersion::V4, 1, "SELECT * FROM system.local", 6);
        ok(ProtocolVersion::V4, opcode::QUERY, &q.body);
        ok(ProtocolVersion::V4, opcode::OPTIONS, &[]);
    }

    #[test]
    fn every_query_flag_is_walked() {
        // values: one 4-byte value, one null, one unset (v4 only).
        let vals = [
            &[0, 3][..],
            &[0, 0, 0, 4, 1, 2, 3, 4],
            &(-1i32).to_be_bytes(),
            &(-2i32).to_be_bytes(),
        ]
        .concat();
        ok(ProtocolVersion::V4, opcode::QUERY, &query(0x01, &vals));
        ok(ProtocolVersion::V3, opcode::QUERY, &query(0x01, &vals));
        // named values
        let named = [&[0, 1, 0, 1, b'k'][..], &[0, 0, 0, 1, 9]].concat();
        ok(ProtocolVersion::V4, opcode::QUERY, &query(0x41, &named));
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &query(0x01, &named[2..]),
        );
        // page size, paging state, serial consistency, timestamp, all at once
        let tail = [
            &5000i32.to_be_bytes()[..],
            &[0, 0, 0, 2, 0xab, 0xcd],
            &[0, 9],
            &1_700_000_000_000_000i64.to_be_bytes(),
        ]
        .concat();
        ok(ProtocolVersion::V4, opcode::QUERY, &query(0x3c, &tail));
        for cut in 0..tail.len() {
            bad(
                ProtocolVersion::V4,
                opcode::QUERY,
                &query(0x3c, &tail[..cut]),
            );
        }
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &query(0x3c, &[&tail[..], &[0]].concat()),
        );
    }

    #[test]
    fn malformed_queries_are_refused() {
        bad(ProtocolVersion::V4, opcode::QUERY, &query(0x80, &[])); // unknown flag
        bad(ProtocolVersion::V4, opcode::QUERY, &query(0x00, &[0])); // trailing byte
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &query(0x04, &0i32.to_be_bytes()),
        ); // page size 0
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &query(0x20, &i64::MIN.to_be_bytes()),
        );
        bad(ProtocolVersion::V4, opcode::QUERY, &query(0x10, &[0, 0x0b])); // unknown serial consistency
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &query(0x01, &[&[0, 1][..], &(-3i32).to_be_bytes()].concat()),
        );
        // v3 reads any negative length as null
        ok(
            ProtocolVersion::V3,
            opcode::QUERY,
            &query(0x01, &[&[0, 1][..], &(-3i32).to_be_bytes()].concat()),
        );
        // [long string "SELECT 1"] is 12 bytes; the consistency's low byte is at 13.
        let mut q = query(0, &[]);
        q[13] = 0; // ANY is fine...
        ok(ProtocolVersion::V4, opcode::QUERY, &q);
        q[13] = 0x0b; // ...0x000b is no consistency level
        bad(ProtocolVersion::V4, opcode::QUERY, &q);
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &[0, 0, 0, 2, 0xff, 0xfe, 0, 6, 0],
        ); // invalid UTF-8
        bad(
            ProtocolVersion::V4,
            opcode::QUERY,
            &[0xff, 0xff, 0xff, 0xff],
        ); // negative text length
        bad(ProtocolVersion::V4, opcode::QUERY, &[]);
    }

    #[test]
    fn execute_prepare_register() {
        let mut e = vec![0, 2, 0xab, 0xcd, 0, 6, 0x01, 0, 1, 0, 0, 0, 1, 7];
        ok(ProtocolVersion::V4, opcode::EXECUTE, &e);
        e.push(0);
        bad(ProtocolVersion::V4, opcode::EXECUTE, &e);
        bad(ProtocolVersion::V4, opcode::EXECUTE, &[0, 0, 0, 6, 0]); // empty id
        let mut p = BytesMut::new();
        p.put_long_string("SELECT * FROM t WHERE k = ?");
        ok(ProtocolVersion::V4, opcode::PREPARE, &p);
        p.put_u8(0);
        bad(ProtocolVersion::V4, opcode::PREPARE, &p);
        let r = [&[0, 1, 0, 15][..], b"SCHEMA_CHANGE"].concat();
        bad(ProtocolVersion::V4, opcode::REGISTER, &r);
        let r = [&[0, 1, 0, 13][..], b"SCHEMA_CHANGE"].concat();
        ok(ProtocolVersion::V4, opcode::REGISTER, &r);
        bad(ProtocolVersion::V4, opcode::OPTIONS, &[0]);
    }

    #[test]
    fn batches() {
        let mut b = BytesMut::new();
        b.put_u8(1); // unlogged
        b.put_u16(2);
        b.put_u8(0);
        b.put_long_string("INSERT INTO t (k) VALUES (?)");
        b.put_u16(1);
        b.put_i32(1);
        b.put_u8(5);
        b.put_u8(1);
        b.put_u16(2);
        b.put_slice(&[0xab, 0xcd]);
        b.put_u16(1);
        b.put_i32(-2);
        b.put_u16(6);
        let entries = b.to_vec();
        let with = |flags: u8, tail: &[u8]| [&entries[..], &[flags], tail].concat();
        ok(ProtocolVersion::V4, opcode::BATCH, &with(0, &[]));
        ok(
            ProtocolVersion::V4,
            opcode::BATCH,
            &with(0x30, &[&[0, 8][..], &7i64.to_be_bytes()].concat()),
        );
        bad(ProtocolVersion::V4, opcode::BATCH, &with(0x40, &[])); // names: unsupported
        bad(ProtocolVersion::V4, opcode::BATCH, &with(0x01, &[]));
        bad(ProtocolVersion::V4, opcode::BATCH, &with(0, &[1]));
        bad(ProtocolVersion::V3, opcode::BATCH, &with(0x20, &[0; 7]));
        let mut wrong_type = with(0, &[]);
        wrong_type[0] = 3;
        bad(ProtocolVersion::V4, opcode::BATCH, &wrong_type);
        let mut wrong_kind = with(0, &[]);
        wrong_kind[3] = 2;
        bad(ProtocolVersion::V4, opcode::BATCH, &wrong_kind);
        for cut in 0..entries.len() {
            bad(ProtocolVersion::V4, opcode::BATCH, &entries[..cut]);
        }
    }
}
