//! keyspaces-proxy: a CQL sidecar that lets unmodified Cassandra drivers reach Amazon Keyspaces,
//! terminating the client's handshake locally and signing the upstream one with SigV4.
//!
//! The crate is a binary first. What stays `pub` is what something outside the crate drives:
//! the binary (`app`, `config`, `runtime`, `probe`, `check`), the in-process integration tests
//! (`server`, `context`, `shutdown`, `session`, `upstream::{pool, tls, addresses, streams}`,
//! `auth`'s stores and signer), and the fuzz targets and benches (`frame`, `route`,
//! `handshake`, `topology`, `policy`, `writer`, `metrics`). Everything else is `pub(crate)`, and
//! `unreachable_pub` keeps a `pub` inside a private module from pretending otherwise.

#![warn(unreachable_pub)]

pub(crate) mod admin;
pub mod app;
pub mod auth;
pub mod check;
pub mod client_tls;
pub mod config;
pub(crate) mod config_file;
pub mod context;
pub(crate) mod cql_lexer;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod policy;
pub mod probe;
pub(crate) mod queue;
pub(crate) mod reference;
pub(crate) mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod session;
pub mod shutdown;
pub(crate) mod single_flight;
pub(crate) mod statement;
pub mod topology;
pub mod upstream;
pub(crate) mod use_statement;
pub mod writer;
