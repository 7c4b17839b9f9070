//! Verifies client authentication the way Keyspaces does: the SigV4 signed response over the
//! connection's nonce, or PLAIN service-specific credentials (KEYSPACES.md, "SigV4 exchange").

use std::time::{Duration, SystemTime};

use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::sigv4::{expected_signature, parse_amzdate, SignedResponse};

/// Keyspaces' tolerance for the client's clock. ASSUMPTION: KEYSPACES.md, "SigV4 exchange" says
/// it is unknown and that an emulator may use ±5 min.
pub const CLOCK_WINDOW: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, PartialEq, Eq)]
pub struct SigV4Key {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for SigV4Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigV4Key({})", self.access_key_id)
    }
}

impl std::str::FromStr for SigV4Key {
    type Err = String;

    /// `AKID:SECRET[:SESSION_TOKEN]`
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(s), token) if !a.is_empty() && !s.is_empty() => Ok(SigV4Key {
                access_key_id: a.to_owned(),
                secret_access_key: s.to_owned(),
                session_token: token.map(str::to_owned),
            }),
            _ => Err("expected AKID:SECRET[:SESSION_TOKEN]".to_owned()),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PlainUser {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for PlainUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PlainUser({})", self.user)
    }
}

impl std::str::FromStr for PlainUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(PlainUser {
                user: u.to_owned(),
                password: p.to_owned(),
            }),
            _ => Err("expected USER:PASSWORD".to_owned()),
        }
    }
}

// Only InvalidSignature's text is documented (KEYSPACES.md, "SigV4 exchange"); BadPassword's is
// Cassandra's PasswordAuthenticator's; the others are the emulator's own (ASSUMPTION).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("Authentication failure: Invalid signature")]
    InvalidSignature,
    #[error("Authentication failure: Malformed signed response ({0})")]
    Malformed(String),
    #[error("Authentication failure: Unknown access key {0}")]
    UnknownKey(String),
    #[error("Authentication failure: Signature expired: amzdate {0} is more than 5 minutes from the server time")]
    ClockSkew(String),
    #[error("Authentication failure: Session token does not match the access key")]
    TokenMismatch,
    #[error("Provided username {0} and/or password are incorrect")]
    BadPassword(String),
    #[error("Authentication failure: rejected by fault injection")]
    Injected,
}

impl AuthFailure {
    /// A short label for the event log.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::InvalidSignature => "invalid_signature",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::UnknownKey(_) => "unknown_key",
            AuthFailure::ClockSkew(_) => "clock_skew",
            AuthFailure::TokenMismatch => "token_mismatch",
            AuthFailure::BadPassword(_) => "bad_password",
            AuthFailure::Injected => "injected",
        }
    }
}

/// 32 lowercase hex characters, fresh for every connection (KEYSPACES.md, "SigV4 exchange").
pub fn new_nonce() -> String {
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Compare digests so the time taken does not depend on where the inputs differ.
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Checks a SigV4 signed response; returns the access key id it authenticated.
pub fn verify_sigv4(
    keys: &[SigV4Key],
    region: &str,
    nonce: &str,
    token: &[u8],
    now: SystemTime,
) -> Result<String, AuthFailure> {
    let resp = SignedResponse::parse(token).map_err(AuthFailure::Malformed)?;
    let time = parse_amzdate(resp.amzdate).map_err(AuthFailure::Malformed)?;
    let skew = match now.duration_since(time) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    if skew > CLOCK_WINDOW {
        return Err(AuthFailure::ClockSkew(resp.amzdate.to_owned()));
    }
    let key = keys
        .iter()
        .find(|k| k.access_key_id == resp.access_key)
        .ok_or_else(|| AuthFailure::UnknownKey(resp.access_key.to_owned()))?;
    // ASSUMPTION: the token must be the one issued with the key (Keyspaces checks it with STS;
    // the signature does not cover it).
    if key.session_token.as_deref() != resp.session_token {
        return Err(AuthFailure::TokenMismatch);
    }
    let expected = expected_signature(
        &key.access_key_id,
        &key.secret_access_key,
        region,
        nonce,
        resp.amzdate,
    );
    if !constant_time_eq(expected.as_bytes(), resp.signature.as_bytes()) {
        return Err(AuthFailure::InvalidSignature);
    }
    Ok(key.access_key_id.clone())
}

pub fn verify_plain(users: &[PlainUser], user: &str, password: &[u8]) -> Result<(), AuthFailure> {
    let ok = users
        .iter()
        .any(|u| u.user == user && constant_time_eq(u.password.as_bytes(), password));
    if ok {
        Ok(())
    } else {
        Err(AuthFailure::BadPassword(user.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Vector {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
        region: String,
        nonce: String,
        timestamp: String,
        expected_response: String,
    }

    fn vectors() -> Vec<Vector> {
        serde_json::from_str(include_str!("../../data/sigv4-vectors.json")).unwrap()
    }

    fn key_of(v: &Vector) -> SigV4Key {
        SigV4Key {
            access_key_id: v.access_key_id.clone(),
            secret_access_key: v.secret_access_key.clone(),
            session_token: v.session_token.clone(),
        }
    }

    #[test]
    fn accepts_every_official_vector() {
        for v in vectors() {
            let now = parse_amzdate(&v.timestamp).unwrap() + Duration::from_secs(30);
            let got = verify_sigv4(
                &[key_of(&v)],
                &v.region,
                &v.nonce,
                v.expected_response.as_bytes(),
                now,
            );
            assert_eq!(got, Ok(v.access_key_id.clone()));
        }
    }

    #[test]
    fn rejects_mutations() {
        for v in vectors() {
            let now = parse_amzdate(&v.timestamp).unwrap();
            let keys = [key_of(&v)];
            let resp = v.expected_response.as_bytes();
            // Signature: flip its first hex digit.
            let mut chars: Vec<char> = v.expected_response.chars().collect();
            chars[10] = if chars[10] == 'a' { 'b' } else { 'a' };
            let bad_sig: String = chars.into_iter().collect();
            assert_eq!(
                verify_sigv4(&keys, &v.region, &v.nonce, bad_sig.as_bytes(), now),
                Err(AuthFailure::InvalidSignature)
            );
            // Secret key.
            let mut wrong_key = key_of(&v);
            wrong_key.secret_access_key.push('x');
            assert_eq!(
                verify_sigv4(&[wrong_key], &v.region, &v.nonce, resp, now),
                Err(AuthFailure::InvalidSignature)
            );
            // Region and nonce.
            assert_eq!(
                verify_sigv4(&keys, "eu-west-1", &v.nonce, resp, now),
                Err(AuthFailure::InvalidSignature)
            );
            assert_eq!(
                verify_sigv4(
                    &keys,
                    &v.region,
                    "0123456789abcdef0123456789abcdef",
                    resp,
                    now
                ),
                Err(AuthFailure::InvalidSignature)
            );
            // Date: a different amzdate than the one signed.
            let mut ts: Vec<char> = v.timestamp.chars().collect();
            ts[22] = if ts[22] == '0' { '1' } else { '0' };
            let other: String = ts.into_iter().collect();
            let other_date = v.expected_response.replace(&v.timestamp, &other);
            assert_eq!(
                verify_sigv4(&keys, &v.region, &v.nonce, other_date.as_bytes(), now),
                Err(AuthFailure::InvalidSignature)
            );
            // Clock skew.
            let late = now + CLOCK_WINDOW + Duration::from_secs(1);
            assert!(matches!(
                verify_sigv4(&keys, &v.region, &v.nonce, resp, late),
                Err(AuthFailure::ClockSkew(_))
            ));
            // Unknown key.
            let mut other = key_of(&v);
            other.access_key_id = "AKIAOTHER".into();
            assert!(matches!(
                verify_sigv4(&[other], &v.region, &v.nonce, resp, now),
                Err(AuthFailure::UnknownKey(_))
            ));
        }
    }

    #[test]
    fn session_token_must_match() {
        let v = vectors()
            .into_iter()
            .find(|v| v.session_token.is_some())
            .unwrap();
        let now = parse_amzdate(&v.timestamp).unwrap();
        let mut k = key_of(&v);
        k.session_token = Some("another-token".into());
        assert_eq!(
            verify_sigv4(
                &[k],
                &v.region,
                &v.nonce,
                v.expected_response.as_bytes(),
                now
            ),
            Err(AuthFailure::TokenMismatch)
        );
    }

    #[test]
    fn two_digit_milliseconds_are_rejected() {
        let v = &vectors()[0];
        let now = parse_amzdate(&v.timestamp).unwrap();
        let resp = v.expected_response.replace(".000Z", ".00Z");
        assert!(matches!(
            verify_sigv4(&[key_of(v)], &v.region, &v.nonce, resp.as_bytes(), now),
            Err(AuthFailure::Malformed(_))
        ));
    }

    #[test]
    fn nonces_are_fresh_lowercase_hex() {
        let (a, b) = (new_nonce(), new_nonce());
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_ne!(a, b);
    }
}
