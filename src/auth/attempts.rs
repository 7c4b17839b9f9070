//! Failed logins, limited per source address and per username: a client that guesses
//! passwords (or kmsauth tokens, each a KMS call) gets a few tries a minute, then is refused
//! before any hashing or KMS call until its budget refills. Pure bookkeeping: the caller passes
//! the time.

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

#[derive(Debug)]
struct Buckets<K> {
    budget: Budget,
    map: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(budget: Budget) -> Self {
        Buckets {
            budget,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(b.at).as_secs_f64() * self.budget.per_second;
        (b.left + gained).min(self.budget.burst)
    }

    /// How long until `key` may try again; zero if it may now.
    fn wait(&self, key: &K, now: Instant) -> Duration {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some(b) if self.refilled(*b, now) < 1.0 => {
                let missing = 1.0 - self.refilled(*b, now);
                Duration::from_secs_f64(missing / self.budget.per_second)
            }
            Some(_) => Duration::ZERO,
            None if map.len() >= MAX_KEYS => Duration::from_secs(1),
            None => Duration::ZERO,
        }
    }

    fn fail(&self, key: &K, now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            map.retain(|_, b| self.refilled(*b, now) < self.budget.burst);
            if map.len() >= MAX_KEYS {
                return;
            }
        }
        let left = map
            .get(key)
            .map_or(self.budget.burst, |b| self.refilled(*b, now));
        map.insert(
            key.clone(),
            Bucket {
                left: left - 1.0,
                at: now,
            },
        );
    }
}

/// Failed-login budgets per source address and per username.
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

    /// Zero when a login from `source` as `user` may be checked now, else how long to wait.
    pub fn wait(&self, source: IpAddr, user: &str, now: Instant) -> Duration {
        self.sources
            .wait(&source, now)
            .max(self.users.wait(&user.to_owned(), now))
    }

    pub fn failed(&self, source: IpAddr, user: &str, now: Instant) {
        self.sources.fail(&source, now);
        self.users.fail(&user.to_owned(), now);
    }
}

/// A client-chosen name made safe to log: escaped (no newline can forge a log line) and at
/// most 64 characters.
pub fn loggable(name: &str) -> String {
    let escaped: String = name.escape_debug().take(64).collect();
    if name.escape_debug().nth(64).is_some() {
        format!("{escaped}…")
    } else {
        escaped
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
            assert_eq!(l.wait(ip(1), &format!("u{i}"), t0), Duration::ZERO);
            l.failed(ip(1), &format!("u{i}"), t0);
        }
        let wait = l.wait(ip(1), "u9", t0);
        assert!(
            wait > Duration::from_secs(19) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert_eq!(
            l.wait(ip(2), "u9", t0),
            Duration::ZERO,
            "other sources are unaffected"
        );
        assert_eq!(
            l.wait(ip(1), "u9", t0 + Duration::from_secs(20)),
            Duration::ZERO
        );
    }

    #[test]
    fn a_user_is_limited_across_sources() {
        let l = LoginFailures::new(Budget::per_minute(100), Budget::per_minute(2));
        let t0 = Instant::now();
        l.failed(ip(1), "app", t0);
        l.failed(ip(2), "app", t0);
        assert!(l.wait(ip(3), "app", t0) > Duration::ZERO);
        assert_eq!(l.wait(ip(3), "other", t0), Duration::ZERO);
    }

    #[test]
    fn names_are_escaped_and_truncated_for_logs() {
        assert_eq!(loggable("app\nERROR forged"), "app\\nERROR forged");
        let long = "x".repeat(100);
        assert_eq!(loggable(&long).chars().count(), 65);
    }
}
