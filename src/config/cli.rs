//! The command line: every flag, its environment variable and its help, grouped under the
//! headings `--help` shows, most used first.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;
use serde::Serialize;

use super::commands::Command;
use super::modes::{ClientAuthMode, LogFormat, UnmappedIdentities, UpstreamAuthMode, UpstreamMode};
use super::{mask_secret, mask_users};
use crate::frame::codec::DEFAULT_MAX_FRAME_LEN;

/// keyspaces-proxy: unmodified Cassandra drivers on localhost, Amazon Keyspaces with SigV4 upstream.
#[derive(Parser, Serialize)]
// A flag given again overrides the earlier one (last wins), as Kubernetes `args` appended to the
// image's ENTRYPOINT and Helm's extraArgs after the chart's own flags expect.
#[command(name = "keyspaces-proxy", version, about, args_override_self = true)]
#[serde(rename_all = "kebab-case")]
pub struct Cli {
    #[command(subcommand)]
    #[serde(skip)]
    pub command: Option<Command>,

    /// AWS region of the Keyspaces endpoint and of the SigV4 signature (else the AWS region chain).
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_REGION"
    )]
    pub region: Option<String>,

    /// AWS profile for credentials and region (AWS_PROFILE also works).
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_PROFILE"
    )]
    pub profile: Option<String>,

    /// IAM role to assume, through the standard chain, for signing.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_ROLE_ARN"
    )]
    pub role_arn: Option<String>,

    /// Keyspaces endpoint HOST[:PORT] (default cassandra.<region>.amazonaws.com:9142).
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_ENDPOINT"
    )]
    pub endpoint: Option<String>,

    /// Use the FIPS endpoint cassandra-fips.<region>.amazonaws.com.
    #[arg(help_heading = "Upstream and AWS", long, env = "KEYSPACES_PROXY_FIPS")]
    pub fips: bool,

    /// Name sent as SNI and verified in the certificate (default: the endpoint's host).
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_TLS_SERVER_NAME"
    )]
    pub tls_server_name: Option<String>,

    /// Built-in roots to trust: every root Keyspaces documents (Amazon Root CAs 1–4, Starfield
    /// Class 2), or Amazon Root CA 1 alone.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_BUILTIN_ROOTS",
        value_enum,
        default_value = "keyspaces"
    )]
    pub builtin_roots: crate::upstream::tls::BuiltinRoots,

    /// Trust the roots in this PEM file instead of the built-in ones.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_CA_FILE"
    )]
    pub ca_file: Option<PathBuf>,

    /// How the proxy authenticates to Keyspaces.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_AUTH",
        value_enum,
        default_value = "sigv4"
    )]
    pub upstream_auth: UpstreamAuthMode,

    /// User name for --upstream-auth plain.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_USERNAME"
    )]
    pub upstream_username: Option<String>,

    /// Password for --upstream-auth plain (prefer the environment variable).
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_PASSWORD",
        hide_env_values = true
    )]
    #[serde(serialize_with = "mask_secret")]
    pub upstream_password: Option<String>,

    /// Seconds allowed for connecting and authenticating to Keyspaces.
    #[arg(
        help_heading = "Upstream and AWS",
        long,
        env = "KEYSPACES_PROXY_CONNECT_TIMEOUT",
        default_value_t = 10
    )]
    pub connect_timeout: u64,

    /// Address to accept CQL clients on (plaintext unless --client-tls-cert: keep it on
    /// loopback then).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_LISTEN",
        default_value = "127.0.0.1:9042"
    )]
    pub listen: SocketAddr,

    /// How local clients authenticate to the proxy.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_AUTH",
        value_enum,
        default_value = "none"
    )]
    pub client_auth: ClientAuthMode,

    /// PEM certificate chain the client port presents: with it, clients must connect with TLS
    /// (1.2 or 1.3). Re-read on SIGHUP.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_TLS_CERT",
        requires = "client_tls_key"
    )]
    pub client_tls_cert: Option<PathBuf>,

    /// PEM private key of --client-tls-cert.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_TLS_KEY",
        requires = "client_tls_cert"
    )]
    pub client_tls_key: Option<PathBuf>,

    /// PEM roots client certificates must chain to: mutual TLS, a client without a valid
    /// certificate is refused (needed by --client-auth mtls).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_CA",
        requires = "client_tls_cert"
    )]
    pub client_ca: Option<PathBuf>,

    /// --client-auth mtls: the certificate fields the client identity is read from, first
    /// present wins (uri-san: a SPIFFE ID as it is; dns-san: `dns:<name>`; cn: `cn:<name>`).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_CERT_IDENTITY",
        value_enum,
        value_delimiter = ',',
        default_value = "uri-san,dns-san,cn"
    )]
    pub client_cert_identity: Vec<crate::auth::certificate::IdentityField>,

    /// File of `user:password` or `user:sha256:<hex>` lines for --client-auth password.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_CLIENT_CREDENTIALS_FILE"
    )]
    pub client_credentials_file: Option<PathBuf>,

    /// A `user:password` entry for --client-auth password (repeatable; prefer the file).
    #[arg(
        help_heading = "Clients and authentication",
        long = "client-user",
        env = "KEYSPACES_PROXY_CLIENT_USER",
        value_delimiter = ',',
        hide_env_values = true
    )]
    #[serde(rename = "client-user", serialize_with = "mask_users")]
    pub client_users: Vec<String>,

    /// Address to advertise in system.local (default: the address each client dialled).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_ADVERTISE_ADDRESS"
    )]
    pub advertise_address: Option<IpAddr>,

    /// Seed of the host_id system.local reports: a UUID of this seed and the advertised
    /// address, the same on every connection and across restarts (drivers key nodes and
    /// prepared statements by it). Replicas sharing a Service differ by their address.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_HOST_ID_SEED",
        default_value = ""
    )]
    pub host_id_seed: String,

    /// TOML mapping client identities to IAM roles: each mapped identity is signed upstream
    /// with its own assumed role, in a pool of its own (reloaded on SIGHUP).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_IDENTITY_ROLES"
    )]
    pub identity_roles: Option<PathBuf>,

    /// With --identity-roles: refuse identities it does not map (`deny`), or let them act with
    /// the proxy's own credentials (`proxy-credentials`).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_UNMAPPED_IDENTITIES",
        value_enum,
        default_value = "deny"
    )]
    pub unmapped_identities: UnmappedIdentities,

    /// STS endpoint URL for --identity-roles (a VPC endpoint; default: the region's).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_STS_ENDPOINT"
    )]
    pub sts_endpoint: Option<String>,

    /// Seconds a validated client is remembered after its last use, so reconnecting clients
    /// are not re-checked (with KMS) each time; 0 checks every connection.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_AUTH_SESSION_TTL",
        default_value_t = 1800
    )]
    pub auth_session_ttl: u64,

    /// kmsauth: this proxy's name, the `to` every token must be addressed to.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_KMSAUTH_TO"
    )]
    pub kmsauth_to: Option<String>,

    /// kmsauth: KMS keys (ARNs or aliases) accepted for service tokens (repeatable).
    #[arg(
        help_heading = "Clients and authentication",
        long = "kmsauth-service-key",
        env = "KEYSPACES_PROXY_KMSAUTH_SERVICE_KEY",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-service-key")]
    pub kmsauth_service_keys: Vec<String>,

    /// kmsauth: KMS keys (ARNs or aliases) accepted for user tokens (repeatable).
    #[arg(
        help_heading = "Clients and authentication",
        long = "kmsauth-user-key",
        env = "KEYSPACES_PROXY_KMSAUTH_USER_KEY",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-user-key")]
    pub kmsauth_user_keys: Vec<String>,

    /// kmsauth: extra encryption context every token must carry, KEY=VALUE (repeatable).
    #[arg(
        help_heading = "Clients and authentication",
        long = "kmsauth-context",
        env = "KEYSPACES_PROXY_KMSAUTH_CONTEXT",
        value_delimiter = ','
    )]
    #[serde(rename = "kmsauth-context")]
    pub kmsauth_context: Vec<String>,

    /// kmsauth: the longest token lifetime accepted, in minutes.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_KMSAUTH_MAX_LIFETIME",
        default_value_t = 60
    )]
    pub kmsauth_max_lifetime: u64,

    /// kmsauth: oldest token version accepted (1 or 2).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_KMSAUTH_MIN_VERSION",
        default_value_t = 1
    )]
    pub kmsauth_min_version: u8,

    /// kmsauth: KMS Decrypt calls per second for all clients together (KMS throttles per
    /// account and region); beyond it logins needing KMS are refused as busy.
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_KMSAUTH_MAX_KMS_CALLS_PER_SECOND",
        default_value_t = 50
    )]
    pub kmsauth_max_kms_calls_per_second: u32,

    /// KMS endpoint URL (a VPC endpoint; default: the region's).
    #[arg(
        help_heading = "Clients and authentication",
        long,
        env = "KEYSPACES_PROXY_KMS_ENDPOINT"
    )]
    pub kms_endpoint: Option<String>,

    /// Shared upstream pool (default) or one upstream connection per client.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_UPSTREAM_MODE",
        value_enum,
        default_value = "pooled"
    )]
    pub upstream_mode: UpstreamMode,

    /// Upstream connections kept warm per protocol version.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_POOL_MIN_CONNECTIONS",
        default_value_t = 2
    )]
    pub pool_min_connections: usize,

    /// Most upstream connections per protocol version and keyspace.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_POOL_MAX_CONNECTIONS",
        default_value_t = 64
    )]
    pub pool_max_connections: usize,

    /// Requests per second sent on one upstream connection (Keyspaces allows 3,000); 0 = no limit.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_MAX_RATE_PER_CONNECTION",
        default_value_t = 1000
    )]
    pub max_rate_per_connection: u32,

    /// Requests in flight on one upstream connection.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 2048
    )]
    pub max_streams_per_connection: usize,

    /// Open another upstream connection when the least busy one has more requests than this in
    /// flight, or when clients outnumber connections and one shared by two or more has a
    /// quarter of this, an eighth from the sending client and an eighth from the others (busy
    /// clients then get a connection each, as going direct). The rate
    /// budget already spreads Keyspaces' 3,000 req/s per connection; set low, this splits one
    /// client over many half-empty connections, with smaller batches on every hop.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_POOL_GROW_IN_FLIGHT",
        default_value_t = 256
    )]
    pub pool_grow_in_flight: usize,

    /// Seconds between OPTIONS heartbeats on upstream connections.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_HEARTBEAT_INTERVAL",
        default_value_t = 30
    )]
    pub heartbeat_interval: u64,

    /// Seconds before an unanswered upstream request is failed back to the client.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_REQUEST_TIMEOUT",
        default_value_t = 12
    )]
    pub request_timeout: u64,

    /// Seconds before signing credentials expire at which connections are replaced.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_RECYCLE_BEFORE_EXPIRY",
        default_value_t = 300
    )]
    pub recycle_before_expiry: u64,

    /// Prepared statements remembered for transparent re-preparation.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_MAX_PREPARED",
        default_value_t = 10_000
    )]
    pub max_prepared: usize,

    /// Raise write consistency to LOCAL_QUORUM and unsupported read levels to LOCAL_QUORUM.
    #[arg(
        help_heading = "Pool and requests",
        long,
        env = "KEYSPACES_PROXY_CONSISTENCY_GUARD"
    )]
    pub consistency_guard: bool,

    /// Largest frame body accepted from either side, in bytes.
    #[arg(help_heading = "Limits", long, env = "KEYSPACES_PROXY_MAX_FRAME_LEN", default_value_t = DEFAULT_MAX_FRAME_LEN)]
    pub max_frame_len: usize,

    /// Seconds a client may take to finish its handshake.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_HANDSHAKE_TIMEOUT",
        default_value_t = 30
    )]
    pub handshake_timeout: u64,

    /// Most client connections served at once; more are closed on accept.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,

    /// Most client connections still in their handshake (not yet authenticated); more are
    /// closed on accept, so unauthenticated clients cannot take every slot.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_HANDSHAKING_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_handshaking_connections: usize,

    /// Most of those from one source address, so one address cannot take every handshake slot.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_HANDSHAKING_PER_SOURCE",
        default_value_t = 64
    )]
    pub max_handshaking_per_source: usize,

    /// Failed logins one source address may make per minute (burst included); further logins
    /// from it are refused without being checked until the budget refills.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_LOGIN_FAILURES_PER_SOURCE",
        default_value_t = 10
    )]
    pub login_failures_per_source: u32,

    /// Failed logins one username may see per minute, from all sources together.
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_LOGIN_FAILURES_PER_USER",
        default_value_t = 30
    )]
    pub login_failures_per_user: u32,

    /// Requests one client may have unanswered before the proxy stops reading from it
    /// (back-pressure, not an error).
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_CLIENT_IN_FLIGHT",
        default_value_t = 4096
    )]
    pub max_client_in_flight: usize,

    /// Bytes of answers a client may leave unread before the proxy closes it (Keyspaces pages
    /// are at most 1 MB).
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_CLIENT_BUFFER",
        default_value_t = 8 << 20
    )]
    pub max_client_buffer: usize,

    /// Bytes of unread answers all clients together may leave: beyond it a client already
    /// holding one is closed on its next (sized for the manifests' memory limits).
    #[arg(
        help_heading = "Limits",
        long,
        env = "KEYSPACES_PROXY_MAX_TOTAL_CLIENT_BUFFER",
        default_value_t = 48 << 20
    )]
    pub max_total_client_buffer: usize,

    /// TOML file with the same names as the flags (flags and environment take precedence).
    #[arg(help_heading = "Operations", long, env = "KEYSPACES_PROXY_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// TOML file of defaults, below --config (the container image's own: its config file, the
    /// environment and flags all win over them).
    #[arg(help_heading = "Operations", long, env = "KEYSPACES_PROXY_DEFAULTS")]
    #[serde(skip)]
    pub defaults: Option<PathBuf>,

    /// Print the effective configuration (secrets masked) and exit.
    #[arg(help_heading = "Operations", long)]
    #[serde(skip)]
    pub print_config: bool,

    /// Address of the /metrics, /livez and /readyz endpoints.
    #[arg(
        help_heading = "Operations",
        long,
        env = "KEYSPACES_PROXY_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,

    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT (a second signal exits at once).
    #[arg(
        help_heading = "Operations",
        long,
        env = "KEYSPACES_PROXY_DRAIN_TIMEOUT",
        default_value_t = 20
    )]
    pub drain_timeout: u64,

    /// Runtime worker threads (0 = one per CPU core). One is the sidecar default: it shares the
    /// node with its application, serves ~300k requests/s here, and costs the least CPU per
    /// request (no cross-thread wake-ups); raise it for a shared deployment.
    #[arg(
        help_heading = "Operations",
        long,
        env = "KEYSPACES_PROXY_WORKER_THREADS",
        default_value_t = 1
    )]
    pub worker_threads: usize,

    /// Log output format (filter with RUST_LOG, e.g. RUST_LOG=keyspaces_proxy=debug).
    #[arg(
        help_heading = "Operations",
        long,
        env = "KEYSPACES_PROXY_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// BENCHMARKS ONLY: talk plaintext to the upstream. Refused unless the endpoint is a loopback
    /// address; never use it with Keyspaces (which is TLS-only anyway).
    #[arg(
        help_heading = "Benchmarks only",
        long,
        env = "KEYSPACES_PROXY_INSECURE_PLAINTEXT_UPSTREAM_FOR_BENCHMARKS"
    )]
    pub insecure_plaintext_upstream_for_benchmarks: bool,
}
