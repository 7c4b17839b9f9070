//! From a parsed command line to what the proxy runs with: client authentication (users,
//! KMS), credentials, endpoint, TLS, pools. The only part of the configuration that does I/O.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{
    default_endpoint_host, parse_endpoint, Cli, ClientAuthMode, ConfigError, UpstreamAuthMode,
    UpstreamMode, KEYSPACES_PORT,
};
use crate::auth::client::{ClientAuth, UserStore};
use crate::auth::credentials::{provider_from_chain, sdk_config, CredentialCache};
use crate::auth::identity_roles::IdentityRoles;
use crate::auth::kmsauth::{KmsAuthSettings, KmsAuthValidator};
use crate::auth::sessions::{SessionCache, MAX_SESSIONS};
use crate::session::ProxyContext;
use crate::upstream::identity_pools::IdentityPools;
use crate::upstream::pool::{Pool, PoolSettings};
use crate::upstream::tls::{client_config, server_name};
use crate::upstream::{UpstreamAuth, UpstreamTarget};

/// A context ready to serve, and the credential cache to keep warm (SigV4 only).
pub struct Resolved {
    pub context: ProxyContext,
    pub credentials: Option<Arc<CredentialCache>>,
    pub region: Option<String>,
}

impl Cli {
    pub async fn client_auth(&self) -> Result<ClientAuth, ConfigError> {
        match self.client_auth {
            ClientAuthMode::Kmsauth => Ok(ClientAuth::KmsAuth(Arc::new(self.kmsauth().await?))),
            ClientAuthMode::None => Ok(ClientAuth::None),
            ClientAuthMode::Password => {
                let mut users = match &self.client_credentials_file {
                    Some(p) => UserStore::load(p)?,
                    None => UserStore::default(),
                };
                for entry in &self.client_users {
                    users.add_entry(entry)?;
                }
                if users.is_empty() {
                    return Err(ConfigError::NoClientUsers);
                }
                Ok(ClientAuth::Password(users))
            }
        }
    }

    /// The kmsauth settings (pure, so the checks are unit-tested).
    pub fn kmsauth_settings(&self) -> Result<KmsAuthSettings, ConfigError> {
        let bad = |m: &str| ConfigError::Kmsauth(m.to_owned());
        let to = self
            .kmsauth_to
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| bad("--kmsauth-to (this proxy's name in tokens) is required"))?;
        if self.kmsauth_service_keys.is_empty() && self.kmsauth_user_keys.is_empty() {
            return Err(bad("give --kmsauth-service-key and/or --kmsauth-user-key"));
        }
        let mut extra_context = Vec::new();
        for entry in &self.kmsauth_context {
            let (k, v) = entry
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| bad(&format!("--kmsauth-context {entry:?}: expected KEY=VALUE")))?;
            if ["to", "from", "user_type"].contains(&k) {
                return Err(bad(&format!("--kmsauth-context cannot set {k:?}")));
            }
            extra_context.push((k.to_owned(), v.to_owned()));
        }
        if !(1..=2).contains(&self.kmsauth_min_version) {
            return Err(bad("--kmsauth-min-version is 1 or 2"));
        }
        Ok(KmsAuthSettings {
            to,
            service_keys: self.kmsauth_service_keys.clone(),
            user_keys: self.kmsauth_user_keys.clone(),
            extra_context,
            max_lifetime: Duration::from_secs(self.kmsauth_max_lifetime.max(1) * 60),
            min_version: self.kmsauth_min_version,
            max_version: 2,
        })
    }

    async fn kmsauth(&self) -> Result<KmsAuthValidator, ConfigError> {
        let settings = self.kmsauth_settings()?;
        let region = self.region.as_deref().map(str::to_ascii_lowercase);
        let sdk = sdk_config(
            self.profile.as_deref(),
            region.as_deref(),
            self.kms_endpoint.as_deref(),
        )
        .await;
        Ok(KmsAuthValidator::new(
            settings,
            aws_sdk_kms::Client::new(&sdk),
        ))
    }

    pub fn pool_settings(&self) -> PoolSettings {
        PoolSettings {
            min_connections: self.pool_min_connections.max(1),
            max_connections: self.pool_max_connections.max(1),
            max_rate_per_connection: self.max_rate_per_connection,
            max_streams_per_connection: self.max_streams_per_connection.clamp(1, 32768),
            grow_at_in_flight: self.pool_grow_in_flight.max(1),
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval.max(1)),
            request_timeout: Duration::from_secs(self.request_timeout.max(1)),
            recycle_before_expiry: Duration::from_secs(self.recycle_before_expiry),
            max_prepared: self.max_prepared,
        }
    }

    /// Resolves region, credentials, endpoint and TLS. Reaches the AWS chain only for SigV4.
    pub async fn resolve(&self) -> Result<Resolved, ConfigError> {
        let client_auth = self.client_auth().await?;
        let mut region = self.region.as_deref().map(str::to_ascii_lowercase);
        let (auth, credentials) = match self.upstream_auth {
            UpstreamAuthMode::Sigv4 => {
                let (provider, chain_region) = provider_from_chain(
                    self.profile.as_deref(),
                    self.role_arn.as_deref(),
                    region.as_deref(),
                )
                .await?;
                region = region.or(chain_region.map(|r| r.to_ascii_lowercase()));
                let region = region.clone().ok_or(ConfigError::NoRegion)?;
                let cache = CredentialCache::new(provider);
                (
                    UpstreamAuth::SigV4 {
                        credentials: cache.clone(),
                        region,
                    },
                    Some(cache),
                )
            }
            UpstreamAuthMode::Plain => match (&self.upstream_username, &self.upstream_password) {
                (Some(u), Some(p)) => (
                    UpstreamAuth::Plain {
                        username: u.clone(),
                        password: zeroize::Zeroizing::new(p.clone()),
                    },
                    None,
                ),
                _ => return Err(ConfigError::NoUpstreamCredentials),
            },
            UpstreamAuthMode::Astra => match &self.upstream_password {
                Some(p) if p.starts_with("AstraCS:") => (
                    UpstreamAuth::Plain {
                        username: "token".into(),
                        password: zeroize::Zeroizing::new(p.clone()),
                    },
                    None,
                ),
                _ => return Err(ConfigError::NoAstraToken),
            },
        };
        let (host, port) = match &self.endpoint {
            Some(e) => parse_endpoint(e)?,
            None => {
                let r = region.as_deref().ok_or(ConfigError::NoRegion)?;
                (default_endpoint_host(r, self.fips), KEYSPACES_PORT)
            }
        };
        let loopback =
            host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if self.insecure_plaintext_upstream_for_benchmarks && !loopback {
            return Err(ConfigError::PlaintextNotLoopback(host));
        }
        let name = self.tls_server_name.clone().unwrap_or_else(|| host.clone());
        let address = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let upstream = UpstreamTarget {
            address,
            server_name: server_name(&name)?,
            tls: client_config(self.ca_file.as_deref())?,
            insecure_plaintext: self.insecure_plaintext_upstream_for_benchmarks,
            auth,
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
            max_frame_len: self.max_frame_len,
        };
        let pool = match self.upstream_mode {
            UpstreamMode::Dedicated => None,
            UpstreamMode::Pooled => Some(Pool::new(upstream.clone(), self.pool_settings())),
        };
        let identity_pools = match &self.identity_roles {
            None => None,
            Some(path) => {
                if self.upstream_mode != UpstreamMode::Pooled
                    || self.upstream_auth != UpstreamAuthMode::Sigv4
                {
                    return Err(ConfigError::IdentityRolesNeedPooledSigv4);
                }
                let roles = IdentityRoles::load(path)?;
                let sdk = sdk_config(
                    self.profile.as_deref(),
                    region.as_deref(),
                    self.sts_endpoint.as_deref(),
                )
                .await;
                Some(Arc::new(IdentityPools::new(
                    upstream.clone(),
                    region.clone().ok_or(ConfigError::NoRegion)?,
                    self.pool_settings(),
                    sdk,
                    roles,
                )))
            }
        };
        Ok(Resolved {
            context: ProxyContext {
                pool,
                consistency_guard: self.consistency_guard,
                // Replaced by the caller that owns the shutdown signal.
                shutdown: tokio::sync::watch::channel(false).1,
                upstream,
                client_auth: arc_swap::ArcSwap::from_pointee(client_auth),
                advertise_address: self.advertise_address,
                max_frame_len: self.max_frame_len,
                handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
                max_client_in_flight: self.max_client_in_flight.max(1),
                max_client_buffer: self.max_client_buffer.max(1),
                sessions: SessionCache::new(
                    Duration::from_secs(self.auth_session_ttl),
                    MAX_SESSIONS,
                ),
                identity_pools,
            },
            credentials,
            region,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[tokio::test]
    async fn plaintext_upstream_only_on_loopback() {
        let args = |endpoint: &str| {
            Cli::parse_from([
                "keyspaces-proxy",
                "--upstream-auth",
                "plain",
                "--upstream-username",
                "u",
                "--upstream-password",
                "p",
                "--endpoint",
                endpoint,
                "--insecure-plaintext-upstream-for-benchmarks",
            ])
        };
        let err = args("cassandra.us-east-1.amazonaws.com")
            .resolve()
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ConfigError::PlaintextNotLoopback(_)), "{err}");
        let ok = args("127.0.0.1:19142").resolve().await.unwrap();
        assert!(ok.context.upstream.insecure_plaintext);
    }

    #[test]
    fn kmsauth_settings_are_checked() {
        let base = ["keyspaces-proxy", "--client-auth", "kmsauth"];
        let cli = |extra: &[&str]| Cli::parse_from(base.iter().chain(extra));
        assert!(
            cli(&[]).kmsauth_settings().is_err(),
            "--kmsauth-to is required"
        );
        assert!(
            cli(&["--kmsauth-to", "p"]).kmsauth_settings().is_err(),
            "keys are required"
        );
        let ok = cli(&[
            "--kmsauth-to",
            "p",
            "--kmsauth-service-key",
            "alias/a,alias/b",
            "--kmsauth-context",
            "env=prod",
        ])
        .kmsauth_settings()
        .unwrap();
        assert_eq!(ok.service_keys, ["alias/a", "alias/b"]);
        assert_eq!(ok.extra_context, [("env".into(), "prod".into())]);
        assert_eq!(ok.max_lifetime, Duration::from_secs(3600));
        for bad in ["to=x", "novalue", "=x"] {
            let c = cli(&[
                "--kmsauth-to",
                "p",
                "--kmsauth-user-key",
                "k",
                "--kmsauth-context",
                bad,
            ]);
            assert!(c.kmsauth_settings().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn astra_tokens_are_plain_user_token() {
        let cli = |pw: &str| {
            Cli::parse_from([
                "keyspaces-proxy",
                "--region",
                "us-east-1",
                "--endpoint",
                "127.0.0.1:29042",
                "--upstream-auth",
                "astra",
                "--upstream-password",
                pw,
            ])
        };
        let r = cli("AstraCS:abc:123").resolve().await.unwrap();
        match &r.context.upstream.auth {
            UpstreamAuth::Plain { username, password } => {
                assert_eq!(
                    (username.as_str(), password.as_str()),
                    ("token", "AstraCS:abc:123")
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            cli("not-a-token").resolve().await,
            Err(ConfigError::NoAstraToken)
        ));
    }

    #[tokio::test]
    async fn identity_roles_need_the_pooled_sigv4_mode() {
        let dir = tempfile::tempdir().unwrap();
        let roles = dir.path().join("roles.toml");
        std::fs::write(&roles, "").unwrap();
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--region",
            "us-east-1",
            "--upstream-mode",
            "dedicated",
            "--upstream-auth",
            "plain",
            "--upstream-username",
            "u",
            "--upstream-password",
            "p",
            "--identity-roles",
            roles.to_str().unwrap(),
        ]);
        assert!(matches!(
            cli.resolve().await,
            Err(ConfigError::IdentityRolesNeedPooledSigv4)
        ));
    }

    #[tokio::test]
    async fn password_mode_needs_users() {
        let cli = Cli::parse_from(["keyspaces-proxy", "--client-auth", "password"]);
        assert!(matches!(
            cli.client_auth().await,
            Err(ConfigError::NoClientUsers)
        ));
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--client-auth",
            "password",
            "--client-user",
            "a:b",
        ]);
        assert!(matches!(
            cli.client_auth().await,
            Ok(ClientAuth::Password(_))
        ));
    }
}
