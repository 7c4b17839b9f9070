//! What a kmsauth client controls before KMS is asked: the username, and (after KMS) the
//! decrypted payload, whose times are parsed and checked.
#![no_main]

use std::time::{Duration, SystemTime};

use keyspaces_proxy::auth::kmsauth::{check_window, parse_payload, parse_time, parse_username};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_username(text);
        let _ = parse_time(text);
    }
    if let Ok((nb, na)) = parse_payload(data) {
        let _ = check_window(nb, na, SystemTime::now(), Duration::from_secs(3600));
    }
});
