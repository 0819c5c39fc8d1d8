//! Kernels compiled once per instruction set and chosen at run time, so that one build runs on every x86-64 CPU
//! and at full speed on each: no `-C target-cpu=native` is needed, and a crate that depends on normvision gets
//! the same kernels.
//!
//! Two macros write the versions. Both take a generic kernel whose signature names two const flags, the first
//! for AVX2 and FMA and the second for AVX-512F, and make a function that takes an [`Isa`](crate::Isa) first and runs the
//! body compiled with that set's target features, after lowering the request to what this CPU has
//! ([`Isa::usable`](crate::Isa::usable)), so that no safe call can reach an instruction the CPU lacks. Bodies take their
//! explicit-intrinsics paths under the flags.
//!
//! - [`isa_fn!`] copies the body into one `#[target_feature]` function per set. Closures written in the body
//!   (the tasks a kernel hands to rayon) inherit the features, so a whole parallel kernel is compiled for the
//!   set. For kernel entry points.
//! - [`isa_leaf!`] also makes the body callable as a generic `#[inline(always)]` function of the flags, so
//!   that a kernel already compiled for a set calls a leaf loop with no dispatch at all. For the lane
//!   building blocks.
//!
//! Loops in generic code are vectorised for the chosen width; the arithmetic is the same at every width (Rust
//! contracts no multiply-add by itself), so generic code gives the same bits whichever version runs, and only
//! the explicit-intrinsics paths may round differently.

/// `fn name<'a, T: Real, const X2: bool, const X512: bool>(args) -> R { body }` becomes
/// `fn name<'a, T: Real>(isa: Isa, args) -> R`, running a copy of the body compiled for `isa.usable()`, with
/// the flags as consts. With a leading `isa = EXPR;` (an expression of the arguments, such as `ko.isa`) the
/// function keeps its own arguments and takes the set from `EXPR`.
macro_rules! isa_fn {
    (
        isa = $isa:expr;
        $(#[$m:meta])*
        $vis:vis fn $name:ident<$($lt:lifetime,)* $T:ident: Real, const $X2:ident: bool, const $X512:ident: bool>(
            $($a:ident: $t:ty),* $(,)?
        ) $(-> $r:ty)? $body:block
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$($lt,)* $T: $crate::Real>($($a: $t),*) $(-> $r)? {
            $crate::kernels::isa::isa_fn!(@versions ($($lt,)* $T) ($X2, $X512) ($($a: $t),*) ($($r)?) $body);
            match ($isa).usable() {
                // SAFETY: `usable` returns no set this CPU lacks.
                #[cfg(nv_x86)]
                $crate::ctx::Isa::Avx512 => unsafe { avx512::<$T>($($a),*) },
                #[cfg(nv_x86)]
                $crate::ctx::Isa::Avx2 => unsafe { avx2::<$T>($($a),*) },
                _ => portable::<$T>($($a),*),
            }
        }
    };
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident<$($lt:lifetime,)* $T:ident: Real, const $X2:ident: bool, const $X512:ident: bool>(
            $($a:ident: $t:ty),* $(,)?
        ) $(-> $r:ty)? $body:block
    ) => {
        $crate::kernels::isa::isa_fn! {
            isa = isa;
            $(#[$m])*
            $vis fn $name<$($lt,)* $T: Real, const $X2: bool, const $X512: bool>(
                isa: $crate::ctx::Isa, $($a: $t),*
            ) $(-> $r)? $body
        }
    };
    (@versions ($($lt:lifetime,)* $T:ident) ($X2:ident, $X512:ident) ($($a:ident: $t:ty),*) ($($r:ty)?) $body:block) => {
        #[cfg(nv_x86)]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments, unused_unsafe, unused_variables)]
        unsafe fn avx2<$($lt,)* $T: $crate::Real>($($a: $t),*) $(-> $r)? {
            #[allow(dead_code)]
            const $X2: bool = true;
            #[allow(dead_code)]
            const $X512: bool = false;
            $body
        }
        #[cfg(nv_x86)]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::too_many_arguments, unused_unsafe, unused_variables)]
        unsafe fn avx512<$($lt,)* $T: $crate::Real>($($a: $t),*) $(-> $r)? {
            #[allow(dead_code)]
            const $X2: bool = true;
            #[allow(dead_code)]
            const $X512: bool = true;
            $body
        }
        #[inline(always)]
        #[allow(clippy::too_many_arguments, unused_unsafe, unused_variables)]
        fn portable<$($lt,)* $T: $crate::Real>($($a: $t),*) $(-> $r)? {
            #[allow(dead_code)]
            const $X2: bool = false;
            #[allow(dead_code)]
            const $X512: bool = false;
            $body
        }
    };
}
pub(crate) use isa_fn;

/// `fn name / name_with<T: Real, const X2: bool, const X512: bool>(args) -> R { body }` (a leaf: no closures
/// handed to other threads) becomes the dispatcher `fn name<T: Real>(isa: Isa, args) -> R` and the generic
/// `#[inline(always)] fn name_with<T, X2, X512>(args) -> R` that other kernels call from a body compiled for a
/// set.
macro_rules! isa_leaf {
    (
        $(#[$m:meta])*
        $vis:vis fn $name:ident / $with:ident<$T:ident: Real, const $X2:ident: bool, const $X512:ident: bool>(
            $($a:ident: $t:ty),* $(,)?
        ) $(-> $r:ty)? $body:block
    ) => {
        $(#[$m])*
        #[inline(always)]
        #[allow(clippy::too_many_arguments, unused_unsafe)]
        $vis fn $with<$T: $crate::Real, const $X2: bool, const $X512: bool>($($a: $t),*) $(-> $r)? $body

        $(#[$m])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis fn $name<$T: $crate::Real>(isa: $crate::ctx::Isa, $($a: $t),*) $(-> $r)? {
            #[cfg(nv_x86)]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$T: $crate::Real>($($a: $t),*) $(-> $r)? {
                $with::<$T, true, false>($($a),*)
            }
            #[cfg(nv_x86)]
            #[target_feature(enable = "avx512f,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$T: $crate::Real>($($a: $t),*) $(-> $r)? {
                $with::<$T, true, true>($($a),*)
            }
            match isa.usable() {
                // SAFETY: `usable` returns no set this CPU lacks.
                #[cfg(nv_x86)]
                $crate::ctx::Isa::Avx512 => unsafe { avx512::<$T>($($a),*) },
                #[cfg(nv_x86)]
                $crate::ctx::Isa::Avx2 => unsafe { avx2::<$T>($($a),*) },
                _ => $with::<$T, false, false>($($a),*),
            }
        }
    };
}
pub(crate) use isa_leaf;
