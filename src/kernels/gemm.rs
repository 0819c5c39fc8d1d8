//! A safe, bounds-checked front end to the `gemm` crate for row-major matrices of a [`Real`] type.
//!
//! `C (m×n) = [C +] op(A) · op(B)`, where `op(A)` is `A` (stored m×k) or `Aᵀ` (stored k×m), and likewise for `B`
//! (stored k×n, or n×k when transposed). All three matrices are dense row-major slices; `C` is written in place.

use crate::Real;

/// How a matrix multiply may use threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Par {
    /// Single-threaded (the caller parallelises at a coarser level).
    Seq,
    /// `gemm`'s own rayon parallelism with this many threads (`1` behaves like [`Par::Seq`]).
    Threads(usize),
}

impl Par {
    /// All of rayon's threads.
    pub fn all() -> Self {
        Par::Threads(rayon::current_num_threads())
    }
    fn to_gemm(self) -> gemm::Parallelism {
        match self {
            Par::Threads(n) if n > 1 => gemm::Parallelism::Rayon(n),
            _ => gemm::Parallelism::None,
        }
    }
}

/// Whether a stored operand is used as is or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

/// `c = op(a)·op(b)` (or `c += op(a)·op(b)` with `accumulate`), `c` is m×n row-major.
///
/// Panics if a slice is shorter than its dimensions require: the callers are internal and size them exactly.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Real>(
    m: usize,
    n: usize,
    k: usize,
    a: &[T],
    op_a: Op,
    b: &[T],
    op_b: Op,
    c: &mut [T],
    accumulate: bool,
    par: Par,
) {
    assert!(a.len() >= m * k, "matmul: lhs has {} < {m}x{k}", a.len());
    assert!(b.len() >= k * n, "matmul: rhs has {} < {k}x{n}", b.len());
    assert!(c.len() >= m * n, "matmul: dst has {} < {m}x{n}", c.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(T::zero());
        }
        return;
    }
    // (row stride, column stride) of op(A) (m×k) and op(B) (k×n).
    let (a_rs, a_cs) = match op_a {
        Op::N => (k as isize, 1),
        Op::T => (1, m as isize),
    };
    let (b_rs, b_cs) = match op_b {
        Op::N => (n as isize, 1),
        Op::T => (1, k as isize),
    };
    // SAFETY: the asserts above guarantee every element the strides address lies inside its slice; `c` is
    // exclusively borrowed and does not alias `a` or `b`. `T` is f32 or f64, both supported by gemm's dispatch.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par.to_gemm(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: Op, b: &[f64], tb: Op) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta == Op::N {
                        a[i * k + p]
                    } else {
                        a[p * m + i]
                    };
                    let bv = if tb == Op::N {
                        b[p * n + j]
                    } else {
                        b[j * k + p]
                    };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn all_transpose_combinations() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let b: Vec<f64> = (0..k * n).map(|i| (i as f64 * 0.11).cos()).collect();
        for ta in [Op::N, Op::T] {
            for tb in [Op::N, Op::T] {
                let want = naive(m, n, k, &a, ta, &b, tb);
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, &a, ta, &b, tb, &mut c, false, Par::Seq);
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - y).abs() < 1e-12);
                }
                let mut c = vec![1.0; m * n];
                matmul(m, n, k, &a, ta, &b, tb, &mut c, true, Par::all());
                for (x, y) in c.iter().zip(&want) {
                    assert!((x - (y + 1.0)).abs() < 1e-12);
                }
            }
        }
    }
}
