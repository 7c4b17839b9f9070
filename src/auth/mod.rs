//! Authentication on both sides of the proxy.

pub mod attempts;
pub mod aws_chain;
pub mod certificate;
pub mod client;
pub mod credentials;
pub mod identity_roles;
pub mod kmsauth;
pub mod passwords;
pub mod sessions;
pub mod sigv4;
