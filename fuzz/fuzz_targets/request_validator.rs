//! Arbitrary request bodies through the structural validator: it never panics, and whatever it
//! accepts, the router's own prefix parsers read too.
#![no_main]

use keyspaces_proxy::frame::opcode;
use keyspaces_proxy::frame::request::{parse_execute, parse_prepare, parse_query};
use keyspaces_proxy::frame::validate::validate_request;
use keyspaces_proxy::frame::ProtocolVersion;
use libfuzzer_sys::fuzz_target;

const OPCODES: [u8; 6] = [
    opcode::QUERY,
    opcode::PREPARE,
    opcode::EXECUTE,
    opcode::BATCH,
    opcode::REGISTER,
    opcode::OPTIONS,
];

fuzz_target!(|data: &[u8]| {
    let Some((selector, body)) = data.split_first() else {
        return;
    };
    let version = if selector & 1 == 0 {
        ProtocolVersion::V3
    } else {
        ProtocolVersion::V4
    };
    let op = OPCODES[usize::from(selector >> 1) % OPCODES.len()];
    if validate_request(version, op, body).is_ok() {
        match op {
            opcode::QUERY => assert!(parse_query(body).is_ok()),
            opcode::PREPARE => assert!(parse_prepare(body).is_ok()),
            opcode::EXECUTE => assert!(parse_execute(body).is_ok()),
            _ => {}
        }
    }
});
