//! The proxy's request validator against the emulator's decoder (independent code, as strict as
//! a real server could be): whatever the proxy would forward onto a shared connection, a
//! Cassandra-like server must be able to decode, or it closes that connection under every
//! other client.
#![no_main]

use keyspaces_proxy::frame::header::flags::CUSTOM_PAYLOAD;
use keyspaces_proxy::frame::messages::message_body;
use keyspaces_proxy::frame::validate::validate_request;
use keyspaces_proxy::frame::{opcode, Header};
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
    let spoken = if selector & 1 == 0 {
        ProtocolVersion::V3
    } else {
        ProtocolVersion::V4
    };
    let version = spoken.wire();
    let op = OPCODES[usize::from((selector >> 2) & 0x3f) % OPCODES.len()];
    let mut header = Header::request(spoken, 1, op);
    if selector & 2 != 0 {
        header.flags |= CUSTOM_PAYLOAD;
    }
    // REGISTER is answered by the proxy itself and never forwarded.
    if op == opcode::REGISTER {
        return;
    }
    let forwarded = message_body(&header, body).and_then(|m| validate_request(spoken, op, m));
    if forwarded.is_ok() {
        if let Err(e) = keyspaces_emulator::wire::request::decode(version, header.flags, op, body) {
            panic!("forwarded, but a strict server cannot decode it: {e}");
        }
    }
});
