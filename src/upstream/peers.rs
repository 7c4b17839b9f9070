//! Reading the upstream's `system.peers` on a fresh connection, before it serves anyone: for
//! Keyspaces these are the endpoint's other load-balancer addresses (never shown to clients;
//! they see the proxy's own topology).

use std::net::IpAddr;

use super::connection::{roundtrip, UpstreamError, UpstreamFramed};
use crate::frame::compression::decompressed;
use crate::frame::messages::{self, consistency};
use crate::frame::result::Rows;
use crate::frame::ProtocolVersion;
use crate::frame::{opcode, Compression, Frame};

/// A peers answer larger than this is not one.
const MAX_ANSWER: usize = 1 << 20;

/// What the upstream's answer about its peers was.
#[derive(Debug)]
pub(super) enum Peers {
    Listed(Vec<IpAddr>),
    /// An answer that is not rows of addresses (an error, a server without the table).
    NotListed(UpstreamError),
}

/// The `peer` addresses the upstream lists. An error is the connection's own (closed or broken
/// during the read): it must not go on to serve anyone.
pub(super) async fn read(
    framed: &mut UpstreamFramed,
    version: ProtocolVersion,
    compression: Compression,
) -> Result<Peers, UpstreamError> {
    let query = messages::query(
        version,
        0,
        "SELECT peer FROM system.peers",
        consistency::ONE,
    );
    let reply = roundtrip(framed, query).await?;
    Ok(match listed(reply, compression) {
        Ok(peers) => Peers::Listed(peers),
        Err(e) => Peers::NotListed(e),
    })
}

/// The addresses in an answer to the peers query.
fn listed(reply: Frame, compression: Compression) -> Result<Vec<IpAddr>, UpstreamError> {
    // Answers come compressed once an algorithm was negotiated; the query itself need not be.
    let reply = decompressed(reply, compression, MAX_ANSWER)
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    if reply.opcode() != opcode::RESULT {
        return Err(UpstreamError::Protocol("system.peers: no rows".into()));
    }
    let body = messages::message_body(&reply.header, &reply.body)
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    let rows = Rows::parse(body).map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    let cells = rows
        .cells()
        .map_err(|e| UpstreamError::Protocol(e.to_string()))?;
    Ok(cells
        .iter()
        .filter_map(|row| row.first().copied().flatten())
        .filter_map(inet)
        .collect())
}

/// A CQL `inet` value: 4 or 16 bytes.
fn inet(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inet_values() {
        assert_eq!(inet(&[127, 0, 1, 2]), Some(IpAddr::from([127, 0, 1, 2])));
        assert_eq!(inet(&[0u8; 16]), Some(IpAddr::from([0u8; 16])));
        assert_eq!(inet(&[1, 2, 3]), None);
    }
}
