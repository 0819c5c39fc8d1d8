//! The 2×2, stride-2 max pool of one f32 plane with AVX-512: 16 outputs per step from the even and odd columns
//! of two input rows, with the scalar path's tie and NaN rules (the first maximum in row-major window order
//! wins; a NaN is taken and then kept).

pub fn available() -> bool {
    super::gemm_avx512::available()
}

/// `y` (oh × ow) and the argmax indices `ix` (into the h × w plane) from `x` (rows of `w`).
pub fn plane(x: &[f32], w: usize, oh: usize, ow: usize, y: &mut [f32], ix: &mut [u32]) {
    assert!(available(), "AVX-512F");
    assert!(2 * ow <= w && x.len() >= 2 * oh * w && y.len() >= oh * ow && ix.len() >= oh * ow);
    #[cfg(nv_x86)]
    // SAFETY: AVX-512F is available; loads are masked to the 2·ow columns of rows < 2·oh, stores to the
    // ow values of output rows < oh (bounds asserted above).
    unsafe {
        x86::plane(x, w, oh, ow, y, ix)
    }
}

/// dx of one plane (h × w, every element written) from dy and the argmax indices of `plane`: dy at its
/// window's argmax (as 0 + dy), zero elsewhere, including rows and columns outside every window.
pub fn plane_backward(
    dy: &[f32],
    ix: &[u32],
    w: usize,
    h: usize,
    oh: usize,
    ow: usize,
    dx: &mut [f32],
) {
    assert!(available(), "AVX-512F");
    assert!(
        2 * ow <= w
            && 2 * oh <= h
            && dx.len() >= h * w
            && dy.len() >= oh * ow
            && ix.len() >= oh * ow
    );
    #[cfg(nv_x86)]
    // SAFETY: AVX-512F is available; dy and ix reads are masked to ow values of rows < oh, dx writes to the
    // 2·ow columns of rows < 2·oh (bounds asserted above); the rest is written by safe code.
    unsafe {
        x86::plane_backward(dy, ix, w, oh, ow, dx)
    }
    for r in 0..2 * oh {
        dx[r * w + 2 * ow..(r + 1) * w].fill(0.0);
    }
    dx[2 * oh * w..h * w].fill(0.0);
}

#[cfg(nv_x86)]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn plane_backward(
        dy: &[f32],
        ix: &[u32],
        w: usize,
        oh: usize,
        ow: usize,
        dx: &mut [f32],
    ) {
        let iota2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let zero = _mm512_setzero_ps();
        let dp = dx.as_mut_ptr();
        for oi in 0..oh {
            let base = 2 * oi * w;
            let mut oj = 0;
            while oj < ow {
                let cnt = (ow - oj).min(16);
                let mo = mask(cnt);
                let v = _mm512_add_ps(
                    zero,
                    _mm512_maskz_loadu_ps(mo, dy.as_ptr().add(oi * ow + oj)),
                );
                let at = _mm512_maskz_loadu_epi32(mo, ix.as_ptr().add(oi * ow + oj) as *const _);
                // offset of the argmax inside its window: 0, 1, w or w + 1
                let off = _mm512_sub_epi32(
                    at,
                    _mm512_add_epi32(_mm512_set1_epi32((base + 2 * oj) as i32), iota2),
                );
                let pick = |o: i32| {
                    _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(off, _mm512_set1_epi32(o)), v)
                };
                let (e0, o0) = (pick(0), pick(1));
                let (e1, o1) = (pick(w as i32), pick(w as i32 + 1));
                for (r, (e, o)) in [(e0, o0), (e1, o1)].into_iter().enumerate() {
                    crate::kernels::gemm_avx512::store_interleaved(
                        dp.add(base + r * w + 2 * oj),
                        e,
                        o,
                        2 * cnt,
                    );
                }
                oj += 16;
            }
        }
    }

    use crate::kernels::gemm_avx512::lane_mask as mask;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn plane(x: &[f32], w: usize, oh: usize, ow: usize, y: &mut [f32], ix: &mut [u32]) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let xp = x.as_ptr();
        for oi in 0..oh {
            let base = 2 * oi * w;
            let mut oj = 0;
            while oj < ow {
                let cnt = (ow - oj).min(16);
                let cols = 2 * cnt;
                let (ml, mh) = (mask(cols), mask(cols.saturating_sub(16)));
                let load = |r: usize| {
                    let p = xp.add(base + r * w + 2 * oj);
                    let lo = _mm512_maskz_loadu_ps(ml, p);
                    let hi = _mm512_maskz_loadu_ps(mh, p.add(16.min(cols)));
                    (
                        _mm512_permutex2var_ps(lo, even, hi),
                        _mm512_permutex2var_ps(lo, odd, hi),
                    )
                };
                let (a0, a1) = load(0);
                let (b0, b1) = load(1);
                // window offsets 0, 1, w, w + 1 in row-major order
                let mut best = a0;
                let mut off = _mm512_setzero_si512();
                for (v, o) in [(a1, 1), (b0, w as i32), (b1, w as i32 + 1)] {
                    let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best)
                        | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    best = _mm512_mask_blend_ps(take, best, v);
                    off = _mm512_mask_blend_epi32(take, off, _mm512_set1_epi32(o));
                }
                let j2 = _mm512_add_epi32(
                    _mm512_set1_epi32((base + 2 * oj) as i32),
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                );
                let mo = mask(cnt);
                _mm512_mask_storeu_ps(y.as_mut_ptr().add(oi * ow + oj), mo, best);
                _mm512_mask_storeu_epi32(
                    ix.as_mut_ptr().add(oi * ow + oj) as *mut _,
                    mo,
                    _mm512_add_epi32(j2, off),
                );
                oj += 16;
            }
        }
    }
}

#[cfg(not(nv_x86))]
mod x86 {
    pub unsafe fn plane(_: &[f32], _: usize, _: usize, _: usize, _: &mut [f32], _: &mut [u32]) {
        unreachable!("AVX-512F only")
    }
    pub unsafe fn plane_backward(
        _: &[f32],
        _: &[u32],
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("AVX-512F only")
    }
}
