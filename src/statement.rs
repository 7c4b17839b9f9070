//! Cheap classification of CQL text and in-place consistency rewriting, for the few decisions
//! the proxy makes about statements (read/write, Keyspaces' consistency rules; `USE` has a
//! module of its own, `use_statement`).

use bytes::{Bytes, BytesMut};

use crate::frame::messages::{consistency, message_body};
use crate::frame::types::{BodyResult, Reader};
use crate::frame::{opcode, Frame};
use crate::policy::prepared::PreparedCache;

fn first_word(cql: &str) -> &str {
    let t = cql.trim_start();
    let end = t
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(t.len());
    &t[..end]
}

pub(crate) fn is_select(cql: &str) -> bool {
    first_word(cql).eq_ignore_ascii_case("select")
}

pub(crate) fn is_write(cql: &str) -> bool {
    let w = first_word(cql);
    ["insert", "update", "delete", "begin"]
        .iter()
        .any(|k| w.eq_ignore_ascii_case(k))
}

/// The consistency Keyspaces accepts for a statement sent at `cl`, or `None` if `cl` is fine.
fn keyspaces_level(write: bool, cl: u16) -> Option<u16> {
    let ok = if write {
        cl == consistency::LOCAL_QUORUM
    } else {
        matches!(
            cl,
            consistency::ONE | consistency::LOCAL_ONE | consistency::LOCAL_QUORUM
        )
    };
    (!ok).then_some(consistency::LOCAL_QUORUM)
}

/// Byte offset (within the message body) of the [consistency] of QUERY, EXECUTE or BATCH, and
/// whether the statement writes. `None` when it cannot be told.
fn consistency_slot(
    op: u8,
    body: &[u8],
    prepared: &PreparedCache,
) -> BodyResult<Option<(usize, bool)>> {
    let mut r = Reader::new(body);
    let write = match op {
        opcode::QUERY => {
            let text = r.long_string()?;
            if is_write(text) {
                true
            } else if is_select(text) {
                false
            } else {
                return Ok(None);
            }
        }
        opcode::EXECUTE => {
            let id = r.short_bytes()?;
            match prepared.get(id) {
                Some(s) if is_write(&s.query) => true,
                Some(s) if is_select(&s.query) => false,
                _ => return Ok(None),
            }
        }
        opcode::BATCH => {
            r.u8()?;
            let n = r.u16()?;
            for _ in 0..n {
                match r.u8()? {
                    0 => {
                        r.long_string()?;
                    }
                    _ => {
                        r.short_bytes()?;
                    }
                }
                let values = r.u16()?;
                for _ in 0..values {
                    // [value]: -1 null and -2 unset carry no bytes.
                    r.bytes()?;
                }
            }
            true
        }
        _ => return Ok(None),
    };
    Ok(Some((body.len() - r.remaining().len(), write)))
}

/// Returns the frame with its consistency raised to what Keyspaces accepts, or unchanged.
/// Bodies must be uncompressed.
pub(crate) fn guard_consistency(frame: Frame, prepared: &PreparedCache) -> Frame {
    let Ok(message) = message_body(&frame.header, &frame.body) else {
        return frame;
    };
    let prefix = frame.body.len() - message.len();
    let Ok(Some((offset, write))) = consistency_slot(frame.opcode(), message, prepared) else {
        return frame;
    };
    let at = prefix + offset;
    let Some(cl) = frame
        .body
        .get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
    else {
        return frame;
    };
    let Some(level) = keyspaces_level(write, cl) else {
        return frame;
    };
    let mut body = BytesMut::from(&frame.body[..]);
    body[at..at + 2].copy_from_slice(&level.to_be_bytes());
    Frame::new(frame.header, Bytes::from(body))
}

#[cfg(test)]
mod tests {
    use crate::frame::ProtocolVersion;
    use std::sync::Arc;

    use bytes::BufMut;

    use super::*;
    use crate::frame::messages;
    use crate::frame::request::{parse_execute, parse_query};
    use crate::frame::types::WriteExt;
    use crate::policy::prepared::PreparedStatement;

    #[test]
    fn raises_write_consistency_only() {
        let cache = PreparedCache::new(8);
        let q = guard_consistency(
            messages::query(
                ProtocolVersion::V4,
                1,
                "INSERT INTO t (a) VALUES (1)",
                consistency::LOCAL_ONE,
            ),
            &cache,
        );
        assert_eq!(
            parse_query(&q.body).unwrap().consistency,
            consistency::LOCAL_QUORUM
        );
        let r = messages::query(
            ProtocolVersion::V4,
            1,
            "SELECT * FROM t",
            consistency::LOCAL_ONE,
        );
        assert_eq!(guard_consistency(r.clone(), &cache), r);
        let r = guard_consistency(
            messages::query(
                ProtocolVersion::V4,
                1,
                "select * from t",
                consistency::QUORUM,
            ),
            &cache,
        );
        assert_eq!(
            parse_query(&r.body).unwrap().consistency,
            consistency::LOCAL_QUORUM
        );
        let ddl = messages::query(
            ProtocolVersion::V4,
            1,
            "CREATE TABLE t (a int PRIMARY KEY)",
            consistency::ONE,
        );
        assert_eq!(guard_consistency(ddl.clone(), &cache), ddl);
    }

    #[test]
    fn prepared_writes_use_the_cached_statement() {
        let cache = PreparedCache::new(8);
        cache.insert(
            Bytes::from_static(b"w1"),
            PreparedStatement {
                system: None,
                query: Arc::from("UPDATE t SET a = ? WHERE k = ?"),
                keyspace: None,
            },
        );
        let mut b = BytesMut::new();
        b.put_short_bytes(b"w1");
        b.put_u16(consistency::ONE);
        b.put_u8(0);
        let f = Frame::new(
            crate::frame::Header::request(ProtocolVersion::V4, 1, opcode::EXECUTE),
            b.freeze(),
        );
        let out = guard_consistency(f, &cache);
        assert_eq!(
            parse_execute(&out.body).unwrap().consistency,
            consistency::LOCAL_QUORUM
        );
    }

    #[test]
    fn batches_are_writes() {
        let mut b = BytesMut::new();
        b.put_u8(1); // unlogged
        b.put_u16(2);
        b.put_u8(0);
        b.put_long_string("INSERT INTO t (a) VALUES (?)");
        b.put_u16(1);
        b.put_bytes_value(Some(&[0, 0, 0, 1]));
        b.put_u8(1);
        b.put_short_bytes(b"id");
        b.put_u16(1);
        b.put_i32(-2); // unset
        b.put_u16(consistency::ONE);
        b.put_u8(0);
        let len = b.len();
        let f = Frame::new(
            crate::frame::Header::request(ProtocolVersion::V4, 1, opcode::BATCH),
            b.freeze(),
        );
        let out = guard_consistency(f, &PreparedCache::new(1));
        assert_eq!(
            &out.body[len - 3..len - 1],
            &consistency::LOCAL_QUORUM.to_be_bytes()
        );
    }
}
