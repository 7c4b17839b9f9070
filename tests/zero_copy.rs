//! A 1 MiB result crosses the proxy's codec and writer without its body being copied: counted
//! with an allocator that tallies every byte allocated while the frame is forwarded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, BytesMut};
use keyspaces_proxy::frame::ProtocolVersion;
use keyspaces_proxy::frame::{opcode, FrameCodec, Header};
use keyspaces_proxy::writer::write_frames;
use tokio_util::codec::Decoder;

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn one_mib_result_is_forwarded_without_copying_its_body() {
    const BODY: usize = 1 << 20;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut wire = BytesMut::with_capacity(9 + BODY);
    let mut h = Header::response(ProtocolVersion::V4, 1, opcode::RESULT);
    h.length = BODY as u32;
    h.write(&mut wire);
    wire.put_bytes(0x42, BODY);

    let before = ALLOCATED.load(Ordering::Relaxed);
    let frame = FrameCodec::new(keyspaces_proxy::frame::codec::DEFAULT_MAX_FRAME_LEN)
        .decode(&mut wire)
        .unwrap()
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    runtime.block_on(async {
        tx.send(frame).await.unwrap();
        drop(tx);
        write_frames(rx, tokio::io::sink()).await.unwrap();
    });
    let allocated = ALLOCATED.load(Ordering::Relaxed) - before;
    // The writer's 64 KiB batch buffer and the channel are allowed; a copy of the body is not.
    assert!(
        allocated < BODY / 4,
        "{allocated} bytes allocated while forwarding a {BODY}-byte body"
    );
    eprintln!("forwarding a 1 MiB result allocated {allocated} bytes");
}
