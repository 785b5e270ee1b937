//! Thin, safe wrapper over the matrix products for row-major and strided matrices: loft's own
//! AVX-512 SGEMM (`sgemm.rs`) for single-threaded f32 products where the CPU has it, else the
//! `gemm` crate.

use super::real::Real;
use super::sgemm;
use gemm::Parallelism;
use std::cell::Cell;

thread_local! {
    static IN_GEMM: Cell<bool> = const { Cell::new(false) };
}

/// True while the current thread is inside a call of the gemm crate. The gemm crate allocates
/// its packing buffers on every call; the allocation test uses this to tell those apart
/// from loft's own (which must be none in the hot loop).
pub fn inside_gemm() -> bool {
    IN_GEMM.with(|f| f.get())
}

/// Run `f` flagged as inside gemm.
fn flagged<R>(f: impl FnOnce() -> R) -> R {
    IN_GEMM.with(|g| g.set(true));
    let r = f();
    IN_GEMM.with(|g| g.set(false));
    r
}

/// A read-only matrix: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `(rows, cols)` matrix.
    pub fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }
    /// The transpose of a row-major `(cols, rows)` matrix stored in `data`.
    pub fn rm_t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }
    fn max_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs
        }
    }
}

/// `dst (m, n) row-major with row stride ld = a (m, k) @ b (k, n)`, added to dst when
/// `accumulate`. `threads` > 1 lets gemm split the output among rayon threads; the result does
/// not depend on it (each output element is summed by one thread in a fixed order).
pub fn matmul<T: Real>(dst: &mut [T], ld: usize, a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    if m == 0 || n == 0 {
        return;
    }
    assert!(ld >= n && dst.len() > (m - 1) * ld + n - 1, "matmul: dst too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * ld..i * ld + n].fill(T::ZERO);
            }
        }
        return;
    }
    assert!(a.data.len() > a.max_index(), "matmul: lhs too small");
    assert!(b.data.len() > b.max_index(), "matmul: rhs too small");
    let par = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above check that every index gemm touches, (m-1)*ld + (n-1) in dst,
    // (m-1)*a.rs + (k-1)*a.cs in a and (k-1)*b.rs + (n-1)*b.cs in b, is in bounds; dst is
    // borrowed mutably and cannot alias a or b.
    unsafe { gemm_raw(dst.as_mut_ptr(), ld, a, b, accumulate, par) }
}

/// The one call into the gemm crate: `dst (+)= a @ b` with row stride `ld`.
///
/// # Safety
/// Every element gemm reads or writes must be in bounds: `(m-1) ld + (n-1)` of dst and the
/// last index of each operand; no other thread may touch those dst elements meanwhile.
unsafe fn gemm_raw<T: Real>(dst: *mut T, ld: usize, a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool, par: Parallelism) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if let (Some(af), Some(bf), true) = (
        T::as_f32(a.data),
        T::as_f32(b.data),
        matches!(par, Parallelism::None) && sgemm::available(),
    ) {
        let op = |s: &[f32], rs, cs| sgemm::Strided {
            ptr: s.as_ptr(),
            rs,
            cs,
        };
        // SAFETY: T is f32 (as_f32 answered), so dst points at f32; the caller's bounds
        // contract covers the same elements; AVX-512F is present (`available`).
        unsafe {
            sgemm::sgemm(
                m,
                n,
                k,
                dst as *mut f32,
                ld,
                1,
                op(af, a.rs, a.cs),
                op(bf, b.rs, b.cs),
                accumulate,
            )
        };
        return;
    }
    // SAFETY: forwarded to the caller.
    flagged(|| unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            par,
        );
    })
}

/// A raw destination pointer that may cross into rayon tasks. Used only where tasks write
/// provably disjoint parts of one matrix (distinct column blocks).
#[derive(Clone, Copy)]
pub struct SendPtr<T>(pub *mut T);
impl<T> SendPtr<T> {
    /// The pointer `n` elements further.
    ///
    /// # Safety
    /// The result must stay inside the allocation the pointer came from.
    pub unsafe fn add(self, n: usize) -> Self {
        // SAFETY: forwarded to the caller.
        SendPtr(unsafe { self.0.add(n) })
    }
}

// SAFETY: the pointer is only dereferenced through `matmul_into_block`, whose callers
// guarantee that concurrent tasks write disjoint elements.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

/// `dst[i * ld + j] (+)= (a @ b)[i, j]` for the (m, n) block at a raw pointer, single-threaded.
///
/// # Safety
/// `dst` must be valid for writes at every `i * ld + j` with i < a.rows, j < b.cols, and no
/// other thread may access those elements during the call.
pub unsafe fn matmul_into_block<T: Real>(dst: SendPtr<T>, ld: usize, a: Mat<'_, T>, b: Mat<'_, T>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    assert!(
        a.data.len() > a.max_index() && b.data.len() > b.max_index(),
        "matmul: operand too small"
    );
    assert!(k > 0, "matmul_into_block: empty inner dimension");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: operands are bounds-checked above; the caller guarantees dst.
    unsafe { gemm_raw(dst.0, ld, a, b, accumulate, Parallelism::None) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_naive_with_transposes() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f64> = (0..m * k).map(|i| (i as f64 * 0.37).sin()).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| (i as f64 * 0.11).cos()).collect(); // (n, k)
        let mut c = vec![1.0; m * n];
        matmul(&mut c, n, Mat::rm(&a, m, k), Mat::rm_t(&bt, k, n), true, 2);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = 1.0 + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f64>();
                assert!((c[i * n + j] - want).abs() < 1e-12);
            }
        }
    }
}
