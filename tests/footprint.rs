//! What an idle client costs is mostly its session task: the future `session::run` returns.
//! Its size is fixed at compile time, so it is asserted here (not timed): a large future awaited
//! inline somewhere in a session (the KMS call once doubled it) shows up as a failure, not as a
//! memory regression found later with 10,000 clients.

mod common;

use std::sync::Arc;

use common::*;
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn a_session_task_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let emu = emulator(dir.path(), |_| {}).await;
    let ctx = Arc::new(context(&emu, ProxyOptions::for_emulator(&emu)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (socket, peer) = listener.accept().await.unwrap();
    let session = keyspaces_proxy::session::run(ctx, socket, peer);
    let size = std::mem::size_of_val(&session);
    println!("session future: {size} bytes");
    assert!(size <= 6 * 1024, "session future grew to {size} bytes");
    drop((session, client));
}
