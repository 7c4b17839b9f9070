//! The protocol's notation (spec §3): [short], [int], [string], [bytes], maps and lists.
//!
//! `Reader` walks a borrowed body and never panics: every length is checked against what is left,
//! because every byte here may come from a hostile peer.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};

#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum BodyError {
    #[error("body ended early while reading {0}")]
    Truncated(&'static str),
    #[error("invalid UTF-8 in {0}")]
    InvalidUtf8(&'static str),
    #[error("invalid value: {0}")]
    Invalid(&'static str),
}

pub type BodyResult<T> = Result<T, BodyError>;

#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> BodyResult<&'a [u8]> {
        if self.buf.len() < n {
            return Err(BodyError::Truncated(what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> BodyResult<u8> {
        Ok(self.take(1, "byte")?[0])
    }

    pub fn u16(&mut self) -> BodyResult<u16> {
        let b = self.take(2, "short")?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> BodyResult<i32> {
        let b = self.take(4, "int")?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u32(&mut self) -> BodyResult<u32> {
        Ok(self.i32()? as u32)
    }

    pub fn string(&mut self) -> BodyResult<&'a str> {
        let n = self.u16()? as usize;
        let raw = self.take(n, "string")?;
        std::str::from_utf8(raw).map_err(|_| BodyError::InvalidUtf8("string"))
    }

    pub fn long_string(&mut self) -> BodyResult<&'a str> {
        let n = self.i32()?;
        if n < 0 {
            return Err(BodyError::Invalid("negative long string length"));
        }
        let raw = self.take(n as usize, "long string")?;
        std::str::from_utf8(raw).map_err(|_| BodyError::InvalidUtf8("long string"))
    }

    /// [bytes]: `None` for a negative length (null).
    pub fn bytes(&mut self) -> BodyResult<Option<&'a [u8]>> {
        let n = self.i32()?;
        if n < 0 {
            return Ok(None);
        }
        Ok(Some(self.take(n as usize, "bytes")?))
    }

    pub fn short_bytes(&mut self) -> BodyResult<&'a [u8]> {
        let n = self.u16()? as usize;
        self.take(n, "short bytes")
    }

    pub fn string_list(&mut self) -> BodyResult<Vec<&'a str>> {
        let n = self.u16()? as usize;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            out.push(self.string()?);
        }
        Ok(out)
    }

    pub fn string_map(&mut self) -> BodyResult<HashMap<&'a str, &'a str>> {
        let n = self.u16()? as usize;
        let mut out = HashMap::with_capacity(n.min(64));
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            out.insert(k, v);
        }
        Ok(out)
    }

    pub fn string_multimap(&mut self) -> BodyResult<HashMap<&'a str, Vec<&'a str>>> {
        let n = self.u16()? as usize;
        let mut out = HashMap::with_capacity(n.min(64));
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string_list()?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// [bytes map], used by custom payloads; skipped rather than read.
    pub fn skip_bytes_map(&mut self) -> BodyResult<()> {
        let n = self.u16()? as usize;
        for _ in 0..n {
            self.string()?;
            self.bytes()?;
        }
        Ok(())
    }

    pub fn uuid(&mut self) -> BodyResult<&'a [u8]> {
        self.take(16, "uuid")
    }

    /// [inet]: a one-byte address length, the address, then an [int] port.
    pub fn inet(&mut self) -> BodyResult<(IpAddr, i32)> {
        let n = self.u8()? as usize;
        let raw = self.take(n, "inet")?;
        let ip = ip_from_bytes(raw).ok_or(BodyError::Invalid("inet address length"))?;
        Ok((ip, self.i32()?))
    }
}

pub fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(raw).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(raw).ok()?)),
        _ => None,
    }
}

pub fn ip_to_bytes(ip: IpAddr) -> Bytes {
    match ip {
        IpAddr::V4(v4) => Bytes::copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => Bytes::copy_from_slice(&v6.octets()),
    }
}

/// Writers for the same notation.
pub trait WriteExt: BufMut {
    fn put_string(&mut self, s: &str) {
        self.put_u16(s.len() as u16);
        self.put_slice(s.as_bytes());
    }

    fn put_long_string(&mut self, s: &str) {
        self.put_i32(s.len() as i32);
        self.put_slice(s.as_bytes());
    }

    fn put_bytes_value(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => {
                self.put_i32(b.len() as i32);
                self.put_slice(b);
            }
            None => self.put_i32(-1),
        }
    }

    fn put_short_bytes(&mut self, b: &[u8]) {
        self.put_u16(b.len() as u16);
        self.put_slice(b);
    }

    fn put_string_list(&mut self, items: &[&str]) {
        self.put_u16(items.len() as u16);
        for s in items {
            self.put_string(s);
        }
    }

    fn put_string_map(&mut self, entries: &[(&str, &str)]) {
        self.put_u16(entries.len() as u16);
        for (k, v) in entries {
            self.put_string(k);
            self.put_string(v);
        }
    }

    fn put_string_multimap(&mut self, entries: &[(&str, &[&str])]) {
        self.put_u16(entries.len() as u16);
        for (k, v) in entries {
            self.put_string(k);
            self.put_string_list(v);
        }
    }
}

impl WriteExt for BytesMut {}
impl WriteExt for Vec<u8> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes() {
        let mut b = BytesMut::new();
        b.put_string("CQL_VERSION");
        b.put_long_string("SELECT * FROM t");
        b.put_bytes_value(None);
        b.put_bytes_value(Some(b"ab"));
        b.put_string_map(&[("a", "b")]);
        b.put_string_multimap(&[("COMPRESSION", &["lz4", "snappy"])]);
        let mut r = Reader::new(&b);
        assert_eq!(r.string().unwrap(), "CQL_VERSION");
        assert_eq!(r.long_string().unwrap(), "SELECT * FROM t");
        assert_eq!(r.bytes().unwrap(), None);
        assert_eq!(r.bytes().unwrap(), Some(&b"ab"[..]));
        assert_eq!(r.string_map().unwrap().get("a"), Some(&"b"));
        assert_eq!(
            r.string_multimap().unwrap().get("COMPRESSION"),
            Some(&vec!["lz4", "snappy"])
        );
        assert!(r.is_empty());
    }

    #[test]
    fn hostile_lengths_are_errors_not_panics() {
        assert!(Reader::new(&[0xff, 0xff]).string().is_err());
        assert!(Reader::new(&[0x7f, 0xff, 0xff, 0xff])
            .long_string()
            .is_err());
        assert!(Reader::new(&[0xff, 0xff, 0xff, 0xfe])
            .long_string()
            .is_err());
        assert!(Reader::new(&[0, 2, 0xff, 0xfe]).string().is_err());
        assert!(Reader::new(&[5, 1, 2]).inet().is_err());
    }
}
