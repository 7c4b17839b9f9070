//! Sliding-TTL sessions for authenticated clients (as Stargate's table-based auth does): once a
//! client's credentials validate, reconnecting with the same credentials within the window skips
//! validation (a KMS call for kmsauth), and every use renews the window.
//!
//! Pure bookkeeping: callers pass the time, so expiry, renewal and eviction are tested with a
//! fake clock.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Sessions kept at most; beyond it, expired ones go first, then the closest to expiry.
pub const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Clone)]
struct Session {
    identity: String,
    expires: Instant,
    /// Never renewed past this (a kmsauth token's own `not_after`).
    hard_limit: Option<Instant>,
}

impl Session {
    fn alive(&self, now: Instant) -> bool {
        now < self.expires && self.hard_limit.is_none_or(|h| now < h)
    }
}

#[derive(Debug)]
pub struct SessionCache {
    ttl: Duration,
    max: usize,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
}

/// The cache key: credentials are never stored, only a digest of them.
pub fn session_key(user: &str, secret: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(secret);
    h.finalize().into()
}

impl SessionCache {
    pub fn new(ttl: Duration, max: usize) -> SessionCache {
        SessionCache {
            ttl,
            max: max.max(1),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enabled(&self) -> bool {
        !self.ttl.is_zero()
    }

    /// The identity of a live session for `key`, renewing its window; `None` if there is none.
    pub fn touch(&self, key: &[u8; 32], now: Instant) -> Option<String> {
        if !self.enabled() {
            return None;
        }
        let mut sessions = self.lock();
        let s = sessions.get_mut(key)?;
        if !s.alive(now) {
            sessions.remove(key);
            return None;
        }
        s.expires = now + self.ttl;
        Some(s.identity.clone())
    }

    /// Remembers a validated identity; `valid_for` caps the session (the token's remaining life).
    pub fn insert(&self, key: [u8; 32], identity: &str, now: Instant, valid_for: Option<Duration>) {
        if !self.enabled() {
            return;
        }
        let mut sessions = self.lock();
        if sessions.len() >= self.max && !sessions.contains_key(&key) {
            sessions.retain(|_, s| s.alive(now));
            if sessions.len() >= self.max {
                if let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(k, _)| *k)
                {
                    sessions.remove(&oldest);
                }
            }
        }
        sessions.insert(
            key,
            Session {
                identity: identity.to_owned(),
                expires: now + self.ttl,
                hard_limit: valid_for.map(|d| now + d),
            },
        );
    }

    /// Copies into `into` the live sessions whose identity `keep` approves: a reload that did
    /// not change a user's entry must not send its application back through a full check (or,
    /// while someone guesses at its name, into the failure budget).
    pub fn carry_over(&self, into: &SessionCache, keep: impl Fn(&str) -> bool, now: Instant) {
        if !into.enabled() {
            return;
        }
        let kept: Vec<([u8; 32], Session)> = self
            .lock()
            .iter()
            .filter(|(_, s)| s.alive(now) && keep(&s.identity))
            .map(|(k, s)| (*k, s.clone()))
            .collect();
        let mut target = into.lock();
        for (key, session) in kept.into_iter().take(into.max) {
            target.insert(key, session);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn sessions_approved_by_a_reload_are_carried_over() {
        let old = SessionCache::new(30 * MIN, 10);
        let t0 = Instant::now();
        old.insert(session_key("app", b"pw"), "app", t0, None);
        old.insert(session_key("gone", b"pw"), "gone", t0, None);
        let new = SessionCache::new(30 * MIN, 10);
        old.carry_over(&new, |identity| identity == "app", t0);
        assert_eq!(
            new.touch(&session_key("app", b"pw"), t0).as_deref(),
            Some("app")
        );
        assert!(new.touch(&session_key("gone", b"pw"), t0).is_none());
    }

    #[test]
    fn a_session_slides_with_use_and_expires_without() {
        let cache = SessionCache::new(30 * MIN, 10);
        let t0 = Instant::now();
        let key = session_key("app", b"pw");
        assert_eq!(cache.touch(&key, t0), None);
        cache.insert(key, "app", t0, None);
        // Used every 20 minutes: it never expires.
        let mut t = t0;
        for _ in 0..10 {
            t += 20 * MIN;
            assert_eq!(cache.touch(&key, t).as_deref(), Some("app"));
        }
        // Idle for 30 minutes: gone.
        assert_eq!(cache.touch(&key, t + 30 * MIN), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn different_credentials_are_different_sessions() {
        let cache = SessionCache::new(30 * MIN, 10);
        let t0 = Instant::now();
        cache.insert(session_key("app", b"pw"), "app", t0, None);
        assert_eq!(cache.touch(&session_key("app", b"other"), t0), None);
        assert_eq!(cache.touch(&session_key("ap", b"ppw"), t0), None);
    }

    #[test]
    fn a_token_session_never_outlives_the_token() {
        let cache = SessionCache::new(30 * MIN, 10);
        let t0 = Instant::now();
        let key = session_key("2/service/orders", b"token");
        cache.insert(key, "2/service/orders", t0, Some(45 * MIN));
        assert!(cache.touch(&key, t0 + 20 * MIN).is_some());
        assert!(cache.touch(&key, t0 + 40 * MIN).is_some());
        assert_eq!(cache.touch(&key, t0 + 45 * MIN), None, "token expired");
    }

    #[test]
    fn full_caches_evict_expired_then_oldest() {
        let cache = SessionCache::new(30 * MIN, 2);
        let t0 = Instant::now();
        let (a, b, c) = (
            session_key("a", b""),
            session_key("b", b""),
            session_key("c", b""),
        );
        cache.insert(a, "a", t0, None);
        cache.insert(b, "b", t0 + MIN, None);
        cache.insert(c, "c", t0 + 2 * MIN, None);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.touch(&a, t0 + 2 * MIN), None, "the oldest went");
        assert!(cache.touch(&b, t0 + 2 * MIN).is_some());
        // Expired ones are dropped before live ones: b is renewed, c is not.
        assert!(cache.touch(&b, t0 + 25 * MIN).is_some());
        let d = session_key("d", b"");
        cache.insert(d, "d", t0 + 40 * MIN, None);
        assert!(cache.touch(&b, t0 + 40 * MIN).is_some());
        assert_eq!(cache.touch(&c, t0 + 40 * MIN), None);
    }

    #[test]
    fn a_zero_ttl_disables_sessions() {
        let cache = SessionCache::new(Duration::ZERO, 10);
        let t0 = Instant::now();
        let key = session_key("a", b"");
        cache.insert(key, "a", t0, None);
        assert_eq!(cache.touch(&key, t0), None);
    }
}
