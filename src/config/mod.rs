//! The command line (flags ⇄ environment ⇄ config file) as one struct, with its checks;
//! `resolve` turns it into what the proxy runs with.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::auth::client::UserFileError;
use crate::auth::credentials::CredentialsError;
use crate::auth::identity_roles::IdentityRolesError;
use crate::frame::codec::DEFAULT_MAX_FRAME_LEN;
use crate::upstream::tls::TlsConfigError;

mod resolve;

pub use resolve::Resolved;

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

    /// Open another upstream connection when the least busy one has more requests than this in
    /// flight. The rate budget already spreads Keyspaces' 3,000 req/s per connection, so this
    /// only catches a connection whose answers lag; set low, it splits clients over many
    /// half-empty connections, with smaller batches on every hop (on loopback, 256 gave 9–20%
    /// more throughput than 64 at 4×128 in flight).
    #[arg(
        long,
        env = "KEYSPACES_PROXY_POOL_GROW_IN_FLIGHT",
        default_value_t = 256
    )]
    pub pool_grow_in_flight: usize,

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

    #[test]
    fn exposed_listeners_without_client_auth_are_warned_about() {
        let cli = Cli::parse_from(["keyspaces-proxy"]);
        assert_eq!(
            cli.listen.to_string(),
            "127.0.0.1:9042",
            "loopback by default"
        );
        assert!(cli.exposure_warning().is_none());
        let cli = Cli::parse_from(["keyspaces-proxy", "--listen", "0.0.0.0:9042"]);
        assert!(cli.exposure_warning().is_some());
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--listen",
            "0.0.0.0:9042",
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
}
