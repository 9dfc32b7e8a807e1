use std::process::ExitCode;

// Evaluation allocates many small maps and strings on every core; glibc's
// malloc spent a third of a 100k-customer run in allocation and arena-lock
// contention (perf, see BENCHMARKS.md). mimalloc's per-thread heaps avoid both.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // `engaged run --json | head` closes stdout early: end quietly like other
    // Unix tools instead of panicking in println!.
    sigpipe::reset();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts");
    let code = runtime.block_on(engaged::cli::main());
    // Dropping a runtime waits for its blocking tasks however long they
    // take; a shutdown that already waited its grace period must not.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}
