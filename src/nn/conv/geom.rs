//! The shapes of one convolution call and the per-thread workspaces of the direct paths.

use crate::kernels::gemm_avx512 as simd;
use crate::Real;

/// Per-thread scratch: the im2col matrix and private parameter-gradient accumulators.
#[derive(Debug, Clone, Default)]
pub(super) struct Workspace<T> {
    pub(super) col: Vec<T>,
    pub(super) dw: Vec<T>,
    pub(super) db: Vec<f64>,
    /// Zero-bordered padded copies of x and dy for the implicit path, with the (planes, Hp, Wp) they were
    /// zeroed for (only the interior is rewritten per sample).
    pub(super) xpad: Vec<T>,
    pub(super) xpad_key: (usize, usize, usize),
    pub(super) dypad: Vec<T>,
    pub(super) dypad_key: (usize, usize, usize),
}

/// Makes `buf` a zeroed (planes × hp × wp) buffer unless it already is one for that key (borders stay zero:
/// only interiors are ever written).
pub(super) fn ensure_padded<T: Real>(
    buf: &mut Vec<T>,
    key: &mut (usize, usize, usize),
    want: (usize, usize, usize),
) {
    if *key != want {
        buf.clear();
        buf.resize(want.0 * want.1 * want.2, T::zero());
        *key = want;
    }
}

/// The shapes of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) sh: usize,
    pub(super) sw: usize,
    pub(super) ph: usize,
    pub(super) pw: usize,
    pub(super) dh: usize,
    pub(super) dw: usize,
    pub(super) groups: usize,
}

impl Geom {
    pub(super) fn p(&self) -> usize {
        self.oh * self.ow
    }
    pub(super) fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    pub(super) fn out_size(&self) -> usize {
        self.o * self.p()
    }
    /// Rows of one group's column matrix: C/groups · kh · kw.
    pub(super) fn kdim(&self) -> usize {
        self.c / self.groups * self.kh * self.kw
    }
    pub(super) fn og(&self) -> usize {
        self.o / self.groups
    }
    /// 1×1, stride 1, no padding: the input is its own column matrix.
    pub(super) fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.sh == 1 && self.sw == 1 && self.ph == 0 && self.pw == 0
    }
    /// Stride 1, output the size of the input ("same" padding), not pointwise: the AVX-512 path reads the column
    /// matrix as shifted rows of a zero-padded copy of the image ([`implicit_offsets`]) instead of building it.
    pub(super) fn implicit(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.oh == self.h && self.ow == self.w && !self.pointwise()
    }
    /// On the implicit path, whether dx is computed implicitly too: its product has C/groups rows, padded to
    /// 8-row panels, so with fewer channels the explicit `col2im(Wᵀ·dy)` does less work.
    pub(super) fn implicit_dx(&self) -> bool {
        self.implicit() && self.c / self.groups >= simd::MR
    }
    pub(super) fn hp(&self) -> usize {
        self.h + 2 * self.ph
    }
    pub(super) fn wp(&self) -> usize {
        self.w + 2 * self.pw
    }
    /// Columns of the implicit products: output (oh, ow) is column oh·Wp + ow; ow ≥ W are discarded.
    pub(super) fn q(&self) -> usize {
        (self.h - 1) * self.wp() + self.w
    }
    /// Stride 1 and OW = W: im2col rows are shifted copies of whole planes ([`im2col_flat`]).
    pub(super) fn flat_rows(&self) -> bool {
        self.sh == 1 && self.sw == 1 && self.ow == self.w
    }
    pub(super) fn col_len(&self) -> usize {
        if self.pointwise() {
            0
        } else {
            self.c * self.kh * self.kw * self.p()
        }
    }
    /// For kernel column `kj`: the input column offset `off` (iw = ow·sw + off) and the range [lo, hi) of
    /// output columns whose input column lies inside the image.
    pub(super) fn col_range(&self, kj: usize) -> (isize, usize, usize) {
        let off = (kj * self.dw) as isize - self.pw as isize;
        let sw = self.sw as isize;
        let lo = if off >= 0 {
            0
        } else {
            ((-off + sw - 1) / sw) as usize
        };
        let last = self.w as isize - 1 - off;
        let hi = if last < 0 {
            0
        } else {
            (last / sw) as usize + 1
        };
        let lo = lo.min(self.ow);
        (off, lo, hi.min(self.ow).max(lo))
    }
}
