//! Client authentication with lyft's kmsauth service tokens (`--client-auth kmsauth`).
//!
//! A client proves who it is with a token that only KMS can open: the PLAIN username is the
//! kmsauth username (v1 `service-name`, v2 `2/service/name` or `2/user/name`) and the password is
//! the base64 ciphertext of `{"not_before": …, "not_after": …}` encrypted under the context
//! `{"to": <this proxy>, "from": <name>, "user_type": <service|user>}` (v2; v1 has no user_type).
//! Validation mirrors `kmsauth.KMSTokenValidator`: KMS must decrypt it under exactly that context
//! (plus configured extra context), with one of the keys configured for the user type, and the
//! token must be inside its validity window and no longer-lived than allowed.
//!
//! The parsing and checks are pure functions; `KmsAuthValidator` adds the KMS calls and a cache
//! of validated tokens until they expire.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_smithy_types::error::display::DisplayErrorContext;
use sha2::{Digest, Sha256};

use crate::auth::attempts::{Buckets, Budget};
use crate::single_flight::SingleFlight;

/// Tokens remembered at most (as kmsauth's LRU default).
const TOKEN_CACHE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserType {
    Service,
    User,
}

impl UserType {
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Service => "service",
            UserType::User => "user",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsUser {
    pub version: u8,
    pub user_type: UserType,
    pub from: String,
}

impl KmsUser {
    /// `version/type/name`, the one spelling of this identity (roles, sessions, logs): a v1
    /// `orders` is `1/service/orders`, never the same identity as `2/service/orders`.
    pub fn canonical(&self) -> String {
        format!("{}/{}/{}", self.version, self.user_type.as_str(), self.from)
    }
}

/// kmsauth's own messages, so operators recognise them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KmsAuthError {
    #[error("Unsupported username format.")]
    Username,
    #[error("Unacceptable token version.")]
    Version,
    #[error("Authentication error. Unsupported user_type.")]
    UserType,
    #[error("Authentication error (wrong KMS key).")]
    WrongKey,
    #[error("Authentication error. Missing validity.")]
    Validity,
    #[error("Authentication error. Token lifetime exceeded.")]
    Lifetime,
    #[error("Authentication error. Invalid time validity for token.")]
    Window,
    #[error("Authentication error. General error.")]
    General,
    /// KMS refused or failed a call: the details (key ARNs, the proxy's principal, SDK text)
    /// are logged under the reference, the client sees only kmsauth's words and the reference.
    #[error("Authentication error. {}. (reference {reference} in the proxy's log)", if *unreachable { "Failure connecting to AWS endpoint" } else { "General error" })]
    Kms {
        unreachable: bool,
        reference: crate::reference::Reference,
    },
    #[error("Authentication service busy; try again shortly.")]
    Busy,
}

/// `per_second` KMS calls a second, in any second: the burst is a tenth of a second's worth,
/// so a flood after a quiet spell cannot spend two seconds' worth in one.
fn kms_budget(per_second: u32) -> Budget {
    let rate = f64::from(per_second.max(1));
    Budget {
        burst: (rate / 10.0).max(1.0),
        per_second: rate,
    }
}

/// What `--client-auth kmsauth` checks.
#[derive(Debug, Clone, PartialEq)]
pub struct KmsAuthSettings {
    /// This proxy's name: the `to` of every token.
    pub to: String,
    /// Keys (ARNs or aliases) accepted for service tokens, and for user tokens.
    pub service_keys: Vec<String>,
    pub user_keys: Vec<String>,
    /// Context every token must also carry (`from`, `to`, `user_type` cannot be overridden).
    pub extra_context: Vec<(String, String)>,
    pub max_lifetime: Duration,
    pub min_version: u8,
    pub max_version: u8,
    /// KMS Decrypt calls per second, for every client together: KMS throttles per account and
    /// region, so a login flood must not take the account's other services down with it.
    pub max_kms_calls_per_second: u32,
}

type Window = (SystemTime, SystemTime);

/// Splits a kmsauth username: `name` (v1 service), or `2/service/name`, `2/user/name`.
pub fn parse_username(username: &str) -> Result<KmsUser, KmsAuthError> {
    let parts: Vec<&str> = username.split('/').collect();
    let (version, user_type, from) = match parts.as_slice() {
        [from] => (1, "service", *from),
        // Exactly the digits kmsauth writes: `02/service/x` or `+2/service/x` would be another
        // spelling of one identity, and must not escape what is configured for it.
        [v, t, from]
            if !v.is_empty()
                && v.bytes().all(|b| b.is_ascii_digit())
                && !(v.len() > 1 && v.starts_with('0')) =>
        {
            (
                v.parse::<u8>().map_err(|_| KmsAuthError::Username)?,
                *t,
                *from,
            )
        }
        _ => return Err(KmsAuthError::Username),
    };
    let user_type = match user_type {
        "service" => UserType::Service,
        "user" => UserType::User,
        _ => return Err(KmsAuthError::UserType),
    };
    if from.is_empty() {
        return Err(KmsAuthError::Username);
    }
    Ok(KmsUser {
        version,
        user_type,
        from: from.to_owned(),
    })
}

/// The encryption context a token for `user` must have been made under.
pub fn encryption_context(settings: &KmsAuthSettings, user: &KmsUser) -> HashMap<String, String> {
    let mut c: HashMap<String, String> = settings.extra_context.iter().cloned().collect();
    c.insert("to".into(), settings.to.clone());
    c.insert("from".into(), user.from.clone());
    if user.version > 1 {
        c.insert("user_type".into(), user.user_type.as_str().into());
    } else {
        c.remove("user_type");
    }
    c
}

/// kmsauth's `%Y%m%dT%H%M%SZ`, as a time.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let month = time::Month::try_from(num(4..6)? as u8).ok()?;
    let date = time::Date::from_calendar_date(num(0..4)? as i32, month, num(6..8)? as u8).ok()?;
    let t = time::Time::from_hms(num(9..11)? as u8, num(11..13)? as u8, num(13..15)? as u8).ok()?;
    let secs = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp();
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// The validity window in a decrypted payload.
pub fn parse_payload(plaintext: &[u8]) -> Result<(SystemTime, SystemTime), KmsAuthError> {
    let v: serde_json::Value =
        serde_json::from_slice(plaintext).map_err(|_| KmsAuthError::Validity)?;
    let field = |k: &str| {
        v.get(k)
            .and_then(|t| t.as_str())
            .and_then(parse_time)
            .ok_or(KmsAuthError::Validity)
    };
    Ok((field("not_before")?, field("not_after")?))
}

/// The token's lifetime must not exceed `max_lifetime` and `now` must be inside its window.
/// (kmsauth measures the lifetime with `timedelta.seconds`, which ignores whole days; this counts
/// them, so a token valid for a day and ten minutes is refused rather than taken for ten.)
pub fn check_window(
    not_before: SystemTime,
    not_after: SystemTime,
    now: SystemTime,
    max_lifetime: Duration,
) -> Result<(), KmsAuthError> {
    match not_after.duration_since(not_before) {
        Ok(life) if life <= max_lifetime => {}
        _ => return Err(KmsAuthError::Lifetime),
    }
    if now < not_before || now > not_after {
        return Err(KmsAuthError::Window);
    }
    Ok(())
}

/// A client kmsauth vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsIdentity {
    /// The canonical username (`2/service/orders`; `1/service/orders` for v1's `orders`).
    pub name: String,
    pub not_after: SystemTime,
}

pub struct KmsAuthValidator {
    settings: KmsAuthSettings,
    kms: aws_sdk_kms::Client,
    /// Configured key (ARN or alias) → ARN, as KMS reports it on decrypt.
    arns: tokio::sync::Mutex<HashMap<String, String>>,
    /// Validated tokens → their window, until they expire.
    tokens: Mutex<HashMap<[u8; 32], (SystemTime, SystemTime)>>,
    /// Tokens being decrypted now: every login with one of them waits for that one KMS call.
    inflight: SingleFlight<[u8; 32], Result<Window, KmsAuthError>>,
    /// KMS calls for all clients together (burst = one second's worth).
    kms_calls: Buckets<()>,
}

impl std::fmt::Debug for KmsAuthValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsAuthValidator")
            .field("to", &self.settings.to)
            .finish_non_exhaustive()
    }
}

fn token_key(token: &[u8], user: &KmsUser, to: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    // The version too: a token validated for `2/service/x` says nothing about `x` (v1).
    h.update([user.version]);
    for part in [
        token,
        user.from.as_bytes(),
        to.as_bytes(),
        user.user_type.as_str().as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

impl KmsAuthValidator {
    pub fn new(settings: KmsAuthSettings, kms: aws_sdk_kms::Client) -> KmsAuthValidator {
        KmsAuthValidator {
            kms_calls: Buckets::new(kms_budget(settings.max_kms_calls_per_second)),
            settings,
            kms,
            arns: tokio::sync::Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            inflight: SingleFlight::default(),
        }
    }

    pub fn settings(&self) -> &KmsAuthSettings {
        &self.settings
    }

    async fn key_arn(&self, key: &str) -> Result<String, KmsAuthError> {
        if key.starts_with("arn:aws") && key.contains(":key/") {
            return Ok(key.to_owned());
        }
        let mut arns = self.arns.lock().await;
        if let Some(a) = arns.get(key) {
            return Ok(a.clone());
        }
        let out = self.kms.describe_key().key_id(key).send().await.map_err(|e| {
            let reference = crate::reference::Reference::new();
            tracing::warn!(%reference, key, error = %DisplayErrorContext(&e), "kmsauth: cannot describe a configured key");
            KmsAuthError::Kms {
                unreachable: false,
                reference,
            }
        })?;
        let arn = out
            .key_metadata()
            .and_then(|m| m.arn())
            .ok_or(KmsAuthError::General)?
            .to_owned();
        arns.insert(key.to_owned(), arn.clone());
        Ok(arn)
    }

    async fn key_allowed(&self, user_type: UserType, arn: &str) -> Result<bool, KmsAuthError> {
        let keys = match user_type {
            UserType::Service => &self.settings.service_keys,
            UserType::User => &self.settings.user_keys,
        };
        for k in keys {
            if self.key_arn(k).await? == arn {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn cached(&self, key: &[u8; 32]) -> Option<(SystemTime, SystemTime)> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn remember(&self, key: [u8; 32], window: (SystemTime, SystemTime), now: SystemTime) {
        let mut t = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if t.len() >= TOKEN_CACHE {
            t.retain(|_, (_, not_after)| *not_after > now);
            if t.len() >= TOKEN_CACHE {
                t.clear();
            }
        }
        t.insert(key, window);
    }

    /// Validates `token` (the PLAIN password) for `username` at `now`.
    pub async fn validate(
        &self,
        username: &str,
        token: &[u8],
        now: SystemTime,
    ) -> Result<KmsIdentity, KmsAuthError> {
        let user = parse_username(username)?;
        if user.version < self.settings.min_version || user.version > self.settings.max_version {
            return Err(KmsAuthError::Version);
        }
        let key = token_key(token, &user, &self.settings.to);
        let (not_before, not_after) = match self.cached(&key) {
            Some(w) => w,
            None => {
                let w = self.decrypt_once(key, &user, token).await?;
                check_window(w.0, w.1, now, self.settings.max_lifetime)?;
                self.remember(key, w, now);
                w
            }
        };
        check_window(not_before, not_after, now, self.settings.max_lifetime)?;
        Ok(KmsIdentity {
            name: user.canonical(),
            not_after,
        })
    }

    /// One KMS call per token however many logins carry it at once, within the global budget.
    async fn decrypt_once(
        &self,
        key: [u8; 32],
        user: &KmsUser,
        token: &[u8],
    ) -> Result<Window, KmsAuthError> {
        let decrypt = || async {
            if self
                .kms_calls
                .reserve(&(), std::time::Instant::now())
                .is_err()
            {
                tracing::warn!("kmsauth: KMS call budget spent; refusing logins until it refills");
                return Err(KmsAuthError::Busy);
            }
            self.decrypt(user, token).await
        };
        self.inflight.run(key, decrypt).await
    }

    async fn decrypt(
        &self,
        user: &KmsUser,
        token: &[u8],
    ) -> Result<(SystemTime, SystemTime), KmsAuthError> {
        let text = std::str::from_utf8(token).map_err(|_| KmsAuthError::General)?;
        let blob =
            aws_smithy_types::base64::decode(text.trim()).map_err(|_| KmsAuthError::General)?;
        let mut req = self
            .kms
            .decrypt()
            .ciphertext_blob(aws_smithy_types::Blob::new(blob));
        for (k, v) in encryption_context(&self.settings, user) {
            req = req.encryption_context(k, v);
        }
        let out = req.send().await.map_err(|e| {
            use aws_sdk_kms::error::SdkError;
            let unreachable = matches!(
                e,
                SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
            );
            let reference = crate::reference::Reference::new();
            tracing::info!(%reference, from = %user.from, error = %DisplayErrorContext(&e), "kmsauth: token refused by KMS");
            KmsAuthError::Kms {
                unreachable,
                reference,
            }
        })?;
        let arn = out.key_id().ok_or(KmsAuthError::General)?;
        if !self.key_allowed(user.user_type, arn).await? {
            tracing::info!(from = %user.from, key = arn, "kmsauth: token made with a key not accepted for its user type");
            return Err(KmsAuthError::WrongKey);
        }
        let plaintext = out.plaintext().ok_or(KmsAuthError::General)?;
        parse_payload(plaintext.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> KmsAuthSettings {
        KmsAuthSettings {
            to: "keyspaces-proxy".into(),
            service_keys: vec!["alias/svc".into()],
            user_keys: vec![],
            extra_context: vec![("env".into(), "prod".into()), ("to".into(), "evil".into())],
            max_lifetime: Duration::from_secs(60 * 60),
            min_version: 1,
            max_version: 2,
            max_kms_calls_per_second: 50,
        }
    }

    #[test]
    fn kms_calls_have_a_global_budget() {
        let b = Buckets::new(kms_budget(50));
        let take = |at| b.reserve(&(), at).is_ok();
        let t0 = std::time::Instant::now();
        assert!(
            (0..5).all(|_| take(t0)),
            "a tenth of a second's worth at once"
        );
        assert!(!take(t0), "then they wait");
        // Any one second, however the calls come: at most the rate plus that small burst.
        let granted = (0..1000)
            .filter(|ms| take(t0 + Duration::from_millis(*ms)))
            .count();
        assert!((49..=50).contains(&granted), "{granted}");
        assert_eq!(kms_budget(3).burst, 1.0);
    }

    #[test]
    fn usernames_v1_and_v2() {
        assert_eq!(
            parse_username("orders").unwrap(),
            KmsUser {
                version: 1,
                user_type: UserType::Service,
                from: "orders".into()
            }
        );
        let u = parse_username("2/user/alice").unwrap();
        assert_eq!(
            (u.version, u.user_type, u.from.as_str()),
            (2, UserType::User, "alice")
        );
        assert_eq!(parse_username("2/robot/x"), Err(KmsAuthError::UserType));
        assert_eq!(parse_username("a/b"), Err(KmsAuthError::Username));
        assert_eq!(parse_username("x/service/y"), Err(KmsAuthError::Username));
        assert_eq!(parse_username("2/service/"), Err(KmsAuthError::Username));
        assert_eq!(parse_username("1/2/3/4"), Err(KmsAuthError::Username));
        // Other spellings of 2/service/orders (Python's int() reads them all as 2).
        for spelling in [
            "02/service/orders",
            "+2/service/orders",
            " 2/service/orders",
            "/service/orders",
        ] {
            assert_eq!(
                parse_username(spelling),
                Err(KmsAuthError::Username),
                "{spelling}"
            );
        }
        assert_eq!(
            parse_username("orders").unwrap().canonical(),
            "1/service/orders"
        );
        assert_eq!(
            parse_username("2/service/orders").unwrap().canonical(),
            "2/service/orders"
        );
    }

    #[test]
    fn a_token_validated_for_v2_is_not_valid_for_the_v1_name() {
        let (v1, v2) = (
            parse_username("orders").unwrap(),
            parse_username("2/service/orders").unwrap(),
        );
        assert_ne!(token_key(b"tok", &v1, "p"), token_key(b"tok", &v2, "p"));
    }

    #[test]
    fn context_names_both_ends_and_cannot_be_overridden() {
        let s = settings();
        let v2 = encryption_context(&s, &parse_username("2/service/orders").unwrap());
        assert_eq!(v2["to"], "keyspaces-proxy");
        assert_eq!(v2["from"], "orders");
        assert_eq!(v2["user_type"], "service");
        assert_eq!(v2["env"], "prod");
        let v1 = encryption_context(&s, &parse_username("orders").unwrap());
        assert!(!v1.contains_key("user_type"));
    }

    #[test]
    fn times_and_payloads() {
        let t = parse_time("20261125T231500Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_795_648_500
        );
        for bad in [
            "20261125T2315Z",
            "2026-11-25T23:15:00Z",
            "20261325T231500Z",
            "2026112xT231500Z",
        ] {
            assert!(parse_time(bad).is_none(), "{bad}");
        }
        let (nb, na) = parse_payload(
            br#"{"not_before": "20261125T231500Z", "not_after": "20261125T232200Z"}"#,
        )
        .unwrap();
        assert_eq!(na.duration_since(nb).unwrap(), Duration::from_secs(420));
        assert_eq!(parse_payload(b"{}"), Err(KmsAuthError::Validity));
        assert_eq!(parse_payload(b"not json"), Err(KmsAuthError::Validity));
    }

    #[test]
    fn windows_and_lifetimes() {
        let nb = parse_time("20261125T231500Z").unwrap();
        let na = parse_time("20261125T232200Z").unwrap();
        let hour = Duration::from_secs(3600);
        let inside = nb + Duration::from_secs(60);
        assert_eq!(check_window(nb, na, inside, hour), Ok(()));
        assert_eq!(
            check_window(nb, na, nb - Duration::from_secs(1), hour),
            Err(KmsAuthError::Window)
        );
        assert_eq!(
            check_window(nb, na, na + Duration::from_secs(1), hour),
            Err(KmsAuthError::Window)
        );
        assert_eq!(
            check_window(nb, na, inside, Duration::from_secs(300)),
            Err(KmsAuthError::Lifetime)
        );
        assert_eq!(
            check_window(na, nb, inside, hour),
            Err(KmsAuthError::Lifetime)
        );
        let day_later = na + Duration::from_secs(86_400);
        assert_eq!(
            check_window(nb, day_later, inside, hour),
            Err(KmsAuthError::Lifetime)
        );
    }

    #[test]
    fn cache_keys_bind_token_sender_receiver_and_type() {
        let u = parse_username("2/service/orders").unwrap();
        let v = parse_username("2/user/orders").unwrap();
        assert_ne!(token_key(b"t", &u, "a"), token_key(b"t", &v, "a"));
        assert_ne!(token_key(b"t", &u, "a"), token_key(b"t", &u, "b"));
        assert_ne!(token_key(b"t", &u, "a"), token_key(b"u", &u, "a"));
    }
}
