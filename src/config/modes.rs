//! The choices the command line offers as words (`--client-auth kmsauth`, `--log-format json`).

use clap::ValueEnum;
use serde::Serialize;

/// What happens to an authenticated client whose identity `--identity-roles` does not map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum UnmappedIdentities {
    /// Refuse the login: on a shared proxy nobody acts with the proxy's own role by accident.
    Deny,
    /// Let it in on the proxy's own credentials.
    ProxyCredentials,
}

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
    /// Mutual TLS: the client certificate's identity (--client-cert-identity) is the client
    /// identity; needs --client-tls-cert, --client-tls-key and --client-ca.
    Mtls,
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
