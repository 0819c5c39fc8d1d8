//! The AVX-512 tile transforms of Winograd F(4×4, 3×3) (see [`super`]): each padded input row split into its
//! residues mod 4 by permutes, so that column j of every tile of a row is one vector.

#![allow(unsafe_code)]
#![allow(clippy::needless_range_loop)]

/// Off x86-64 the transforms are never reached: the Winograd path applies only with AVX-512F (`applies`).
#[cfg(not(nv_x86))]
#[allow(clippy::too_many_arguments)]
pub(super) mod x86 {
    pub unsafe fn input_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn output_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn dy_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    pub unsafe fn adjoint_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
}

#[cfg(nv_x86)]
#[allow(clippy::too_many_arguments)]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn idx(v: [i32; 16]) -> __m512i {
        _mm512_loadu_si512(v.as_ptr() as *const _)
    }

    /// Lanes m = 0..7 of residue `r` of a 32-value row: element 4m + r of the pair (lo, hi).
    #[inline(always)]
    unsafe fn residue(lo: __m512, hi: __m512, r: i32) -> __m512 {
        let mut ix = [0i32; 16];
        for (m, v) in ix.iter_mut().enumerate().take(8) {
            *v = 4 * m as i32 + r;
        }
        _mm512_permutex2var_ps(lo, idx(ix), hi)
    }

    /// v shifted down one lane: lane m holds v[m + 1] (the last lane is don't-care).
    #[inline(always)]
    unsafe fn next(v: __m512) -> __m512 {
        let i = _mm512_castps_si512(v);
        _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(i, i))
    }

    /// v shifted up one lane: lane m holds v[m − 1], lane 0 zero.
    #[inline(always)]
    unsafe fn prev(v: __m512) -> __m512 {
        let i = _mm512_castps_si512(v);
        _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(i, _mm512_setzero_si512()))
    }

    /// (Bᵀ d) for the six values d: the input transform's 1-D step.
    #[inline(always)]
    unsafe fn bt(d: [__m512; 6]) -> [__m512; 6] {
        let (c4, c5, c2) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(-5.0),
            _mm512_set1_ps(2.0),
        );
        let s12 = _mm512_add_ps(d[1], d[2]);
        let s34 = _mm512_add_ps(d[3], d[4]);
        let m12 = _mm512_sub_ps(d[1], d[2]);
        let m43 = _mm512_sub_ps(d[4], d[3]);
        let m31 = _mm512_sub_ps(d[3], d[1]);
        let m42 = _mm512_sub_ps(d[4], d[2]);
        [
            _mm512_fmadd_ps(c4, d[0], _mm512_fmadd_ps(c5, d[2], d[4])),
            _mm512_fnmadd_ps(c4, s12, s34),
            _mm512_fmadd_ps(c4, m12, m43),
            _mm512_fmadd_ps(c2, m31, m42),
            _mm512_fnmadd_ps(c2, m31, m42),
            _mm512_fmadd_ps(c4, d[1], _mm512_fmadd_ps(c5, d[3], d[5])),
        ]
    }

    /// (B v): the adjoint of [`bt`] (Bᵀ's columns).
    #[inline(always)]
    unsafe fn b(v: [__m512; 6]) -> [__m512; 6] {
        let (c4, c5, c2) = (
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(-5.0),
            _mm512_set1_ps(2.0),
        );
        let s12 = _mm512_add_ps(v[1], v[2]);
        let s34 = _mm512_add_ps(v[3], v[4]);
        let m21 = _mm512_sub_ps(v[2], v[1]);
        let m43 = _mm512_sub_ps(v[4], v[3]);
        let m12 = _mm512_sub_ps(v[1], v[2]);
        let m34 = _mm512_sub_ps(v[3], v[4]);
        [
            _mm512_mul_ps(c4, v[0]),
            // 4(v2 − v1 + v5) + 2(v4 − v3)
            _mm512_fmadd_ps(c4, _mm512_add_ps(m21, v[5]), _mm512_mul_ps(c2, m43)),
            // −5 v0 − 4(v1 + v2) − (v3 + v4)
            _mm512_sub_ps(
                _mm512_fmadd_ps(
                    c5,
                    v[0],
                    _mm512_mul_ps(c4, _mm512_sub_ps(_mm512_setzero_ps(), s12)),
                ),
                s34,
            ),
            // (v1 − v2) + 2(v3 − v4) − 5 v5
            _mm512_fmadd_ps(c5, v[5], _mm512_fmadd_ps(c2, m34, m12)),
            _mm512_add_ps(_mm512_add_ps(v[0], s12), s34),
            v[5],
        ]
    }

    /// (Aᵀ m) for six values: the output transform's 1-D step (four outputs).
    #[inline(always)]
    unsafe fn at(m: [__m512; 6]) -> [__m512; 4] {
        let (c2, c4, c8) = (
            _mm512_set1_ps(2.0),
            _mm512_set1_ps(4.0),
            _mm512_set1_ps(8.0),
        );
        let s12 = _mm512_add_ps(m[1], m[2]);
        let d12 = _mm512_sub_ps(m[1], m[2]);
        let s34 = _mm512_add_ps(m[3], m[4]);
        let d34 = _mm512_sub_ps(m[3], m[4]);
        [
            _mm512_add_ps(_mm512_add_ps(m[0], s12), s34),
            _mm512_fmadd_ps(c2, d34, d12),
            _mm512_fmadd_ps(c4, s34, s12),
            _mm512_add_ps(_mm512_fmadd_ps(c8, d34, d12), m[5]),
        ]
    }

    /// (A d) for four values: the dy transform's 1-D step (six outputs).
    #[inline(always)]
    unsafe fn a(d: [__m512; 4]) -> [__m512; 6] {
        let (c2, c4) = (_mm512_set1_ps(2.0), _mm512_set1_ps(4.0));
        let s02 = _mm512_add_ps(d[0], d[2]);
        let s13 = _mm512_add_ps(d[1], d[3]);
        let u = _mm512_fmadd_ps(c4, d[2], d[0]);
        let v = _mm512_mul_ps(c2, _mm512_fmadd_ps(c4, d[3], d[1]));
        [
            d[0],
            _mm512_add_ps(s02, s13),
            _mm512_sub_ps(s02, s13),
            _mm512_add_ps(u, v),
            _mm512_sub_ps(u, v),
            d[3],
        ]
    }

    /// The tile row's six vectors p = 6·pr + pc, pc = 0..6 (the planes of p are `pstride` apart from `base`).
    #[inline(always)]
    unsafe fn load6(base: *const f32, pstride: usize, pr: usize, lanes: __mmask16) -> [__m512; 6] {
        let mut row = [_mm512_setzero_ps(); 6];
        for (pc, v) in row.iter_mut().enumerate() {
            *v = _mm512_maskz_loadu_ps(lanes, base.add((pr * 6 + pc) * pstride));
        }
        row
    }

    /// Stores `o` as the tile row's six vectors p = 6·pr + pc (the inverse of [`load6`]).
    #[inline(always)]
    unsafe fn store6(base: *mut f32, pstride: usize, pr: usize, lanes: __mmask16, o: [__m512; 6]) {
        for (pc, v) in o.into_iter().enumerate() {
            _mm512_mask_storeu_ps(base.add((pr * 6 + pc) * pstride), lanes, v);
        }
    }

    fn mask(n: usize) -> __mmask16 {
        if n >= 16 {
            0xFFFF
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    }

    /// The four residues mod 4 of padded row `r` (columns −1..31, zero outside 0..w): lane m of residue k is
    /// column 4m + k − 1. Zero vectors for rows outside 0..h.
    #[inline(always)]
    unsafe fn input_row(plane: &[f32], r: isize, h: usize, w: usize) -> [__m512; 4] {
        if r < 0 || r as usize >= h {
            return [_mm512_setzero_ps(); 4];
        }
        let row = plane.as_ptr().add(r as usize * w);
        // lanes l ↔ column l − 1 (lo) and l + 15 (hi)
        let lo_mask = mask((w + 1).min(16)) & !1;
        let hi_mask = mask(w.saturating_sub(15));
        let lo = _mm512_maskz_loadu_ps(lo_mask, row.wrapping_sub(1));
        let hi = _mm512_maskz_loadu_ps(hi_mask, row.wrapping_add(15));
        [
            residue(lo, hi, 0),
            residue(lo, hi, 1),
            residue(lo, hi, 2),
            residue(lo, hi, 3),
        ]
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        debug_assert!(w <= super::super::MAX_W && plane.len() >= h * w);
        debug_assert!(35 * pstride + dst + (th - 1) * tw + tw <= v.len());
        let sm = mask(tw);
        let out = v.as_mut_ptr();
        // rows −1.. of the current tile row, reused across the two rows shared with the next
        let mut rows: [[__m512; 4]; 6] = [[_mm512_setzero_ps(); 4]; 6];
        for (i, rw) in rows.iter_mut().enumerate() {
            *rw = input_row(plane, i as isize - 1, h, w);
        }
        for ty in 0..th {
            if ty > 0 {
                rows[0] = rows[4];
                rows[1] = rows[5];
                for i in 2..6 {
                    rows[i] = input_row(plane, (4 * ty + i) as isize - 1, h, w);
                }
            }
            // vertical: Bᵀ over the six rows, per residue
            let mut t = [[_mm512_setzero_ps(); 4]; 6];
            for k in 0..4 {
                let col = bt([
                    rows[0][k], rows[1][k], rows[2][k], rows[3][k], rows[4][k], rows[5][k],
                ]);
                for pr in 0..6 {
                    t[pr][k] = col[pr];
                }
            }
            // horizontal: column j of tile m is residue j mod 4 at lane m + j / 4
            let base = out.add(dst + ty * tw);
            for pr in 0..6 {
                let r = t[pr];
                let o = bt([r[0], r[1], r[2], r[3], next(r[0]), next(r[1])]);
                store6(base, pstride, pr, sm, o);
            }
        }
    }

    /// Interleaves four vectors (lanes m) into a row: out[4m + r] = v[r][m], as two vectors (columns 0..16, 16..32).
    #[inline(always)]
    unsafe fn interleave4(v: [__m512; 4]) -> (__m512, __m512) {
        let mut ia = [0i32; 16];
        for l in 0..16 {
            ia[l] = if l % 2 == 0 {
                (l / 2) as i32
            } else {
                16 + (l / 2) as i32
            };
        }
        let p01 = _mm512_permutex2var_ps(v[0], idx(ia), v[1]); // v0[0] v1[0] v0[1] v1[1] ...
        let p23 = _mm512_permutex2var_ps(v[2], idx(ia), v[3]);
        let (mut il, mut ih) = ([0i32; 16], [0i32; 16]);
        for l in 0..16 {
            let (m, r) = (l / 4, l % 4);
            let pick = |m: usize| {
                if r < 2 {
                    (2 * m + r) as i32
                } else {
                    16 + (2 * m + r - 2) as i32
                }
            };
            il[l] = pick(m);
            ih[l] = pick(m + 4);
        }
        (
            _mm512_permutex2var_ps(p01, idx(il), p23),
            _mm512_permutex2var_ps(p01, idx(ih), p23),
        )
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_plane(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        bias: f32,
        relu: bool,
        plane: &mut [f32],
    ) {
        debug_assert!(35 * pstride + src + (th - 1) * tw + tw <= m.len());
        debug_assert!(plane.len() >= h * w);
        let lm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let (vb, zero) = (_mm512_set1_ps(bias), _mm512_setzero_ps());
        let out = plane.as_mut_ptr();
        for ty in 0..th {
            let base = m.as_ptr().add(src + ty * tw);
            // horizontal first: per pr, Aᵀ over the six pc
            let mut hz = [[_mm512_setzero_ps(); 4]; 6];
            for pr in 0..6 {
                let row = load6(base, pstride, pr, lm);
                hz[pr] = at(row);
            }
            // vertical: Aᵀ over the six pr, per output column r: yq[r][q]
            let mut yq = [[_mm512_setzero_ps(); 4]; 4];
            for r in 0..4 {
                yq[r] = at([hz[0][r], hz[1][r], hz[2][r], hz[3][r], hz[4][r], hz[5][r]]);
            }
            for q in 0..4 {
                let yrow = 4 * ty + q;
                if yrow >= h {
                    break;
                }
                let (mut lo, mut hi) = interleave4([yq[0][q], yq[1][q], yq[2][q], yq[3][q]]);
                lo = _mm512_add_ps(lo, vb);
                hi = _mm512_add_ps(hi, vb);
                if relu {
                    lo = _mm512_max_ps(lo, zero);
                    hi = _mm512_max_ps(hi, zero);
                }
                let o = out.add(yrow * w);
                _mm512_mask_storeu_ps(o, mlo, lo);
                _mm512_mask_storeu_ps(o.wrapping_add(16), mhi, hi);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        debug_assert!(35 * pstride + dst + (th - 1) * tw + tw <= dm.len());
        let sm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let out = dm.as_mut_ptr();
        for ty in 0..th {
            // the tile row's four dy rows, each split into residues mod 4 (lane m ↔ column 4m + r)
            let mut d = [[_mm512_setzero_ps(); 4]; 4];
            for q in 0..4 {
                let r = 4 * ty + q;
                if r < h {
                    let row = plane.as_ptr().add(r * w);
                    let lo = _mm512_maskz_loadu_ps(mlo, row);
                    let hi = _mm512_maskz_loadu_ps(mhi, row.wrapping_add(16));
                    for k in 0..4 {
                        d[q][k] = residue(lo, hi, k as i32);
                    }
                }
            }
            // vertical: A over the four rows, per residue
            let mut t = [[_mm512_setzero_ps(); 4]; 6];
            for k in 0..4 {
                let col = a([d[0][k], d[1][k], d[2][k], d[3][k]]);
                for pr in 0..6 {
                    t[pr][k] = col[pr];
                }
            }
            let base = out.add(dst + ty * tw);
            for pr in 0..6 {
                let o = a(t[pr]);
                store6(base, pstride, pr, sm, o);
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_plane(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        plane: &mut [f32],
    ) {
        debug_assert!(35 * pstride + src + (th - 1) * tw + tw <= dv.len());
        debug_assert!(plane.len() >= h * w);
        let lm = mask(tw);
        let (mlo, mhi) = (mask(w.min(16)), mask(w.saturating_sub(16)));
        let out = plane.as_mut_ptr();
        // accumulated padded rows −1.. of the current tile row: residues mod 4 of columns −1..
        let mut acc = [[_mm512_setzero_ps(); 4]; 6];
        let zero = _mm512_setzero_ps();
        // writes padded row r (index r + 1 in the plane's padded numbering) if it is a real row
        let emit = |r: isize, s: [__m512; 4]| {
            if r < 0 || r as usize >= h {
                return;
            }
            // z[l] = column l − 1: interleave the residues, then drop column −1
            let (zl, zh) = interleave4(s);
            let lo = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(zh),
                _mm512_castps_si512(zl),
            ));
            let hi = _mm512_castsi512_ps(_mm512_alignr_epi32::<1>(
                _mm512_castps_si512(zero),
                _mm512_castps_si512(zh),
            ));
            let o = out.add(r as usize * w);
            _mm512_mask_storeu_ps(o, mlo, lo);
            _mm512_mask_storeu_ps(o.wrapping_add(16), mhi, hi);
        };
        for ty in 0..th {
            let base = dv.as_ptr().add(src + ty * tw);
            // horizontal: B over pc, then each window column j to residue j mod 4 at lane m + j / 4
            let mut sres = [[_mm512_setzero_ps(); 4]; 6];
            for pr in 0..6 {
                let row = load6(base, pstride, pr, lm);
                let wv = b(row);
                sres[pr] = [
                    _mm512_add_ps(wv[0], prev(wv[4])),
                    _mm512_add_ps(wv[1], prev(wv[5])),
                    wv[2],
                    wv[3],
                ];
            }
            // vertical: B over pr gives the window's six rows 4ty − 1 + i
            for k in 0..4 {
                let col = b([
                    sres[0][k], sres[1][k], sres[2][k], sres[3][k], sres[4][k], sres[5][k],
                ]);
                for i in 0..6 {
                    acc[i][k] = _mm512_add_ps(acc[i][k], col[i]);
                }
            }
            // rows 4ty − 1 .. 4ty + 2 are complete (the next tile row starts at 4ty + 3)
            for i in 0..4 {
                emit((4 * ty + i) as isize - 1, acc[i]);
            }
            acc[0] = acc[4];
            acc[1] = acc[5];
            for row in acc.iter_mut().skip(2) {
                *row = [zero; 4];
            }
        }
        // the last two window rows
        emit((4 * th) as isize - 1, acc[0]);
        emit((4 * th) as isize, acc[1]);
    }
}
