//! Arbitrary RESULT bodies through the system.local / system.peers rewriter.
#![no_main]

use bytes::Bytes;
use keyspaces_proxy::frame::result::ColumnSpec;
use keyspaces_proxy::frame::{opcode, Header};
use keyspaces_proxy::topology::{rewrite_result, SystemTable};
use libfuzzer_sys::fuzz_target;
use keyspaces_proxy::frame::ProtocolVersion;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, body)) = data.split_first() else { return };
    let mut header = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
    header.flags = flags & 0x0e; // tracing, custom payload, warning (never compression here)
    let body = Bytes::copy_from_slice(body);
    let hint = [ColumnSpec { name: "rpc_address".into(), type_id: 0x0010 }];
    for table in [SystemTable::Local, SystemTable::Peers] {
        let _ = rewrite_result(&header, &body, table, None, "127.0.0.1".parse::<std::net::IpAddr>().unwrap());
        let _ = rewrite_result(&header, &body, table, Some(&hint), "::1".parse::<std::net::IpAddr>().unwrap());
    }
});
