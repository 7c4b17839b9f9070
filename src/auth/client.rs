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
    /// password is stored: when the file has argon2 entries, every check — an unknown user's,
    /// a sha256 entry's — hashes once against an argon2 entry on the hashing threads, so it
    /// queues, takes CPU and time alike (a wait instead of the hash was told apart under
    /// concurrency: it did not queue). Checks of clients that have gone are skipped; the
    /// failure budgets bound how many checks anyone can ask for.
    pub async fn check(&self, user: &str, password: &[u8]) -> bool {
        if self.any_argon2().is_none() {
            return self.verify(user, password);
        }
        let Some(jobs) = hash_threads() else {
            return false;
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, user) = (self.clone(), user.to_owned());
        let password = zeroize::Zeroizing::new(password.to_vec());
        let job: HashJob = Box::new(move || {
            // A client that gave up (closed, timed out) while queued costs nothing more.
            if !tx.is_closed() {
                let _ = tx.send(store.verify_hashing(&user, &password));
            }
        });
        let queued = jobs.lock().map(|j| j.send(job).is_ok()).unwrap_or(false);
        queued && rx.await.unwrap_or(false)
    }

    /// `verify`, with one argon2 hash whatever the entry (on a hashing thread).
    fn verify_hashing(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(argon2 @ StoredPassword::Argon2(_)) => argon2.verify(password),
            other => {
                if let Some(decoy) = self.any_argon2() {
                    let _ = decoy.verify(password);
                }
                other.is_some_and(|p| p.verify(password))
            }
        }
    }
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

    /// Whether a session `self` vouched for still stands under `next` (a reload): the same
    /// stored password for a user, the same kmsauth settings for a token.
    pub fn still_vouches(&self, next: &Logins, identity: &str) -> bool {
        match (&self.auth, &next.auth) {
            (ClientAuth::Password(old), ClientAuth::Password(new)) => {
                old.users.get(identity).is_some()
                    && old.users.get(identity) == new.users.get(identity)
            }
            (ClientAuth::KmsAuth(old), ClientAuth::KmsAuth(new)) => {
                old.settings() == new.settings()
            }
            _ => false,
        }
    }

    /// Checks PLAIN credentials against the users or KMS, and remembers a session for them.
    /// Returns the identity, or the reason (empty when Cassandra's usual message says it all).
    /// A live session is looked up by the caller first (`session::login`), before the budgets.
    pub async fn verify(&self, user: &str, secret: &[u8]) -> Result<String, String> {
        use crate::auth::sessions::session_key;
        let key = session_key(user, secret);
        let now = std::time::Instant::now();
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

    /// Found by review: in a mixed file timing told unknown and sha256 users from argon2 ones
    /// (a decoy of the wrong kind, then a wait that did not queue like a hash). Every check now
    /// hashes once; the results stay right.
    #[tokio::test]
    async fn every_check_hashes_once_and_answers_right() {
        use std::sync::atomic::Ordering;
        let phc = crate::auth::passwords::hash_password(b"s3cret");
        let store = UserStore::parse(&format!("bob:plain\nalice:{phc}\n")).unwrap();
        for (user, password, ok) in [
            ("alice", "s3cret", true),
            ("alice", "x", false),
            ("nobody", "x", false),
            ("bob", "plain", true),
            ("bob", "x", false),
        ] {
            let before = crate::auth::passwords::ARGON2_CHECKS.load(Ordering::SeqCst);
            assert_eq!(store.check(user, password.as_bytes()).await, ok, "{user}");
            let after = crate::auth::passwords::ARGON2_CHECKS.load(Ordering::SeqCst);
            assert!(after > before, "{user}: no argon2 hash");
        }
    }

    /// Found by review: every reload emptied the session cache, so guessing at an application's
    /// name locked it out again after any SIGHUP or file change.
    #[test]
    fn a_reload_vouches_for_sessions_of_unchanged_users_only() {
        let logins = |text: &str| {
            Logins::without_sessions(ClientAuth::Password(UserStore::parse(text).unwrap()))
        };
        let before = logins("app:pw\nops:old\n");
        let after = logins("app:pw\nops:new\nextra:x\n");
        assert!(before.still_vouches(&after, "app"));
        assert!(!before.still_vouches(&after, "ops"), "rotated");
        assert!(
            !before.still_vouches(&logins("ops:old\n"), "app"),
            "removed"
        );
        assert!(!before.still_vouches(&Logins::without_sessions(ClientAuth::None), "app"));
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
