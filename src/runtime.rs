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

/// How long a kept-warm worker goes on polling for work after the last job it ran.
const WARM_SPIN: std::time::Duration = std::time::Duration::from_micros(500);

/// Live keepers (see [`keep_workers_warm`]).
static KEEPERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Keeps the current rayon pool's other workers polling for work until none has come for 0.5 ms.
///
/// A rayon worker that finds no work spins for a few microseconds, then sleeps; waking it for the next parallel
/// region costs tens of microseconds on this project's VM (the idle vCPU has halted). Measured with
/// `cargo run --release --example pool_latency` (a 2 MB elementwise pass in 8 tasks, 2 threads): back to back
/// the pass took 0.057 ms (median), with 50 µs of serial work between passes 0.110 ms, more than the 1-thread
/// 0.154 ms at the 75th percentile. OpenMP runtimes (and so PyTorch) keep their workers spinning for a while
/// instead. This does the same inside rayon: it spawns, per other worker, a job that runs the pool's pending
/// jobs as they come (`rayon::yield_now`) and returns after [`WARM_SPIN`] without any. Call it from inside the
/// pool (`ThreadPool::install`) before a burst of parallel kernels; it does nothing while keepers are alive, on
/// a one-thread pool, or outside a pool worker.
///
/// `normvision bench-kernels` calls it before every repetition, so its timings compare with PyTorch's under the
/// same policy. Training does not use it: with the command run on a pool worker and one call per forward and
/// backward, `normvision --threads 2 train --epochs 1` went 1992/1925/1976 → 1877/1774/2013 img/s (alternating
/// runs): the spinning worker competes with the data-loading thread for the machine's two cores.
pub fn keep_workers_warm() {
    use std::sync::atomic::Ordering;
    let Some(me) = rayon::current_thread_index() else {
        return;
    };
    let want = rayon::current_num_threads().saturating_sub(1);
    loop {
        let live = KEEPERS.load(Ordering::Relaxed);
        if live >= want {
            return;
        }
        if KEEPERS
            .compare_exchange(live, live + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            rayon::spawn(move || keeper(me));
        }
    }
}

fn keeper(spawner: usize) {
    struct Leave;
    impl Drop for Leave {
        fn drop(&mut self) {
            KEEPERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    let _leave = Leave;
    // Picked up by the thread that asked for it (while it waited on a join): that thread is awake anyway.
    if rayon::current_thread_index() == Some(spawner) {
        return;
    }
    let mut last = std::time::Instant::now();
    loop {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last = std::time::Instant::now(),
            Some(rayon::Yield::Idle) if last.elapsed() < WARM_SPIN => std::hint::spin_loop(),
            _ => return,
        }
    }
}

/// Keepers alive now (see [`keep_workers_warm`]).
pub fn live_keepers() -> usize {
    KEEPERS.load(std::sync::atomic::Ordering::Acquire)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn keepers_run_the_pools_work_and_leave_when_idle() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let v: Vec<u64> = (0..100_000).collect();
        let (sum, live) = pool.install(|| {
            keep_workers_warm();
            keep_workers_warm(); // no second set while the first is alive
            let live = live_keepers();
            let mut sum = 0;
            for _ in 0..50 {
                sum = v
                    .par_chunks(1000)
                    .map(|c| c.iter().sum::<u64>())
                    .sum::<u64>();
            }
            (sum, live)
        });
        assert_eq!(sum, 99_999 * 100_000 / 2);
        assert!(live <= 2, "{live} keepers for 2 other workers");
        let t = std::time::Instant::now();
        while live_keepers() != 0 {
            assert!(t.elapsed().as_secs() < 5, "keepers still alive after 5 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Outside a pool, and on a one-thread pool, nothing is spawned.
        keep_workers_warm();
        assert_eq!(live_keepers(), 0);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        one.install(keep_workers_warm);
        assert_eq!(live_keepers(), 0);
    }
}
