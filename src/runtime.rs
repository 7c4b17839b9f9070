//! The tokio runtime for a given number of worker threads, shared by the proxy and the emulator.

/// One thread gets the current-thread scheduler: every task and the accept loop share one run
/// queue, so handing a frame from task to task needs no atomics or cross-thread wake-ups
/// (measured: less CPU per request than a one-worker pool). 0 = one worker per core.
pub fn build(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 0 {
                b.worker_threads(n);
            }
            b
        }
    };
    builder.enable_all().build()
}
