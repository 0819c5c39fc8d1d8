//! 16×16 AVX-512 transposes between planar (C, H, W) and channel-last (H, W, C) f32 layouts, for channel
//! counts in multiples of 16: the channel-last Winograd forward and the convolutions that feed it convert at
//! their edges with these.

/// Whether the transposes can run here (AVX-512F).
pub fn available() -> bool {
    super::gemm_avx512::available()
}

/// Rows `r0..r1` of a planar (C, H, W) image, channel-last: `dst[((r - r0)·w + x)·c + ch] = src[(ch·h + r)·w + x]`.
/// Panics unless AVX-512F, C a multiple of 16, `r0 ≤ r1 ≤ h` and the lengths suffice.
pub fn planar_rows_to_cl(
    src: &[f32],
    (c, h, w): (usize, usize, usize),
    (r0, r1): (usize, usize),
    dst: &mut [f32],
) {
    assert!(available(), "AVX-512F");
    assert!(c.is_multiple_of(16), "channels in multiples of 16");
    assert!(r0 <= r1 && r1 <= h && src.len() >= c * h * w && dst.len() >= (r1 - r0) * w * c);
    #[cfg(nv_x86)]
    // SAFETY: AVX-512F; the loads are rows r < h of the C planes at columns < w (masked), the stores
    // (r1 - r0)·w·c values of `dst` (lengths asserted).
    unsafe {
        x86::planar_rows_to_cl(src, (c, h, w), (r0, r1), dst)
    }
}

/// `npix` channel-last pixels of `k` channels (`src[p·k + kk]`) into planes: `dst[kk·pstride + p] = src[p·k + kk]`.
/// Panics unless AVX-512F, K a multiple of 16 and `src` holds the pixels.
///
/// # Safety
/// `dst + kk·pstride + p` must be valid for writes for every kk < k and p < npix, and nothing else may access
/// those values during the call.
pub unsafe fn cl_to_planar(src: &[f32], k: usize, npix: usize, dst: *mut f32, pstride: usize) {
    assert!(available(), "AVX-512F");
    assert!(k.is_multiple_of(16) && src.len() >= npix * k);
    #[cfg(nv_x86)]
    x86::cl_to_planar(src, k, npix, dst, pstride);
    #[cfg(not(nv_x86))]
    let _ = (dst, pstride);
}

#[cfg(nv_x86)]
mod x86 {
    use super::super::gemm_avx512::lane_mask as mask;
    use std::arch::x86_64::*;

    /// The permutes of [`transpose16`]: for a block size s (8, 4, 2, 1), the first row of a pair takes its own
    /// low `s` lanes of each 2s-lane block, then its partner's; the second row the high ones.
    const fn swap_index(s: usize, high: bool) -> [i32; 16] {
        let mut out = [0i32; 16];
        let mut l = 0;
        while l < 16 {
            let (blk, off) = (l / (2 * s), l % (2 * s));
            let mut from = if off < s {
                blk * 2 * s + off
            } else {
                16 + blk * 2 * s + off - s
            };
            if high {
                from += s;
            }
            out[l] = from as i32;
            l += 1;
        }
        out
    }

    /// One round of [`transpose16`]: rows i and i + S (i without bit S) swap their off-diagonal S-lane blocks.
    #[inline(always)]
    unsafe fn swap_round<const S: usize>(r: &mut [__m512; 16]) {
        const { assert!(S == 8 || S == 4 || S == 2 || S == 1) };
        let (lo, hi) = (swap_index(S, false), swap_index(S, true));
        let (ilo, ihi) = (
            _mm512_loadu_si512(lo.as_ptr() as *const _),
            _mm512_loadu_si512(hi.as_ptr() as *const _),
        );
        for i in 0..16 {
            if i & S == 0 {
                let (a, b) = (r[i], r[i + S]);
                r[i] = _mm512_permutex2var_ps(a, ilo, b);
                r[i + S] = _mm512_permutex2var_ps(a, ihi, b);
            }
        }
    }

    /// Transposes the 16×16 block held in `r` (row i, lane j → row j, lane i): four rounds of block swaps,
    /// 8×8, 4×4, 2×2 and 1×1, 64 two-source permutes in all.
    #[inline(always)]
    unsafe fn transpose16(r: &mut [__m512; 16]) {
        swap_round::<8>(r);
        swap_round::<4>(r);
        swap_round::<2>(r);
        swap_round::<1>(r);
    }

    /// Rows `r0..r1` of an (C, H, W) image, channel-last: `dst[((r - r0)·w + x)·c + ch] = src[(ch·h + r)·w + x]`.
    /// C is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn planar_rows_to_cl(
        src: &[f32],
        (c, h, w): (usize, usize, usize),
        (r0, r1): (usize, usize),
        dst: &mut [f32],
    ) {
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        for r in r0..r1 {
            let mut x0 = 0;
            while x0 < w {
                let n = (w - x0).min(16);
                let mk = mask(n);
                let mut ch = 0;
                while ch < c {
                    let mut b: [__m512; 16] = std::array::from_fn(|l| {
                        _mm512_maskz_loadu_ps(mk, sp.add(((ch + l) * h + r) * w + x0))
                    });
                    transpose16(&mut b);
                    for (l, v) in b.iter().enumerate().take(n) {
                        _mm512_storeu_ps(dp.add(((r - r0) * w + x0 + l) * c + ch), *v);
                    }
                    ch += 16;
                }
                x0 += 16;
            }
        }
    }

    /// `npix` channel-last pixels of `k` channels (`src[p·k + kk]`, k a multiple of 16) into planes:
    /// `dst[kk·pstride + p] = src[p·k + kk]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn cl_to_planar(
        src: &[f32],
        k: usize,
        npix: usize,
        dst: *mut f32,
        pstride: usize,
    ) {
        let sp = src.as_ptr();
        let mut p0 = 0;
        while p0 < npix {
            let n = (npix - p0).min(16);
            let mk = mask(n);
            let mut kk = 0;
            while kk < k {
                let mut b: [__m512; 16] = std::array::from_fn(|l| {
                    if l < n {
                        _mm512_loadu_ps(sp.add((p0 + l) * k + kk))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                transpose16(&mut b);
                for (l, v) in b.iter().enumerate() {
                    _mm512_mask_storeu_ps(dst.add((kk + l) * pstride + p0), mk, *v);
                }
                kk += 16;
            }
            p0 += 16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_channel_last() {
        if !available() {
            return;
        }
        for (c, h, w) in [(16, 3, 5), (32, 4, 17), (48, 2, 33), (16, 1, 1)] {
            let x: Vec<f32> = (0..c * h * w).map(|i| i as f32).collect();
            let mut cl = vec![0.0; c * h * w];
            planar_rows_to_cl(&x, (c, h, w), (0, h), &mut cl);
            for ch in 0..c {
                for p in 0..h * w {
                    assert_eq!(
                        cl[p * c + ch],
                        x[ch * h * w + p],
                        "{c}x{h}x{w}: channel {ch}, pixel {p}"
                    );
                }
            }
            let mut back = vec![f32::NAN; c * h * w];
            // SAFETY: c planes of h·w values, all within `back`
            unsafe { cl_to_planar(&cl, c, h * w, back.as_mut_ptr(), h * w) };
            assert_eq!(back, x);
            if h > 1 {
                let mut part = vec![0.0; w * c];
                planar_rows_to_cl(&x, (c, h, w), (1, 2), &mut part);
                assert_eq!(part, cl[w * c..2 * w * c]);
            }
        }
    }
}
