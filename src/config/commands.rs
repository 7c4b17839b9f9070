//! The subcommands: the server is the default; these diagnose, probe and hash.

use std::net::SocketAddr;

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
        /// The proxy's --metrics-listen address (default: the one configured here).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
    /// Read a password on standard input (one line) and print its argon2id hash, for
    /// `--client-user user:<hash>` and the credentials file.
    HashPassword,
}
