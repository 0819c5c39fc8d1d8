//! Process-level settings for training speed.

/// Keeps freed activation buffers in the process instead of returning them to the kernel.
///
/// A training step allocates and frees the same large activation buffers (up to ~13 MB at batch 128) every
/// step. glibc serves blocks above its mmap threshold with fresh `mmap`s and trims the heap after large frees,
/// so every step page-faults its buffers in again and the kernel zeroes them (profiled: `exc_page_fault`,
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
/// The longest a keeper stays, however much work comes (it may have been picked up by a worker waiting in a
/// join, whose own continuation then waits for it).
const WARM_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// Keepers spawned and not yet finished, process-wide (see [`keep_workers_warm`]).
static KEEPERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Keepers that have started polling, for the tests.
#[cfg(test)]
static KEEPER_STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

std::thread_local! {
    static IN_KEEPER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Keeps the current rayon pool's other workers polling for work until none has come for 0.5 ms.
///
/// A rayon worker that finds no work spins for a few microseconds, then sleeps; waking it for the next parallel
/// region costs tens of microseconds on a VM whose idle vCPU has halted (measured with `cargo run --release
/// --example pool_latency`; see docs/PERFORMANCE.md, "Tuning constants"). OpenMP runtimes (and so PyTorch) keep their workers spinning
/// for a while instead. This does
/// the same inside rayon: it broadcasts to every other worker of the pool a job that runs the pool's pending
/// jobs as they come (`rayon::yield_now`) and returns after `WARM_SPIN` (0.5 ms) without any, or after
/// `WARM_MAX` (50 ms) in all.
///
/// Call it from inside the pool (`ThreadPool::install`) before a burst of parallel kernels. It does nothing on a
/// one-thread pool, outside a pool worker, or while keepers of an earlier call have not all finished (the count
/// is process-wide, not per pool).
///
/// `normvision bench-kernels` calls it before every repetition, so its timings compare with PyTorch's under the
/// same policy, and inference (`Graph::infer`) at the start of every call, whose small layers at batch 1 are
/// each shorter than a wake-up. Training does not use it: the spinning worker competes with the data-loading
/// thread for a two-core machine's cores, and training was no faster with it.
pub fn keep_workers_warm() {
    use std::sync::atomic::Ordering;
    let Some(me) = rayon::current_thread_index() else {
        return;
    };
    let others = rayon::current_num_threads().saturating_sub(1);
    if others == 0
        || KEEPERS
            .compare_exchange(0, others, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    rayon::spawn_broadcast(move |ctx| {
        if ctx.index() != me {
            keeper();
        }
    });
}

fn keeper() {
    struct Leave(bool);
    impl Drop for Leave {
        fn drop(&mut self) {
            if self.0 {
                IN_KEEPER.with(|k| k.set(false));
            }
            KEEPERS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
    // A keeper reached from inside another one (through `yield_now`) has nothing to add.
    let outer = !IN_KEEPER.with(|k| k.replace(true));
    let _leave = Leave(outer);
    if !outer {
        return;
    }
    #[cfg(test)]
    KEEPER_STARTS.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let start = std::time::Instant::now();
    let mut last = start;
    while start.elapsed() < WARM_MAX {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => last = std::time::Instant::now(),
            Some(rayon::Yield::Idle) if last.elapsed() < WARM_SPIN => std::hint::spin_loop(),
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn a_keeper_polls_on_every_other_worker_and_leaves_when_idle() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let v: Vec<u64> = (0..100_000).collect();
        let (sum, live) = pool.install(|| {
            keep_workers_warm();
            let live = KEEPERS.load(Ordering::Acquire);
            keep_workers_warm(); // no second set while the first is alive
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
        assert_eq!(live, 2, "one keeper per other worker");
        let t = std::time::Instant::now();
        while KEEPERS.load(Ordering::Acquire) != 0 {
            assert!(t.elapsed().as_secs() < 5, "keepers still alive after 5 s");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            KEEPER_STARTS.load(Ordering::Acquire),
            2,
            "each other worker polled"
        );
        // Outside a pool, and on a one-thread pool, nothing is spawned.
        keep_workers_warm();
        assert_eq!(KEEPERS.load(Ordering::Acquire), 0);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        one.install(keep_workers_warm);
        assert_eq!(KEEPERS.load(Ordering::Acquire), 0);
    }
}
