//! Failed logins, limited per source address and per username: a client that guesses
//! passwords (or kmsauth tokens, each a KMS call) gets a few tries a minute, then is refused
//! before any hashing or KMS call until its budget refills. The same token buckets bound
//! kmsauth's KMS calls. Pure bookkeeping: the caller passes the time.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Keys tracked per map; beyond it the entries that have fully refilled are dropped, and if none
/// has, new keys are refused (an attacker with 10,000 addresses is limited as one).
const MAX_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Failures allowed at once.
    pub burst: f64,
    /// Failures regained per second.
    pub per_second: f64,
}

impl Budget {
    pub fn per_second(n: u32) -> Budget {
        Budget {
            burst: f64::from(n.max(1)),
            per_second: f64::from(n.max(1)),
        }
    }

    pub fn per_minute(n: u32) -> Budget {
        Budget {
            burst: f64::from(n.max(1)),
            per_second: f64::from(n.max(1)) / 60.0,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    left: f64,
    at: Instant,
}

/// Token buckets by key (one key, `()`, for a single global budget).
#[derive(Debug)]
pub(crate) struct Buckets<K> {
    budget: Budget,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    pub(crate) fn new(budget: Budget) -> Self {
        Buckets {
            budget,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(b.at).as_secs_f64() * self.budget.per_second;
        (b.left + gained).min(self.budget.burst)
    }

    /// Takes one failure from `key`'s budget before its login is checked (so logins checked
    /// at once cannot overdraw it), or says how long until it may try again. Keys never seen
    /// always may: a full table never locks anyone out.
    pub(crate) fn reserve(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let left = map
            .get(key)
            .map_or(self.budget.burst, |b| self.refilled(*b, now));
        if left < 1.0 {
            return Err(Duration::from_secs_f64(
                (1.0 - left) / self.budget.per_second,
            ));
        }
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, b| self.refilled(*b, now) < self.budget.burst);
            if map.len() >= MAX_KEYS {
                // Still full of keys that failed recently: forget the one with the most budget
                // left (it failed least). An attacker with more names than this only gets some
                // of its own budgets back, never takes anyone else's.
                let fullest = map
                    .iter()
                    .max_by(|a, b| {
                        self.refilled(*a.1, now)
                            .total_cmp(&self.refilled(*b.1, now))
                    })
                    .map(|(k, _)| k.clone());
                if let Some(k) = fullest {
                    map.remove(&k);
                }
            }
        }
        map.insert(
            key.clone(),
            Bucket {
                left: left - 1.0,
                at: now,
            },
        );
        Ok(())
    }

    /// Gives back what [`Buckets::reserve`] took: the login succeeded.
    fn refund(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = map.get(key).copied() {
            let left = (self.refilled(b, now) + 1.0).min(self.budget.burst);
            map.insert(key.clone(), Bucket { left, at: now });
        }
    }
}

/// Failed-login budgets per source address and username.
#[derive(Debug)]
pub struct LoginFailures {
    sources: Buckets<IpAddr>,
    users: Buckets<String>,
}

impl LoginFailures {
    pub fn new(per_source: Budget, per_user: Budget) -> Self {
        LoginFailures {
            sources: Buckets::new(per_source),
            users: Buckets::new(per_user),
        }
    }

    /// Reserves one failure for a login from `source` as `user` about to be checked, or says
    /// how long until one may be. Call [`LoginFailures::succeeded`] if the login was good.
    pub fn reserve(&self, source: IpAddr, user: &str, now: Instant) -> Result<(), Duration> {
        self.sources.reserve(&source, now)?;
        if let Err(wait) = self.users.reserve(&user.to_owned(), now) {
            self.sources.refund(&source, now);
            return Err(wait);
        }
        Ok(())
    }

    pub fn succeeded(&self, source: IpAddr, user: &str, now: Instant) {
        self.sources.refund(&source, now);
        self.users.refund(&user.to_owned(), now);
    }
}

/// A client-chosen name made safe to log: at most 64 characters, quoted and escaped, so it
/// can neither forge a line (a newline) nor a field (`x source=…`).
pub fn loggable(name: &str) -> String {
    let short: String = name.chars().take(64).collect();
    if name.chars().nth(64).is_some() {
        format!("{short:?}…")
    } else {
        format!("{short:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn a_source_gets_its_burst_then_waits_for_the_refill() {
        let l = LoginFailures::new(Budget::per_minute(3), Budget::per_minute(100));
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(l.reserve(ip(1), &format!("u{i}"), t0), Ok(()));
        }
        let wait = l.reserve(ip(1), "u9", t0).unwrap_err();
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(
            l.reserve(ip(2), "u9", t0),
            Ok(()),
            "other sources are unaffected"
        );
        assert_eq!(l.reserve(ip(1), "u9", t0 + Duration::from_secs(20)), Ok(()));
    }

    #[test]
    fn good_logins_give_their_reservation_back() {
        let l = LoginFailures::new(Budget::per_minute(2), Budget::per_minute(2));
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(l.reserve(ip(1), "app", t0), Ok(()));
            l.succeeded(ip(1), "app", t0);
        }
    }

    #[test]
    fn a_user_is_limited_across_sources() {
        let l = LoginFailures::new(Budget::per_minute(100), Budget::per_minute(2));
        let t0 = Instant::now();
        assert!(l.reserve(ip(1), "app", t0).is_ok());
        assert!(l.reserve(ip(2), "app", t0).is_ok());
        assert!(l.reserve(ip(3), "app", t0).is_err());
        assert!(l.reserve(ip(3), "other", t0).is_ok());
    }

    #[test]
    fn a_full_table_locks_nobody_out() {
        // Found by review: 10,000 failed names once refused every login, for good.
        let l = LoginFailures::new(Budget::per_minute(1_000_000), Budget::per_minute(1));
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            assert!(l.reserve(ip(1), &format!("bogus{i}"), t0).is_ok());
        }
        assert!(l.reserve(ip(1), "victim", t0).is_ok());
        assert!(l.reserve(ip(2), "other-victim", t0).is_ok());
    }

    #[test]
    fn names_are_quoted_escaped_and_truncated_for_logs() {
        assert_eq!(loggable("app\nERROR forged"), "\"app\\nERROR forged\"");
        assert_eq!(loggable("x source=1.2.3.4"), "\"x source=1.2.3.4\"");
        let long = "x".repeat(100);
        assert_eq!(loggable(&long).chars().count(), 64 + 3);
    }
}
