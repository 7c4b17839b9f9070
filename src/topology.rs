//! Keeps drivers on the proxy: `system.local` names the proxy's address and `system.peers` is
//! empty, so a driver's load balancer has exactly one host to use: us. Results are rewritten
//! from what the upstream returned (partitioner and versions stay Keyspaces' own).

use std::net::IpAddr;

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::header::Header;
use crate::frame::messages::message_body;
use crate::frame::result::{kind, metadata_flags, result_kind, ColumnSpec, Rows, TYPE_INET};
use crate::frame::types::{ip_to_bytes, BodyError, WriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemTable {
    Local,
    Peers,
}

/// Which rewritten system table a statement reads, if any, in `keyspace` (the client's `USE`,
/// for unqualified names). `system.peers_v2` is left alone: Keyspaces has none, and drivers
/// fall back to `system.peers` on its error. Comments count as the spaces they are to
/// Cassandra (`FROM /**/ system.peers`), as does space around the dot.
pub fn classify(cql: &str, keyspace: Option<&str>) -> Option<SystemTable> {
    let in_system = keyspace.is_some_and(|k| k.eq_ignore_ascii_case("system"));
    // Cheap exit for the hot path: ordinary statements never mention "system".
    if !in_system
        && !cql
            .as_bytes()
            .windows(6)
            .any(|w| w.eq_ignore_ascii_case(b"system"))
    {
        return None;
    }
    let normalized = crate::cql_lexer::without_comments(cql).to_ascii_lowercase();
    // Anything but a name character separates tokens, as in Cassandra's lexer: `*FROM`,
    // `"system"."local"`.
    let mut tokens = normalized
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '.'))
        .filter(|t| !t.is_empty())
        .peekable();
    while let Some(t) = tokens.next() {
        if t != "from" {
            continue;
        }
        // `system.local`, `system . local`, `system .local`, `system. local`.
        let mut name = String::new();
        while let Some(part) = tokens.peek() {
            let joins = name.is_empty() || name.ends_with('.') || part.starts_with('.');
            if !joins {
                break;
            }
            name.push_str(part);
            tokens.next();
        }
        let table = match name.split_once('.') {
            Some(("system", table)) => table,
            None if in_system => name.as_str(),
            _ => return None,
        };
        return match table {
            "local" => Some(SystemTable::Local),
            "peers" => Some(SystemTable::Peers),
            _ => None,
        };
    }
    None
}

const ADDRESS_COLUMNS: [&str; 4] = [
    "rpc_address",
    "broadcast_address",
    "listen_address",
    "preferred_ip",
];

/// The node the proxy presents to drivers: its address, and a host_id that drivers which key
/// nodes and prepared statements by it (Java 4, gocql) see unchanged on every connection and
/// across upstream reconnects — Keyspaces answers with whichever load balancer's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNode {
    pub address: IpAddr,
    pub host_id: [u8; 16],
}

impl ProxyNode {
    /// host_id = a name-based UUID (version 5 layout, SHA-256) of `seed` and `address`: stable
    /// across restarts; replicas behind one Service differ by their advertised address.
    pub fn new(address: IpAddr, seed: &str) -> ProxyNode {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"keyspaces-proxy host_id\0");
        h.update(seed.as_bytes());
        h.update(b"\0");
        h.update(ip_to_bytes(address));
        let digest = h.finalize();
        let mut host_id = [0u8; 16];
        host_id.copy_from_slice(&digest[..16]);
        host_id[6] = (host_id[6] & 0x0f) | 0x50;
        host_id[8] = (host_id[8] & 0x3f) | 0x80;
        ProxyNode { address, host_id }
    }
}

impl From<IpAddr> for ProxyNode {
    fn from(address: IpAddr) -> ProxyNode {
        ProxyNode::new(address, "")
    }
}

const TYPE_UUID: u16 = 0x000C;
const TYPE_SET: u16 = 0x0022;

/// `tokens` for the one node drivers see: `{'0'}`, a single token, so the proxy owns the whole
/// ring under either partitioner Keyspaces reports ("0" is a valid Murmur3 and Random token).
/// Each Keyspaces endpoint answers with its own tokens; passing them through would hand a
/// driver a different ring on every reconnect of its control connection.
const PROXY_TOKENS: [u8; 9] = [0, 0, 0, 1, 0, 0, 0, 1, b'0'];

/// Rewrites a RESULT frame body for `table`. Non-ROWS results (errors never get here) pass
/// through unchanged. `columns` is the prepared result metadata, for EXECUTEs that skipped it.
pub fn rewrite_result(
    header: &Header,
    body: &Bytes,
    table: SystemTable,
    columns: Option<&[ColumnSpec]>,
    node: impl Into<ProxyNode>,
) -> Result<Bytes, BodyError> {
    let node = node.into();
    let message = message_body(header, body)?;
    if result_kind(message)? != kind::ROWS {
        return Ok(body.clone());
    }
    let prefix = &body[..body.len() - message.len()];
    let rows = Rows::parse(message)?;
    let mut out = BytesMut::with_capacity(body.len());
    out.put_slice(prefix);
    match table {
        SystemTable::Local => rewrite_local(&rows, columns, &node, &mut out)?,
        SystemTable::Peers => empty_rows(&rows, &mut out),
    }
    Ok(out.freeze())
}

fn put_metadata(rows: &Rows<'_>, flags: i32, paging: Option<&[u8]>, out: &mut BytesMut) {
    out.put_i32(kind::ROWS);
    out.put_i32(flags);
    out.put_i32(rows.columns_count);
    if let Some(p) = paging {
        out.put_bytes_value(Some(p));
    }
    out.put_slice(rows.raw_specs);
}

fn rewrite_local(
    rows: &Rows<'_>,
    hint: Option<&[ColumnSpec]>,
    node: &ProxyNode,
    out: &mut BytesMut,
) -> Result<(), BodyError> {
    put_metadata(rows, rows.flags, rows.paging_state, out);
    let columns = rows.columns.as_deref().or(hint);
    let address = ip_to_bytes(node.address);
    // Per column: the proxy's value to put there instead of the upstream's, if any.
    let replace: Vec<Option<&[u8]>> = match columns {
        Some(cols) => cols
            .iter()
            .map(|c| match (c.type_id, c.name.as_str()) {
                (TYPE_INET, name) if ADDRESS_COLUMNS.contains(&name) => Some(&address[..]),
                (TYPE_UUID, "host_id") => Some(&node.host_id[..]),
                (TYPE_SET, "tokens") => Some(&PROXY_TOKENS[..]),
                _ => None,
            })
            .collect(),
        // No metadata at all: nothing can be identified, so nothing is changed.
        None => vec![None; rows.columns_count.max(0) as usize],
    };
    out.put_i32(rows.rows_count);
    for row in rows.cells()? {
        for (i, cell) in row.iter().enumerate() {
            match (replace.get(i).copied().flatten(), cell) {
                (Some(value), Some(_)) => out.put_bytes_value(Some(value)),
                _ => out.put_bytes_value(*cell),
            }
        }
    }
    Ok(())
}

fn empty_rows(rows: &Rows<'_>, out: &mut BytesMut) {
    put_metadata(
        rows,
        rows.flags & !metadata_flags::HAS_MORE_PAGES,
        None,
        out,
    );
    out.put_i32(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::header::opcode;
    use crate::frame::result::test_bodies::rows_body;
    use crate::frame::ProtocolVersion;

    #[test]
    fn classifies_system_queries() {
        use SystemTable::*;
        for (q, want) in [
            ("SELECT * FROM system.local WHERE key='local'", Some(Local)),
            ("select peer, rpc_address from system.peers", Some(Peers)),
            ("SELECT * FROM \"system\".\"local\";", Some(Local)),
            ("SELECT *\nFROM\tsystem.peers;", Some(Peers)),
            ("SELECT * FROM system.peers_v2", None),
            ("SELECT * FROM system_schema.tables", None),
            ("INSERT INTO ks.t (a) VALUES ('from system.local')", None),
            ("SELECT * FROM ks.tbl", None),
            // Found by review: spellings Cassandra reads as system.peers / system.local.
            ("SELECT * FROM /**/ system.peers", Some(Peers)),
            ("SELECT host_id FROM /* x */ system.local", Some(Local)),
            ("SELECT * FROM -- note\n system . peers", Some(Peers)),
            ("SELECT * FROM system .local", Some(Local)),
            ("SELECT * FROM system. local", Some(Local)),
            ("SELECT * FROM local", None),
            ("SELECT *FROM system.local", Some(Local)),
            ("SELECT \"key\"FROM system.peers", Some(Peers)),
            ("SELECT * FROM \"system\" . \"peers\"", Some(Peers)),
        ] {
            assert_eq!(classify(q, None), want, "{q}");
        }
        // After `USE system`, unqualified names are system tables.
        assert_eq!(classify("SELECT * FROM peers", Some("system")), Some(Peers));
        assert_eq!(
            classify("SELECT * FROM \"local\"", Some("system")),
            Some(Local)
        );
        assert_eq!(classify("SELECT * FROM peers", Some("ks")), None);
        assert_eq!(classify("SELECT * FROM ks.peers", Some("system")), None);
    }

    fn local_body() -> Bytes {
        rows_body(
            "local",
            &[
                ("key", 0x000d),
                ("rpc_address", TYPE_INET),
                ("broadcast_address", TYPE_INET),
                ("partitioner", 0x000d),
            ],
            &[vec![
                Some(b"local"),
                Some(&[127, 1, 2, 3]),
                Some(&[127, 1, 2, 3]),
                Some(b"org.apache.cassandra.dht.Murmur3Partitioner"),
            ]],
            None,
        )
    }

    #[test]
    fn local_gets_proxy_address_and_keeps_the_rest() {
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let out = rewrite_result(
            &h,
            &local_body(),
            SystemTable::Local,
            None,
            "127.0.0.42".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let rows = Rows::parse(&out).unwrap();
        let cells = rows.cells().unwrap();
        assert_eq!(cells[0][1], Some(&[127u8, 0, 0, 42][..]));
        assert_eq!(cells[0][2], Some(&[127u8, 0, 0, 42][..]));
        assert_eq!(
            cells[0][3],
            Some(&b"org.apache.cassandra.dht.Murmur3Partitioner"[..])
        );
    }

    #[test]
    fn host_id_is_the_proxys_own_and_stable() {
        let body = rows_body(
            "local",
            &[("host_id", TYPE_UUID), ("rpc_address", TYPE_INET)],
            &[vec![Some(&[0xaa; 16]), Some(&[127, 0, 3, 1])]],
            None,
        );
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let ip: IpAddr = "127.0.2.3".parse().unwrap();
        let node = ProxyNode::new(ip, "prod");
        let out = rewrite_result(&h, &body, SystemTable::Local, None, node).unwrap();
        let rows = Rows::parse(&out).unwrap();
        let host_id = rows.cells().unwrap()[0][0].unwrap().to_vec();
        assert_eq!(host_id, node.host_id);
        assert_eq!(host_id[6] >> 4, 5, "a version 5 layout");
        assert_eq!(
            ProxyNode::new(ip, "prod"),
            node,
            "the same on every connection"
        );
        assert_ne!(ProxyNode::new(ip, "other").host_id, node.host_id);
        assert_ne!(
            ProxyNode::new("127.0.2.4".parse().unwrap(), "prod").host_id,
            node.host_id
        );
    }

    #[test]
    fn local_with_ipv6_proxy_address() {
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let out = rewrite_result(
            &h,
            &local_body(),
            SystemTable::Local,
            None,
            "::1".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let cells = Rows::parse(&out)
            .unwrap()
            .cells()
            .unwrap()
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(cells[1].unwrap().len(), 16);
    }

    #[test]
    fn peers_become_empty_and_lose_paging() {
        let body = rows_body(
            "peers",
            &[("peer", TYPE_INET), ("rpc_address", TYPE_INET)],
            &vec![vec![Some(&[127u8, 0, 1, 1][..]), Some(&[127u8, 0, 1, 1][..])]; 9],
            Some(b"more"),
        );
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let out = rewrite_result(
            &h,
            &body,
            SystemTable::Peers,
            None,
            "127.0.0.1".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let rows = Rows::parse(&out).unwrap();
        assert_eq!(rows.rows_count, 0);
        assert_eq!(rows.paging_state, None);
        assert_eq!(rows.columns.unwrap().len(), 2);
    }

    /// Bodies as a CQL server (the emulator's engine) returned them for `SELECT *`.
    fn captured(hex_text: &str) -> Bytes {
        Bytes::from(hex::decode(hex_text.trim()).unwrap())
    }

    #[test]
    fn rewrites_captured_server_bodies() {
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let local = captured(include_str!("../tests/data/system_local_result.hex"));
        let out = rewrite_result(
            &h,
            &local,
            SystemTable::Local,
            None,
            "127.0.0.53".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let before = Rows::parse(&local).unwrap();
        let after = Rows::parse(&out).unwrap();
        let cols = after.columns.clone().unwrap();
        let (old, new) = (&before.cells().unwrap()[0], &after.cells().unwrap()[0]);
        for (i, c) in cols.iter().enumerate() {
            if ADDRESS_COLUMNS.contains(&c.name.as_str()) && old[i].is_some() {
                assert_eq!(new[i], Some(&[127u8, 0, 0, 53][..]), "{}", c.name);
            } else if c.name == "host_id" {
                let node = ProxyNode::from("127.0.0.53".parse::<IpAddr>().unwrap());
                assert_eq!(new[i], Some(&node.host_id[..]), "the proxy's own host_id");
            } else if c.name == "tokens" {
                assert_ne!(old[i], new[i], "the emulator's tokens are not the proxy's");
                assert_eq!(new[i], Some(&PROXY_TOKENS[..]), "one token, the whole ring");
            } else {
                assert_eq!(new[i], old[i], "{} must be unchanged", c.name);
            }
        }
        assert!(cols
            .iter()
            .any(|c| c.name == "tokens" && c.type_id == 0x0022));

        let peers = captured(include_str!("../tests/data/system_peers_result.hex"));
        assert_eq!(Rows::parse(&peers).unwrap().rows_count, 2);
        let out = rewrite_result(
            &h,
            &peers,
            SystemTable::Peers,
            None,
            "127.0.0.53".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let after = Rows::parse(&out).unwrap();
        assert_eq!(after.rows_count, 0);
        assert_eq!(after.raw_specs, Rows::parse(&peers).unwrap().raw_specs);
    }

    #[test]
    fn non_rows_results_pass_through() {
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let body = Bytes::from_static(&[0, 0, 0, 1]);
        assert_eq!(
            rewrite_result(
                &h,
                &body,
                SystemTable::Local,
                None,
                "127.0.0.1".parse::<IpAddr>().unwrap(),
            )
            .unwrap(),
            body
        );
    }

    #[test]
    fn skip_metadata_uses_prepared_columns() {
        // NO_METADATA: flags=4, one column, one row.
        let mut b = BytesMut::new();
        b.put_i32(kind::ROWS);
        b.put_i32(metadata_flags::NO_METADATA);
        b.put_i32(1);
        b.put_i32(1);
        b.put_bytes_value(Some(&[127, 0, 3, 1]));
        let hint = [ColumnSpec {
            name: "rpc_address".into(),
            type_id: TYPE_INET,
        }];
        let h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
        let out = rewrite_result(
            &h,
            &b.freeze(),
            SystemTable::Local,
            Some(&hint),
            "127.0.0.9".parse::<IpAddr>().unwrap(),
        )
        .unwrap();
        let cells = Rows::parse(&out).unwrap().cells().unwrap();
        assert_eq!(cells[0][0], Some(&[127u8, 0, 0, 9][..]));
    }
}
