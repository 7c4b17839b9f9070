//! keyspaces-proxy: a CQL sidecar that lets unmodified Cassandra drivers reach Amazon Keyspaces,
//! terminating the client's handshake locally and signing the upstream one with SigV4.

pub mod admin;
pub mod app;
pub mod auth;
pub mod check;
pub mod client_tls;
pub mod config;
pub mod config_file;
pub mod context;
pub(crate) mod cql_lexer;
pub mod frame;
pub mod handshake;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod queue;
pub mod reference;
pub mod reload;
pub mod route;
pub mod runtime;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod single_flight;
pub mod statement;
pub mod topology;
pub mod upstream;
pub mod use_statement;
pub mod writer;
