//! A hostile client: arbitrary frames through the handshake state machine, then the router.
#![no_main]

use std::sync::Arc;

use bytes::BytesMut;
use keyspaces_proxy::auth::client::{ClientAuth, Logins, UserStore};
use keyspaces_proxy::frame::{Compression, FrameCodec};
use keyspaces_proxy::handshake::{ClientHandshake, Step};
use keyspaces_proxy::route::Router;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let (mode, rest) = data.split_first().map_or((0, data), |(m, r)| (*m, r));
    let auth = if mode & 1 == 0 {
        ClientAuth::None
    } else {
        ClientAuth::Password(UserStore::parse("app:pw").unwrap())
    };
    let users = Arc::new(Logins::without_sessions(auth));
    let mut hs = ClientHandshake::new(users.clone());
    let mut router: Option<Router> = None;
    let mut buf = BytesMut::from(rest);
    let mut codec = FrameCodec::new(1 << 20);
    while let Ok(Some(frame)) = codec.decode(&mut buf) {
        match &mut router {
            Some(r) => {
                let _ = r.on_client_frame(frame);
            }
            None => {
                let mut step = hs.on_frame(&frame);
                if let Step::Verify(creds) = &step {
                    // What the session does for password users (no sessions, no KMS here).
                    let ok = match &users.auth {
                        ClientAuth::Password(u) if u.verify(&creds.user, &creds.secret) => {
                            Ok(creds.user.clone())
                        }
                        _ => Err(String::new()),
                    };
                    step = hs.verified(creds, ok);
                }
                if let Step::Connect(a) = step {
                    let upstream = if mode & 2 == 0 { Compression::None } else { Compression::Lz4 };
                    router = Some(
                        Router::new(a.version, a.compression, upstream, "127.0.0.1".parse().unwrap(), 1 << 20)
                            .split_use(mode & 4 != 0),
                    );
                }
            }
        }
    }
});
