//! Command line and environment → one resolved configuration.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::auth::client::{ClientAuth, UserFileError, UserStore};
use crate::auth::credentials::{provider_from_chain, CredentialCache, CredentialsError};
use crate::auth::identity_roles::{IdentityRoles, IdentityRolesError};
use crate::auth::kmsauth::{KmsAuthSettings, KmsAuthValidator};
use crate::auth::sessions::{SessionCache, MAX_SESSIONS};
use crate::frame::codec::DEFAULT_MAX_FRAME_LEN;
use crate::session::ProxyContext;
use crate::upstream::identity_pools::IdentityPools;
use crate::upstream::pool::{Pool, PoolSettings};
use crate::upstream::tls::{client_config, server_name, TlsConfigError};
use crate::upstream::{UpstreamAuth, UpstreamTarget};

pub const KEYSPACES_PORT: u16 = 9142;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    /// Answer STARTUP with READY: any local client is trusted.
    None,
    /// Require a PasswordAuthenticator user from --client-credentials-file / --client-user.
    Password,
    /// PasswordAuthenticator carrying lyft kmsauth tokens (username = kmsauth username,
    /// password = token), validated with KMS.
    Kmsauth,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamAuthMode {
    /// SigV4 with credentials from the AWS chain (the default).
    Sigv4,
    /// Service-specific credentials or a Cassandra user (--upstream-username/--upstream-password).
    Plain,
    /// A DataStax Astra application token in --upstream-password (PLAIN user name `token`).
    Astra,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamMode {
    /// Multiplex every client over a shared pool of warm, pre-authenticated connections.
    Pooled,
    /// One upstream connection per client connection (for debugging).
    Dedicated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// keyspaces-proxy: unmodified Cassandra drivers on localhost, Amazon Keyspaces with SigV4 upstream.
#[derive(Parser, Serialize)]
#[command(name = "keyspaces-proxy", version, about)]
#[serde(rename_all = "kebab-case")]
pub struct Cli {
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,

    /// TOML file with the same names as the flags (flags and environment take precedence).
    #[arg(long, env = "KEYSPACES_PROXY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Address to accept CQL clients on (plaintext; keep it on loopback).
    #[arg(long, env = "KEYSPACES_PROXY_LISTEN", default_value = "127.0.0.1:9042")]
    pub listen: SocketAddr,

    /// AWS region of the Keyspaces endpoint and of the SigV4 signature (else the AWS region chain).
    #[arg(long, env = "KEYSPACES_PROXY_REGION")]
    pub region: Option<String>,

    /// Keyspaces endpoint HOST[:PORT] (default cassandra.<region>.amazonaws.com:9142).
    #[arg(long, env = "KEYSPACES_PROXY_ENDPOINT")]
    pub endpoint: Option<String>,

    /// Use the FIPS endpoint cassandra-fips.<region>.amazonaws.com.
    #[arg(long, env = "KEYSPACES_PROXY_FIPS")]
    pub fips: bool,

    /// Name sent as SNI and verified in the certificate (default: the endpoint's host).
    #[arg(long, env = "KEYSPACES_PROXY_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,

    /// Trust the roots in this PEM file instead of the built-in Amazon Root CA 1.
    #[arg(long, env = "KEYSPACES_PROXY_CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// How local clients authenticate to the proxy.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_CLIENT_AUTH",
        value_enum,
        default_value = "none"
    )]
    pub client_auth: ClientAuthMode,

    /// File of `user:password` or `user:sha256:<hex>` lines for --client-auth password.
    #[arg(long, env = "KEYSPACES_PROXY_CLIENT_CREDENTIALS_FILE")]
    pub client_credentials_file: Option<PathBuf>,

    /// A `user:password` entry for --client-auth password (repeatable; prefer the file).
    #[arg(
        long = "client-user",
        env = "KEYSPACES_PROXY_CLIENT_USERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(rename = "client-user", serialize_with = "mask_users")]
    pub client_users: Vec<String>,

    /// kmsauth: this proxy's name, the `to` every token must be addressed to.
    #[arg(long, env = "KEYSPACES_PROXY_KMSAUTH_TO")]
    pub kmsauth_to: Option<String>,

    /// kmsauth: KMS keys (ARNs or aliases) accepted for service tokens (repeatable).
    #[arg(
        long = "kmsauth-service-key",
        env = "KEYSPACES_PROXY_KMSAUTH_SERVICE_KEYS",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-service-key")]
    pub kmsauth_service_keys: Vec<String>,

    /// kmsauth: KMS keys (ARNs or aliases) accepted for user tokens (repeatable).
    #[arg(
        long = "kmsauth-user-key",
        env = "KEYSPACES_PROXY_KMSAUTH_USER_KEYS",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-user-key")]
    pub kmsauth_user_keys: Vec<String>,

    /// kmsauth: extra encryption context every token must carry, KEY=VALUE (repeatable).
    #[arg(
        long = "kmsauth-context",
        env = "KEYSPACES_PROXY_KMSAUTH_CONTEXT",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-context")]
    pub kmsauth_context: Vec<String>,

    /// kmsauth: the longest token lifetime accepted, in minutes.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_KMSAUTH_MAX_LIFETIME",
        default_value_t = 60
    )]
    pub kmsauth_max_lifetime: u64,

    /// kmsauth: oldest token version accepted (1 or 2).
    #[arg(long, env = "KEYSPACES_PROXY_KMSAUTH_MIN_VERSION", default_value_t = 1)]
    pub kmsauth_min_version: u8,

    /// KMS endpoint URL (a VPC endpoint; default: the region's).
    #[arg(long, env = "KEYSPACES_PROXY_KMS_ENDPOINT")]
    pub kms_endpoint: Option<String>,

    /// TOML mapping client identities to IAM roles: each mapped identity is signed upstream
    /// with its own assumed role, in a pool of its own (reloaded on SIGHUP).
    #[arg(long, env = "KEYSPACES_PROXY_IDENTITY_ROLES")]
    pub identity_roles: Option<PathBuf>,

    /// STS endpoint URL for --identity-roles (a VPC endpoint; default: the region's).
    #[arg(long, env = "KEYSPACES_PROXY_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,

    /// Seconds a validated client is remembered after its last use, so reconnecting clients
    /// are not re-checked (with KMS) each time; 0 checks every connection.
    #[arg(long, env = "KEYSPACES_PROXY_AUTH_SESSION_TTL", default_value_t = 1800)]
    pub auth_session_ttl: u64,

    /// How the proxy authenticates to Keyspaces.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_AUTH",
        value_enum,
        default_value = "sigv4"
    )]
    pub upstream_auth: UpstreamAuthMode,

    /// User name for --upstream-auth plain.
    #[arg(long, env = "KEYSPACES_PROXY_UPSTREAM_USERNAME")]
    pub upstream_username: Option<String>,

    /// Password for --upstream-auth plain (prefer the environment variable).
    #[arg(
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_PASSWORD",
        hide_env_values = true
    )]
    #[serde(serialize_with = "mask_secret")]
    pub upstream_password: Option<String>,

    /// AWS profile for credentials and region (AWS_PROFILE also works).
    #[arg(long, env = "KEYSPACES_PROXY_PROFILE")]
    pub profile: Option<String>,

    /// IAM role to assume, through the standard chain, for signing.
    #[arg(long, env = "KEYSPACES_PROXY_ROLE_ARN")]
    pub role_arn: Option<String>,

    /// Address to advertise in system.local (default: the address each client dialled).
    #[arg(long, env = "KEYSPACES_PROXY_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<IpAddr>,

    /// Largest frame body accepted from either side, in bytes.
    #[arg(long, env = "KEYSPACES_PROXY_MAX_FRAME_LEN", default_value_t = DEFAULT_MAX_FRAME_LEN)]
    pub max_frame_len: usize,

    /// Seconds allowed for connecting and authenticating to Keyspaces.
    #[arg(long, env = "KEYSPACES_PROXY_CONNECT_TIMEOUT", default_value_t = 10)]
    pub connect_timeout: u64,

    /// Seconds a client may take to finish its handshake.
    #[arg(long, env = "KEYSPACES_PROXY_HANDSHAKE_TIMEOUT", default_value_t = 30)]
    pub handshake_timeout: u64,

    /// Requests one client may have unanswered before the proxy stops reading from it
    /// (back-pressure, not an error).
    #[arg(
        long,
        env = "KEYSPACES_PROXY_MAX_CLIENT_IN_FLIGHT",
        default_value_t = 4096
    )]
    pub max_client_in_flight: usize,

    /// Bytes of answers a client may leave unread before the proxy closes it.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_MAX_CLIENT_BUFFER",
        default_value_t = 64 << 20
    )]
    pub max_client_buffer: usize,

    /// Most client connections served at once; more are closed on accept.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,

    /// Shared upstream pool (default) or one upstream connection per client.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_MODE",
        value_enum,
        default_value = "pooled"
    )]
    pub upstream_mode: UpstreamMode,

    /// Upstream connections kept warm per protocol version.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_POOL_MIN_CONNECTIONS",
        default_value_t = 2
    )]
    pub pool_min_connections: usize,

    /// Most upstream connections per protocol version and keyspace.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_POOL_MAX_CONNECTIONS",
        default_value_t = 64
    )]
    pub pool_max_connections: usize,

    /// Requests per second sent on one upstream connection (Keyspaces allows 3,000); 0 = no limit.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_MAX_RATE_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_rate_per_connection: u32,

    /// Requests in flight on one upstream connection.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 2048
    )]
    pub max_streams_per_connection: usize,

    /// Seconds between OPTIONS heartbeats on upstream connections.
    #[arg(long, env = "KEYSPACES_PROXY_HEARTBEAT_INTERVAL", default_value_t = 30)]
    pub heartbeat_interval: u64,

    /// Seconds before an unanswered upstream request is failed back to the client.
    #[arg(long, env = "KEYSPACES_PROXY_REQUEST_TIMEOUT", default_value_t = 12)]
    pub request_timeout: u64,

    /// Seconds before signing credentials expire at which connections are replaced.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_RECYCLE_BEFORE_EXPIRY",
        default_value_t = 300
    )]
    pub recycle_before_expiry: u64,

    /// Prepared statements remembered for transparent re-preparation.
    #[arg(long, env = "KEYSPACES_PROXY_MAX_PREPARED", default_value_t = 10_000)]
    pub max_prepared: usize,

    /// Raise write consistency to LOCAL_QUORUM and unsupported read levels to LOCAL_QUORUM.
    #[arg(long, env = "KEYSPACES_PROXY_CONSISTENCY_GUARD")]
    pub consistency_guard: bool,

    /// BENCHMARKS ONLY: talk plaintext to the upstream. Refused unless the endpoint is a loopback
    /// address; never use it with Keyspaces (which is TLS-only anyway).
    #[arg(
        long,
        env = "KEYSPACES_PROXY_INSECURE_PLAINTEXT_UPSTREAM_FOR_BENCHMARKS"
    )]
    pub insecure_plaintext_upstream_for_benchmarks: bool,

    /// Runtime worker threads (0 = one per CPU core). One is the sidecar default: it shares the
    /// node with its application, serves ~300k requests/s here, and costs the least CPU per
    /// request (no cross-thread wake-ups); raise it for a shared deployment.
    #[arg(long, env = "KEYSPACES_PROXY_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,

    /// Address of the /metrics, /livez and /readyz endpoints.
    #[arg(
        long,
        env = "KEYSPACES_PROXY_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT (a second signal exits at once).
    #[arg(long, env = "KEYSPACES_PROXY_DRAIN_TIMEOUT", default_value_t = 20)]
    pub drain_timeout: u64,

    /// Log output format (filter with RUST_LOG, e.g. RUST_LOG=keyspaces_proxy=debug).
    #[arg(
        long,
        env = "KEYSPACES_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Diagnose the connection to Keyspaces step by step (exit status 0 only if all pass).
    Check,
    /// Ask a running proxy's health endpoint (on --metrics-listen) and exit 0 if it answers 200:
    /// a HEALTHCHECK for images without a shell or curl.
    Probe {
        /// /livez (the process answers) or /readyz (Keyspaces is reachable).
        #[arg(long, default_value = "/livez")]
        path: String,
    },
}

/// Secrets never leave the process, not even in --print-config or a Debug dump.
fn mask_secret<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("****"),
        None => s.serialize_none(),
    }
}

fn mask_users<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for entry in v {
        let user = entry.split_once(':').map_or(entry.as_str(), |(u, _)| u);
        seq.serialize_element(&format!("{user}:****"))?;
    }
    seq.end()
}

impl std::fmt::Debug for Cli {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.effective_toml())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no AWS region: pass --region or set AWS_REGION (or a region in the AWS profile)")]
    NoRegion,
    #[error("invalid endpoint {0:?}: expected HOST[:PORT]")]
    Endpoint(String),
    #[error("--client-auth password needs users: --client-credentials-file or --client-user")]
    NoClientUsers,
    #[error("--insecure-plaintext-upstream-for-benchmarks is refused: endpoint {0} is not a loopback address")]
    PlaintextNotLoopback(String),
    #[error("--upstream-auth plain needs --upstream-username and --upstream-password")]
    NoUpstreamCredentials,
    #[error("--upstream-auth astra needs an application token (AstraCS:…) in --upstream-password or KEYSPACES_PROXY_UPSTREAM_PASSWORD")]
    NoAstraToken,
    #[error("--identity-roles needs --upstream-mode pooled and --upstream-auth sigv4")]
    IdentityRolesNeedPooledSigv4,
    #[error(transparent)]
    IdentityRoles(#[from] IdentityRolesError),
    #[error("--client-auth kmsauth: {0}")]
    Kmsauth(String),
    #[error(transparent)]
    Users(#[from] UserFileError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

/// Splits `HOST[:PORT]` (IPv6 hosts in brackets).
pub fn parse_endpoint(s: &str) -> Result<(String, u16), ConfigError> {
    let bad = || ConfigError::Endpoint(s.to_owned());
    if let Some(rest) = s.strip_prefix('[') {
        let (host, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if tail.is_empty() => KEYSPACES_PORT,
            None => return Err(bad()),
        };
        return Ok((host.to_owned(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Ok((h.to_owned(), p.parse().map_err(|_| bad())?)),
        Some(_) => Err(bad()),
        None if s.is_empty() => Err(bad()),
        None => Ok((s.to_owned(), KEYSPACES_PORT)),
    }
}

/// The regional endpoint name; China regions live under amazonaws.com.cn.
pub fn default_endpoint_host(region: &str, fips: bool) -> String {
    let service = if fips { "cassandra-fips" } else { "cassandra" };
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("{service}.{region}.{suffix}")
}

/// A context ready to serve, and the credential cache to keep warm (SigV4 only).
pub struct Resolved {
    pub context: ProxyContext,
    pub credentials: Option<Arc<CredentialCache>>,
    pub region: Option<String>,
}

impl Cli {
    /// Anyone who can reach a non-loopback port without client auth acts with this proxy's
    /// AWS identity: say so loudly (it stays allowed for pods sharing a network namespace).
    pub fn exposure_warning(&self) -> Option<&'static str> {
        (!self.listen.ip().is_loopback() && self.client_auth == ClientAuthMode::None).then_some(
            "listening on a non-loopback address without client authentication: anyone who can \
             reach it uses this proxy's AWS identity (use --client-auth password or bind to 127.0.0.1)",
        )
    }

    /// The clap command with every option global, so `keyspaces-proxy check --region X` and
    /// `keyspaces-proxy --region X check` both work.
    pub fn command_with_globals() -> clap::Command {
        use clap::CommandFactory;
        Cli::command().mut_args(|a| a.global(true))
    }

    /// Parses `argv` with the config file merged in (flag > env > file > default).
    pub fn parse_with_config(
        argv: Vec<std::ffi::OsString>,
    ) -> Result<Cli, Box<dyn std::error::Error>> {
        use clap::FromArgMatches;
        let merged = crate::config_file::merge(Cli::command_with_globals(), argv)?;
        let matches = Cli::command_with_globals().try_get_matches_from(merged)?;
        Ok(Cli::from_arg_matches(&matches)?)
    }

    /// The effective configuration as TOML, secrets masked.
    pub fn effective_toml(&self) -> String {
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }

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
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(p) = &self.profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = &self.region {
            loader = loader.region(aws_config::Region::new(r.to_ascii_lowercase()));
        }
        if let Some(url) = &self.kms_endpoint {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
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
                let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
                if let Some(p) = &self.profile {
                    loader = loader.profile_name(p);
                }
                if let Some(r) = &region {
                    loader = loader.region(aws_config::Region::new(r.clone()));
                }
                if let Some(url) = &self.sts_endpoint {
                    loader = loader.endpoint_url(url);
                }
                Some(Arc::new(IdentityPools::new(
                    upstream.clone(),
                    region.clone().ok_or(ConfigError::NoRegion)?,
                    self.pool_settings(),
                    loader.load().await,
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
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("cassandra.us-east-1.amazonaws.com").unwrap(),
            ("cassandra.us-east-1.amazonaws.com".into(), 9142)
        );
        assert_eq!(
            parse_endpoint("127.0.0.1:19142").unwrap(),
            ("127.0.0.1".into(), 19142)
        );
        assert_eq!(
            parse_endpoint("[::1]:19142").unwrap(),
            ("::1".into(), 19142)
        );
        assert_eq!(parse_endpoint("[::1]").unwrap(), ("::1".into(), 9142));
        assert!(parse_endpoint("host:notaport").is_err());
        assert!(parse_endpoint("::1").is_err());
    }

    #[test]
    fn default_endpoints() {
        assert_eq!(
            default_endpoint_host("us-east-1", false),
            "cassandra.us-east-1.amazonaws.com"
        );
        assert_eq!(
            default_endpoint_host("us-west-2", true),
            "cassandra-fips.us-west-2.amazonaws.com"
        );
        assert_eq!(
            default_endpoint_host("cn-north-1", false),
            "cassandra.cn-north-1.amazonaws.com.cn"
        );
    }

    #[test]
    fn print_config_masks_secrets() {
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--upstream-password",
            "hunter2",
            "--client-user",
            "app:s3cret",
            "--region",
            "us-east-1",
        ]);
        let text = cli.effective_toml();
        assert!(text.contains("region = \"us-east-1\""), "{text}");
        assert!(text.contains("upstream-password = \"****\""), "{text}");
        assert!(text.contains("app:****"), "{text}");
        assert!(!text.contains("hunter2") && !text.contains("s3cret"));
        assert!(!format!("{cli:?}").contains("hunter2"));
        // What it prints is itself a valid config file.
        let f = tempfile::NamedTempFile::new().unwrap();
        let reusable = text
            .replace("upstream-password = \"****\"\n", "")
            .replace("client-user = [\"app:****\"]\n", "");
        std::fs::write(f.path(), reusable).unwrap();
        let argv: Vec<std::ffi::OsString> =
            ["keyspaces-proxy", "--config", f.path().to_str().unwrap()]
                .iter()
                .map(Into::into)
                .collect();
        use clap::CommandFactory;
        let merged = crate::config_file::merge(Cli::command(), argv).unwrap();
        assert_eq!(Cli::parse_from(merged).region.as_deref(), Some("us-east-1"));
    }

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

    #[test]
    fn exposed_listeners_without_client_auth_are_warned_about() {
        let cli = Cli::parse_from(["keyspaces-proxy"]);
        assert_eq!(
            cli.listen.to_string(),
            "127.0.0.1:9042",
            "loopback by default"
        );
        assert!(cli.exposure_warning().is_none());
        let cli = Cli::parse_from(["keyspaces-proxy", "--listen", "10.1.2.3:9042"]);
        assert!(cli.exposure_warning().is_some());
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--listen",
            "10.1.2.3:9042",
            "--client-auth",
            "password",
        ]);
        assert!(cli.exposure_warning().is_none());
    }

    #[test]
    fn no_flag_turns_certificate_verification_off() {
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            let name = arg.get_long().unwrap_or_default();
            for word in [
                "verify",
                "insecure-skip",
                "no-tls",
                "accept-invalid",
                "danger",
            ] {
                assert!(!name.contains(word), "--{name}");
            }
        }
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
