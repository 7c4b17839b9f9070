//! Correlation ids: what a client is told about a failure whose details it must not see (ARNs,
//! account ids, AWS SDK text) carries a short id, and the proxy logs the details with the same
//! id, so an operator handed the client's error finds the cause.

/// A short random id, shown as 8 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference([u8; 4]);

impl Reference {
    pub fn new() -> Reference {
        Reference(rand::random())
    }
}

impl Default for Reference {
    fn default() -> Self {
        Reference::new()
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
