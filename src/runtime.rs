//! Process-level settings for training speed.

/// Keeps freed activation buffers in the process instead of returning them to the kernel.
///
/// A training step allocates and frees the same large activation buffers (up to ~13 MB at batch 128) every
/// step. glibc serves blocks above its mmap threshold with fresh `mmap`s and trims the heap after large frees,
/// so every step page-faults its buffers in again and the kernel zeroes them (measured: `exc_page_fault`,
/// `clear_page_erms` and memcg accounting were ~8% of a step). Raising the mmap and trim thresholds makes
/// those buffers reusable heap memory. No-op on other C libraries.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 (malloc.h)
        libc::mallopt(-3, 1 << 30);
        libc::mallopt(-1, 1 << 30);
    }
}
