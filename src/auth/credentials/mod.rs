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

use super::aws_chain::{providers, ChainSource, Providers};
use crate::metrics::{metrics, Metrics, Outcome};

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

type Rebuild = Box<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Providers, CredentialsError>>
        + Send
        + Sync,
>;

/// Why a load gave no new credentials, and whether the current ones still sign.
enum LoadFailed {
    Kept(Arc<Credentials>, CredentialsError),
    Lost(CredentialsError),
}

pub struct CredentialCache {
    provider: ArcSwap<SharedCredentialsProvider>,
    /// The chain's credentials before `--role-arn` is assumed on top (the same provider when
    /// no role is): what assumes an identity's role.
    base: ArcSwap<SharedCredentialsProvider>,
    /// Builds the providers again on SIGHUP and on the periodic re-read (the chain's file
    /// providers parse the shared files once, so asking the same provider after a rotation
    /// returns the keys it replaced); `None` for a provider that reads no files (fixed keys, an
    /// identity's role).
    rebuild: Option<Rebuild>,
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
        Arc::new(CredentialCache::build(
            Providers {
                base: provider.clone(),
                provider,
            },
            None,
            timeout,
        ))
    }

    fn build(providers: Providers, rebuild: Option<Rebuild>, timeout: Duration) -> Self {
        CredentialCache {
            base: ArcSwap::from_pointee(providers.base),
            provider: ArcSwap::from_pointee(providers.provider),
            rebuild,
            timeout,
            current: ArcSwapOption::empty(),
            refreshing: tokio::sync::Mutex::new(()),
            failed_at: std::sync::Mutex::new(None),
        }
    }

    /// The standard chain for `source`, built again on every reload; and the chain's region.
    pub async fn from_chain(
        source: ChainSource,
    ) -> Result<(Arc<CredentialCache>, Option<String>), CredentialsError> {
        let (first, region) = providers(&source).await?;
        let rebuild: Rebuild = Box::new(move || {
            let source = source.clone();
            Box::pin(async move { providers(&source).await.map(|(p, _)| p) })
        });
        let cache = CredentialCache::build(first, Some(rebuild), PROVIDER_TIMEOUT);
        Ok((Arc::new(cache), region))
    }

    /// Reads the credentials afresh: the providers are built again, then asked. An error when
    /// nothing new was read, even if the current credentials go on signing (a SIGHUP must not
    /// report success for a file it could not read).
    pub async fn reload(&self) -> Result<Arc<Credentials>, CredentialsError> {
        let fresh = match &self.rebuild {
            Some(rebuild) => Some(rebuild().await?),
            None => None,
        };
        match self.load(true, fresh).await {
            Ok(c) => Ok(c),
            Err(LoadFailed::Kept(_, e)) => Err(CredentialsError(format!(
                "{}; still signing with the current credentials until they expire",
                e.0
            ))),
            Err(LoadFailed::Lost(e)) => Err(e),
        }
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
        match self.load(force, None).await {
            Ok(c) => Ok(c),
            Err(LoadFailed::Kept(c, e)) => {
                tracing::warn!(error = %e, "credential refresh failed; still using the current credentials until they expire");
                Ok(c)
            }
            Err(LoadFailed::Lost(e)) => Err(e),
        }
    }

    /// Asks `fresh` (a chain built again: a reload), else the current provider. A reload never
    /// takes another caller's result (it was read before the rotation it is for), and its chain
    /// replaces the current one only once it has given usable credentials.
    async fn load(
        &self,
        force: bool,
        fresh: Option<Providers>,
    ) -> Result<Arc<Credentials>, LoadFailed> {
        let before = self.current.load_full();
        let _guard = self.refreshing.lock().await;
        let now_cached = self.current.load_full();
        let someone_else_refreshed = match (&before, &now_cached) {
            (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
            (None, Some(_)) => true,
            _ => false,
        };
        if let Some(c) = now_cached {
            let shared = someone_else_refreshed && fresh.is_none();
            if (shared || !force) && is_fresh(&c, SystemTime::now()) {
                return Ok(c);
            }
        }
        let provider = match &fresh {
            Some(f) => Arc::new(f.provider.clone()),
            None => self.provider.load_full(),
        };
        let loaded = tokio::time::timeout(self.timeout, provider.provide_credentials()).await;
        let loaded = match loaded {
            // An empty key would replace working credentials with ones every handshake fails.
            Ok(Ok(c))
                if c.access_key_id().trim().is_empty()
                    || c.secret_access_key().trim().is_empty() =>
            {
                Err(CredentialsError(
                    "the credentials read have an empty access key id or secret access key".into(),
                ))
            }
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(CredentialsError(super::aws_chain::error_chain(&e))),
            Err(_) => Err(CredentialsError(format!(
                "the credentials provider did not answer within {} s",
                self.timeout.as_secs_f32()
            ))),
        };
        let result = if loaded.is_ok() { "ok" } else { "error" };
        *self.failed_at.lock().unwrap_or_else(|e| e.into_inner()) =
            loaded.is_err().then(std::time::Instant::now);
        Metrics::count(&metrics().credential_refreshes, Outcome { result });
        let loaded = match loaded {
            Ok(c) => c,
            Err(e) => {
                // Credentials that are due for refresh but not yet expired still sign: a
                // provider hiccup must not fail handshakes while they last.
                if let Some(c) = self.current.load_full() {
                    if !is_expired(&c, SystemTime::now()) {
                        return Err(LoadFailed::Kept(c, e));
                    }
                }
                return Err(LoadFailed::Lost(e));
            }
        };
        if let Some(f) = fresh {
            self.base.store(Arc::new(f.base));
            self.provider.store(Arc::new(f.provider));
        }
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
                // At least RETRY_AFTER_FAILURE apart: credentials issued for less than
                // REFRESH_AHEAD would otherwise be re-read in a busy loop.
                tokio::time::sleep(cache.next_refresh().max(RETRY_AFTER_FAILURE)).await;
                if let Err(e) = cache.reload().await {
                    tracing::warn!(error = %e, "credential re-read failed; retrying");
                    tokio::time::sleep(RETRY_AFTER_FAILURE).await;
                }
            }
        })
    }
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
mod tests;
