//! The credential cache against providers that block, fail, expire and rotate.

use std::sync::atomic::{AtomicUsize, Ordering};

use aws_credential_types::provider::future;

use super::*;

#[derive(Debug)]
struct Counting {
    calls: Arc<AtomicUsize>,
    ttl: Option<Duration>,
}

impl ProvideCredentials for Counting {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let expiry = self.ttl.map(|t| SystemTime::now() + t);
        future::ProvideCredentials::ready(Ok(Credentials::new(
            format!("AKID{n}"),
            "secret",
            None,
            expiry,
            "test",
        )))
    }
}

fn cache(ttl: Option<Duration>) -> (Arc<CredentialCache>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let p = Counting {
        calls: calls.clone(),
        ttl,
    };
    (
        CredentialCache::new(SharedCredentialsProvider::new(p)),
        calls,
    )
}

fn fixed_provider(akid: &str, secret: &str) -> Providers {
    let p = SharedCredentialsProvider::new(Credentials::new(akid, secret, None, None, "test"));
    Providers {
        base: p.clone(),
        provider: p,
    }
}

/// A cache that starts with AKIDFIRST and whose every rebuild reads what `next` holds then
/// (a shared credentials file rewritten between reloads).
fn rebuilt(
    next: Arc<std::sync::Mutex<Option<(&'static str, &'static str)>>>,
) -> Arc<CredentialCache> {
    let rebuild: Rebuild = Box::new(move || {
        let next = *next.lock().unwrap();
        Box::pin(async move {
            match next {
                Some((akid, secret)) => Ok(fixed_provider(akid, secret)),
                None => Ok(Providers {
                    base: SharedCredentialsProvider::new(Broken),
                    provider: SharedCredentialsProvider::new(Broken),
                }),
            }
        })
    });
    Arc::new(CredentialCache::build(
        fixed_provider("AKIDFIRST", "first-secret"),
        Some(rebuild),
        Duration::from_secs(1),
    ))
}

#[derive(Debug)]
struct Broken;

impl ProvideCredentials for Broken {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::not_loaded(
                "no credentials found in chain",
            ),
        ))
    }
}

#[tokio::test]
async fn a_reload_reads_the_chain_built_again() {
    let next = Arc::new(std::sync::Mutex::new(Some(("AKIDSECOND", "second-secret"))));
    let c = rebuilt(next);
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
    // Asking the same provider again cannot see a rotated file.
    assert_eq!(c.refresh(true).await.unwrap().access_key_id(), "AKIDFIRST");
    assert_eq!(c.reload().await.unwrap().access_key_id(), "AKIDSECOND");
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDSECOND");
}

#[tokio::test]
async fn a_failed_reload_leaves_the_chain_that_works() {
    let next = Arc::new(std::sync::Mutex::new(None));
    let c = rebuilt(next);
    c.get().await.unwrap();
    assert!(c.reload().await.is_err());
    // What assumes identities' roles still has working keys.
    let base = c.base_provider().provide_credentials().await.unwrap();
    assert_eq!(base.access_key_id(), "AKIDFIRST");
    assert_eq!(c.refresh(true).await.unwrap().access_key_id(), "AKIDFIRST");
}

/// Credentials issued for less than the refresh margin are re-read every few seconds, not in a
/// busy loop.
#[tokio::test(start_paused = true)]
async fn short_lived_credentials_are_not_re_read_in_a_loop() {
    let (c, calls) = cache(Some(Duration::from_secs(120)));
    c.get().await.unwrap();
    let refresher = c.spawn_refresher();
    tokio::time::sleep(Duration::from_secs(60)).await;
    refresher.abort();
    let n = calls.load(Ordering::SeqCst);
    assert!(n <= 8, "{n} loads in a minute");
}

#[tokio::test(start_paused = true)]
async fn the_periodic_re_read_rebuilds_the_chain() {
    let next = Arc::new(std::sync::Mutex::new(Some(("AKIDSECOND", "second-secret"))));
    let c = rebuilt(next);
    c.get().await.unwrap();
    let refresher = c.spawn_refresher();
    // Paused time: each sleep jumps straight to the refresher's next wake-up.
    let mut waited = Duration::ZERO;
    while c.get().await.unwrap().access_key_id() != "AKIDSECOND" {
        assert!(waited < 2 * STATIC_REFRESH_INTERVAL, "never re-read");
        tokio::time::sleep(Duration::from_secs(1)).await;
        waited += Duration::from_secs(1);
    }
    assert!(waited >= STATIC_REFRESH_INTERVAL - Duration::from_secs(1));
    refresher.abort();
}

#[tokio::test]
async fn a_failed_or_empty_reload_is_an_error_and_the_current_keys_go_on_signing() {
    let next = Arc::new(std::sync::Mutex::new(None));
    let c = rebuilt(next.clone());
    c.get().await.unwrap();
    let e = c.reload().await.unwrap_err();
    assert!(
        e.0.contains("still signing with the current credentials"),
        "{e}"
    );
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
    for empty in [
        ("", "a-secret"),
        ("AKIDEMPTYSECRET", ""),
        ("  ", "s"),
        ("AKIDNBSP", "\u{a0}"),
    ] {
        *next.lock().unwrap() = Some(empty);
        let e = c.reload().await.unwrap_err();
        assert!(e.0.contains("empty access key id or secret"), "{e}");
        assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
    }
}

#[tokio::test]
async fn caches_between_calls() {
    let (c, calls) = cache(Some(Duration::from_secs(3600)));
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKID0");
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKID0");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(c.expires_in().unwrap() > Duration::from_secs(3500));
}

#[tokio::test]
async fn reloads_when_about_to_expire() {
    let (c, calls) = cache(Some(Duration::from_secs(60)));
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKID0");
    assert_eq!(c.get().await.unwrap().access_key_id(), "AKID1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Answers only once the test opens its gate, so callers pile up behind the first load.
#[derive(Debug)]
struct Gated {
    calls: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl ProvideCredentials for Gated {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let gate = self.gate.clone();
        future::ProvideCredentials::new(async move {
            let _open = gate.acquire().await;
            Ok(Credentials::new(
                format!("AKID{n}"),
                "secret",
                None,
                None,
                "test",
            ))
        })
    }
}

#[tokio::test]
async fn concurrent_loads_are_single_flight() {
    let calls = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let c = CredentialCache::new(SharedCredentialsProvider::new(Gated {
        calls: calls.clone(),
        gate: gate.clone(),
    }));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get().await.map(|k| k.access_key_id().to_owned()) })
        })
        .collect();
    // One thread, no I/O: after these turns every caller has run until it blocks, either in
    // the provider (without single flight, all eight) or waiting for the first load.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "one load while eight wait");
    gate.add_permits(100);
    for caller in callers {
        assert_eq!(caller.await.unwrap().unwrap(), "AKID0");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    c.refresh(true).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// First answers with credentials expiring in 2 minutes, then fails or hangs.
#[derive(Debug)]
struct ThenBroken {
    calls: AtomicUsize,
    hang: bool,
}

impl ProvideCredentials for ThenBroken {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
            let expiry = SystemTime::now() + Duration::from_secs(120);
            return future::ProvideCredentials::ready(Ok(Credentials::new(
                "AKIDFIRST",
                "secret",
                None,
                Some(expiry),
                "test",
            )));
        }
        if self.hang {
            return future::ProvideCredentials::new(std::future::pending());
        }
        future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::provider_error(
                "metadata service said no",
            ),
        ))
    }
}

fn broken(hang: bool) -> Arc<CredentialCache> {
    let p = ThenBroken {
        calls: AtomicUsize::new(0),
        hang,
    };
    CredentialCache::with_timeout(
        SharedCredentialsProvider::new(p),
        Duration::from_millis(200),
    )
}

#[tokio::test]
async fn a_failing_or_hanging_provider_keeps_unexpired_credentials_in_use() {
    for hang in [false, true] {
        let c = broken(hang);
        assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
        // Due for refresh (2 min left < 5 min ahead); the refresh fails, the key still signs.
        assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
        assert_eq!(c.refresh(true).await.unwrap().access_key_id(), "AKIDFIRST");
    }
}

#[tokio::test]
async fn after_a_failure_valid_credentials_are_used_without_asking_again() {
    let p = Arc::new(ThenBroken {
        calls: AtomicUsize::new(0),
        hang: true,
    });
    let c = CredentialCache::with_timeout(
        SharedCredentialsProvider::new(Shared(p.clone())),
        Duration::from_millis(200),
    );
    c.get().await.unwrap();
    c.get().await.unwrap(); // due for refresh: the provider hangs, times out once
    assert_eq!(p.calls.load(Ordering::SeqCst), 2);
    for _ in 0..5 {
        assert_eq!(c.get().await.unwrap().access_key_id(), "AKIDFIRST");
    }
    assert_eq!(
        p.calls.load(Ordering::SeqCst),
        2,
        "no new wait on the broken provider"
    );
}

#[derive(Debug)]
struct Shared(Arc<ThenBroken>);

impl ProvideCredentials for Shared {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.0.provide_credentials()
    }
}

#[tokio::test]
async fn a_hanging_provider_is_an_error_not_a_hang() {
    let p = ThenBroken {
        calls: AtomicUsize::new(1),
        hang: true,
    };
    let c = CredentialCache::with_timeout(
        SharedCredentialsProvider::new(p),
        Duration::from_millis(100),
    );
    let e = c.get().await.unwrap_err();
    assert!(e.to_string().contains("did not answer"), "{e}");
    let p = ThenBroken {
        calls: AtomicUsize::new(1),
        hang: false,
    };
    let c = CredentialCache::new(SharedCredentialsProvider::new(p));
    let e = c.get().await.unwrap_err();
    assert!(e.to_string().contains("metadata service said no"), "{e}");
}
