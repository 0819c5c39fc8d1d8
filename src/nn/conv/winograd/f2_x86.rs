//! The AVX-512 tile transforms of Winograd F(2×2, 3×3): vectorised over the tiles of a tile row, on inputs split
//! into even and odd columns.

#[cfg(nv_x86)]
#[allow(clippy::needless_range_loop)] // the tile algebra reads best with explicit row/column indices
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// Even and odd lanes of the 32-lane pair (a, b).
    const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
    const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];

    #[inline(always)]
    unsafe fn idx(v: &[i32; 16]) -> __m512i {
        _mm512_loadu_si512(v.as_ptr() as *const _)
    }

    /// Distance, in floats, at which the plane transforms prefetch their (cold) input.
    const AHEAD: usize = 2048;

    /// Prefetches into L2 a plane's worth of lines [`AHEAD`] floats past the start of `plane`: called for each
    /// plane of a contiguous run of planes, it keeps the input 8 KB ahead of the transform. Without it the
    /// split of every row waited on memory (perf: the loads of the input were the transform's hottest spots).
    /// Prefetches never fault, and the address is computed with wrapping arithmetic.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_ahead(plane: &[f32]) {
        let p = plane.as_ptr().wrapping_add(AHEAD);
        let mut l = 0;
        while l < plane.len() {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(l) as *const i8);
            l += 16;
        }
    }

    /// Input tiles of one plane: its rows split into even/odd padded half-rows, then [`input_tiles`]. The `th`
    /// tile rows from tile row `row0` on (all of them: `row0 = 0`, `th` = ⌈h/2⌉).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        rows: &mut [f32],
        (row0, th): (usize, usize),
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let wl = tw + 1;
        prefetch_ahead(&plane[(2 * row0).saturating_sub(1).min(h) * w..]);
        for r in 0..2 * th + 2 {
            let (e, o) = rows[r * 2 * wl..(r + 1) * 2 * wl].split_at_mut(wl);
            // padded row r of the band is padded row 2·row0 + r of the plane, input row 2·row0 + r − 1
            let pr = 2 * row0 + r;
            if pr == 0 || pr > h {
                e.fill(0.0);
                o.fill(0.0);
            } else {
                split(&plane[(pr - 1) * w..pr * w], 1, e, o);
            }
        }
        input_tiles(rows, wl, th, tw, v, pstride, dst);
    }

    /// dM tiles of one dy plane: its rows split into even/odd half-rows, then [`dy_tiles`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_plane(
        plane: &[f32],
        h: usize,
        w: usize,
        rows: &mut [f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        prefetch_ahead(plane);
        for r in 0..2 * th {
            let (e, o) = rows[r * 2 * tw..(r + 1) * 2 * tw].split_at_mut(tw);
            if r >= h {
                e.fill(0.0);
                o.fill(0.0);
            } else {
                split(&plane[r * w..(r + 1) * w], 0, e, o);
            }
        }
        dy_tiles(rows, th, tw, dm, pstride, dst);
    }

    /// dx of one plane: the tiles' B dV Bᵀ summed into even/odd padded half-rows, then interleaved into the
    /// plane's h rows (padded column col + 1: even ones in e, odd ones in o, so a row is o[0], e[1], o[1], ...).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_plane(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
        h: usize,
        w: usize,
        plane: &mut [f32],
    ) {
        if wl <= 16 {
            adjoint_tiles_narrow(dv, pstride, src, th, tw, rows, wl);
        } else {
            rows.fill(0.0);
            adjoint_tiles(dv, pstride, src, th, tw, rows, wl);
        }
        for r in 0..h {
            let (e, o) = rows[(r + 1) * 2 * wl..(r + 2) * 2 * wl].split_at(wl);
            merge(o, &e[1..], &mut plane[r * w..(r + 1) * w]);
        }
    }

    /// Splits `src` into its even and odd columns. `shift = 0`: `e[m] = src[2m]`, `o[m] = src[2m+1]`.
    /// `shift = 1` (a zero column in front, as in the padded row): `e[0] = 0`, `o[m] = src[2m]`,
    /// `e[m+1] = src[2m+1]`. Entries past the row are zero. `e` and `o` have the same length.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn split(src: &[f32], shift: usize, e: &mut [f32], o: &mut [f32]) {
        let w = src.len();
        let len = e.len();
        let (ie, io) = (idx(&EVEN), idx(&ODD));
        let sp = src.as_ptr();
        if shift == 1 {
            *e.get_unchecked_mut(0) = 0.0;
        }
        // destinations: the even lanes of src go to `first`, the odd lanes to `second` at offset `shift`
        let (first, second): (*mut f32, *mut f32) = if shift == 1 {
            (o.as_mut_ptr(), e.as_mut_ptr().add(1))
        } else {
            (e.as_mut_ptr(), o.as_mut_ptr())
        };
        let n_first = len;
        let n_second = len - shift;
        let mut m0 = 0;
        while m0 < n_first {
            let s0 = 2 * m0;
            let a = _mm512_maskz_loadu_ps(mask(w.saturating_sub(s0)), sp.add(s0.min(w)));
            let b =
                _mm512_maskz_loadu_ps(mask(w.saturating_sub(s0 + 16)), sp.add((s0 + 16).min(w)));
            _mm512_mask_storeu_ps(
                first.add(m0),
                mask(n_first - m0),
                _mm512_permutex2var_ps(a, ie, b),
            );
            if m0 < n_second {
                _mm512_mask_storeu_ps(
                    second.add(m0),
                    mask(n_second - m0),
                    _mm512_permutex2var_ps(a, io, b),
                );
            }
            m0 += 16;
        }
    }

    /// `out = a[0], b[0], a[1], b[1], ...` (out.len() values; a and b hold at least ⌈len/2⌉ and ⌊len/2⌋).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn merge(a: &[f32], b: &[f32], out: &mut [f32]) {
        let w = out.len();
        let op = out.as_mut_ptr();
        let mut m0 = 0;
        while 2 * m0 < w {
            let va = _mm512_maskz_loadu_ps(
                mask(a.len().saturating_sub(m0)),
                a.as_ptr().add(m0.min(a.len())),
            );
            let vb = _mm512_maskz_loadu_ps(
                mask(b.len().saturating_sub(m0)),
                b.as_ptr().add(m0.min(b.len())),
            );
            let s0 = 2 * m0;
            store_interleaved(op.add(s0), va, vb, (w - s0).min(32));
            m0 += 16;
        }
    }

    use crate::kernels::gemm_avx512::{lane_mask as mask, store_interleaved};

    /// Input tiles of one plane from its even/odd padded rows (`wl` values each, row r at `rows[r·2·wl..]`,
    /// odd half after the even one); output p goes to `v[p·pstride + dst + i·tw + j]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn input_tiles(
        rows: &[f32],
        wl: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let vp = v.as_mut_ptr();
        if 2 * tw <= 16 {
            return input_tiles_paired(rows, wl, th, tw, v, pstride, dst);
        }
        // One transform column q at a time, over the whole plane: only its 4 output planes (rr·4 + q) are
        // written in the inner loop. With all 16 at once the 16 store pointers did not fit the registers and
        // were kept on the stack, each advanced with a read-modify-write per tile row.
        for (q, &(oa, ob, add)) in input_columns(wl).iter().enumerate() {
            let outs: [*mut f32; 4] =
                std::array::from_fn(|rr| vp.add((rr * 4 + q) * pstride + dst));
            for i in 0..th {
                let mut j0 = 0;
                while j0 < tw {
                    let mk = mask(tw - j0);
                    let mut ca = [_mm512_setzero_ps(); 4];
                    for (a, c) in ca.iter_mut().enumerate() {
                        let e = rp.add((2 * i + a) * 2 * wl + j0);
                        let (x, y) = (
                            _mm512_maskz_loadu_ps(mk, e.add(oa)),
                            _mm512_maskz_loadu_ps(mk, e.add(ob)),
                        );
                        *c = if add {
                            _mm512_add_ps(x, y)
                        } else {
                            _mm512_sub_ps(x, y)
                        };
                    }
                    let at = i * tw + j0;
                    _mm512_mask_storeu_ps(outs[0].add(at), mk, _mm512_sub_ps(ca[0], ca[2]));
                    _mm512_mask_storeu_ps(outs[1].add(at), mk, _mm512_add_ps(ca[1], ca[2]));
                    _mm512_mask_storeu_ps(outs[2].add(at), mk, _mm512_sub_ps(ca[2], ca[1]));
                    _mm512_mask_storeu_ps(outs[3].add(at), mk, _mm512_sub_ps(ca[1], ca[3]));
                    j0 += 16;
                }
            }
        }
    }

    /// Column q of Bᵀ d B in terms of a padded row's even (e) and odd (o) half-rows: `(offset of x, offset of
    /// y, add)`, the column value being x + y or x - y with x, y read at those offsets from e's start:
    /// q = 0: e[j] - e[j+1]; 1: o[j] + e[j+1]; 2: e[j+1] - o[j]; 3: o[j] - o[j+1] (o starts at wl).
    #[inline(always)]
    fn input_columns(wl: usize) -> [(usize, usize, bool); 4] {
        [
            (0, 1, false),
            (wl, 1, true),
            (1, wl, false),
            (wl, wl + 1, false),
        ]
    }

    /// [`input_tiles`] for planes whose tile rows fit two to a vector (2·tw ≤ 16, as the 14×14 layers' 7):
    /// tile rows i and i + 1 share one vector (lanes 0..tw and tw..2·tw), which halves the transform's
    /// iterations and stores. Their outputs are contiguous in V (index i·tw + j), so one store covers both.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn input_tiles_paired(
        rows: &[f32],
        wl: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let vp = v.as_mut_ptr();
        let lo = mask(tw);
        for (q, &(oa, ob, add)) in input_columns(wl).iter().enumerate() {
            let outs: [*mut f32; 4] =
                std::array::from_fn(|rr| vp.add((rr * 4 + q) * pstride + dst));
            let mut i = 0;
            while i < th {
                let pair = (th - i).min(2);
                let mk = mask(pair * tw);
                let hi = mk & !lo;
                let mut ca = [_mm512_setzero_ps(); 4];
                for (a, c) in ca.iter_mut().enumerate() {
                    let e = rp.add((2 * i + a) * 2 * wl);
                    // the same row of tile row i + 1 is two padded rows further down; offset so that its
                    // first value lands in lane tw (lanes below tw are masked off, so nothing before it is read)
                    let e2 = e.wrapping_add(2 * 2 * wl).wrapping_sub(tw);
                    let ld = |off: usize| {
                        _mm512_mask_loadu_ps(
                            _mm512_maskz_loadu_ps(lo, e.add(off)),
                            hi,
                            e2.wrapping_add(off),
                        )
                    };
                    let (x, y) = (ld(oa), ld(ob));
                    *c = if add {
                        _mm512_add_ps(x, y)
                    } else {
                        _mm512_sub_ps(x, y)
                    };
                }
                let at = i * tw;
                _mm512_mask_storeu_ps(outs[0].add(at), mk, _mm512_sub_ps(ca[0], ca[2]));
                _mm512_mask_storeu_ps(outs[1].add(at), mk, _mm512_add_ps(ca[1], ca[2]));
                _mm512_mask_storeu_ps(outs[2].add(at), mk, _mm512_sub_ps(ca[2], ca[1]));
                _mm512_mask_storeu_ps(outs[3].add(at), mk, _mm512_sub_ps(ca[1], ca[3]));
                i += 2;
            }
        }
    }

    /// y = Aᵀ M A of a tile from its 16 products `load(p)`, as rows a of columns b: the row sums of each column
    /// q first ((m0 + m1) + m2 and (m1 - m2) - m3), then the column sums of each row. Every F(2×2) output pass
    /// (planar and channel-last) computes its tiles with this, so they round alike.
    #[inline(always)]
    pub(in crate::nn::conv::winograd) unsafe fn tile_output(
        load: impl Fn(usize) -> __m512,
    ) -> [[__m512; 2]; 2] {
        let zero = _mm512_setzero_ps();
        let mut s0 = [zero; 4];
        let mut s1 = [zero; 4];
        for q in 0..4 {
            let (m0, m1, m2, m3) = (load(q), load(4 + q), load(8 + q), load(12 + q));
            s0[q] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
            s1[q] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
        }
        let cols = |s: &[__m512; 4]| {
            [
                _mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]),
                _mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]),
            ]
        };
        [cols(&s0), cols(&s1)]
    }

    /// The output pass's epilogue of one vector: + bias, then the eval BatchNorm's `y·a + b` (a rounded
    /// product, then a rounded sum, as its own pass computes it), then max(·, 0).
    #[inline(always)]
    pub(in crate::nn::conv::winograd) unsafe fn epilogue(
        y: __m512,
        bias: __m512,
        affine: Option<(__m512, __m512)>,
        relu: bool,
    ) -> __m512 {
        let mut y = _mm512_add_ps(y, bias);
        if let Some((a, b)) = affine {
            y = _mm512_add_ps(_mm512_mul_ps(y, a), b);
        }
        if relu {
            y = _mm512_max_ps(y, _mm512_setzero_ps());
        }
        y
    }

    /// [`output_tiles`] for planes whose tile rows fit two to a vector (2·tw ≤ 16): tile rows i and i + 1
    /// are loaded from M with one load per transform plane and transformed together; their output rows
    /// (2i, 2i + 1 and 2i + 2, 2i + 3) are written from the low and the shifted-down high lanes.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn output_tiles_paired(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        b: f32,
        affine: Option<(f32, f32)>,
        relu: bool,
        pool: bool,
        plane: &mut [f32],
    ) {
        let aff = affine.map(|(a, ab)| (_mm512_set1_ps(a), _mm512_set1_ps(ab)));
        let mp = m.as_ptr();
        let yp = plane.as_mut_ptr();
        let vb = _mm512_set1_ps(b);
        let zero = _mm512_setzero_ps();
        // lane j ← lane j + tw: tile row i + 1 moved down to lanes 0..tw
        let down = _mm512_add_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(tw as i32),
        );
        let mut i = 0;
        while i < th {
            let pair = (th - i).min(2);
            let mk = mask(pair * tw);
            let base = src + i * tw;
            let tile = tile_output(|p| _mm512_maskz_loadu_ps(mk, mp.add(p * pstride + base)));
            let mut pooled = zero;
            for (a, yr) in tile.iter().enumerate() {
                let y0 = epilogue(yr[0], vb, aff, relu);
                let y1 = epilogue(yr[1], vb, aff, relu);
                if pool {
                    // after the ReLU every value is +0 or positive, so the maximum is exact in any order
                    pooled = _mm512_max_ps(pooled, _mm512_max_ps(y0, y1));
                    continue;
                }
                let row = 2 * i + a;
                if row < h {
                    store_interleaved(yp.add(row * w), y0, y1, w);
                }
                if pair == 2 && row + 2 < h {
                    let (d0, d1) = (
                        _mm512_permutexvar_ps(down, y0),
                        _mm512_permutexvar_ps(down, y1),
                    );
                    store_interleaved(yp.add((row + 2) * w), d0, d1, w);
                }
            }
            if pool {
                // pooled rows i and i + 1 (tw values each) are contiguous in the (H/2) × (W/2) plane
                _mm512_mask_storeu_ps(yp.add(i * tw), mk, pooled);
            }
            i += 2;
        }
    }

    /// Output tiles of one plane: y = Aᵀ M A (+ b, ReLU), interleaved back into rows of `w` values.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn output_tiles(
        m: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        h: usize,
        w: usize,
        b: f32,
        affine: Option<(f32, f32)>,
        relu: bool,
        pool: bool,
        plane: &mut [f32],
    ) {
        if 2 * tw <= 16 {
            return output_tiles_paired(
                m, pstride, src, th, tw, h, w, b, affine, relu, pool, plane,
            );
        }
        let aff = affine.map(|(a, ab)| (_mm512_set1_ps(a), _mm512_set1_ps(ab)));
        let mp = m.as_ptr();
        let yp = plane.as_mut_ptr();
        let vb = _mm512_set1_ps(b);
        let zero = _mm512_setzero_ps();
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let cnt = (tw - j0).min(16);
                let mk = mask(cnt);
                let base = src + i * tw + j0;
                let tile = tile_output(|p| _mm512_maskz_loadu_ps(mk, mp.add(p * pstride + base)));
                let ncols = (w - 2 * j0).min(2 * cnt);
                let mut pooled = zero;
                for (a, yr) in tile.iter().enumerate() {
                    let row = 2 * i + a;
                    if row >= h {
                        break;
                    }
                    let y0 = epilogue(yr[0], vb, aff, relu);
                    let y1 = epilogue(yr[1], vb, aff, relu);
                    if pool {
                        // after the ReLU every value is +0 or positive, so the maximum is exact in any order
                        pooled = _mm512_max_ps(pooled, _mm512_max_ps(y0, y1));
                    } else {
                        store_interleaved(yp.add(row * w + 2 * j0), y0, y1, ncols);
                    }
                }
                if pool {
                    _mm512_mask_storeu_ps(yp.add(i * tw + j0), mk, pooled);
                }
                j0 += 16;
            }
        }
    }

    /// dM tiles of one dy plane from its even/odd rows (`tw` values each, no padding).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dy_tiles(
        rows: &[f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let dp = dm.as_mut_ptr();
        if 2 * tw <= 16 {
            return dy_tiles_paired(rows, th, tw, dm, pstride, dst);
        }
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let mk = mask(tw - j0);
                let r0 = rp.add(2 * i * 2 * tw + j0);
                let r1 = rp.add((2 * i + 1) * 2 * tw + j0);
                let (e0, o0) = (
                    _mm512_maskz_loadu_ps(mk, r0),
                    _mm512_maskz_loadu_ps(mk, r0.add(tw)),
                );
                let (e1, o1) = (
                    _mm512_maskz_loadu_ps(mk, r1),
                    _mm512_maskz_loadu_ps(mk, r1.add(tw)),
                );
                let zero = _mm512_setzero_ps();
                // rows of A g: (e0, o0), (e0+e1, o0+o1), (e0-e1, o0-o1), (-e1, -o1)
                let rws = [
                    (e0, o0),
                    (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                    (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                    (_mm512_sub_ps(zero, e1), _mm512_sub_ps(zero, o1)),
                ];
                let base = dst + i * tw + j0;
                for (r, (a, b)) in rws.iter().enumerate() {
                    let vals = [
                        *a,
                        _mm512_add_ps(*a, *b),
                        _mm512_sub_ps(*a, *b),
                        _mm512_sub_ps(zero, *b),
                    ];
                    for (q, val) in vals.iter().enumerate() {
                        _mm512_mask_storeu_ps(dp.add((r * 4 + q) * pstride + base), mk, *val);
                    }
                }
                j0 += 16;
            }
        }
    }

    /// [`dy_tiles`] with two tile rows per vector when they fit (2·tw ≤ 16), as [`input_tiles_paired`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn dy_tiles_paired(
        rows: &[f32],
        th: usize,
        tw: usize,
        dm: &mut [f32],
        pstride: usize,
        dst: usize,
    ) {
        let rp = rows.as_ptr();
        let dp = dm.as_mut_ptr();
        let lo = mask(tw);
        let zero = _mm512_setzero_ps();
        let mut i = 0;
        while i < th {
            let pair = (th - i).min(2);
            let mk = mask(pair * tw);
            let hi = mk & !lo;
            // half-row p of tile row i in lanes 0..tw, the same half-row of tile row i + 1 (two rows of 2·tw
            // values further on) in lanes tw..2·tw
            let ld = |p: *const f32| {
                let q = p.wrapping_add(2 * 2 * tw).wrapping_sub(tw);
                _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(lo, p), hi, q)
            };
            let r0 = rp.add(2 * i * 2 * tw);
            let r1 = rp.add((2 * i + 1) * 2 * tw);
            let (e0, o0) = (ld(r0), ld(r0.add(tw)));
            let (e1, o1) = (ld(r1), ld(r1.add(tw)));
            // rows of A g: (e0, o0), (e0+e1, o0+o1), (e0-e1, o0-o1), (-e1, -o1)
            let rws = [
                (e0, o0),
                (_mm512_add_ps(e0, e1), _mm512_add_ps(o0, o1)),
                (_mm512_sub_ps(e0, e1), _mm512_sub_ps(o0, o1)),
                (_mm512_sub_ps(zero, e1), _mm512_sub_ps(zero, o1)),
            ];
            let base = dst + i * tw;
            for (r, (a, b)) in rws.iter().enumerate() {
                let vals = [
                    *a,
                    _mm512_add_ps(*a, *b),
                    _mm512_sub_ps(*a, *b),
                    _mm512_sub_ps(zero, *b),
                ];
                for (q, val) in vals.iter().enumerate() {
                    _mm512_mask_storeu_ps(dp.add((r * 4 + q) * pstride + base), mk, *val);
                }
            }
            i += 2;
        }
    }

    /// [`adjoint_tiles`] for planes whose padded half-rows fit one vector (`wl = tw + 1 <= 16`, W <= 30): the
    /// overlapping contributions are summed in registers (the shift by one column with a lane rotation, the
    /// two rows shared with the next tile row carried to it) and every row is stored once. Read-modify-writes
    /// of overlapping, misaligned masked stores would wait on failed store forwarding instead.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_tiles_narrow(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
    ) {
        let vp = dv.as_ptr();
        let rp = rows.as_mut_ptr();
        let mk = mask(tw);
        let mw = mask(wl);
        let zero = _mm512_setzero_ps();
        // lane j -> lane j + 1 (lane 0 gets 0); lane tw - 1 lands in lane tw < wl <= 16
        let shift1 = |v: __m512| {
            _mm512_castsi512_ps(_mm512_alignr_epi32::<15>(
                _mm512_castps_si512(v),
                _mm512_castps_si512(zero),
            ))
        };
        let mut carry = [(zero, zero); 2];
        for i in 0..th {
            let base = src + i * tw;
            let mut dr = [[zero; 4]; 4];
            for q in 0..4 {
                let ld = |p: usize| _mm512_maskz_loadu_ps(mk, vp.add(p * pstride + base));
                let (v0, v1, v2, v3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                dr[0][q] = v0;
                dr[1][q] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
                dr[2][q] = _mm512_sub_ps(_mm512_add_ps(v1, v2), v0);
                dr[3][q] = _mm512_sub_ps(zero, v3);
            }
            for (a, c) in dr.iter().enumerate() {
                let x0 = c[0];
                let x1 = _mm512_add_ps(_mm512_sub_ps(c[1], c[2]), c[3]);
                let x2 = _mm512_sub_ps(_mm512_add_ps(c[1], c[2]), c[0]);
                // e[j] += x0[j], e[j+1] += x2[j]; o[j] += x1[j], o[j+1] -= c3[j]
                let e = _mm512_add_ps(x0, shift1(x2));
                let o = _mm512_sub_ps(x1, shift1(c[3]));
                if a < 2 {
                    let r = rp.add((2 * i + a) * 2 * wl);
                    _mm512_mask_storeu_ps(r, mw, _mm512_add_ps(carry[a].0, e));
                    _mm512_mask_storeu_ps(r.add(wl), mw, _mm512_add_ps(carry[a].1, o));
                } else {
                    carry[a - 2] = (e, o);
                }
            }
        }
        for (a, (e, o)) in carry.iter().enumerate() {
            let r = rp.add((2 * th + a) * 2 * wl);
            _mm512_mask_storeu_ps(r, mw, *e);
            _mm512_mask_storeu_ps(r.add(wl), mw, *o);
        }
    }

    /// Adds B dV Bᵀ of every tile of one plane into its even/odd padded rows (`wl` values each).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn adjoint_tiles(
        dv: &[f32],
        pstride: usize,
        src: usize,
        th: usize,
        tw: usize,
        rows: &mut [f32],
        wl: usize,
    ) {
        let vp = dv.as_ptr();
        let rp = rows.as_mut_ptr();
        for i in 0..th {
            let mut j0 = 0;
            while j0 < tw {
                let mk = mask(tw - j0);
                let base = src + i * tw + j0;
                let ld = |p: usize| _mm512_maskz_loadu_ps(mk, vp.add(p * pstride + base));
                // row adjoint per column q: dR0 = dV0, dR1 = dV1 - dV2 + dV3, dR2 = dV1 + dV2 - dV0, dR3 = -dV3
                let mut dr = [[_mm512_setzero_ps(); 4]; 4]; // dr[a][q]
                for q in 0..4 {
                    let (v0, v1, v2, v3) = (ld(q), ld(4 + q), ld(8 + q), ld(12 + q));
                    dr[0][q] = v0;
                    dr[1][q] = _mm512_add_ps(_mm512_sub_ps(v1, v2), v3);
                    dr[2][q] = _mm512_sub_ps(_mm512_add_ps(v1, v2), v0);
                    dr[3][q] = _mm512_sub_ps(_mm512_setzero_ps(), v3);
                }
                for (a, c) in dr.iter().enumerate() {
                    // column adjoint: dX0 = c0, dX1 = c1 - c2 + c3, dX2 = c1 + c2 - c0, dX3 = -c3
                    let x0 = c[0];
                    let x1 = _mm512_add_ps(_mm512_sub_ps(c[1], c[2]), c[3]);
                    let x2 = _mm512_sub_ps(_mm512_add_ps(c[1], c[2]), c[0]);
                    let x3 = c[3];
                    let e = rp.add((2 * i + a) * 2 * wl + j0);
                    let o = e.add(wl);
                    _mm512_mask_storeu_ps(e, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, e), x0));
                    _mm512_mask_storeu_ps(o, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, o), x1));
                    let e1 = e.add(1);
                    let o1 = o.add(1);
                    _mm512_mask_storeu_ps(e1, mk, _mm512_add_ps(_mm512_maskz_loadu_ps(mk, e1), x2));
                    _mm512_mask_storeu_ps(o1, mk, _mm512_sub_ps(_mm512_maskz_loadu_ps(mk, o1), x3));
                }
                j0 += 16;
            }
        }
    }
}

#[cfg(not(nv_x86))]
pub(super) mod x86 {
    // The public entry points assert `available()`, which is false off x86-64, so these are never reached.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn input_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: (usize, usize),
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dy_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn adjoint_plane(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn output_tiles(
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: Option<(f32, f32)>,
        _: bool,
        _: bool,
        _: &mut [f32],
    ) {
        unreachable!("Winograd kernels need AVX-512F")
    }
}
