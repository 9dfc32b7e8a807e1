use std::process::ExitCode;

// Evaluation allocates many small maps and strings on every core; glibc's
// malloc spent a third of a 100k-customer run in allocation and arena-lock
// contention (perf, see BENCHMARKS.md). mimalloc's per-thread heaps avoid both.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    engaged::cli::main().await
}
