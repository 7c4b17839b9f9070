//! The command line (flags ⇄ environment ⇄ config file) as one struct, with its checks;
//! `resolve` turns it into what the proxy runs with.

use crate::auth::client::UserFileError;
use crate::auth::credentials::CredentialsError;
use crate::auth::identity_roles::IdentityRolesError;
use crate::upstream::tls::TlsConfigError;

mod cli;
mod clients;
mod commands;
mod modes;
mod region;
mod resolve;

pub use cli::Cli;
pub use commands::Command;
pub use modes::{ClientAuthMode, LogFormat, UnmappedIdentities, UpstreamAuthMode, UpstreamMode};

pub use resolve::{Resolved, UpstreamParts, UpstreamSummary};

pub const KEYSPACES_PORT: u16 = 9142;

/// The options `keyspaces-proxy check` reads: what the path to Keyspaces depends on.
const CHECK_FLAGS: &[&str] = &[
    "config",
    "region",
    "profile",
    "role_arn",
    "endpoint",
    "fips",
    "tls_server_name",
    "ca_file",
    "builtin_roots",
    "upstream_auth",
    "upstream_username",
    "upstream_password",
    "connect_timeout",
    "max_frame_len",
    "insecure_plaintext_upstream_for_benchmarks",
];

/// Secrets never leave the process, not even in --print-config or a Debug dump.
fn mask_secret<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("****"),
        None => s.serialize_none(),
    }
}

fn mask_users<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    // As they are used: a comma inside an argon2 hash or a password does not start a user.
    let entries = clients::rejoin_phc(v);
    let mut seq = s.serialize_seq(Some(entries.len()))?;
    for entry in &entries {
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
    #[error("no AWS region: none in --region, KEYSPACES_PROXY_REGION, AWS_REGION, the AWS profile or instance metadata; pass --region (e.g. --region us-east-1)")]
    NoRegion,
    #[error(
        "region {region:?} (from {from}) is not an AWS region name (like us-east-1){suggestion}"
    )]
    Region {
        region: String,
        from: &'static str,
        suggestion: String,
    },
    #[error("no {0}: it is derived from {1}, which is not valid")]
    DerivedFromBroken(&'static str, &'static str),
    #[error("invalid endpoint {0:?}: expected HOST[:PORT]")]
    Endpoint(String),
    #[error("--client-auth password needs users: --client-credentials-file or --client-user")]
    NoClientUsers,
    #[error("{flag} is set but --client-auth is none, so clients would connect without a password: add --client-auth password, or remove it")]
    UsersWithoutPasswordAuth { flag: &'static str },
    #[error("{flag} is set but --client-auth kmsauth does not use it (clients log in with kmsauth tokens): remove it, or use --client-auth password")]
    UsersUnusedByKmsauth { flag: &'static str },
    #[error("{flag} is set but --client-auth mtls does not use it (the client certificate is the identity): remove it, or use --client-auth password")]
    UsersUnusedByMtls { flag: &'static str },
    #[error("--insecure-plaintext-upstream-for-benchmarks is refused: endpoint {0} is not a loopback address")]
    PlaintextNotLoopback(String),
    #[error("--upstream-auth plain needs --upstream-username and --upstream-password")]
    NoUpstreamCredentials,
    #[error("--upstream-auth astra needs an application token (AstraCS:…) in --upstream-password or KEYSPACES_PROXY_UPSTREAM_PASSWORD")]
    NoAstraToken,
    #[error("--identity-roles needs --upstream-mode pooled and --upstream-auth sigv4")]
    IdentityRolesNeedPooledSigv4,
    #[error("--identity-roles maps client identities, but --client-auth none gives clients none: use --client-auth password, kmsauth or mtls")]
    IdentityRolesNeedClientIdentities,
    #[error(transparent)]
    IdentityRoles(#[from] IdentityRolesError),
    #[error("--client-auth kmsauth: {0}")]
    Kmsauth(String),
    #[error(transparent)]
    Users(#[from] UserFileError),
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error("{0}")]
    ClientTlsOptions(&'static str),
    #[error(transparent)]
    ClientTls(#[from] crate::client_tls::ClientTlsError),
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

/// The environment variable of option `--long`: every one follows this rule.
pub fn env_name(long: &str) -> String {
    format!(
        "KEYSPACES_PROXY_{}",
        long.to_ascii_uppercase().replace('-', "_")
    )
}

/// Warnings for `KEYSPACES_PROXY_*` variables no option reads: a misspelt (or renamed) one
/// would otherwise be ignored without a word.
pub fn unknown_environment(names: impl IntoIterator<Item = String>) -> Vec<String> {
    use clap::CommandFactory;
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    let mut unknown: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with("KEYSPACES_PROXY_") && !known.contains(n))
        .collect();
    unknown.sort();
    unknown
        .into_iter()
        .map(|name| {
            let nearest = known
                .iter()
                .map(|k| (strsim::damerau_levenshtein(&name, k), k))
                .filter(|(d, _)| *d <= 3)
                .min_by_key(|(d, _)| *d)
                .map(|(_, k)| format!(" (did you mean {k}?)"))
                .unwrap_or_default();
            format!("environment variable {name} is not a keyspaces-proxy setting and is ignored{nearest}")
        })
        .collect()
}

impl Cli {
    /// Anyone who can reach a non-loopback port without client auth acts with this proxy's
    /// AWS identity: say so loudly (it stays allowed for pods sharing a network namespace).
    /// So do passwords and kmsauth tokens sent in plaintext over a network.
    pub fn exposure_warning(&self) -> Option<&'static str> {
        if self.listen.ip().is_loopback() {
            return None;
        }
        match self.client_auth {
            ClientAuthMode::None => Some(
                "listening on a non-loopback address without client authentication: anyone who \
                 can reach it uses this proxy's AWS identity (use --client-auth password, \
                 kmsauth or mtls, or bind to 127.0.0.1)",
            ),
            ClientAuthMode::Password | ClientAuthMode::Kmsauth
                if self.client_tls_cert.is_none() =>
            {
                Some(
                    "listening on a non-loopback address without TLS: client passwords and \
                     kmsauth tokens cross the network in plaintext (add --client-tls-cert and \
                     --client-tls-key, or bind to 127.0.0.1)",
                )
            }
            _ => None,
        }
    }

    /// The clap command with every option global, so `keyspaces-proxy check --region X` and
    /// `keyspaces-proxy --region X check` both work (and command lines copied from the server
    /// still parse), while each subcommand's help lists only what it reads: `check` its
    /// upstream options, `probe` none of them.
    pub fn command_with_globals() -> clap::Command {
        use clap::CommandFactory;
        let cmd = Cli::command().mut_args(|a| a.global(true));
        // clap does not copy a global into a subcommand that has an argument of the same id:
        // hidden, local copies of the options a subcommand does not read keep them accepted
        // there (and ignored) without listing them in its help.
        let hidden_except = |reads: &[&str]| -> Vec<clap::Arg> {
            cmd.get_arguments()
                .filter(|a| !reads.contains(&a.get_id().as_str()))
                .map(|a| a.clone().global(false).hide(true))
                .collect()
        };
        let (for_check, for_probe) = (
            hidden_except(CHECK_FLAGS),
            hidden_except(&["metrics_listen"]),
        );
        cmd.mut_subcommand("check", |sc| sc.args(for_check))
            .mut_subcommand("probe", |sc| sc.args(for_probe))
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
    use clap::Parser;

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
        let w = cli
            .exposure_warning()
            .expect("plaintext passwords on a network");
        assert!(w.contains("without TLS"), "{w}");
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--listen",
            "0.0.0.0:9042",
            "--client-auth",
            "kmsauth",
            "--client-tls-cert",
            "c.pem",
            "--client-tls-key",
            "k.pem",
        ]);
        assert!(cli.exposure_warning().is_none());
    }

    /// Found by review: Kubernetes `args` after the image's ENTRYPOINT, or Helm's extraArgs
    /// after the chart's flags, repeated a flag and the proxy refused to start.
    #[test]
    fn a_repeated_flag_overrides_and_a_list_accumulates() {
        let cli = Cli::parse_from([
            "keyspaces-proxy",
            "--worker-threads",
            "2",
            "--region",
            "us-east-1",
            "--worker-threads=4",
            "--region=eu-west-1",
            "--client-user",
            "a:1",
            "--client-user",
            "b:2",
        ]);
        assert_eq!(cli.worker_threads, 4);
        assert_eq!(cli.region.as_deref(), Some("eu-west-1"));
        assert_eq!(cli.client_users, ["a:1", "b:2"]);
    }

    /// `--flag-name` reads `KEYSPACES_PROXY_FLAG_NAME`, no exceptions (actions aside).
    #[test]
    fn every_variable_follows_the_rule() {
        use clap::CommandFactory;
        for arg in Cli::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if ["print-config", "help", "version"].contains(&long) {
                continue;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            assert_eq!(env, Some(env_name(long)), "--{long}");
        }
    }

    #[test]
    fn unknown_variables_are_named() {
        let w = unknown_environment([
            "KEYSPACES_PROXY_CLIENT_USERS".to_owned(),
            "KEYSPACES_PROXY_REGION".to_owned(),
            "OTHER".to_owned(),
            "KEYSPACES_PROXY_NOTHING_LIKE_IT".to_owned(),
        ]);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].contains("KEYSPACES_PROXY_CLIENT_USERS")
                && w[0].contains("did you mean KEYSPACES_PROXY_CLIENT_USER?"),
            "{w:?}"
        );
        assert!(!w[1].contains("did you mean"), "{w:?}");
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
