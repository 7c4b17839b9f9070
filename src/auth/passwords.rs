//! Stored client passwords: argon2id in PHC format (`$argon2id$v=19$m=…`), the form to use, and
//! the older unsalted `sha256:<hex>` and plaintext entries, still accepted with a warning at
//! startup (a leaked file of those gives passwords away to a GPU in hours).

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

#[derive(Clone, PartialEq, Eq)]
pub(crate) enum StoredPassword {
    /// A PHC string, checked by parsing it (its parameters and salt are in it).
    Argon2(String),
    /// SHA-256 of the password: from a `sha256:` entry or a plaintext one.
    Sha256([u8; 32]),
}

impl std::fmt::Debug for StoredPassword {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoredPassword::Argon2(_) => "Argon2(..)",
            StoredPassword::Sha256(_) => "Sha256(..)",
        })
    }
}

fn sha256(password: &[u8]) -> [u8; 32] {
    Sha256::digest(password).into()
}

impl StoredPassword {
    /// From the part of a users-file line after `user:`.
    pub(crate) fn parse(secret: &str) -> Option<StoredPassword> {
        if secret.starts_with("$argon2") {
            let phc = PasswordHash::new(secret).ok()?;
            let known = matches!(phc.algorithm.as_str(), "argon2id" | "argon2i" | "argon2d");
            let complete = phc.salt.is_some() && phc.hash.is_some();
            let affordable =
                argon2::Params::try_from(&phc).is_ok_and(|p| p.m_cost() <= MAX_MEMORY_KIB);
            let complete = complete && affordable;
            return (known && complete).then(|| StoredPassword::Argon2(secret.to_owned()));
        }
        match secret.strip_prefix("sha256:") {
            Some(h) => {
                let mut d = [0u8; 32];
                hex::decode_to_slice(h, &mut d).ok()?;
                Some(StoredPassword::Sha256(d))
            }
            None => Some(StoredPassword::Sha256(sha256(secret.as_bytes()))),
        }
    }

    /// Unsalted and fast to guess: worth a warning.
    pub(crate) fn is_weak(&self) -> bool {
        matches!(self, StoredPassword::Sha256(_))
    }

    /// Whether `password` matches. Argon2 costs tens of milliseconds of CPU and ~19 MiB: call it
    /// off the async runtime, a bounded number at a time.
    pub(crate) fn verify(&self, password: &[u8]) -> bool {
        match self {
            StoredPassword::Argon2(phc) => verify_argon2(phc, password).unwrap_or(false),
            StoredPassword::Sha256(stored) => bool::from(stored.ct_eq(&sha256(password))),
        }
    }
}

thread_local! {
    /// Argon2's working memory (19 MiB with the default parameters), kept per hashing thread
    /// and reused: allocating it for every check left the allocator holding hundreds of MiB.
    static BLOCKS: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Ceiling on the working memory a stored hash may ask for (m in KiB): a file line with
/// `m=4194304` must not make each check allocate 4 GiB.
const MAX_MEMORY_KIB: u32 = 256 * 1024;

/// Argon2 hashes computed, for tests that a path hashed (a check must cost the same whoever
/// is asked for).
pub(crate) static ARGON2_CHECKS: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

fn verify_argon2(phc: &str, password: &[u8]) -> Option<bool> {
    ARGON2_CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let h = PasswordHash::new(phc).ok()?;
    let params = argon2::Params::try_from(&h).ok()?;
    if params.m_cost() > MAX_MEMORY_KIB {
        return None;
    }
    let algorithm = argon2::Algorithm::try_from(h.algorithm).ok()?;
    let version = match h.version {
        Some(v) => argon2::Version::try_from(v).ok()?,
        None => argon2::Version::V0x13,
    };
    let expected = h.hash?;
    let mut salt = [0u8; 64];
    let salt = h.salt?.decode_b64(&mut salt).ok()?;
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params.clone());
    BLOCKS.with(|blocks| {
        let mut blocks = blocks.borrow_mut();
        blocks.resize(params.block_count(), argon2::Block::default());
        argon
            .hash_password_into_with_memory(password, salt, &mut out, &mut blocks[..])
            .ok()
    })?;
    Some(bool::from(out.ct_eq(expected.as_bytes())))
}

/// An argon2id PHC string for `password`, with OWASP's parameters (19 MiB, 2 passes) and a
/// random salt: what `keyspaces-proxy hash-password` prints.
pub fn hash_password(password: &[u8]) -> String {
    let salt: [u8; 16] = rand::random();
    // 16 random bytes always encode to a valid salt.
    let salt = SaltString::encode_b64(&salt).unwrap_or_else(|_| unreachable!());
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .unwrap_or_else(|_| unreachable!())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_hashes_verify_and_are_salted() {
        let a = hash_password(b"hunter2");
        let b = hash_password(b"hunter2");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b, "a fresh salt each time");
        let stored = StoredPassword::parse(&a).unwrap();
        assert!(!stored.is_weak());
        assert!(stored.verify(b"hunter2"));
        assert!(!stored.verify(b"hunter3"));
    }

    #[test]
    fn a_stored_hash_cannot_ask_for_gigabytes() {
        let huge = "$argon2id$v=19$m=4194304,t=1,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        assert!(
            StoredPassword::parse(huge).is_none(),
            "refused when the file is read"
        );
    }

    #[test]
    fn legacy_entries_still_work_and_are_weak() {
        let hex = hex::encode(sha256(b"pw"));
        for entry in [format!("sha256:{hex}"), "pw".to_owned()] {
            let stored = StoredPassword::parse(&entry).unwrap();
            assert!(stored.is_weak());
            assert!(stored.verify(b"pw"));
            assert!(!stored.verify(b"px"));
        }
        assert!(StoredPassword::parse("sha256:zz").is_none());
        assert!(StoredPassword::parse("$argon2id$nonsense").is_none());
        assert!(StoredPassword::parse("$argon2x$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA").is_none());
    }
}
