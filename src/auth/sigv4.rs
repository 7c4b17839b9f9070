//! The Keyspaces SigV4 handshake as pure functions: nothing here does I/O or reads a clock.
//!
//! Keyspaces signs a fixed pseudo-request (`PUT /authenticate`, host `cassandra`) whose payload is
//! the server's nonce; the exchange is byte-for-byte what the official plugins produce
//! (see tests/data/sigv4-vectors.json).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

pub const SERVICE: &str = "cassandra";

/// The client's first AUTH_RESPONSE token, announcing the SigV4 mechanism.
pub const INITIAL_RESPONSE: &[u8] = b"SigV4\0\0";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigV4Error {
    #[error("challenge is not of the form nonce=<hex>")]
    BadChallenge,
    #[error("signed response is malformed: {0}")]
    BadResponse(&'static str),
    #[error("amzdate is not YYYY-MM-DDTHH:MM:SS.mmmZ")]
    BadDate,
}

/// The inputs a signature depends on. Secrets are borrowed, never stored here.
pub struct SigningParams<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub nonce: &'a str,
    pub time: SystemTime,
}

/// Extracts the nonce from an AUTH_CHALLENGE token `nonce=<hex>`.
///
/// The plugins disagree on how strictly to parse it; accepting only the exact form Keyspaces
/// sends keeps a tampered challenge from being signed.
pub fn parse_challenge(token: &[u8]) -> Result<&str, SigV4Error> {
    let text = std::str::from_utf8(token).map_err(|_| SigV4Error::BadChallenge)?;
    let nonce = text
        .strip_prefix("nonce=")
        .ok_or(SigV4Error::BadChallenge)?;
    let nonce = nonce.split(',').next().unwrap_or_default();
    if nonce.is_empty() || !nonce.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(SigV4Error::BadChallenge);
    }
    Ok(nonce)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, milliseconds truncated (never rounded to `.1000Z`).
pub fn amz_date(time: SystemTime) -> String {
    let dt = utc(time);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        dt.year(),
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    )
}

fn utc(time: SystemTime) -> OffsetDateTime {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    OffsetDateTime::from_unix_timestamp_nanos(since.as_nanos() as i128)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// The time an `amzdate` names; strict about the three millisecond digits, as Keyspaces is.
pub fn parse_amz_date(text: &str) -> Result<SystemTime, SigV4Error> {
    let b = text.as_bytes();
    let shape_ok = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(SigV4Error::BadDate);
    }
    let num = |r: std::ops::Range<usize>| -> u32 {
        text[r]
            .bytes()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    let month = time::Month::try_from(num(5..7) as u8).map_err(|_| SigV4Error::BadDate)?;
    let date = time::Date::from_calendar_date(num(0..4) as i32, month, num(8..10) as u8)
        .map_err(|_| SigV4Error::BadDate)?;
    let t = time::Time::from_hms_milli(
        num(11..13) as u8,
        num(14..16) as u8,
        num(17..19) as u8,
        num(20..23) as u16,
    )
    .map_err(|_| SigV4Error::BadDate)?;
    let ts = date.with_time(t).assume_utc();
    let nanos = ts.unix_timestamp_nanos();
    if nanos < 0 {
        return Err(SigV4Error::BadDate);
    }
    Ok(UNIX_EPOCH + Duration::from_nanos(nanos as u64))
}

fn hex_sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// `D/<region>/cassandra/aws4_request`
pub fn credential_scope(time: SystemTime, region: &str) -> String {
    format!("{}/{region}/{SERVICE}/aws4_request", &amz_date_stamp(time))
}

fn amz_date_stamp(time: SystemTime) -> String {
    let dt = utc(time);
    format!("{:04}{:02}{:02}", dt.year(), u8::from(dt.month()), dt.day())
}

pub fn canonical_request(
    access_key_id: &str,
    region: &str,
    time: SystemTime,
    nonce: &str,
) -> String {
    let scope = credential_scope(time, region).replace('/', "%2F");
    let date = amz_date(time).replace(':', "%3A");
    format!(
        "PUT\n/authenticate\nX-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={access_key_id}%2F{scope}&X-Amz-Date={date}&X-Amz-Expires=900\nhost:{SERVICE}\n\nhost\n{}",
        hex_sha256(nonce.as_bytes())
    )
}

pub fn string_to_sign(canonical_request: &str, region: &str, time: SystemTime) -> String {
    format!(
        "AWS4-HMAC-SHA256\n{}\n{}\n{}",
        amz_date(time),
        credential_scope(time, region),
        hex_sha256(canonical_request.as_bytes())
    )
}

/// The lowercase hex signature over the challenge nonce.
pub fn signature(p: &SigningParams<'_>) -> String {
    let canonical = canonical_request(p.access_key_id, p.region, p.time, p.nonce);
    let sts = string_to_sign(&canonical, p.region, p.time);
    let key =
        aws_sigv4::sign::v4::generate_signing_key(p.secret_access_key, p.time, p.region, SERVICE);
    aws_sigv4::sign::v4::calculate_signature(key, sts.as_bytes())
}

/// The AUTH_RESPONSE token answering a challenge. The session token is appended, unsigned.
pub fn signed_response(p: &SigningParams<'_>) -> String {
    let mut out = format!(
        "signature={},access_key={},amzdate={}",
        signature(p),
        p.access_key_id,
        amz_date(p.time)
    );
    if let Some(token) = p.session_token {
        out.push_str(",session_token=");
        out.push_str(token);
    }
    out
}

/// A client's signed response, split into its fields (used by the emulator's verifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedResponse<'a> {
    pub signature: &'a str,
    pub access_key: &'a str,
    pub amzdate: &'a str,
    pub session_token: Option<&'a str>,
}

impl<'a> SignedResponse<'a> {
    pub fn parse(token: &'a [u8]) -> Result<SignedResponse<'a>, SigV4Error> {
        let text = std::str::from_utf8(token).map_err(|_| SigV4Error::BadResponse("not UTF-8"))?;
        let (mut signature, mut access_key, mut amzdate, mut session_token) =
            (None, None, None, None);
        // The session token may itself contain '=' and '/', but never ','.
        for part in text.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or(SigV4Error::BadResponse("field without '='"))?;
            let slot = match k {
                "signature" => &mut signature,
                "access_key" => &mut access_key,
                "amzdate" => &mut amzdate,
                "session_token" => &mut session_token,
                _ => return Err(SigV4Error::BadResponse("unknown field")),
            };
            if slot.replace(v).is_some() {
                return Err(SigV4Error::BadResponse("repeated field"));
            }
        }
        Ok(SignedResponse {
            signature: signature.ok_or(SigV4Error::BadResponse("no signature"))?,
            access_key: access_key.ok_or(SigV4Error::BadResponse("no access_key"))?,
            amzdate: amzdate.ok_or(SigV4Error::BadResponse("no amzdate"))?,
            session_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_date_truncates_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_nanos(1_709_251_199_999_999_999);
        assert_eq!(amz_date(t), "2024-02-29T23:59:59.999Z");
        assert_eq!(
            parse_amz_date("2024-02-29T23:59:59.999Z").unwrap(),
            UNIX_EPOCH + Duration::from_millis(1_709_251_199_999)
        );
    }

    #[test]
    fn amz_date_parser_is_strict() {
        for bad in [
            "2024-02-29T23:59:59Z",
            "2024-02-29T23:59:59.99Z",
            "2024-02-29T23:59:59.1000Z",
            "2023-02-29T23:59:59.999Z",
            "2024-02-29 23:59:59.999Z",
            "2024-13-01T00:00:00.000Z",
        ] {
            assert!(parse_amz_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn challenge_parsing() {
        assert_eq!(parse_challenge(b"nonce=abc123").unwrap(), "abc123");
        assert!(parse_challenge(b"nonce=").is_err());
        assert!(parse_challenge(b"nonc=abc").is_err());
        assert!(parse_challenge(b"nonce=ab c").is_err());
    }

    #[test]
    fn response_parsing() {
        let r = SignedResponse::parse(b"signature=ab,access_key=AK,amzdate=D,session_token=x/y==")
            .unwrap();
        assert_eq!(r.session_token, Some("x/y=="));
        assert!(SignedResponse::parse(b"signature=ab,access_key=AK").is_err());
        assert!(
            SignedResponse::parse(b"signature=ab,signature=cd,access_key=AK,amzdate=D").is_err()
        );
    }
}
