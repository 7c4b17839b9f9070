//! Authentication of local clients: none, or PasswordAuthenticator against configured users.
//!
//! Passwords are kept only as argon2id hashes (or, from older files, SHA-256 digests) and
//! compared in constant time, so neither a memory dump nor response timing gives them away.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use super::passwords::StoredPassword;
use super::sessions::SessionCache;

/// Argon2 checks running at once, each on a thread of its own kept for the process's life:
/// a check takes ~19 MiB and tens of milliseconds of a core, so a burst of logins queues here
/// instead of taking the runtime's threads, and the allocator's per-thread caches of those
/// 19 MiB stay at four (on short-lived blocking threads they piled up: 1 GB after 75 checks).
const CONCURRENT_HASHES: usize = 4;

type HashJob = Box<dyn FnOnce() + Send>;

fn hash_threads() -> Option<&'static std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>> {
    static JOBS: std::sync::OnceLock<Option<std::sync::Mutex<std::sync::mpsc::Sender<HashJob>>>> =
        std::sync::OnceLock::new();
    JOBS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<HashJob>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..CONCURRENT_HASHES {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                });
            if spawned.is_err() {
                return None;
            }
        }
        Some(std::sync::Mutex::new(tx))
    })
    .as_ref()
}

#[derive(Debug, thiserror::Error)]
pub enum UserFileError {
    #[error("cannot read client credentials file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("client credentials line {line}: expected user:$argon2id$… (keyspaces-proxy hash-password), user:sha256:<hex> or user:password")]
    Syntax { line: usize },
}

/// Configured users, by name, with their stored passwords. Cheap to clone (shared).
#[derive(Clone, Default)]
pub struct UserStore {
    users: Arc<HashMap<String, StoredPassword>>,
}

impl std::fmt::Debug for UserStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserStore")
            .field("users", &self.users.len())
            .finish()
    }
}

impl UserStore {
    /// Parses `user:password` or `user:sha256:<64 hex>` entries, one per line (`#` comments).
    pub fn parse(text: &str) -> Result<UserStore, UserFileError> {
        let mut store = UserStore::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            store
                .add_entry(line)
                .map_err(|_| UserFileError::Syntax { line: i + 1 })?;
        }
        Ok(store)
    }

    pub fn load(path: &Path) -> Result<UserStore, UserFileError> {
        // The file may hold plaintext passwords: wipe its text once the digests are made.
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            UserFileError::Read {
                path: path.display().to_string(),
                source,
            }
        })?);
        UserStore::parse(&text)
    }

    /// Adds one `user:$argon2id$…`, `user:sha256:<hex>` or `user:password` entry.
    pub fn add_entry(&mut self, entry: &str) -> Result<(), UserFileError> {
        let (user, secret) = entry
            .split_once(':')
            .filter(|(u, _)| !u.is_empty())
            .ok_or(UserFileError::Syntax { line: 0 })?;
        let stored = StoredPassword::parse(secret).ok_or(UserFileError::Syntax { line: 0 })?;
        Arc::make_mut(&mut self.users).insert(user.to_owned(), stored);
        Ok(())
    }

    /// Users whose entries are plaintext or unsalted SHA-256 (a startup warning).
    pub fn weak_entries(&self) -> usize {
        self.users.values().filter(|p| p.is_weak()).count()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// True when `user` exists and `password` matches. Argon2 is slow by design: call
    /// [`UserStore::check`] from async code.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        self.users.get(user).is_some_and(|p| p.verify(password))
    }

    fn any_argon2(&self) -> Option<&StoredPassword> {
        self.users
            .values()
            .find(|p| matches!(p, StoredPassword::Argon2(_)))
    }

    /// [`UserStore::verify`] without telling anyone, by its timing, who exists or how their
    /// password is stored. Only argon2 entries are hashed (on the hashing threads, and not at
    /// all once the client has gone); unknown users and sha256 entries take as long as a
    /// typical argon2 check as a wait, not as work, so guesses at names that do not exist cost
    /// no CPU (each used to cost a decoy hash: a flood of them delayed real logins).
    pub async fn check(&self, user: &str, password: &[u8]) -> bool {
        let entry = self.users.get(user);
        if let Some(StoredPassword::Argon2(_)) = entry {
            let started = std::time::Instant::now();
            let ok = self.hash_check(user, password).await;
            record_argon2_time(started.elapsed());
            return ok;
        }
        let ok = entry.is_some_and(|p| p.verify(password));
        if self.any_argon2().is_some() {
            tokio::time::sleep(self.typical_argon2_time().await).await;
        }
        ok
    }

    /// How long an argon2 check takes here lately; measured once with a decoy before any real
    /// check has been.
    async fn typical_argon2_time(&self) -> std::time::Duration {
        let known = TYPICAL_ARGON2_MICROS.load(std::sync::atomic::Ordering::Relaxed);
        if known > 0 {
            return std::time::Duration::from_micros(known);
        }
        let Some((decoy, _)) = self
            .users
            .iter()
            .find(|(_, p)| matches!(p, StoredPassword::Argon2(_)))
        else {
            return std::time::Duration::ZERO;
        };
        let started = std::time::Instant::now();
        let _ = self.hash_check(decoy, b"\0decoy").await;
        record_argon2_time(started.elapsed());
        started.elapsed()
    }

    /// `verify` on a hashing thread.
    async fn hash_check(&self, user: &str, password: &[u8]) -> bool {
        let Some(jobs) = hash_threads() else {
            return false;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, user) = (self.clone(), user.to_owned());
        let password = zeroize::Zeroizing::new(password.to_vec());
        let job: HashJob = Box::new(move || {
            // A client that gave up (closed, timed out) while queued costs nothing more.
            if !tx.is_closed() {
                let _ = tx.send(store.verify(&user, &password));
            }
        });
        let queued = jobs.lock().map(|j| j.send(job).is_ok()).unwrap_or(false);
        queued && rx.await.unwrap_or(false)
    }
}

/// A moving average of argon2 check times (queueing included), in microseconds; 0 until the
/// first is measured.
static TYPICAL_ARGON2_MICROS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn record_argon2_time(took: std::time::Duration) {
    use std::sync::atomic::Ordering;
    let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
    let _ = TYPICAL_ARGON2_MICROS.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
        Some(if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        })
    });
}

/// How the proxy authenticates its own clients.
#[derive(Debug, Clone, Default)]
pub enum ClientAuth {
    /// Answer STARTUP with READY: the sidecar trusts whoever can reach its (loopback) port.
    #[default]
    None,
    /// Present PasswordAuthenticator and check PLAIN credentials.
    Password(UserStore),
    /// Present PasswordAuthenticator; the username is a kmsauth username, the password a token.
    KmsAuth(std::sync::Arc<crate::auth::kmsauth::KmsAuthValidator>),
    /// Answer STARTUP with READY for the identity the verified client certificate carries,
    /// read from these fields in this order (mutual TLS).
    Certificate(Vec<super::certificate::IdentityField>),
}

/// How clients log in, swapped whole on SIGHUP: the users (or the KMS validator) together with
/// the sessions they vouched for. A handshake keeps one snapshot from its first frame to its
/// verdict, so a check that began under the old users can only remember its session in the
/// old cache, which the reload discarded, never in the one new handshakes read.
#[derive(Debug)]
pub struct Logins {
    pub auth: ClientAuth,
    pub sessions: SessionCache,
    /// Checks under way, by credentials: logins presenting the same ones at once (a driver
    /// opening its connection pool) share one check, one reservation of the failure budget.
    pub checks: crate::single_flight::SingleFlight<[u8; 32], Verdict>,
}

/// What a check of credentials found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The identity they prove.
    Accepted(String),
    /// Not valid; the reason, or empty when Cassandra's usual message says it all.
    Refused(String),
    /// Not checked: their source or username failed too often lately.
    Throttled(std::time::Duration),
}

impl Logins {
    pub fn new(auth: ClientAuth, sessions: SessionCache) -> Logins {
        Logins {
            auth,
            sessions,
            checks: Default::default(),
        }
    }

    /// Logins that remember no session: every connection is checked.
    pub fn without_sessions(auth: ClientAuth) -> Logins {
        Logins::new(auth, SessionCache::new(std::time::Duration::ZERO, 1))
    }

    /// Checks PLAIN credentials: a live sliding session first, then the users or KMS. Returns
    /// the identity, or the reason (empty when Cassandra's usual message says it all).
    pub async fn verify(&self, user: &str, secret: &[u8]) -> Result<String, String> {
        use crate::auth::sessions::session_key;
        let key = session_key(user, secret);
        let now = std::time::Instant::now();
        if let Some(identity) = self.sessions.touch(&key, now) {
            return Ok(identity);
        }
        match &self.auth {
            ClientAuth::None => Ok(user.to_owned()),
            // The identity is the certificate's; credentials are never asked for.
            ClientAuth::Certificate(_) => Err(String::new()),
            ClientAuth::Password(users) => {
                if !users.check(user, secret).await {
                    return Err(String::new());
                }
                self.sessions.insert(key, user, now, None);
                Ok(user.to_owned())
            }
            ClientAuth::KmsAuth(validator) => {
                let wall = std::time::SystemTime::now();
                let id = validator
                    .validate(user, secret, wall)
                    .await
                    .map_err(|e| e.to_string())?;
                let left = id.not_after.duration_since(wall).unwrap_or_default();
                self.sessions.insert(key, &id.name, now, Some(left));
                Ok(id.name)
            }
        }
    }
}

/// The message Cassandra sends for bad credentials; drivers show it to users verbatim.
pub fn bad_credentials_message(user: &str) -> String {
    format!("Provided username {user} and/or password are incorrect")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_hashed_entries() {
        use sha2::Digest;
        let hashed = hex::encode(sha2::Sha256::digest(b"hunter2"));
        let store = UserStore::parse(&format!(
            "# users\nalice:wonder:land\nbob:sha256:{hashed}\n"
        ))
        .unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.weak_entries(), 2);
        assert!(store.verify("alice", b"wonder:land"));
        assert!(store.verify("bob", b"hunter2"));
        assert!(!store.verify("bob", b"hunter3"));
        assert!(!store.verify("carol", b"hunter2"));
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert!(matches!(
            UserStore::parse("ok:pw\nnocolon\n"),
            Err(UserFileError::Syntax { line: 2 })
        ));
        assert!(UserStore::parse("u:sha256:zz").is_err());
    }

    /// A SIGHUP while a login is being checked: the check finishes under the settings it began
    /// with, and the session it remembers is not one later handshakes can use.
    #[tokio::test]
    async fn a_check_in_flight_during_a_reload_leaves_no_session_behind() {
        let minute = std::time::Duration::from_secs(60);
        let logins = |pw: &str| {
            Logins::new(
                ClientAuth::Password(UserStore::parse(&format!("app:{pw}\n")).unwrap()),
                SessionCache::new(minute, 10),
            )
        };
        let current = arc_swap::ArcSwap::from_pointee(logins("old-pw"));
        let in_flight = current.load_full();
        current.store(Arc::new(logins("new-pw")));
        assert!(in_flight.verify("app", b"old-pw").await.is_ok());
        assert!(current.load().verify("app", b"old-pw").await.is_err());
        assert!(current.load().verify("app", b"new-pw").await.is_ok());
    }

    /// Found by review: in a mixed file an unknown user was checked against the first entry,
    /// a fast one, so timing told unknown users from argon2 ones; then a decoy hash per unknown
    /// user let a flood of them delay real logins. Unknown users now wait as long as an argon2
    /// check takes, without hashing.
    #[tokio::test]
    async fn unknown_and_sha256_users_wait_like_argon2_ones() {
        let phc = crate::auth::passwords::hash_password(b"s3cret");
        let store = UserStore::parse(&format!("bob:plain\nalice:{phc}\n")).unwrap();
        assert!(store.check("alice", b"s3cret").await);
        let typical = store.typical_argon2_time().await;
        assert!(typical > std::time::Duration::ZERO);
        for (user, password, ok) in [
            ("nobody", "x", false),
            ("bob", "plain", true),
            ("bob", "x", false),
        ] {
            let started = tokio::time::Instant::now();
            assert_eq!(store.check(user, password.as_bytes()).await, ok);
            // A lower bound on a wait, not a speed: the machine may be slower, never faster.
            assert!(
                started.elapsed() >= typical / 4,
                "{user}: {:?}",
                started.elapsed()
            );
        }
    }

    #[test]
    fn argon2_entries() {
        let phc = crate::auth::passwords::hash_password(b"s3cret");
        let store = UserStore::parse(&format!("app:{phc}\n")).unwrap();
        assert_eq!(store.weak_entries(), 0);
        assert!(store.verify("app", b"s3cret"));
        assert!(!store.verify("app", b"s3cre"));
        assert!(!store.verify("other", b"s3cret"));
    }
}
