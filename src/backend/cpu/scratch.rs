//! A pool of reusable scratch vectors for parallel tasks: after the first step of training
//! every task finds a buffer of the size it needs, so the hot loop allocates nothing.

use super::real::Real;
use std::sync::Mutex;

/// Scratch vectors lent to tasks; each grows to the largest request it serves and is kept.
#[derive(Default)]
pub struct ScratchPool<T> {
    free: Mutex<Vec<Vec<T>>>,
}

impl<T: Real> ScratchPool<T> {
    /// An empty pool.
    pub fn new() -> Self {
        ScratchPool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// Run `f` with a buffer of at least `len` elements (contents unspecified).
    pub fn with<R>(&self, len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        let mut v = {
            // the smallest idle buffer that fits, else the largest (grown below): large
            // requests reuse large buffers, so idle memory stays near what concurrent tasks need
            let mut free = self.free.lock().expect("scratch pool lock");
            let fits = (0..free.len())
                .filter(|&i| free[i].len() >= len)
                .min_by_key(|&i| free[i].len());
            let pick = fits.or_else(|| (0..free.len()).max_by_key(|&i| free[i].len()));
            pick.map(|i| free.swap_remove(i)).unwrap_or_default()
        };
        if v.len() < len {
            v.resize(len, T::ZERO);
        }
        let r = f(&mut v[..len]);
        self.free.lock().expect("scratch pool lock").push(v);
        r
    }

    /// Bytes held by idle buffers.
    pub fn bytes(&self) -> usize {
        let free = self.free.lock().expect("scratch pool lock");
        free.iter().map(|v| v.len()).sum::<usize>() * std::mem::size_of::<T>()
    }
}

/// A cache-line-aligned run of 16 floats: the unit of the AVX-512 kernels' scratch (packing
/// buffers, padded images), kept in `Vec<Line>` so that every buffer starts on a line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

/// The floats of aligned scratch.
pub(crate) fn floats(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: Line is repr(C) around [f32; 16]: the lines are 16 len contiguous floats,
    // borrowed mutably for the result's lifetime.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut f32, 16 * lines.len()) }
}
