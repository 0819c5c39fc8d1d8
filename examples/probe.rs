#![allow(clippy::all, unused)]
use normvision::norm::{lanes, simd};
use std::time::Instant;

pub fn ab(names: &[&str], reps: usize, fs: &mut [&mut dyn FnMut()]) {
    let k = fs.len();
    let mut v: Vec<Vec<f64>> = vec![vec![]; k];
    for f in fs.iter_mut() { for _ in 0..3 { f(); } }
    for _ in 0..reps { for (i, f) in fs.iter_mut().enumerate() { let s = Instant::now(); f(); v[i].push(s.elapsed().as_secs_f64()*1e3); } }
    for i in 0..k { v[i].sort_by(|a,b| a.partial_cmp(b).unwrap()); println!("{:40} min {:.3} med {:.3}", names[i], v[i][0], v[i][reps/2]); }
}

use std::arch::x86_64::*;
#[inline(always)]
unsafe fn nt_affine_shifted(x: &[f32], y: &mut [f32], sh: f32, a: f32, b: f32) {
    let (vs, va, vb) = (_mm512_set1_ps(sh), _mm512_set1_ps(a), _mm512_set1_ps(b));
    let n = x.len();
    let mut i = 0;
    let yp = y.as_mut_ptr();
    while i < n && (yp.add(i) as usize) % 64 != 0 { y[i] = (x[i]-sh)*a+b; i += 1; }
    while i + 16 <= n {
        let v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vs), va), vb);
        _mm512_stream_ps(yp.add(i), v);
        i += 16;
    }
    while i < n { y[i] = (x[i]-sh)*a+b; i += 1; }
}
#[inline(always)]
unsafe fn z_affine_shifted(x: &[f32], y: &mut [f32], sh: f32, a: f32, b: f32) {
    let (vs, va, vb) = (_mm512_set1_ps(sh), _mm512_set1_ps(a), _mm512_set1_ps(b));
    let n = x.len();
    let mut i = 0;
    let yp = y.as_mut_ptr();
    while i + 16 <= n {
        let v = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x.as_ptr().add(i)), vs), va), vb);
        _mm512_storeu_ps(yp.add(i), v);
        i += 16;
    }
    while i < n { y[i] = (x[i]-sh)*a+b; i += 1; }
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let (n, c, s) = (args[0], args[1], args[2]);
    let total = n * c * s;
    let x: Vec<f32> = (0..total).map(|i| ((i * 7919) % 1000) as f32 / 1000.0).collect();
    let dy: Vec<f32> = (0..total).map(|i| ((i * 104729) % 1000) as f32 / 1000.0).collect();
    let mut y = vec![0f32; total];
    let mut dx = vec![0f32; total];
    let mut dx2 = vec![0f32; total];
    let mut f_sum = || { let mut a = 0.0; for ch in 0..c { a += lanes::sum_channel(&x, ch*s, n, s, c*s); } std::hint::black_box(a); };
    let mut f_sum_sh = || { let mut a = 0.0; for ch in 0..c { a += lanes::sum_channel(&x, ch*s, n, s, c*s); a += lanes::shifted_moments_channel(&x, ch*s, n, s, c*s, 0.5).0; } std::hint::black_box(a); };
    let mut f_fwd = || { for ch in 0..c { let _ = lanes::sum_channel(&x, ch*s, n, s, c*s); let _ = lanes::shifted_moments_channel(&x, ch*s, n, s, c*s, 0.5); for kk in 0..n { let off = (kk*c+ch)*s; lanes::affine_shifted(&x[off..off+s], &mut y[off..off+s], 0.5, 1.1, 0.2); } } std::hint::black_box(&y); };
    let mut f_dym = || { let mut a = 0.0; for ch in 0..c { a += lanes::dy_moments_channel(&dy, &x, ch*s, n, s, c*s, 0.5, None).0; } std::hint::black_box(a); };
    let mut f_bwd = || { for ch in 0..c { let _ = lanes::dy_moments_channel(&dy, &x, ch*s, n, s, c*s, 0.5, None); for kk in 0..n { let off = (kk*c+ch)*s; lanes::bwd_dx(&dy[off..off+s], &x[off..off+s], &mut dx[off..off+s], 0.5, 1.1, 0.2, 0.1); } } std::hint::black_box(&dx); };
    let mut f_dx = || { for ch in 0..c { for kk in 0..n { let off = (kk*c+ch)*s; lanes::bwd_dx(&dy[off..off+s], &x[off..off+s], &mut dx2[off..off+s], 0.5, 1.1, 0.2, 0.1); } } std::hint::black_box(&dx2); };
    let mut y2 = vec![0f32; total];
    let mut y3 = vec![0f32; total];
    let mut f_fwd_nt = || { for ch in 0..c { let _ = lanes::sum_channel(&x, ch*s, n, s, c*s); let _ = lanes::shifted_moments_channel(&x, ch*s, n, s, c*s, 0.5); for kk in 0..n { let off = (kk*c+ch)*s; unsafe { nt_affine_shifted(&x[off..off+s], &mut y2[off..off+s], 0.5, 1.1, 0.2) }; } } std::hint::black_box(&y2); };
    let mut f_fwd_z = || { for ch in 0..c { let _ = lanes::sum_channel(&x, ch*s, n, s, c*s); let _ = lanes::shifted_moments_channel(&x, ch*s, n, s, c*s, 0.5); for kk in 0..n { let off = (kk*c+ch)*s; unsafe { z_affine_shifted(&x[off..off+s], &mut y3[off..off+s], 0.5, 1.1, 0.2) }; } } std::hint::black_box(&y3); };
    ab(&["fwd fused", "fwd fused NT", "fwd fused zmm"], 20, &mut [&mut f_fwd, &mut f_fwd_nt, &mut f_fwd_z]);
    return;
    ab(&["sum", "sum+shifted", "fwd fused", "dy_moments", "bwd fused", "dx only"], 20, &mut [&mut f_sum, &mut f_sum_sh, &mut f_fwd, &mut f_dym, &mut f_bwd, &mut f_dx]);
}
