//! Run-time selection of wider vector code for the CPU backend's own hot loops.
//!
//! The crate is built for the baseline of its target (x86-64: SSE2), so that one binary runs on
//! every node of a cluster. [`simd_leaf!`] compiles a leaf loop twice, for the baseline and
//! with AVX2 + FMA enabled, and picks the wide one when the CPU has both (checked once).
//! Only leaves (no rayon inside) are worth it: closures handed to rayon become separate
//! functions that would not inherit the features.
//!
//! Results do not depend on the choice: Rust never contracts `a * b + c` into a fused
//! multiply-add on its own, and vectorising independent lanes leaves each lane's operations
//! and their order as written, so both versions give the same bits (tested with
//! `LOFT_SIMD=off`, which forces the baseline).

use std::sync::OnceLock;

/// Whether the AVX2 + FMA versions run: the CPU has both and `LOFT_SIMD` is not `off`.
pub fn wide() -> bool {
    static WIDE: OnceLock<bool> = OnceLock::new();
    *WIDE.get_or_init(|| {
        if std::env::var("LOFT_SIMD").is_ok_and(|v| v == "off") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Define a leaf function (generic over `T: Real`, optionally one const parameter) whose body
/// is compiled for the baseline and for AVX2 + FMA; calls take the wide version when
/// [`wide`] says so.
macro_rules! simd_leaf {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<T: Real $(, const $c:ident: $cty:ty)?>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        $body:block
    ) => {
        $(#[$meta])*
        #[inline]
        $vis fn $name<T: Real $(, const $c: $cty)?>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp<T: Real $(, const $c: $cty)?>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2<T: Real $(, const $c: $cty)?>($($arg: $ty),*) $(-> $ret)? {
                    imp::<T $(, $c)?>($($arg),*)
                }
                if $crate::backend::cpu::simd::wide() {
                    // SAFETY: the CPU supports AVX2 and FMA (`wide` checked it at run time).
                    return unsafe { avx2::<T $(, $c)?>($($arg),*) };
                }
            }
            imp::<T $(, $c)?>($($arg),*)
        }
    };
}
pub(crate) use simd_leaf;
