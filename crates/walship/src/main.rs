//! The walship binary: everything lives in the library; see `walship::cli`.
//!
//! The allocator is jemalloc for the whole process, librdkafka included (the
//! `unprefixed_malloc_on_supported_platforms` feature makes it `malloc` itself): every record
//! costs librdkafka about six small allocations on the session thread (message, header list,
//! one per header) that its poll thread frees. With glibc's malloc, allocating and freeing
//! were ~17 % of walship's CPU samples in a drain (`perf record`); jemalloc's per-thread caches
//! cut walship's CPU per event by ~15 % (6.4 -> 5.4 µs, `scripts/bench_e2e.py drain` on the
//! 2-core VM) for ~4 MB more peak RSS.

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    walship::cli::main()
}
