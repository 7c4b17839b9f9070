//! From a parsed command line to what the proxy runs with: credentials, endpoint, TLS, pools,
//! and the context that joins them with the client side (`clients`). With `clients`, the only
//! part of the configuration that does I/O.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;

use super::region::{check_region, did_you_mean, RegionCheck};
use super::{
    default_endpoint_host, parse_endpoint, Cli, ClientAuthMode, ConfigError, UpstreamAuthMode,
    UpstreamMode, KEYSPACES_PORT,
};
use crate::auth::aws_chain::{sdk_config, ChainSource};
use crate::auth::client::{ClientAuth, Logins};
use crate::auth::credentials::CredentialCache;
use crate::auth::identity_roles::IdentityRoles;
use crate::context::ProxyContext;
use crate::upstream::addresses::AddressBook;
use crate::upstream::identity_pools::IdentityPools;
use crate::upstream::pool::{Pool, PoolSettings};
use crate::upstream::tls::{client_config_with, server_name};
use crate::upstream::{UpstreamAuth, UpstreamTarget};

/// A context ready to serve, and the credential cache to keep warm (SigV4 only).
pub struct Resolved {
    pub context: ProxyContext,
    pub credentials: Option<Arc<CredentialCache>>,
    pub region: Option<String>,
    /// Doubts about the configuration that do not stop it (an unknown region name).
    pub warnings: Vec<String>,
}

/// The upstream target, the credentials to keep warm (SigV4) and what resolving them found.
pub(super) type ResolvedUpstream = (
    UpstreamTarget,
    Option<Arc<CredentialCache>>,
    UpstreamSummary,
);

/// The region and the doubts that came with resolving the upstream.
pub struct UpstreamSummary {
    pub region: Option<String>,
    pub warnings: Vec<String>,
}

impl UpstreamParts {
    /// One target from the parts; the first broken part is the error.
    pub fn into_target(self, cli: &Cli) -> Result<ResolvedUpstream, ConfigError> {
        let region = self.region?;
        let (auth, credentials) = self.auth?;
        let address = self.address?;
        let target = UpstreamTarget {
            addresses: Arc::new(AddressBook::new(&address)),
            address,
            server_name: self.server_name?,
            tls: self.tls?,
            insecure_plaintext: cli.insecure_plaintext_upstream_for_benchmarks,
            auth,
            connect_timeout: Duration::from_secs(cli.connect_timeout.max(1)),
            max_frame_len: cli.max_frame_len,
        };
        let summary = UpstreamSummary {
            region,
            warnings: self.warnings,
        };
        Ok((target, credentials, summary))
    }
}

struct UpstreamAuthParts {
    region: Result<Option<String>, ConfigError>,
    auth: Result<(UpstreamAuth, Option<Arc<CredentialCache>>), ConfigError>,
    chain_credentials: Option<Arc<CredentialCache>>,
    warnings: Vec<String>,
}

/// The path to Keyspaces, part by part (see [`Cli::upstream_parts`]).
pub struct UpstreamParts {
    pub region: Result<Option<String>, ConfigError>,
    pub auth: Result<(UpstreamAuth, Option<Arc<CredentialCache>>), ConfigError>,
    /// The AWS chain's credentials when `auth` failed for want of a region.
    pub chain_credentials: Option<Arc<CredentialCache>>,
    /// `host:port` to dial.
    pub address: Result<String, ConfigError>,
    pub server_name: Result<ServerName<'static>, ConfigError>,
    pub tls: Result<Arc<rustls::ClientConfig>, ConfigError>,
    /// The roots `tls` trusts, to name the one a chain verified against (`check`).
    pub roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub warnings: Vec<String>,
}

impl Cli {
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
            ..PoolSettings::default()
        }
    }

    /// The region: the flag, else (for SigV4) the AWS region chain; checked for shape.
    async fn region_and_auth(&self) -> UpstreamAuthParts {
        let mut region = self.region.as_deref().map(str::to_ascii_lowercase);
        // Credentials need no region: without one, `check` still tests them.
        let mut chain_credentials = None;
        let auth = match self.upstream_auth {
            UpstreamAuthMode::Sigv4 => {
                match CredentialCache::from_chain(ChainSource {
                    profile: self.profile.clone(),
                    role_arn: self.role_arn.clone(),
                    region: region.clone(),
                })
                .await
                {
                    Ok((cache, chain_region)) => {
                        region = region.or(chain_region.map(|r| r.to_ascii_lowercase()));
                        match region.clone() {
                            Some(region) => Ok((
                                UpstreamAuth::SigV4 {
                                    credentials: cache.clone(),
                                    region,
                                },
                                Some(cache),
                            )),
                            None => {
                                chain_credentials = Some(cache);
                                Err(ConfigError::NoRegion)
                            }
                        }
                    }
                    Err(e) => Err(e.into()),
                }
            }
            UpstreamAuthMode::Plain => match (&self.upstream_username, &self.upstream_password) {
                (Some(u), Some(p)) => Ok((
                    UpstreamAuth::Plain {
                        username: u.clone(),
                        password: zeroize::Zeroizing::new(p.clone()),
                    },
                    None,
                )),
                _ => Err(ConfigError::NoUpstreamCredentials),
            },
            UpstreamAuthMode::Astra => match &self.upstream_password {
                Some(p) if p.starts_with("AstraCS:") => Ok((
                    UpstreamAuth::Plain {
                        username: "token".into(),
                        password: zeroize::Zeroizing::new(p.clone()),
                    },
                    None,
                )),
                _ => Err(ConfigError::NoAstraToken),
            },
        };
        let mut warnings = Vec::new();
        if self.ca_file.is_some()
            && self.builtin_roots != crate::upstream::tls::BuiltinRoots::Keyspaces
        {
            warnings.push(
                "--builtin-roots is ignored: --ca-file replaces the built-in roots".to_owned(),
            );
        }
        // Only an AWS region is checked: with plain credentials and an explicit endpoint
        // (Cassandra, Astra) the name is only a label and may be another cloud's (`us-east1`).
        let aws_region = self.upstream_auth == UpstreamAuthMode::Sigv4 || self.endpoint.is_none();
        let region = match region {
            None => Ok(None),
            Some(r) if !aws_region => Ok(Some(r)),
            Some(r) => match check_region(&r) {
                RegionCheck::Known => Ok(Some(r)),
                RegionCheck::Unknown { closest } => {
                    warnings.push(format!(
                        "region {r:?} is not one this version knows{}; using it as given",
                        did_you_mean(closest)
                    ));
                    Ok(Some(r))
                }
                RegionCheck::Malformed { closest } => Err(ConfigError::Region {
                    region: r,
                    from: if self.region.is_some() {
                        "--region or KEYSPACES_PROXY_REGION"
                    } else {
                        "AWS_REGION or the AWS profile"
                    },
                    suggestion: did_you_mean(closest),
                }),
            },
        };
        UpstreamAuthParts {
            region,
            auth,
            chain_credentials,
            warnings,
        }
    }

    /// Every part of the path to Keyspaces, each resolved on its own so that `check` can go
    /// on past a broken one. Reaches the AWS chain only for SigV4.
    pub async fn upstream_parts(&self) -> UpstreamParts {
        let UpstreamAuthParts {
            region,
            auth,
            chain_credentials,
            warnings,
        } = self.region_and_auth().await;
        let host_port = match (&self.endpoint, &region) {
            (Some(e), _) => parse_endpoint(e),
            (None, Ok(Some(r))) => Ok((default_endpoint_host(r, self.fips), KEYSPACES_PORT)),
            (None, Ok(None)) => Err(ConfigError::NoRegion),
            (None, Err(_)) => Err(ConfigError::DerivedFromBroken(
                "endpoint",
                "the region above",
            )),
        };
        let host_port = host_port.and_then(|(host, port)| {
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if self.insecure_plaintext_upstream_for_benchmarks && !loopback {
                return Err(ConfigError::PlaintextNotLoopback(host));
            }
            Ok((host, port))
        });
        let server_name = match (&self.tls_server_name, &host_port) {
            (Some(name), _) | (None, Ok((name, _))) => server_name(name).map_err(Into::into),
            (None, Err(_)) => Err(ConfigError::DerivedFromBroken(
                "TLS server name",
                "the endpoint above",
            )),
        };
        UpstreamParts {
            address: host_port.map(|(host, port)| {
                if host.contains(':') {
                    format!("[{host}]:{port}")
                } else {
                    format!("{host}:{port}")
                }
            }),
            server_name,
            tls: client_config_with(self.ca_file.as_deref(), self.builtin_roots)
                .map_err(Into::into),
            roots: crate::upstream::tls::roots(self.ca_file.as_deref(), self.builtin_roots)
                .unwrap_or_default(),
            region,
            auth,
            chain_credentials,
            warnings,
        }
    }

    /// Resolves region, credentials, endpoint and TLS into one target; the first broken part
    /// is the error.
    pub async fn upstream_target(&self) -> Result<ResolvedUpstream, ConfigError> {
        self.upstream_parts().await.into_target(self)
    }

    /// Resolves everything the proxy serves with: client authentication, the upstream target
    /// and the pools.
    pub async fn resolve(&self) -> Result<Resolved, ConfigError> {
        let client_auth = self.client_auth().await?;
        let client_tls = self.client_tls()?;
        let (upstream, credentials, mut summary) = self.upstream_target().await?;
        if let ClientAuth::Password(users) = &client_auth {
            let weak = users.weak_entries();
            if weak > 0 {
                summary.warnings.push(format!(
                    "{weak} client user(s) have plaintext or unsalted sha256 passwords: store \
                     argon2id hashes instead (keyspaces-proxy hash-password)"
                ));
            }
        }
        let region = summary.region.clone();
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
                if self.client_auth == ClientAuthMode::None {
                    return Err(ConfigError::IdentityRolesNeedClientIdentities);
                }
                let roles = IdentityRoles::load(path)?;
                if matches!(client_auth, ClientAuth::KmsAuth(_)) {
                    roles.check_kmsauth_names()?;
                }
                let sdk = sdk_config(
                    self.profile.as_deref(),
                    region.as_deref(),
                    self.sts_endpoint.as_deref(),
                )
                .await;
                // The roles are assumed with the proxy's own credentials as they are after a
                // reload, not as the SDK's profile provider parsed them at startup.
                let sdk = match &upstream.auth {
                    UpstreamAuth::SigV4 { credentials, .. } => sdk
                        .into_builder()
                        .credentials_provider(credentials.base_provider())
                        .build(),
                    UpstreamAuth::Plain { .. } => sdk,
                };
                Some(Arc::new(IdentityPools::new(
                    upstream.clone(),
                    region.clone().ok_or(ConfigError::NoRegion)?,
                    self.pool_settings(),
                    sdk,
                    roles,
                    self.unmapped_identities == crate::config::UnmappedIdentities::Deny,
                )))
            }
        };
        Ok(Resolved {
            context: ProxyContext {
                pool,
                consistency_guard: self.consistency_guard,
                shutdown: crate::shutdown::Shutdown::new(),
                last_read: Default::default(),
                upstream,
                logins: arc_swap::ArcSwap::from_pointee(Logins::new(
                    client_auth,
                    self.session_cache(),
                )),
                client_tls: arc_swap::ArcSwapOption::new(client_tls),
                advertise_address: self.advertise_address,
                host_id_seed: self.host_id_seed.clone(),
                max_frame_len: self.max_frame_len,
                handshake_timeout: Duration::from_secs(self.handshake_timeout.max(1)),
                max_client_in_flight: self.max_client_in_flight.max(1),
                client_buffers: crate::upstream::streams::ClientBuffers::new(
                    self.max_client_buffer,
                    self.max_total_client_buffer,
                ),
                login_failures: Arc::new(crate::auth::attempts::LoginFailures::new(
                    crate::auth::attempts::Budget::per_minute(self.login_failures_per_source),
                    crate::auth::attempts::Budget::per_minute(self.login_failures_per_user),
                )),
                handshaking: crate::session::admission::HandshakeSlots::new(
                    self.max_handshaking_connections,
                    self.max_handshaking_per_source,
                ),
                identity_pools,
            },
            credentials,
            region,
            warnings: summary.warnings,
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
        // Without client authentication there is no identity to map: every client would act
        // with the proxy's own credentials whatever --unmapped-identities says.
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--region",
            "us-east-1",
            "--identity-roles",
            roles.to_str().unwrap(),
        ]);
        assert!(matches!(
            cli.resolve().await,
            Err(ConfigError::IdentityRolesNeedClientIdentities)
        ));
    }

    #[tokio::test]
    async fn only_aws_region_names_are_checked() {
        let plain = |endpoint: Option<&str>| {
            let mut args = vec![
                "keyspaces-proxy",
                "--region",
                "us-east1",
                "--upstream-auth",
                "plain",
                "--upstream-username",
                "u",
                "--upstream-password",
                "p",
            ];
            args.extend(endpoint.map(|e| ["--endpoint", e]).into_iter().flatten());
            Cli::parse_from(args)
        };
        let parts = plain(Some("127.0.0.1:9042")).upstream_parts().await;
        assert_eq!(parts.region.unwrap().as_deref(), Some("us-east1"));
        let parts = plain(None).upstream_parts().await;
        assert!(matches!(parts.region, Err(ConfigError::Region { .. })));
    }
}
