//! Hand-written AVX-512 f32 GEMM kernels for the convolution shapes (few output rows, long rows), used when the
//! CPU has AVX-512F; everything else goes through the `gemm` crate ([`super::gemm`]).
//!
//! Two kernels, both on row-major data without transposes:
//!
//! - [`gemm_nn`]: `C (m×n) (+)= A·B` with `A` packed by [`pack_a`] into 8-row panels (k × 8, zero-padded) and `B`
//!   row-major with leading dimension `ldb`. Register tile 8 rows × 48 columns (24 zmm accumulators); the last
//!   column vector of a row is masked, so `n` need not be a multiple of 16. Forward (`W·col`) and the data
//!   gradient (`Wᵀ·dy`).
//! - [`gemm_nt`]: `C (m×n) (+)= A·Bᵀ` where both `A` (m×len) and `B` (n×len) are row-major along the reduction
//!   dimension: dot products in a 4×6 register tile, reduced horizontally at the end. The weight gradient
//!   (`dy·colᵀ`), without transposing either operand.
//!
//! The `*_rows` variants take the start of every B row from an offset table instead of a stride: row p of B is
//! `b[offs[p]..offs[p] + n]`. Rows may overlap, which is how the convolution reads shifted views of a padded
//! image as the rows of its column matrix without building it (implicit im2col).
//!
//! The public functions check every bound before entering `unsafe` code.

/// Rows of an A panel of [`gemm_nn`].
pub const MR: usize = 8;

/// The mask of the first `cnt` lanes of a 16-lane vector (all of them for `cnt >= 16`): the tails of the
/// project's AVX-512 kernels (GEMM, Winograd, pooling, the single-channel convolution).
#[cfg(nv_x86)]
#[inline(always)]
pub(crate) fn lane_mask(cnt: usize) -> std::arch::x86_64::__mmask16 {
    if cnt >= 16 {
        0xFFFF
    } else {
        ((1u32 << cnt) - 1) as std::arch::x86_64::__mmask16
    }
}

/// Stores the first `count` (at most 32) values of the interleaving `a[0], b[0], a[1], b[1], …` at `p`: the
/// even/odd column merge of the Winograd output and data-gradient transforms and of the max-pool backward.
///
/// # Safety
/// AVX-512F must be available, and `p..p + count` must be valid for writes.
#[cfg(nv_x86)]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn store_interleaved(
    p: *mut f32,
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
    count: usize,
) {
    use std::arch::x86_64::*;
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    _mm512_mask_storeu_ps(p, lane_mask(count), _mm512_permutex2var_ps(a, lo, b));
    if count > 16 {
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        _mm512_mask_storeu_ps(
            p.add(16),
            lane_mask(count - 16),
            _mm512_permutex2var_ps(a, hi, b),
        );
    }
}

/// Whether the kernels can run on this CPU (AVX-512F, checked once).
pub fn available() -> bool {
    #[cfg(nv_x86)]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(nv_x86))]
    {
        false
    }
}

/// Length of the packed form of an m×k matrix.
pub fn packed_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k
}

/// Packs op(A) (m×k, element (i, p) at `a[i·rs + p·cs]`) into `out` as ⌈m/8⌉ panels of k×8, rows past m zero.
pub fn pack_a(m: usize, k: usize, a: &[f32], rs: usize, cs: usize, out: &mut Vec<f32>) {
    if m > 0 && k > 0 {
        assert!(
            (m - 1) * rs + (k - 1) * cs < a.len(),
            "pack_a: source too short"
        );
    }
    out.clear();
    out.resize(packed_len(m, k), 0.0);
    if k == 0 {
        return;
    }
    for (pi, panel) in out.chunks_exact_mut(MR * k).enumerate() {
        for r in 0..MR {
            let i = pi * MR + r;
            if i >= m {
                break;
            }
            for p in 0..k {
                panel[p * MR + r] = a[i * rs + p * cs];
            }
        }
    }
}

/// Packs an m×k matrix given element-wise by `at(i, p)` (see [`pack_a`]).
pub fn pack_a_with(m: usize, k: usize, at: impl Fn(usize, usize) -> f32, out: &mut Vec<f32>) {
    out.clear();
    out.resize(packed_len(m, k), 0.0);
    if k == 0 {
        return;
    }
    for (pi, panel) in out.chunks_exact_mut(MR * k).enumerate() {
        for r in 0..MR.min(m.saturating_sub(pi * MR)) {
            for p in 0..k {
                panel[p * MR + r] = at(pi * MR + r, p);
            }
        }
    }
}

/// `C (m×n) = [C +] A·B`: `ap` from [`pack_a`] (m×k), `b` k×n with row stride `ldb`, `c` with row stride `ldc`.
/// Panics if a slice is too short or the CPU lacks AVX-512F.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn(
    m: usize,
    n: usize,
    k: usize,
    ap: &[f32],
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let offs: Vec<usize> = (0..k).map(|p| p * ldb).collect();
    gemm_nn_rows(m, n, k, ap, b, &offs, c, ldc, accumulate)
}

/// [`gemm_nn`] with row p of B at `b[offs[p]..offs[p] + n]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nn_rows(
    m: usize,
    n: usize,
    k: usize,
    ap: &[f32],
    b: &[f32],
    offs: &[usize],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(available(), "gemm_nn needs AVX-512F");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ap.len() >= packed_len(m, k), "gemm_nn: packed A too short");
    assert!(
        offs.len() >= k,
        "gemm_nn: {} row offsets for k = {k}",
        offs.len()
    );
    assert!(
        offs[..k].iter().all(|&o| o + n <= b.len()),
        "gemm_nn: a B row runs past the end"
    );
    assert!(n <= ldc || m == 1, "gemm_nn: ldc < n");
    assert!((m - 1) * ldc + n <= c.len(), "gemm_nn: C too short");
    #[cfg(nv_x86)]
    // SAFETY: AVX-512F is available (asserted); the asserts above bound every address the kernels touch:
    // panel rows < packed_len, B rows offs[p] + (column < n, masked), C rows < m with columns < n (masked).
    unsafe {
        x86::gemm_nn(
            m,
            n,
            k,
            ap.as_ptr(),
            b.as_ptr(),
            offs.as_ptr(),
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// `C (m×n) = [C +] A·Bᵀ` with `A` m×len (row stride `lda`), `B` n×len (row stride `ldb`), `C` row stride `ldc`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt(
    m: usize,
    n: usize,
    len: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let offs: Vec<usize> = (0..n).map(|j| j * ldb).collect();
    gemm_nt_rows(m, n, len, a, lda, b, &offs, c, ldc, accumulate)
}

/// [`gemm_nt`] with row j of B at `b[offs[j]..offs[j] + len]`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_rows(
    m: usize,
    n: usize,
    len: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    offs: &[usize],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    gemm_nt_rows_multi(m, n, len, &[a], lda, &[b], offs, c, ldc, accumulate)
}

/// `C (m×n) = [C +] Σ_s A_s·B_sᵀ`: [`gemm_nt_rows`] summed over several (A, B) pairs of the same layout (the
/// samples of a weight gradient). Each output's dot products over all pairs accumulate in the same registers
/// and are reduced horizontally once, instead of once per pair.
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_rows_multi(
    m: usize,
    n: usize,
    len: usize,
    a: &[&[f32]],
    lda: usize,
    b: &[&[f32]],
    offs: &[usize],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(available(), "gemm_nt needs AVX-512F");
    assert_eq!(a.len(), b.len(), "gemm_nt: as many A as B operands");
    if m == 0 || n == 0 || a.is_empty() {
        return;
    }
    assert!(
        offs.len() >= n,
        "gemm_nt: {} row offsets for n = {n}",
        offs.len()
    );
    for (a, b) in a.iter().zip(b) {
        assert!((m - 1) * lda + len <= a.len(), "gemm_nt: A too short");
        assert!(
            offs[..n].iter().all(|&o| o + len <= b.len()),
            "gemm_nt: a B row runs past the end"
        );
    }
    assert!(
        (m - 1) * ldc + n <= c.len() && (n <= ldc || m == 1),
        "gemm_nt: C too short"
    );
    let ap: Vec<*const f32> = a.iter().map(|s| s.as_ptr()).collect();
    let bp: Vec<*const f32> = b.iter().map(|s| s.as_ptr()).collect();
    #[cfg(nv_x86)]
    // SAFETY: AVX-512F is available; rows of every A (< m) and B (< n) are read over [0, len) only (masked
    // tail), which the asserts above bound; C is written at rows < m, columns < n.
    unsafe {
        x86::gemm_nt(
            m,
            n,
            len,
            &ap,
            lda,
            &bp,
            offs.as_ptr(),
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

#[cfg(nv_x86)]
mod x86 {
    use super::MR;
    use std::arch::x86_64::*;

    /// Columns of the gemm_nn register tile (3 vectors).
    const NR: usize = 48;

    use super::lane_mask as tail_mask;

    /// One 8×(16·NV) tile over the whole reduction; the last vector of each row is masked by `last`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_nn<const NV: usize>(
        k: usize,
        a: *const f32,
        b: *const f32,
        offs: *const usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        last: __mmask16,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let mut ap = a;
        for p in 0..k {
            let bp = b.add(*offs.add(p));
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                let m = if v + 1 == NV { last } else { 0xFFFF };
                *x = _mm512_maskz_loadu_ps(m, bp.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*ap.add(i));
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(av, bv[v], *x);
                }
            }
            ap = ap.add(MR);
        }
        for (i, row) in acc.iter().enumerate().take(rows) {
            for (v, x) in row.iter().enumerate() {
                let m = if v + 1 == NV { last } else { 0xFFFF };
                let p = c.add(i * ldc + 16 * v);
                let mut r = *x;
                if accumulate {
                    r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, p));
                }
                _mm512_mask_storeu_ps(p, m, r);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_nn(
        m: usize,
        n: usize,
        k: usize,
        ap: *const f32,
        b: *const f32,
        offs: *const usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            let w = (n - j).min(NR);
            let nv = w.div_ceil(16);
            let last = tail_mask(w - 16 * (nv - 1));
            let mut i = 0;
            while i < m {
                let rows = (m - i).min(MR);
                let a = ap.add(i * k);
                let bj = b.add(j);
                let cij = c.add(i * ldc + j);
                match nv {
                    3 => tile_nn::<3>(k, a, bj, offs, cij, ldc, rows, last, accumulate),
                    2 => tile_nn::<2>(k, a, bj, offs, cij, ldc, rows, last, accumulate),
                    _ => tile_nn::<1>(k, a, bj, offs, cij, ldc, rows, last, accumulate),
                }
                i += MR;
            }
            j += NR;
        }
    }

    const TA: usize = 4;
    const TB: usize = 6;

    /// Dot products of TA rows of A with TB rows of B over `len`, summed over the `pairs` (A, B) bases (row
    /// offsets `ar` into each A, `boffs` into each B); returns the TA×TB sums.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_nt(
        len: usize,
        a_bases: &[*const f32],
        ar: [usize; TA],
        b_bases: &[*const f32],
        boffs: [usize; TB],
    ) -> [[f32; TB]; TA] {
        let mut acc = [[_mm512_setzero_ps(); TB]; TA];
        let full = len / 16;
        for (&abase, &bbase) in a_bases.iter().zip(b_bases) {
            let a: [*const f32; TA] = std::array::from_fn(|t| abase.add(ar[t]));
            let b: [*const f32; TB] = std::array::from_fn(|t| bbase.add(boffs[t]));
            let mut off = 0;
            for _ in 0..full {
                let mut bv = [_mm512_setzero_ps(); TB];
                for (x, p) in bv.iter_mut().zip(b) {
                    *x = _mm512_loadu_ps(p.add(off));
                }
                for (row, p) in acc.iter_mut().zip(a) {
                    let av = _mm512_loadu_ps(p.add(off));
                    for (x, y) in row.iter_mut().zip(bv) {
                        *x = _mm512_fmadd_ps(av, y, *x);
                    }
                }
                off += 16;
            }
            if off < len {
                let m = tail_mask(len - off);
                let mut bv = [_mm512_setzero_ps(); TB];
                for (x, p) in bv.iter_mut().zip(b) {
                    *x = _mm512_maskz_loadu_ps(m, p.add(off));
                }
                for (row, p) in acc.iter_mut().zip(a) {
                    let av = _mm512_maskz_loadu_ps(m, p.add(off));
                    for (x, y) in row.iter_mut().zip(bv) {
                        *x = _mm512_fmadd_ps(av, y, *x);
                    }
                }
            }
        }
        let mut out = [[0f32; TB]; TA];
        for (o, row) in out.iter_mut().zip(acc) {
            for (s, x) in o.iter_mut().zip(row) {
                *s = _mm512_reduce_add_ps(x);
            }
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemm_nt(
        m: usize,
        n: usize,
        len: usize,
        a: &[*const f32],
        lda: usize,
        b: &[*const f32],
        offs: *const usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            let nb = (n - j).min(TB);
            // rows past the end repeat the last valid row; their results are discarded
            let boffs: [usize; TB] = std::array::from_fn(|t| *offs.add(j + t.min(nb - 1)));
            let mut i = 0;
            while i < m {
                let na = (m - i).min(TA);
                let ar: [usize; TA] = std::array::from_fn(|t| (i + t.min(na - 1)) * lda);
                let out = tile_nt(len, a, ar, b, boffs);
                for (r, o) in out.iter().enumerate().take(na) {
                    let crow = c.add((i + r) * ldc + j);
                    for (t, &v) in o.iter().enumerate().take(nb) {
                        let d = crow.add(t);
                        *d = if accumulate { *d + v } else { v };
                    }
                }
                i += TA;
            }
            j += TB;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn kernels_match_naive_products() {
        if !available() {
            return;
        }
        for &(m, n, k) in &[
            (1, 1, 1),
            (8, 48, 5),
            (9, 50, 3),
            (32, 784, 36),
            (3, 17, 0),
            (13, 97, 29),
            (64, 196, 40),
        ] {
            let a = lcg(m * k.max(1), 1);
            let ldb = n + 3;
            let b = lcg(k.max(1) * ldb, 2);
            let ldc = n + 1;
            let mut ap = Vec::new();
            pack_a(m, k, &a, k, 1, &mut ap);
            for accumulate in [false, true] {
                let mut c = lcg(m * ldc, 3);
                let c0 = c.clone();
                gemm_nn(m, n, k, &ap, &b, ldb, &mut c, ldc, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let mut s = if accumulate {
                            c0[i * ldc + j] as f64
                        } else {
                            0.0
                        };
                        for p in 0..k {
                            s += a[i * k + p] as f64 * b[p * ldb + j] as f64;
                        }
                        assert!(
                            (c[i * ldc + j] as f64 - s).abs() < 1e-4,
                            "nn {m}x{n}x{k} at ({i},{j})"
                        );
                    }
                    if ldc > n {
                        assert_eq!(c[i * ldc + n], c0[i * ldc + n], "nn wrote past n");
                    }
                }
            }
            // A·Bᵀ with B stored n×k
            let bt = lcg(n * (k + 2), 4);
            for accumulate in [false, true] {
                let mut c = lcg(m * ldc, 5);
                let c0 = c.clone();
                gemm_nt(m, n, k, &a, k, &bt, k + 2, &mut c, ldc, accumulate);
                for i in 0..m {
                    for j in 0..n {
                        let mut s = if accumulate {
                            c0[i * ldc + j] as f64
                        } else {
                            0.0
                        };
                        for p in 0..k {
                            s += a[i * k + p] as f64 * bt[j * (k + 2) + p] as f64;
                        }
                        assert!(
                            (c[i * ldc + j] as f64 - s).abs() < 1e-4,
                            "nt {m}x{n}x{k} at ({i},{j})"
                        );
                    }
                }
            }
        }
    }
}
