//! Recycled buffers for activations and gradients.
//!
//! An eval pass allocates the same large arrays for every batch (the reference CNN at batch 128: about 10 arrays
//! of 3-13 MB), and fresh zeroed allocations cost a `memset` each, or page faults when they come from `mmap`.
//! Layers whose kernels write every element of their output take their output buffers from here
//! ([`output_uninit`]), and a model's inference plan hands each activation back ([`recycle`]) once its last
//! reader has run. Training does not recycle, but its fresh output buffers are not zeroed either, since the
//! layer's kernel writes every element (measurements: docs/PERFORMANCE.md, "Tuning constants").
//!
//! [`output_uninit`] is `unsafe`: its caller promises to write every element before any is read. It is
//! crate-private, so no safe public function returns uninitialised memory. In debug builds (the test suite)
//! recycled and fresh output buffers are filled with NaN, so a kernel that relies on zeros in an output it does
//! not fully write fails loudly instead of reading stale data.

use ndarray::{ArrayD, IxDyn};
use std::sync::Mutex;

/// Buffers shorter than this are not pooled (their allocation is cheap).
const MIN_LEN: usize = 1 << 14;
/// At most this many floats (1 GiB) are kept; buffers beyond it are freed.
const MAX_POOLED: usize = 1 << 28;

static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// A buffer of exactly `len` floats: a recycled one (contents unspecified) or a fresh zeroed one.
pub fn take(len: usize) -> Vec<f32> {
    pooled(len).unwrap_or_else(|| vec![0.0; len])
}

/// A pooled buffer of exactly `len` floats, if the pool has one (NaN-filled in debug builds).
fn pooled(len: usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    // exact sizes only (the same shapes come back every batch), the most recently returned first: its
    // memory is the likeliest to still be in cache
    let i = pool.iter().rposition(|v| v.len() == len)?;
    let mut v = pool.swap_remove(i);
    drop(pool);
    if cfg!(debug_assertions) {
        v.fill(f32::NAN);
    }
    Some(v)
}

/// A buffer of `len` floats for a caller that writes every element before it reads any: recycled, or fresh
/// and not zeroed (see [`output_uninit`] for the contract). Zeroing a fresh training activation (3-13 MB, allocated every step) was 6-7% of a training
/// step (`perf`: `memset` under `arena::take`); the kernel's own write is the first touch instead.
///
/// Debug builds (the test suite) fill the buffer with NaN, so a caller that leaves an element unwritten fails
/// its tests instead of reading garbage.
unsafe fn take_for_overwrite(len: usize) -> Vec<f32> {
    if let Some(v) = pooled(len) {
        return v;
    }
    if cfg!(debug_assertions) {
        return vec![f32::NAN; len];
    }
    let mut v = Vec::<f32>::with_capacity(len);
    #[allow(clippy::uninit_vec)]
    // SAFETY: the caller's contract (checked by the NaN fill of debug builds) is that every element is written
    // before any is read, so no uninitialised value is ever read; f32 has no drop glue.
    unsafe {
        v.set_len(len)
    };
    v
}

/// Frees every pooled buffer. Call it after an eval pass whose batch shapes the next work will not reuse
/// (evaluation during training: the pool would otherwise keep the eval batch's activations for the rest
/// of the run).
pub fn clear() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// Returns a buffer to the pool.
pub fn give(v: Vec<f32>) {
    if v.len() < MIN_LEN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let held: usize = pool.iter().map(|b| b.capacity()).sum();
    if held + v.capacity() <= MAX_POOLED {
        pool.push(v);
    }
}

/// Hands an array's buffer back to the pool (arrays that are views into a larger buffer are just dropped).
pub fn recycle<T: 'static>(a: ArrayD<T>) {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() || !a.is_standard_layout() {
        return;
    }
    let len = a.len();
    let (v, off) = a.into_raw_vec_and_offset();
    if off.unwrap_or(0) != 0 || v.len() != len {
        return;
    }
    give(cast_vec::<T, f32>(v));
}

/// An output array of `shape` for a kernel that writes every element: for `f32` a recycled buffer or a fresh
/// one that is not zeroed (see `take_for_overwrite`); zeroed for other types.
///
/// # Safety
/// The caller writes every element of the array before any element is read.
pub unsafe fn output_uninit<T: Clone + num_traits::Zero + 'static>(shape: &[usize]) -> ArrayD<T> {
    let len = shape.iter().product();
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
        // SAFETY: passed on to our caller.
        let v = cast_vec::<f32, T>(unsafe { take_for_overwrite(len) });
        return ArrayD::from_shape_vec(IxDyn(shape), v).expect("length matches the shape");
    }
    ArrayD::zeros(IxDyn(shape))
}

/// Reinterprets a `Vec<A>` as a `Vec<B>` when A and B are the same type (checked by the callers).
fn cast_vec<A: 'static, B: 'static>(v: Vec<A>) -> Vec<B> {
    assert_eq!(std::any::TypeId::of::<A>(), std::any::TypeId::of::<B>());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: A and B are the same type, so pointer, length, capacity and layout carry over unchanged.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut B, v.len(), v.capacity()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recycled_buffers_come_back_with_the_requested_length() {
        let len = MIN_LEN * 3 + 5;
        // SAFETY: the buffers of this test are written (or not read) below.
        let mut a: ArrayD<f32> = unsafe { output_uninit(&[len]) };
        a.fill(0.0);
        assert_eq!(a.len(), len);
        recycle(a);
        // SAFETY: only the shape is read.
        let b: ArrayD<f32> = unsafe { output_uninit(&[MIN_LEN * 2, 1]) };
        assert_eq!(b.shape(), &[MIN_LEN * 2, 1]);
        // SAFETY: other types come zeroed.
        let c: ArrayD<f64> = unsafe { output_uninit(&[4, 4]) };
        assert!(c.iter().all(|&v| v == 0.0));
        recycle(c);
    }

    #[test]
    fn a_cleared_pool_serves_fresh_zeroed_buffers() {
        let len = MIN_LEN * 7 + 3; // a size no other test asks for
        give(vec![1.0; len]);
        clear();
        let v = take(len);
        assert!(
            v.iter().all(|&x| x == 0.0),
            "the cleared pool still served a buffer"
        );
    }
}
