//! AWS credentials from the standard chain, cached and refreshed ahead of expiry.
//!
//! `SdkConfig::credentials_provider()` does not cache: every call may reach IMDS, STS or SSO.
//! Upstream handshakes must never wait on that, so one cache serves them all, refreshes in the
//! background before expiry, and collapses concurrent refreshes into one call (single-flight).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;

use crate::metrics::{metrics, Metrics};

/// Refresh this long before credentials expire.
pub const REFRESH_AHEAD: Duration = Duration::from_secs(5 * 60);
/// Credentials without an expiry (keys in env or files) are re-read this often, so rotated keys
/// are picked up without a restart.
pub const STATIC_REFRESH_INTERVAL: Duration = Duration::from_secs(5 * 60);
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// A provider slower than this (IMDS or STS not answering) counts as failed, so a handshake
/// gets an error instead of hanging.
pub const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error, Clone)]
#[error("could not load AWS credentials: {0}")]
pub struct CredentialsError(pub String);

/// Where a chain provider came from, so it can be built again. The chain's file providers
/// parse the shared config and credentials files once: asking the same provider again after
/// the file was rotated returns the keys it replaced (aws-config 1.x).
#[derive(Debug, Clone, Default)]
pub struct ChainSource {
    pub profile: Option<String>,
    pub role_arn: Option<String>,
    pub region: Option<String>,
}

pub struct CredentialCache {
    provider: ArcSwap<SharedCredentialsProvider>,
    /// The chain's credentials before `--role-arn` is assumed on top (the same provider when
    /// no role is): what assumes an identity's role.
    base: ArcSwap<SharedCredentialsProvider>,
    /// Rebuilt from on SIGHUP and on the periodic re-read; `None` for a provider that does not
    /// read files (fixed keys, an identity's role).
    source: Option<ChainSource>,
    timeout: Duration,
    current: ArcSwapOption<Credentials>,
    refreshing: tokio::sync::Mutex<()>,
    /// When the provider last failed: until RETRY_AFTER_FAILURE has passed, handshakes sign
    /// with the still-valid cached credentials instead of each waiting on a broken provider.
    failed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for CredentialCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialCache").finish_non_exhaustive()
    }
}

fn is_fresh(c: &Credentials, now: SystemTime) -> bool {
    match c.expiry() {
        None => true,
        Some(exp) => exp
            .duration_since(now)
            .is_ok_and(|left| left > REFRESH_AHEAD),
    }
}

fn is_expired(c: &Credentials, now: SystemTime) -> bool {
    c.expiry().is_some_and(|exp| exp <= now)
}

impl CredentialCache {
    pub fn new(provider: SharedCredentialsProvider) -> Arc<CredentialCache> {
        CredentialCache::with_timeout(provider, PROVIDER_TIMEOUT)
    }

    /// As `new`, giving up on the provider after `timeout`.
    pub fn with_timeout(provider: SharedCredentialsProvider, timeout: Duration) -> Arc<Self> {
        Arc::new(CredentialCache {
            base: ArcSwap::from_pointee(provider.clone()),
            provider: ArcSwap::from_pointee(provider),
            source: None,
            timeout,
            current: ArcSwapOption::empty(),
            refreshing: tokio::sync::Mutex::new(()),
            failed_at: std::sync::Mutex::new(None),
        })
    }

    /// The standard chain's provider for `source`, rebuilt from it on every reload.
    pub async fn from_chain(
        source: ChainSource,
    ) -> Result<(Arc<CredentialCache>, Option<String>), CredentialsError> {
        let (base, provider, region) = provider_from_chain(&source).await?;
        let mut cache = CredentialCache {
            base: ArcSwap::from_pointee(base),
            provider: ArcSwap::from_pointee(provider),
            source: None,
            timeout: PROVIDER_TIMEOUT,
            current: ArcSwapOption::empty(),
            refreshing: tokio::sync::Mutex::new(()),
            failed_at: std::sync::Mutex::new(None),
        };
        cache.source = Some(source);
        Ok((Arc::new(cache), region))
    }

    /// Reads the credentials afresh: the chain is built again from its files (a provider keeps
    /// what it parsed), then asked. A chain that no longer builds keeps the current provider.
    pub async fn reload(&self) -> Result<Arc<Credentials>, CredentialsError> {
        if let Some(source) = &self.source {
            let (base, provider, _) = provider_from_chain(source).await?;
            self.base.store(Arc::new(base));
            self.provider.store(Arc::new(provider));
        }
        self.refresh(true).await
    }

    /// The chain's own credentials (before `--role-arn`), as a provider that follows this
    /// cache's reloads: an identity's AssumeRole is signed with them, so a rotated key file
    /// reaches STS calls too, not only Keyspaces handshakes.
    pub fn base_provider(self: &Arc<Self>) -> SharedCredentialsProvider {
        SharedCredentialsProvider::new(FromBase(self.clone()))
    }

    /// Fixed credentials, for tests and tools.
    pub fn fixed(credentials: Credentials) -> Arc<CredentialCache> {
        let cache = CredentialCache::new(SharedCredentialsProvider::new(credentials.clone()));
        cache.current.store(Some(Arc::new(credentials)));
        cache
    }

    /// Current credentials; loads them only if none are cached or they are about to expire.
    pub async fn get(&self) -> Result<Arc<Credentials>, CredentialsError> {
        if let Some(c) = self.current.load_full() {
            let now = SystemTime::now();
            if is_fresh(&c, now) || (!is_expired(&c, now) && self.failed_recently()) {
                return Ok(c);
            }
        }
        self.refresh(false).await
    }

    fn failed_recently(&self) -> bool {
        let failed_at = *self.failed_at.lock().unwrap_or_else(|e| e.into_inner());
        failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER_FAILURE)
    }

    /// Seconds until the cached credentials expire, if they expire at all.
    /// Seconds until the current credentials expire, negative once they have; +Inf when they
    /// never do; `None` when there are none. (A gauge that jumped to +Inf at expiry would
    /// look healthiest exactly when it is not.)
    pub fn expiry_seconds(&self) -> Option<f64> {
        let c = self.current.load_full()?;
        let Some(at) = c.expiry() else {
            return Some(f64::INFINITY);
        };
        Some(match at.duration_since(SystemTime::now()) {
            Ok(left) => left.as_secs_f64(),
            Err(past) => -past.duration().as_secs_f64(),
        })
    }

    pub fn expires_in(&self) -> Option<Duration> {
        let c = self.current.load_full()?;
        c.expiry()?.duration_since(SystemTime::now()).ok()
    }

    /// Loads credentials from the provider; with `force` even when the cached ones are fresh.
    /// Callers that arrive while a load is under way share its result.
    pub async fn refresh(&self, force: bool) -> Result<Arc<Credentials>, CredentialsError> {
        let before = self.current.load_full();
        let _guard = self.refreshing.lock().await;
        let now_cached = self.current.load_full();
        let someone_else_refreshed = match (&before, &now_cached) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        if let Some(c) = now_cached {
            if (someone_else_refreshed || !force) && is_fresh(&c, SystemTime::now()) {
                return Ok(c);
            }
        }
        let provider = self.provider.load_full();
        let loaded = tokio::time::timeout(self.timeout, provider.provide_credentials()).await;
        let loaded = match loaded {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(CredentialsError(error_chain(&e))),
            Err(_) => Err(CredentialsError(format!(
                "the credentials provider did not answer within {} s",
                self.timeout.as_secs_f32()
            ))),
        };
        let result = if loaded.is_ok() { "ok" } else { "error" };
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
            loaded.is_err().then(std::time::Instant::now);
        Metrics::count(&metrics().credential_refreshes, vec![("result", result)]);
        let loaded = match loaded {
            Ok(c) => c,
            Err(e) => {
                // Credentials that are due for refresh but not yet expired still sign: a
                // provider hiccup must not fail handshakes while they last.
                if let Some(c) = self.current.load_full() {
                    if !is_expired(&c, SystemTime::now()) {
                        tracing::warn!(error = %e, "credential refresh failed; still using the current credentials until they expire");
                        return Ok(c);
                    }
                }
                return Err(e);
            }
        };
        let loaded = Arc::new(loaded);
        self.current.store(Some(loaded.clone()));
        tracing::debug!(
            access_key_id = loaded.access_key_id(),
            expires = ?loaded.expiry(),
            "loaded AWS credentials"
        );
        Ok(loaded)
    }

    /// When the background task should next refresh.
    fn next_refresh(&self) -> Duration {
        match self.current.load_full() {
            None => Duration::ZERO,
            Some(c) => match c.expiry() {
                None => STATIC_REFRESH_INTERVAL,
                Some(exp) => exp
                    .checked_sub(REFRESH_AHEAD)
                    .and_then(|t| t.duration_since(SystemTime::now()).ok())
                    .unwrap_or(Duration::ZERO)
                    .min(STATIC_REFRESH_INTERVAL),
            },
        }
    }

    /// Keeps the cache warm until the returned task is aborted.
    pub fn spawn_refresher(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(cache.next_refresh()).await;
                if let Err(e) = cache.reload().await {
                    tracing::warn!(error = %e, "credential refresh failed; retrying");
                    tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                }
            }
        })
    }
}

/// The AWS SDK configuration from the standard chain, for a profile, region and endpoint
/// override (a VPC endpoint, or a local emulator in tests) when given.
/// An error and its sources as one line of their messages, without the SDK's Debug dump
/// (`DisplayErrorContext` appends one, a page long for a provider chain).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

pub async fn sdk_config(
    profile: Option<&str>,
    region: Option<&str>,
    endpoint_url: Option<&str>,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(p) = profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = region {
        loader = loader.region(aws_config::Region::new(r.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Builds the provider: the default chain, optionally for a named profile, optionally assuming a
/// role on top.
/// The chain's provider (`base`), the one the cache asks (`base` or a role assumed with it) and
/// the chain's region.
async fn provider_from_chain(
    source: &ChainSource,
) -> Result<
    (
        SharedCredentialsProvider,
        SharedCredentialsProvider,
        Option<String>,
    ),
    CredentialsError,
> {
    let sdk = sdk_config(source.profile.as_deref(), source.region.as_deref(), None).await;
    let region = sdk.region().map(|r| r.as_ref().to_owned());
    let base = sdk
        .credentials_provider()
        .ok_or_else(|| CredentialsError("no credentials provider in the AWS chain".into()))?;
    let provider = match source.role_arn.as_deref() {
        None => base.clone(),
        Some(arn) => {
            let role = aws_config::sts::AssumeRoleProvider::builder(arn)
                .session_name("keyspaces-proxy")
                .configure(&sdk)
                .build_from_provider(base.clone())
                .await;
            SharedCredentialsProvider::new(role)
        }
    };
    Ok((base, provider, region))
}

#[derive(Debug)]
struct FromBase(Arc<CredentialCache>);

impl ProvideCredentials for FromBase {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::new(async move {
            let base = self.0.base.load_full();
            base.provide_credentials().await
        })
    }
}

#[cfg(test)]
mod tests {
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
}
