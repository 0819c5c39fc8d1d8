//! Zero-cost views of a generic `T` slice as `f32` when `T` is `f32`: how the generic layers reach the
//! hand-written `f32` kernels (the `f64` instantiation, used by gradient checks, takes the generic code).

/// `&[T]` as `&[f32]` when `T` is `f32` (`None` otherwise).
#[inline(always)]
pub fn as_f32<T: 'static>(s: &[T]) -> Option<&[f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the cast is the identity.
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len()) })
}

/// `&mut [T]` as `&mut [f32]` when `T` is `f32` (`None` otherwise).
#[inline(always)]
pub fn as_f32_mut<T: 'static>(s: &mut [T]) -> Option<&mut [f32]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the cast is the identity; the borrow is carried over.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut f32, s.len()) })
}

/// `&mut [f32]` as `&mut [T]` when `T` is `f32` (`None` otherwise).
#[inline(always)]
pub fn f32_as_mut<T: 'static>(s: &mut [f32]) -> Option<&mut [T]> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32, so the cast is the identity; the borrow is carried over.
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut T, s.len()) })
}

/// A value of `T` as `f32` when `T` is `f32`.
#[inline(always)]
pub fn val_f32<T: Copy + 'static>(v: T) -> Option<f32> {
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        // SAFETY: T is f32.
        .then(|| unsafe { std::mem::transmute_copy::<T, f32>(&v) })
}
