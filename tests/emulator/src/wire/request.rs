//! Request bodies, decoded strictly. Where the spec leaves room, the emulator takes the
//! strictest reading a real server could (Cassandra raises ProtocolException for unknown
//! consistency codes, batch types and entry kinds, an i64::MIN timestamp, a page size of 0 —
//! in its ConsistencyLevel, BatchMessage and QueryOptions codecs and Query/ExecuteMessage;
//! the emulator also refuses unknown flag bits, unknown event types, invalid UTF-8 and bytes
//! past the end of a message), so a client or proxy that sends anything a strict server would
//! close on is caught here.

use std::collections::BTreeMap;

use super::{consistency, flags, opcode};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn fail<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(msg.into()))
}

/// A bound value (spec §3 [value]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Bytes(&'a [u8]),
    Null,
    Unset,
}

/// `<consistency><flags>...` (spec §4.1.4), shared by QUERY and EXECUTE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters<'a> {
    pub consistency: u16,
    pub values: Vec<(Option<&'a str>, Value<'a>)>,
    pub skip_metadata: bool,
    pub page_size: Option<i32>,
    pub paging_state: Option<&'a [u8]>,
    pub serial_consistency: Option<u16>,
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchEntry<'a> {
    Query(&'a str, Vec<Value<'a>>),
    Prepared(&'a [u8], Vec<Value<'a>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch<'a> {
    pub kind: u8,
    pub entries: Vec<BatchEntry<'a>>,
    pub consistency: u16,
    pub serial_consistency: Option<u16>,
    pub timestamp: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    Startup(BTreeMap<&'a str, &'a str>),
    Options,
    AuthResponse(Option<&'a [u8]>),
    Query(&'a str, Parameters<'a>),
    Prepare(&'a str),
    Execute(&'a [u8], Parameters<'a>),
    Batch(Batch<'a>),
    Register(Vec<&'a str>),
}

/// The spec's notation types (§3), read from a slice.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return fail(format!(
                "Not enough bytes to read {what}: {n} needed, {} left",
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1, "a byte")?[0])
    }

    fn short(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2, "a short")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn int(&mut self) -> Result<i32, DecodeError> {
        let b = self.take(4, "an int")?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn long(&mut self) -> Result<i64, DecodeError> {
        let b = self.take(8, "a long")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn utf8(raw: &'a [u8]) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(raw).or_else(|_| fail("Invalid UTF-8 in a string"))
    }

    fn string(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.short()? as usize;
        Self::utf8(self.take(n, "a string")?)
    }

    fn long_string(&mut self) -> Result<&'a str, DecodeError> {
        let n = self.int()?;
        if n < 0 {
            return fail(format!("Negative long string length {n}"));
        }
        Self::utf8(self.take(n as usize, "a long string")?)
    }

    fn bytes(&mut self) -> Result<Option<&'a [u8]>, DecodeError> {
        let n = self.int()?;
        if n < 0 {
            return Ok(None);
        }
        self.take(n as usize, "bytes").map(Some)
    }

    fn short_bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.short()? as usize;
        self.take(n, "short bytes")
    }

    /// Cassandra's CBUtil.readBoundValue: -1 is null; -2 is "unset" from v4 on; before v4 any
    /// negative length is null (native_protocol_v4.spec §3 [value]).
    fn value(&mut self, version: u8) -> Result<Value<'a>, DecodeError> {
        match self.int()? {
            n if n >= 0 => self.take(n as usize, "a value").map(Value::Bytes),
            -1 => Ok(Value::Null),
            -2 if version >= 4 => Ok(Value::Unset),
            _ if version < 4 => Ok(Value::Null),
            n => fail(format!("Invalid value length {n}")),
        }
    }

    fn consistency(&mut self) -> Result<u16, DecodeError> {
        let cl = self.short()?;
        if !consistency::is_known(cl) {
            return fail(format!("Unknown code {cl} for a consistency level"));
        }
        Ok(cl)
    }

    fn timestamp(&mut self) -> Result<i64, DecodeError> {
        let ts = self.long()?;
        if ts == i64::MIN {
            return fail("Out of bound timestamp, must be in [-2^63+1, 2^63-1]");
        }
        Ok(ts)
    }

    fn bytes_map(&mut self) -> Result<(), DecodeError> {
        for _ in 0..self.short()? {
            self.string()?;
            self.bytes()?;
        }
        Ok(())
    }

    fn string_map(&mut self) -> Result<BTreeMap<&'a str, &'a str>, DecodeError> {
        let mut m = BTreeMap::new();
        for _ in 0..self.short()? {
            let k = self.string()?;
            m.insert(k, self.string()?);
        }
        Ok(m)
    }

    fn parameters(&mut self, version: u8) -> Result<Parameters<'a>, DecodeError> {
        const VALUES: u8 = 0x01;
        const SKIP_METADATA: u8 = 0x02;
        const PAGE_SIZE: u8 = 0x04;
        const PAGING_STATE: u8 = 0x08;
        const SERIAL: u8 = 0x10;
        const TIMESTAMP: u8 = 0x20;
        const NAMES: u8 = 0x40;
        let consistency = self.consistency()?;
        let f = self.byte()?;
        if f & 0x80 != 0 {
            return fail(format!("Unknown query flags 0x{f:02x}"));
        }
        let mut values = Vec::new();
        if f & VALUES != 0 {
            for _ in 0..self.short()? {
                let name = if f & NAMES != 0 {
                    Some(self.string()?)
                } else {
                    None
                };
                values.push((name, self.value(version)?));
            }
        }
        let page_size = if f & PAGE_SIZE != 0 {
            match self.int()? {
                0 => return fail("The page size cannot be 0"),
                n => Some(n),
            }
        } else {
            None
        };
        let paging_state = if f & PAGING_STATE != 0 {
            self.bytes()?
        } else {
            None
        };
        let serial_consistency = if f & SERIAL != 0 {
            Some(self.consistency()?)
        } else {
            None
        };
        let timestamp = if f & TIMESTAMP != 0 {
            Some(self.timestamp()?)
        } else {
            None
        };
        Ok(Parameters {
            consistency,
            values,
            skip_metadata: f & SKIP_METADATA != 0,
            page_size,
            paging_state,
            serial_consistency,
            timestamp,
        })
    }

    fn batch(&mut self, version: u8) -> Result<Batch<'a>, DecodeError> {
        let kind = self.byte()?;
        if kind > 2 {
            return fail(format!("Invalid BATCH message type {kind}"));
        }
        let mut entries = Vec::new();
        for _ in 0..self.short()? {
            let entry_kind = self.byte()?;
            let statement = match entry_kind {
                0 => Ok(self.long_string()?),
                1 => Err(self.short_bytes()?),
                k => {
                    return fail(format!(
                        "Invalid query kind in BATCH messages. Must be 0 or 1 but got {k}"
                    ))
                }
            };
            let mut values = Vec::new();
            for _ in 0..self.short()? {
                values.push(self.value(version)?);
            }
            entries.push(match statement {
                Ok(text) => BatchEntry::Query(text, values),
                Err(id) => BatchEntry::Prepared(id, values),
            });
        }
        let consistency = self.consistency()?;
        let f = self.byte()?;
        // Only serial consistency (0x10) and timestamp (0x20) mean anything in a batch; names
        // for values (0x40) would have changed how the entries above are read.
        if f & !0x30 != 0 {
            return fail(format!("Unsupported BATCH flags 0x{f:02x}"));
        }
        let serial_consistency = if f & 0x10 != 0 {
            Some(self.consistency()?)
        } else {
            None
        };
        let timestamp = if f & 0x20 != 0 {
            Some(self.timestamp()?)
        } else {
            None
        };
        Ok(Batch {
            kind,
            entries,
            consistency,
            serial_consistency,
            timestamp,
        })
    }
}

/// Where the message starts in a request body: past the custom payload, if the frame has one.
pub fn message_start(version: u8, frame_flags: u8, body: &[u8]) -> Result<usize, DecodeError> {
    let mut c = Cursor { rest: body };
    if frame_flags & flags::CUSTOM_PAYLOAD != 0 {
        if version < 4 {
            // Cassandra's Message.ProtocolDecoder text.
            return fail("Received frame with CUSTOM_PAYLOAD flag for native protocol version < 4");
        }
        c.bytes_map()?;
    }
    Ok(body.len() - c.rest.len())
}

/// Decodes a request body (already decompressed). `frame_flags` says whether a custom
/// payload precedes the message (v4, spec §2.2).
pub fn decode(
    version: u8,
    frame_flags: u8,
    op: u8,
    body: &[u8],
) -> Result<Request<'_>, DecodeError> {
    decode_message(
        version,
        op,
        &body[message_start(version, frame_flags, body)?..],
    )
}

/// Decodes a request's message: the body past any custom payload ([`message_start`]).
pub fn decode_message(version: u8, op: u8, message: &[u8]) -> Result<Request<'_>, DecodeError> {
    let mut c = Cursor { rest: message };
    let request = match op {
        opcode::STARTUP => Request::Startup(c.string_map()?),
        opcode::OPTIONS => Request::Options,
        opcode::AUTH_RESPONSE => Request::AuthResponse(c.bytes()?),
        opcode::QUERY => {
            let text = c.long_string()?;
            Request::Query(text, c.parameters(version)?)
        }
        opcode::PREPARE => Request::Prepare(c.long_string()?),
        opcode::EXECUTE => {
            let id = c.short_bytes()?;
            Request::Execute(id, c.parameters(version)?)
        }
        opcode::BATCH => Request::Batch(c.batch(version)?),
        opcode::REGISTER => {
            let mut events = Vec::new();
            for _ in 0..c.short()? {
                let e = c.string()?;
                if !matches!(e, "TOPOLOGY_CHANGE" | "STATUS_CHANGE" | "SCHEMA_CHANGE") {
                    return fail(format!("Unknown event type {e:?}"));
                }
                events.push(e);
            }
            Request::Register(events)
        }
        other => return fail(format!("Unknown request opcode 0x{other:02x}")),
    };
    if !c.rest.is_empty() {
        return fail(format!(
            "{} unread bytes after the {} message",
            c.rest.len(),
            opcode::name(op)
        ));
    }
    Ok(request)
}

/// Request bodies, for the emulator's own tests and for test clients.
pub mod build {
    use bytes::{BufMut, Bytes, BytesMut};

    pub fn long_string(b: &mut BytesMut, s: &str) {
        b.put_i32(s.len() as i32);
        b.put_slice(s.as_bytes());
    }

    pub fn query(text: &str, consistency: u16) -> Bytes {
        let mut b = BytesMut::new();
        long_string(&mut b, text);
        b.put_u16(consistency);
        b.put_u8(0);
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BufMut;

    use super::*;

    fn query_with(f: u8, tail: &[u8]) -> Vec<u8> {
        let mut b = build::query("SELECT 1", consistency::ONE).to_vec();
        let n = b.len();
        b[n - 1] = f;
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn a_query_with_every_field() {
        let mut tail = Vec::new();
        tail.put_u16(2);
        tail.put_u16(1);
        tail.put_slice(b"a");
        tail.put_i32(1);
        tail.put_u8(7);
        tail.put_u16(1);
        tail.put_slice(b"b");
        tail.put_i32(-2);
        tail.put_i32(100);
        tail.put_i32(3);
        tail.put_slice(b"abc");
        tail.put_u16(consistency::LOCAL_SERIAL);
        tail.put_i64(42);
        let body = query_with(0x7f, &tail);
        let Request::Query(text, p) = decode(4, 0, opcode::QUERY, &body).unwrap() else {
            panic!()
        };
        assert_eq!(text, "SELECT 1");
        assert_eq!(
            p.values,
            vec![(Some("a"), Value::Bytes(&[7])), (Some("b"), Value::Unset)]
        );
        assert_eq!(p.page_size, Some(100));
        assert_eq!(p.paging_state, Some(&b"abc"[..]));
        assert_eq!(p.serial_consistency, Some(consistency::LOCAL_SERIAL));
        assert_eq!(p.timestamp, Some(42));
        // Unset is v4's: in v3 a -2 length is a null, as Cassandra reads it.
        let Request::Query(_, p) = decode(3, 0, opcode::QUERY, &body).unwrap() else {
            panic!()
        };
        assert_eq!(p.values[1].1, Value::Null);
    }

    #[test]
    fn malformed_bodies_are_refused() {
        let bad = |op: u8, body: &[u8]| {
            assert!(decode(4, 0, op, body).is_err(), "{op:#x} {body:?}");
        };
        bad(opcode::QUERY, &query_with(0x80, &[]));
        bad(opcode::QUERY, &query_with(0x04, &0i32.to_be_bytes()));
        bad(opcode::QUERY, &query_with(0x20, &i64::MIN.to_be_bytes()));
        bad(opcode::QUERY, &query_with(0x00, &[0]));
        bad(
            opcode::QUERY,
            &query_with(0x01, &[0, 1, 0xff, 0xff, 0xff, 0xfd]),
        );
        bad(opcode::QUERY, &[0, 0, 0, 2, 0xc3, 0x28, 0, 1, 0]);
        bad(opcode::QUERY, &[0, 0, 0, 0, 0, 0x0b, 0]);
        bad(opcode::OPTIONS, &[0]);
        bad(opcode::PREPARE, &[0xff, 0xff, 0xff, 0xff]);
        bad(opcode::BATCH, &[3, 0, 0, 0, 1, 0]);
        bad(opcode::BATCH, &[0, 0, 1, 2]);
        bad(opcode::BATCH, &[0, 0, 0, 0, 1, 0x40]);
        bad(opcode::REGISTER, &[0, 1, 0, 3, b'F', b'O', b'O']);
        bad(0x42, &[]);
    }

    #[test]
    fn custom_payload_precedes_the_message() {
        let mut body = vec![0, 1, 0, 1, b'k', 0, 0, 0, 1, b'v'];
        body.extend_from_slice(&build::query("SELECT 1", 1));
        assert!(decode(4, flags::CUSTOM_PAYLOAD, opcode::QUERY, &body).is_ok());
        assert!(decode(4, 0, opcode::QUERY, &body).is_err());
        assert!(decode(3, flags::CUSTOM_PAYLOAD, opcode::QUERY, &body).is_err());
    }
}
