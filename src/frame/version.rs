//! The native protocol versions the proxy speaks, as a type: a frame's version byte is checked
//! once (handshake, decoder), and from then on code asks the version what it allows instead of
//! comparing numbers. Adding v5 is a variant here, its answers to these questions, and its
//! framing in the codec.

use std::fmt;

/// A version both Keyspaces and the proxy speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    V3,
    V4,
}

impl ProtocolVersion {
    /// The newest version spoken: what an answer to an unusable frame is written in, since
    /// drivers parse it and downgrade.
    pub const NEWEST: ProtocolVersion = ProtocolVersion::V4;

    /// The version a frame claims (direction bit removed), if it is one spoken here.
    pub const fn from_wire(version: u8) -> Option<ProtocolVersion> {
        match version {
            3 => Some(ProtocolVersion::V3),
            4 => Some(ProtocolVersion::V4),
            _ => None,
        }
    }

    /// The spoken version closest to one a peer claimed: an error about its frame is written in
    /// a version it can parse.
    pub const fn nearest(claimed: u8) -> ProtocolVersion {
        match ProtocolVersion::from_wire(claimed) {
            Some(v) => v,
            None if claimed < 3 => ProtocolVersion::V3,
            None => ProtocolVersion::NEWEST,
        }
    }

    pub const fn wire(self) -> u8 {
        match self {
            ProtocolVersion::V3 => 3,
            ProtocolVersion::V4 => 4,
        }
    }

    /// v4 added custom payloads, warnings (frame flags before the message) and `unset` bound
    /// values (length -2).
    pub const fn has_payloads_and_warnings(self) -> bool {
        matches!(self, ProtocolVersion::V4)
    }

    pub const fn has_unset_values(self) -> bool {
        matches!(self, ProtocolVersion::V4)
    }

    /// v4 added the partition-key indexes to a PREPARED result.
    pub const fn has_prepared_key_indexes(self) -> bool {
        matches!(self, ProtocolVersion::V4)
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.wire())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_spoken_versions_are_accepted_and_errors_use_the_nearest() {
        assert_eq!(ProtocolVersion::from_wire(4), Some(ProtocolVersion::V4));
        assert_eq!(ProtocolVersion::from_wire(3), Some(ProtocolVersion::V3));
        for other in [0, 1, 2, 5, 6, 0x7f] {
            assert_eq!(ProtocolVersion::from_wire(other), None, "{other}");
        }
        assert_eq!(ProtocolVersion::nearest(2), ProtocolVersion::V3);
        assert_eq!(ProtocolVersion::nearest(5), ProtocolVersion::V4);
        assert_eq!(ProtocolVersion::nearest(3), ProtocolVersion::V3);
        assert_eq!(ProtocolVersion::V3.to_string(), "v3");
    }
}
