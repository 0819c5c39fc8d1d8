use rayon::prelude::*;
use std::time::Instant;
fn main() {
    let n = 512 * 1024;
    let x: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let mut y = vec![0f32; n];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            for gap_us in [0u64, 50, 200, 1000] {
                let mut t = Vec::new();
                for _ in 0..400 {
                    if gap_us > 0 {
                        let s = Instant::now();
                        while s.elapsed().as_micros() < gap_us as u128 {}
                    }
                    if std::env::var("WARM").is_ok() { normvision::runtime::keep_workers_warm(); }
                    let s = Instant::now();
                    y.par_chunks_mut(n / 8).zip(x.par_chunks(n / 8)).for_each(|(o, i)| {
                        for (a, b) in o.iter_mut().zip(i) {
                            *a = b * 1.5 + 0.25;
                        }
                    });
                    t.push(s.elapsed().as_secs_f64() * 1e3);
                }
                t.sort_by(|a, b| a.partial_cmp(b).unwrap());
                println!("T={threads} gap={gap_us:4}us: min {:.3} p25 {:.3} med {:.3} p75 {:.3} p90 {:.3} ms", t[0], t[100], t[200], t[300], t[360]);
            }
        });
    }
}
