//! Parallel elementwise loops and the small shared pieces of the parallel kernels.

use crate::Real;
use rayon::prelude::*;

/// Elements below which element-wise and per-plane loops stay on the calling thread.
pub const PAR_MIN: usize = 1 << 15;

/// `out[i] = f(a[i])`, in parallel chunks when large.
pub fn map_into<T: Real>(a: &[T], out: &mut [T], f: impl Fn(T) -> T + Sync) {
    debug_assert_eq!(a.len(), out.len());
    if a.len() < PAR_MIN {
        out.iter_mut().zip(a).for_each(|(o, &v)| *o = f(v));
    } else {
        out.par_chunks_mut(PAR_MIN)
            .zip(a.par_chunks(PAR_MIN))
            .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(o, &v)| *o = f(v)));
    }
}

/// `out[i] = f(a[i], b[i])`, in parallel chunks when large.
pub fn zip_map_into<T: Real>(a: &[T], b: &[T], out: &mut [T], f: impl Fn(T, T) -> T + Sync) {
    debug_assert!(a.len() == out.len() && b.len() == out.len());
    if a.len() < PAR_MIN {
        for ((o, &u), &v) in out.iter_mut().zip(a).zip(b) {
            *o = f(u, v);
        }
    } else {
        out.par_chunks_mut(PAR_MIN)
            .zip(a.par_chunks(PAR_MIN).zip(b.par_chunks(PAR_MIN)))
            .for_each(|(o, (a, b))| {
                for ((o, &u), &v) in o.iter_mut().zip(a).zip(b) {
                    *o = f(u, v);
                }
            });
    }
}

/// Σ a[i] in f64 with eight independent partial sums (vectorisable, unlike one serial f64 chain).
pub fn sum_f64<T: Real>(a: &[T]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = a.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (s, v) in acc.iter_mut().zip(c) {
            *s += v.as_f64();
        }
    }
    let tail: f64 = rest.iter().map(|v| v.as_f64()).sum();
    acc.iter().sum::<f64>() + tail
}

/// A raw pointer that rayon tasks may share; each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
// SAFETY: the pointer is only dereferenced through `slice`, whose callers guarantee disjoint ranges.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}
impl<T> SyncPtr<T> {
    /// # Safety
    /// `off..off+len` must lie in the buffer and no other live slice may overlap it.
    #[inline(always)]
    pub unsafe fn slice<'a>(self, off: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(off), len)
    }
}

/// Values per task when a pass over every parameter runs in pieces over the threads (zeroing the gradients, an
/// optimizer step): a parameter of any size becomes tasks of at most this many values.
pub const PIECE: usize = 1 << 15;

/// The `(offset, length)` pieces of an array of `len` values, [`PIECE`] at a time.
pub fn pieces(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(PIECE)
        .map(move |off| (off, PIECE.min(len - off)))
}

/// `buf` in chunks of `len` for the tasks of a parallel loop, or `count` `None`s when there is no buffer (an
/// optional per-task output).
pub fn optional_chunks<T>(
    buf: Option<&mut [T]>,
    len: usize,
    count: usize,
) -> Vec<Option<&mut [T]>> {
    match buf {
        Some(b) => b.chunks_mut(len.max(1)).map(Some).collect(),
        None => (0..count).map(|_| None).collect(),
    }
}
