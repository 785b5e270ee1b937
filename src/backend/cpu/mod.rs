//! The CPU backend: the reference implementation of every op, multi-threaded with rayon.
//!
//! Generic over the scalar ([`Real`]): `CpuBackend<f32>` trains, `CpuBackend<f64>` runs the
//! gradient checks. Buffers are plain `Vec<T>`; views are slices.

pub mod conv;
pub mod direct;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod real;
pub mod scratch;
pub mod sgemm;
pub mod simd;
pub mod winograd;

pub use real::Real;

use super::{Backend, Run, SumOverRanks};
use crate::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use crate::Result;
use scratch::ScratchPool;
use std::borrow::Cow;

/// The CPU backend. Holds the convolution scratch buffers, which grow to the largest layer once.
pub struct CpuBackend<T: Real> {
    threads: usize,
    /// Scratch for im2col and gathered gradients.
    scratch: ScratchPool<T>,
    /// Per-channel f64 scratch of batch norm.
    stats_scratch: ScratchPool<f64>,
}

impl<T: Real> CpuBackend<T> {
    /// A backend using the current rayon pool (its size is the thread count).
    pub fn new() -> Self {
        CpuBackend {
            threads: rayon::current_num_threads(),
            scratch: ScratchPool::new(),
            stats_scratch: ScratchPool::new(),
        }
    }
    /// Bytes held by the scratch buffers.
    pub fn scratch_bytes(&self) -> usize {
        self.scratch.bytes()
    }
}

impl<T: Real> Default for CpuBackend<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Real> Backend for CpuBackend<T> {
    type Buf = Vec<T>;
    type Runs = Vec<Run>;
    type View<'a> = &'a [T];
    type ViewMut<'a> = &'a mut [T];

    fn name(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, std::any::type_name::<T>())
    }
    fn workspace_bytes(&self) -> usize {
        self.scratch.bytes() + self.stats_scratch.bytes()
    }
    fn alloc(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::ZERO; len])
    }
    fn buf_len(&self, b: &Vec<T>) -> usize {
        b.len()
    }
    fn upload(&self, host: &[f32], dst: &mut Vec<T>) -> Result<()> {
        for (d, &h) in dst.iter_mut().zip(host) {
            *d = T::from_f32(h);
        }
        Ok(())
    }
    fn upload_f64(&self, host: &[f64], dst: &mut Vec<T>) -> Result<()> {
        for (d, &h) in dst.iter_mut().zip(host) {
            *d = T::from_f64(h);
        }
        Ok(())
    }
    fn download(&self, src: &Vec<T>) -> Result<Vec<f32>> {
        Ok(src.iter().map(|v| v.to_f32()).collect())
    }
    fn download_f64(&self, src: &Vec<T>) -> Result<Vec<f64>> {
        Ok(src.iter().map(|v| v.to_f64()).collect())
    }
    fn download_into(&self, src: &Vec<T>, dst: &mut [f64]) -> Result<()> {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f64();
        }
        Ok(())
    }
    fn read_host<'a>(&self, b: &'a Vec<T>, off: usize, len: usize) -> Result<Cow<'a, [f32]>> {
        let s = &b[off..off + len];
        Ok(match T::as_f32(s) {
            Some(f) => Cow::Borrowed(f),
            None => Cow::Owned(s.iter().map(|v| v.to_f32()).collect()),
        })
    }
    fn with_host_mut<R>(&self, b: &mut Vec<T>, off: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
        let s = &mut b[off..off + len];
        if let Some(h) = T::as_f32_mut(s) {
            return Ok(f(h));
        }
        let mut h: Vec<f32> = s.iter().map(|v| v.to_f32()).collect();
        let r = f(&mut h);
        for (d, v) in s.iter_mut().zip(h) {
            *d = T::from_f32(v);
        }
        Ok(r)
    }
    fn sync(&self) -> Result<()> {
        // every op ran to completion before it returned
        Ok(())
    }
    fn view<'a>(&self, b: &'a Vec<T>, off: usize, len: usize) -> &'a [T] {
        &b[off..off + len]
    }
    fn view_mut<'a>(&self, b: &'a mut Vec<T>, off: usize, len: usize) -> &'a mut [T] {
        &mut b[off..off + len]
    }
    fn split_mut<'a>(&self, v: &'a mut [T], at: usize) -> (&'a mut [T], &'a mut [T])
    where
        Self: 'a,
    {
        v.split_at_mut(at)
    }
    fn fill(&self, x: &mut [T], value: f32) {
        elementwise::fill(x, T::from_f32(value));
    }
    fn copy(&self, src: &[T], dst: &mut [T], accumulate: bool) {
        elementwise::copy(src, dst, accumulate);
    }
    fn scale(&self, x: &mut [T], a: f32) {
        elementwise::scale(x, T::from_f32(a));
    }
    fn axpy(&self, a: f32, x: &[T], y: &mut [T]) {
        elementwise::axpy(T::from_f32(a), x, y);
    }
    fn prepare_runs(&self, runs: &[Run]) -> Result<Vec<Run>> {
        Ok(runs.to_vec())
    }
    fn copy_runs(&self, runs: &Vec<Run>, src: &[T], dst: &mut [T]) {
        elementwise::copy_runs(runs, src, dst);
    }

    fn conv2d_forward(&self, s: &Conv2d, x: &[T], w: &[T], y: &mut [T]) {
        conv::forward(s, x, w, y, &self.scratch);
    }
    fn conv2d_backward_data(&self, s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T], accumulate: bool) {
        conv::backward_data(s, dy, w, dx, accumulate, &self.scratch);
    }
    fn conv2d_backward_filter(&self, s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T], accumulate: bool) {
        conv::backward_filter(s, x, dy, dw, accumulate, &self.scratch);
    }

    fn batchnorm_forward_train(
        &self,
        s: &BatchNorm,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        running_mean: &mut [T],
        running_var: &mut [T],
        y: &mut [T],
        save_mean: &mut [T],
        save_invstd: &mut [T],
        sync: SumOverRanks<'_>,
    ) {
        self.stats_scratch.with(2 * s.c + 2, |w| {
            norm::forward_train(
                s,
                x,
                gamma,
                beta,
                running_mean,
                running_var,
                y,
                save_mean,
                save_invstd,
                w,
                sync,
            )
        });
    }
    fn batchnorm_forward_eval(
        &self,
        s: &BatchNorm,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        running_mean: &[T],
        running_var: &[T],
        y: &mut [T],
    ) {
        self.stats_scratch.with(2 * s.c, |w| {
            norm::forward_eval(s, x, gamma, beta, running_mean, running_var, y, w)
        });
    }
    fn batchnorm_backward(
        &self,
        s: &BatchNorm,
        x: &[T],
        _y: &[T],
        dy: &[T],
        gamma: &[T],
        beta: &[T],
        save_mean: &[T],
        save_invstd: &[T],
        dx: &mut [T],
        dgamma: &mut [T],
        dbeta: &mut [T],
        accumulate_dx: bool,
        sync: SumOverRanks<'_>,
    ) {
        self.stats_scratch.with(2 * s.c + 1, |w| {
            norm::backward(
                s,
                x,
                dy,
                gamma,
                beta,
                save_mean,
                save_invstd,
                dx,
                dgamma,
                dbeta,
                accumulate_dx,
                w,
                sync,
            )
        });
    }

    fn relu_forward(&self, x: &[T], y: &mut [T]) {
        elementwise::relu_forward(x, y);
    }
    fn relu_backward(&self, y: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
        elementwise::relu_backward(y, dy, dx, accumulate);
    }
    fn add_forward(&self, a: &[T], b: &[T], y: &mut [T]) {
        elementwise::add_forward(a, b, y);
    }
    fn maxpool_forward(&self, s: &Pool2d, x: &[T], y: &mut [T]) {
        elementwise::maxpool_forward(s, x, y);
    }
    fn maxpool_backward(&self, s: &Pool2d, x: &[T], _y: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
        elementwise::maxpool_backward(s, x, dy, dx, accumulate);
    }
    fn avgpool_forward(&self, n: usize, c: usize, hw: usize, x: &[T], y: &mut [T]) {
        elementwise::avgpool_forward(hw, &x[..n * c * hw], &mut y[..n * c]);
    }
    fn avgpool_backward(&self, n: usize, c: usize, hw: usize, dy: &[T], dx: &mut [T], accumulate: bool) {
        elementwise::avgpool_backward(hw, &dy[..n * c], &mut dx[..n * c * hw], accumulate);
    }
    fn linear_forward(&self, s: &Linear, x: &[T], w: &[T], b: &[T], y: &mut [T]) {
        elementwise::linear_forward(s, x, w, b, y);
    }
    fn linear_backward(
        &self,
        s: &Linear,
        x: &[T],
        w: &[T],
        dy: &[T],
        dx: Option<&mut [T]>,
        dw: &mut [T],
        db: &mut [T],
        accumulate_dx: bool,
    ) {
        elementwise::linear_backward(s, x, w, dy, dx, dw, db, accumulate_dx);
    }
    fn softmax_xent(
        &self,
        n: usize,
        classes: usize,
        logits: &[T],
        labels: &[T],
        dlogits: Option<&mut [T]>,
        stats: &mut [T],
    ) {
        elementwise::softmax_xent(n, classes, logits, labels, dlogits, stats);
    }
    fn sgd_step(&self, hp: &Sgd, params: &mut [T], grads: &mut [T], momentum: &mut [T]) {
        elementwise::sgd_step(hp, params, grads, momentum);
    }
    fn apply_mask(&self, x: &mut [T], mask: &[T]) {
        elementwise::apply_mask(x, mask);
    }
}
