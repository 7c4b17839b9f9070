//! The Keyspaces side: TLS with pinned roots, authenticated connections, and the pool that
//! multiplexes every client over a few of them.

pub mod addresses;
pub mod affinity;
mod answers;
pub mod connection;
mod error;
pub mod group;
pub mod identity_pools;
mod maintenance;
pub mod mux;
mod owner;
mod peers;
pub mod pool;
mod retry;
pub mod streams;
pub mod tls;
mod upkeep;

pub use connection::{UpstreamAuth, UpstreamConnection, UpstreamError, UpstreamTarget};
