//! The AVX-512 kernels of the channel-last F(2×2, 3×3) forward ([`super::channel_last`]): tile transforms
//! vectorised over channels, and the products vectorised over output channels.
//!
//! Every transformed value is computed by the same operations, in the same order, as the planar kernels of
//! [`super::f2_x86`] compute it (there, vectorised over the tiles of a tile row), and every product sums over the
//! input channels in order with one fused multiply-add each, as `gemm_nn` does: the two forwards are bitwise
//! equal.

#[cfg(nv_x86)]
#[allow(clippy::needless_range_loop)] // the tile algebra reads best with explicit row/column indices
pub(super) mod x86 {
    use super::super::f2_x86::x86::{epilogue, tile_output};
    use std::arch::x86_64::*;

    /// V of the tiles j0..j1 of tile row `i`: `v[(p·ts + j - j0)·ld + ch] = (Bᵀ d B)[p]` of tile j's 4×4 input
    /// (rows 2i-1.., columns 2j-1.., zero outside the image), from channel-last rows `src` holding image rows
    /// `r0..` (row r at `(r - r0)·w·c`); `zeros` holds at least c zeros, read for the pixels outside. C is a
    /// multiple of 16. The order of operations is the planar kernel's: the 4 column combinations of each row,
    /// then the 4 row combinations of each column. (Carrying the two columns that a tile shares with the next
    /// from one tile to the next, one channel vector at a time, was slower: 14.6 against 10.2 µs for the 28×28,
    /// 32-channel image, with 8 more vectors live.)
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_row(
        src: *const f32,
        r0: usize,
        (c, h, w): (usize, usize, usize),
        i: usize,
        (j0, j1): (usize, usize),
        zeros: *const f32,
        v: *mut f32,
        (ts, ld): (usize, usize),
    ) {
        let rows: [Option<*const f32>; 4] = std::array::from_fn(|a| {
            let r = (2 * i + a).checked_sub(1)?;
            (r < h).then(|| src.add((r - r0) * w * c))
        });
        for j in j0..j1 {
            let ptr: [[*const f32; 4]; 4] = std::array::from_fn(|a| {
                std::array::from_fn(|b| match ((2 * j + b).checked_sub(1), rows[a]) {
                    (Some(x), Some(rp)) if x < w => rp.add(x * c),
                    _ => zeros,
                })
            });
            let vt = v.add((j - j0) * ld);
            let mut ch = 0;
            while ch < c {
                let mut hh = [[_mm512_setzero_ps(); 4]; 4];
                for a in 0..4 {
                    let d: [__m512; 4] =
                        std::array::from_fn(|b| _mm512_loadu_ps(ptr[a][b].add(ch)));
                    hh[a] = [
                        _mm512_sub_ps(d[0], d[2]),
                        _mm512_add_ps(d[1], d[2]),
                        _mm512_sub_ps(d[2], d[1]),
                        _mm512_sub_ps(d[1], d[3]),
                    ];
                }
                for q in 0..4 {
                    let o = [
                        _mm512_sub_ps(hh[0][q], hh[2][q]),
                        _mm512_add_ps(hh[1][q], hh[2][q]),
                        _mm512_sub_ps(hh[2][q], hh[1][q]),
                        _mm512_sub_ps(hh[1][q], hh[3][q]),
                    ];
                    for (rr, val) in o.iter().enumerate() {
                        _mm512_storeu_ps(vt.add((rr * 4 + q) * ts * ld + ch), *val);
                    }
                }
                ch += 16;
            }
        }
    }

    /// `m[t·ld + ..16·NKV] = Σ_ch v[t·ld + ch] · u[ch·ldu + ..16·NKV]` for the `nt` ≤ NT tiles of a block (NT
    /// tiles of `v` are read), summed over ch in order, one fused multiply-add each, from zero. `m` may be `v`:
    /// every read of the block comes before its first store.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn products<const NKV: usize, const NT: usize>(
        c: usize,
        v: *const f32,
        u: *const f32,
        ldu: usize,
        m: *mut f32,
        ld: usize,
        nt: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NKV]; NT];
        for ch in 0..c {
            let ur = u.add(ch * ldu);
            let uv: [__m512; NKV] = std::array::from_fn(|q| _mm512_loadu_ps(ur.add(16 * q)));
            for (t, row) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*v.add(t * ld + ch));
                for (x, y) in row.iter_mut().zip(uv) {
                    *x = _mm512_fmadd_ps(b, y, *x);
                }
            }
        }
        for (t, row) in acc.iter().enumerate().take(nt) {
            for (q, x) in row.iter().enumerate() {
                _mm512_storeu_ps(m.add(t * ld + 16 * q), *x);
            }
        }
    }

    /// The output pass of the tiles j0..j1 of a tile row from `m[(p·ts + j - j0)·ld + kk]`: y = Aᵀ M A, + bias,
    /// then `y·a + b` (separately rounded), ReLU, and with `pool` each tile's maximum. Channel-last into `dst`
    /// (the tile row's first output pixel): pooled, `dst[j·k + kk]`; else `dst[(a·w + x)·k + kk]` for the tile
    /// row's output rows a < `rows` (2, or 1 at an odd bottom edge) and x < w. K is a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_row(
        m: *const f32,
        (ts, ld): (usize, usize),
        k: usize,
        (j0, j1, w, rows): (usize, usize, usize, usize),
        bias: Option<&[f32]>,
        affine: Option<(&[f32], &[f32])>,
        (relu, pool): (bool, bool),
        dst: *mut f32,
    ) {
        let zero = _mm512_setzero_ps();
        let mut kk = 0;
        while kk < k {
            let vb = bias.map_or(zero, |b| _mm512_loadu_ps(b.as_ptr().add(kk)));
            let aff = affine.map(|(a, b)| {
                (
                    _mm512_loadu_ps(a.as_ptr().add(kk)),
                    _mm512_loadu_ps(b.as_ptr().add(kk)),
                )
            });
            for j in j0..j1 {
                let tile = tile_output(|p| _mm512_loadu_ps(m.add((p * ts + j - j0) * ld + kk)));
                let mut pooled = zero;
                for (a, yr) in tile.iter().enumerate().take(rows) {
                    let y = [
                        epilogue(yr[0], vb, aff, relu),
                        epilogue(yr[1], vb, aff, relu),
                    ];
                    if pool {
                        pooled = _mm512_max_ps(pooled, _mm512_max_ps(y[0], y[1]));
                        continue;
                    }
                    for (b, v) in y.iter().enumerate() {
                        let x = 2 * j + b;
                        if x < w {
                            _mm512_storeu_ps(dst.add((a * w + x) * k + kk), *v);
                        }
                    }
                }
                if pool {
                    _mm512_storeu_ps(dst.add(j * k + kk), pooled);
                }
            }
            kk += 16;
        }
    }
}

#[cfg(not(nv_x86))]
pub(super) mod x86 {
    // The driver asserts `available()`, which is false off x86-64, so none of these is reached.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn input_row(
        _: *const f32,
        _: usize,
        _: (usize, usize, usize),
        _: usize,
        _: (usize, usize),
        _: *const f32,
        _: *mut f32,
        _: (usize, usize),
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn products<const NKV: usize, const NT: usize>(
        _: usize,
        _: *const f32,
        _: *const f32,
        _: usize,
        _: *mut f32,
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn output_row(
        _: *const f32,
        _: (usize, usize),
        _: usize,
        _: (usize, usize, usize, usize),
        _: Option<&[f32]>,
        _: Option<(&[f32], &[f32])>,
        _: (bool, bool),
        _: *mut f32,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
}
