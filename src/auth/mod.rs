//! Authentication on both sides of the proxy.

pub mod client;
pub mod credentials;
pub mod sigv4;
