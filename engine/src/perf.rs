//! Process-wide performance settings for binaries that train or run models.

/// candle's own thread pool (element-wise ops) spins 25,000 `pause`s before its workers sleep.
///
/// On a small machine that spin competes with rayon's threads, which run the GEMMs and our
/// kernels right after each element-wise op: a profile of the BERT training step on 2 cores put 13%
/// of all cycles in that loop, and lowering the limit took the step from 245–285 ms to 190–225 ms
/// (BENCHMARKS.md, issue 16). Sets `CANDLE_BARRIER_POOL_SPIN_LIMIT` to 100 unless the user set it.
/// Call first thing in `main`, before any thread starts (it changes the environment).
pub fn tune_threads() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "100");
    }
}

/// Keeps glibc's allocator from handing large buffers back to the OS after every use.
///
/// Training allocates and frees the same multi-megabyte activation and gradient buffers every step.
/// By default glibc serves blocks above 128 KiB-ish with `mmap` and returns them with `munmap`, so
/// each step page-faults its working set in again (15–20% of cycles in a profile of a BERT step).
/// Raising the mmap threshold to its maximum and the trim threshold far above it keeps those blocks
/// in the heap for reuse. Call once, early in `main`; libraries should not call it. A no-op where
/// the allocator is not glibc's.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit targets.
        const MMAP_THRESHOLD: libc::c_int = 32 * 1024 * 1024;
        const TRIM_THRESHOLD: libc::c_int = 1024 * 1024 * 1024;
        const TOP_PAD: libc::c_int = 64 * 1024 * 1024;
        // SAFETY: mallopt only changes allocator tunables; it is safe to call at any time and returns
        // 0 (ignored here: the defaults stay) when a value is rejected.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
        }
    }
}
