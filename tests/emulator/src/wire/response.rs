//! Response bodies the emulator writes itself (native_protocol_v4.spec §4.2); RESULT bodies
//! come from kassandra.

use bytes::{Buf, BufMut, Bytes, BytesMut};

fn string(b: &mut BytesMut, s: &str) {
    // Longer strings cannot be represented; the emulator's own texts are far shorter.
    let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    b.put_u16(s.len() as u16);
    b.put_slice(s);
}

fn bytes(b: &mut BytesMut, v: Option<&[u8]>) {
    match v {
        Some(v) => {
            b.put_i32(v.len() as i32);
            b.put_slice(v);
        }
        None => b.put_i32(-1),
    }
}

/// ERROR: `<code><message>` and the code's own fields (`extra`, already encoded).
pub fn error_with(code: i32, message: &str, extra: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_i32(code);
    string(&mut b, message);
    b.put_slice(extra);
    b.freeze()
}

pub fn error(code: i32, message: &str) -> Bytes {
    error_with(code, message, &[])
}

/// UNPREPARED carries the unknown id as [short bytes] (native_protocol_v4.spec §9).
pub fn unprepared(id: &[u8], message: &str) -> Bytes {
    let mut extra = BytesMut::new();
    extra.put_u16(id.len() as u16);
    extra.put_slice(id);
    error_with(super::error_code::UNPREPARED, message, &extra)
}

/// Read_timeout / Write_timeout's fields: `<cl><received><blockfor>` then `<data_present>`
/// (reads) or `<writeType>` (writes) (native_protocol_v4.spec §9).
pub fn timeout_fields(cl: u16, received: i32, block_for: i32, write_type: Option<&str>) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u16(cl);
    b.put_i32(received);
    b.put_i32(block_for);
    match write_type {
        Some(w) => string(&mut b, w),
        None => b.put_u8(0),
    }
    b.freeze()
}

pub fn supported(options: &[(&str, &[&str])]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u16(options.len() as u16);
    for (k, values) in options {
        string(&mut b, k);
        b.put_u16(values.len() as u16);
        for v in *values {
            string(&mut b, v);
        }
    }
    b.freeze()
}

pub fn authenticate(class: &str) -> Bytes {
    let mut b = BytesMut::new();
    string(&mut b, class);
    b.freeze()
}

pub fn auth_token(token: Option<&[u8]>) -> Bytes {
    let mut b = BytesMut::new();
    bytes(&mut b, token);
    b.freeze()
}

/// An ERROR body's code and message (tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    pub code: i32,
    pub message: String,
}

impl ErrorInfo {
    pub fn parse(mut body: &[u8]) -> Option<ErrorInfo> {
        if body.len() < 6 {
            return None;
        }
        let code = body.get_i32();
        let n = body.get_u16() as usize;
        let message = String::from_utf8_lossy(body.get(..n)?).into_owned();
        Some(ErrorInfo { code, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_read_back() {
        let b = unprepared(&[1, 2], "Prepared query with ID 0102 not found");
        assert_eq!(
            ErrorInfo::parse(&b),
            Some(ErrorInfo {
                code: 0x2500,
                message: "Prepared query with ID 0102 not found".into()
            })
        );
        assert_eq!(&b[b.len() - 4..], &[0, 2, 1, 2]);
    }
}
