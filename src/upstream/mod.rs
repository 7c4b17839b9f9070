//! The Keyspaces side: TLS with pinned roots and authenticated connections.

pub mod connection;
pub mod tls;

pub use connection::{UpstreamAuth, UpstreamConnection, UpstreamError, UpstreamTarget};
