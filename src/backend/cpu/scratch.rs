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
        let mut v = self.free.lock().expect("scratch pool lock").pop().unwrap_or_default();
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
