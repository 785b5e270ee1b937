//! Run-time selection of wider vector code for the CPU backend's own hot loops.
//!
//! The crate is built for the baseline of its target (x86-64: SSE2), so that one binary runs on
//! every node of a cluster. `simd_leaf!` compiles a leaf loop twice, for the baseline and
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

/// `dst.copy_from_slice(src)` for short rows (a feature map's row: 4 to 32 values), inlined as
/// 16- and 4-element block moves: `copy_from_slice` calls `memcpy`, whose call and dispatch
/// cost as much as the copy itself at these lengths.
#[inline(always)]
pub fn copy_row<T: Copy>(dst: &mut [T], src: &[T]) {
    assert_eq!(dst.len(), src.len(), "copy_row: lengths differ");
    let (d16, dr) = dst.as_chunks_mut::<16>();
    let (s16, sr) = src.as_chunks::<16>();
    for (d, s) in d16.iter_mut().zip(s16) {
        *d = *s;
    }
    let (d4, dr) = dr.as_chunks_mut::<4>();
    let (s4, sr) = sr.as_chunks::<4>();
    for (d, s) in d4.iter_mut().zip(s4) {
        *d = *s;
    }
    for (d, s) in dr.iter_mut().zip(sr) {
        *d = *s;
    }
}

/// Ask the CPU to bring `xs` into cache ahead of its use (a hint: nothing is read now).
/// Batch norm walks a channel's planes, one per image, each a few KiB and a whole tensor's
/// image stride apart: the hardware prefetchers stop at each plane's page and start cold
/// on the next, so the next plane is requested while the current one is worked on.
#[inline]
pub fn prefetch<T>(xs: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(xs);
        let base = xs.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing architecturally; the address
            // lies inside xs.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(off)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = xs;
}
