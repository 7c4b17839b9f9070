//! Keyspaces' SigV4 handshake, server side, written from the exchange documented for
//! Keyspaces (KEYSPACES.md, "SigV4 exchange", the same in all four official plugins) and checked
//! against the plugins' known-answer vectors — not from the proxy's signer.

use std::time::SystemTime;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// What the client sends first to ask for a nonce: `SigV4\0\0` (KEYSPACES.md, "SigV4 exchange").
pub const INITIAL_RESPONSE: &[u8] = b"SigV4\0\0";

/// The client's signed response (KEYSPACES.md, "SigV4 exchange", step 3):
/// `signature=<hex>,access_key=<AKID>,amzdate=<TS>[,session_token=<token>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedResponse<'a> {
    pub signature: &'a str,
    pub access_key: &'a str,
    pub amzdate: &'a str,
    pub session_token: Option<&'a str>,
}

impl<'a> SignedResponse<'a> {
    pub fn parse(token: &'a [u8]) -> Result<SignedResponse<'a>, String> {
        let text = std::str::from_utf8(token).map_err(|_| "not UTF-8".to_owned())?;
        let (mut signature, mut access_key, mut amzdate, mut session_token) =
            (None, None, None, None);
        // The session token is last and may itself contain '=' (base64), never ','.
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("field without '=': {part:?}"))?;
            let slot = match k {
                "signature" => &mut signature,
                "access_key" => &mut access_key,
                "amzdate" => &mut amzdate,
                "session_token" => &mut session_token,
                other => return Err(format!("unknown field {other:?}")),
            };
            if slot.replace(v).is_some() {
                return Err(format!("field {k} twice"));
            }
        }
        Ok(SignedResponse {
            signature: signature.ok_or("no signature")?,
            access_key: access_key.ok_or("no access_key")?,
            amzdate: amzdate.ok_or("no amzdate")?,
            session_token,
        })
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, exactly three millisecond digits (KEYSPACES.md, "SigV4 exchange").
pub fn parse_amzdate(ts: &str) -> Result<SystemTime, String> {
    let bad = || format!("amzdate {ts:?} is not YYYY-MM-DDTHH:MM:SS.mmmZ");
    let b = ts.as_bytes();
    let shape = b"dddd-dd-ddTdd:dd:dd.dddZ";
    if b.len() != shape.len()
        || !b.iter().zip(shape).all(|(c, s)| match s {
            b'd' => c.is_ascii_digit(),
            s => c == s,
        })
    {
        return Err(bad());
    }
    let num = |at: usize, len: usize| -> u32 {
        b[at..at + len]
            .iter()
            .fold(0, |n, d| n * 10 + u32::from(d - b'0'))
    };
    let month = time::Month::try_from(num(5, 2) as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(num(0, 4) as i32, month, num(8, 2) as u8)
        .map_err(|_| bad())?;
    let clock = time::Time::from_hms_milli(
        num(11, 2) as u8,
        num(14, 2) as u8,
        num(17, 2) as u8,
        num(20, 3) as u16,
    )
    .map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .into())
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// The signature a client holding `secret` computes over `nonce` at `amzdate` (KEYSPACES.md,
/// "SigV4 exchange"). The session token is not signed.
pub fn expected_signature(
    access_key: &str,
    secret: &str,
    region: &str,
    nonce: &str,
    amzdate: &str,
) -> String {
    let day = amzdate.get(..10).unwrap_or("").replace('-', "");
    let scope = format!("{day}/{region}/cassandra/aws4_request");
    let canonical = format!(
        "PUT\n/authenticate\nX-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={access_key}%2F{day}%2F{region}%2Fcassandra%2Faws4_request&X-Amz-Date={date}&X-Amz-Expires=900\nhost:cassandra\n\nhost\n{nonce_hash}",
        date = amzdate.replace(':', "%3A"),
        nonce_hash = sha256_hex(nonce.as_bytes()),
    );
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{amzdate}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), day.as_bytes());
    for part in [region, "cassandra", "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    hex::encode(hmac(&key, to_sign.as_bytes()))
}
