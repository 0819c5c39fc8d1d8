//! How long a short parallel pass takes on rayon's pool when the calls come back to back and when some serial
//! work separates them (the workers go to sleep and must be woken), with and without
//! `runtime::keep_workers_warm`.
//!
//! ```sh
//! cargo run --release --example pool_latency          # plain rayon
//! WARM=1 cargo run --release --example pool_latency   # keepers before every call
//! ```
//!
//! Each line: 400 calls of a 2 MB elementwise pass in 8 tasks, after `gap` µs of busy serial work each.

use rayon::prelude::*;
use std::time::Instant;

fn main() {
    let warm = std::env::var("WARM").is_ok();
    let n = 512 * 1024;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; n];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for gap_us in [0u128, 50, 200, 1000] {
                let mut t = Vec::new();
                for _ in 0..400 {
                    let s = Instant::now();
                    while s.elapsed().as_micros() < gap_us {}
                    if warm {
                        normvision::runtime::keep_workers_warm();
                    }
                    let s = Instant::now();
                    y.par_chunks_mut(n / 8)
                        .zip(x.par_chunks(n / 8))
                        .for_each(|(o, i)| {
                            for (a, b) in o.iter_mut().zip(i) {
                                *a = b * 1.5 + 0.25;
                            }
                        });
                    t.push(s.elapsed().as_secs_f64() * 1e3);
                }
                t.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let q = |f: f64| t[((t.len() - 1) as f64 * f) as usize];
                println!(
                    "T={threads} gap={gap_us:4}us: min {:.3} p25 {:.3} med {:.3} p75 {:.3} p90 {:.3} ms",
                    q(0.0),
                    q(0.25),
                    q(0.5),
                    q(0.75),
                    q(0.9)
                );
            }
        });
    }
}
