//! The PLAIN credential parser and the user store, with arbitrary tokens and user files.
#![no_main]

use keyspaces_proxy::auth::client::UserStore;
use keyspaces_proxy::frame::messages::{parse_auth_token, parse_plain_token};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let store = UserStore::parse("app:pw\nops:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08").unwrap();
    for token in [data, parse_auth_token(data).unwrap_or_default()] {
        if let Ok((user, password)) = parse_plain_token(token) {
            let _ = store.verify(user, password);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = UserStore::parse(text);
    }
});
