//! The scalar types the CPU backend runs in: f32 for training, f64 for gradient checks.

use std::fmt::Debug;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// A floating-point scalar the CPU kernels (and the gemm crate) accept.
pub trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + Default
    + Debug
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// Convert (rounding for f32).
    fn from_f64(v: f64) -> Self;
    /// Convert exactly.
    fn to_f64(self) -> f64;
    /// Convert (exact for both types).
    fn from_f32(v: f32) -> Self;
    /// Convert (rounding for f64).
    fn to_f32(self) -> f32;
    /// The slice itself as f32, when the scalar is f32 (no copy).
    fn as_f32(s: &[Self]) -> Option<&[f32]>;
    /// The slice itself as writable f32, when the scalar is f32 (no copy).
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]>;
    /// `self` where `gate > 0`, else +0 (NaN gates give 0): a ReLU mask as a bitwise AND, so
    /// that loops over data-dependent masks vectorise instead of branching.
    fn masked_by(self, gate: Self) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn as_f32_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
    #[inline(always)]
    fn masked_by(self, gate: Self) -> Self {
        f32::from_bits(self.to_bits() & ((gate > 0.0) as u32).wrapping_neg())
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    #[inline]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v as f64
    }
    #[inline]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
    fn as_f32_mut(_: &mut [f64]) -> Option<&mut [f32]> {
        None
    }
    #[inline(always)]
    fn masked_by(self, gate: Self) -> Self {
        f64::from_bits(self.to_bits() & ((gate > 0.0) as u64).wrapping_neg())
    }
}
