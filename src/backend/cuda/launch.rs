//! The launch code of every kernel: parameter structs (mirrors of the structs in
//! `kernels/*.cu`) and launch geometry. The GPU and the emulated device run exactly this.

use super::driver::{DevicePtr, Driver, KernelParams, Launch};
use crate::Result;

/// Threads per block of the 1-D element-wise kernels.
pub const ELEMENTWISE_THREADS: u32 = 256;
/// Most blocks an element-wise launch uses (the grid-stride loop covers the rest).
pub const ELEMENTWISE_MAX_BLOCKS: u32 = 4096;

/// Geometry of an element-wise kernel over `n` elements.
pub fn elementwise(n: usize) -> Launch {
    let blocks = n
        .div_ceil(ELEMENTWISE_THREADS as usize)
        .clamp(1, ELEMENTWISE_MAX_BLOCKS as usize);
    Launch::linear(blocks as u32, ELEMENTWISE_THREADS)
}

/// Declare a kernel parameter struct: `#[repr(C)]`, `Copy`, and [`KernelParams`].
macro_rules! params {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$doc])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name { $(pub $field: $ty),* }
        // SAFETY: #[repr(C)] of u64/i64/u32/f32 fields laid out without gaps (every struct
        // below pads itself to 8 bytes with an explicit field), so every byte is initialised.
        unsafe impl KernelParams for $name {}
    };
}

params!(
    /// `fill_forward_f32`: `x[i] = value`.
    FillParams { x: DevicePtr, n: i64, value: f32, pad: u32 }
);
params!(
    /// `copy_forward_f32`: dst (+)= src.
    CopyParams { src: DevicePtr, dst: DevicePtr, n: i64, accumulate: u32, pad: u32 }
);
params!(
    /// `scale_forward_f32`: x *= a.
    ScaleParams { x: DevicePtr, n: i64, a: f32, pad: u32 }
);
params!(
    /// `axpy_forward_f32`: y += a x.
    AxpyParams { x: DevicePtr, y: DevicePtr, n: i64, a: f32, pad: u32 }
);
params!(
    /// `relu_forward_f32`.
    ReluParams { x: DevicePtr, y: DevicePtr, n: i64 }
);
params!(
    /// `relu_backward_f32`: `dx (+)= dy [y > 0]`.
    ReluBackwardParams { y: DevicePtr, dy: DevicePtr, dx: DevicePtr, n: i64, accumulate: u32, pad: u32 }
);
params!(
    /// `add_forward_f32`: y = a + b.
    AddParams { a: DevicePtr, b: DevicePtr, y: DevicePtr, n: i64 }
);
params!(
    /// `mask_forward_f32`: x *= mask.
    MaskParams { x: DevicePtr, mask: DevicePtr, n: i64 }
);
params!(
    /// `sgd_forward_f32`: SGD with momentum and weight decay.
    SgdParams { params: DevicePtr, grads: DevicePtr, momentum: DevicePtr, n: i64, lr: f32, mu: f32, wd: f32, pad: u32 }
);
params!(
    /// `runs_forward_f32`: the run copy (gather / scatter of filter slices).
    RunsParams { runs: DevicePtr, src: DevicePtr, dst: DevicePtr, count: i64 }
);

/// Launch an element-wise kernel over `n` elements (nothing when `n` is 0).
pub fn launch_elementwise<D: Driver, P: KernelParams>(d: &D, name: &'static str, n: usize, p: P) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    d.launch(name, elementwise(n), p.bytes())
}

/// Threads per block of the run copy; one block per run.
pub const RUNS_THREADS: u32 = 256;

/// Launch the run copy over `count` runs.
pub fn launch_runs<D: Driver>(d: &D, p: RunsParams) -> Result<()> {
    if p.count == 0 {
        return Ok(());
    }
    let blocks = (p.count as u64).min(65535) as u32;
    d.launch("runs_forward_f32", Launch::linear(blocks, RUNS_THREADS), p.bytes())
}

params!(
    /// `conv_*_f32`: one implicit-GEMM pass (see `kernels/conv.cu`).
    ConvParams {
        a_src: DevicePtr, b_src: DevicePtr, out: DevicePtr,
        n: i64, c_in: i64, h: i64, w: i64, c_out: i64, kh: i64, kw: i64, stride: i64, pad: i64, ho: i64, wo: i64,
        m: i64, ncols: i64, steps: i64, split_steps: i64, phases: i64, accumulate: u32, partial: u32,
    }
);
params!(
    /// `conv_filters_forward_f32`: the filters regrouped tap-major.
    FiltersParams { w: DevicePtr, out: DevicePtr, c_out: i64, c_in: i64, taps: i64, by_input: u32, pad: u32 }
);
params!(
    /// `conv_reduce_forward_f32`: out (+)= the sum of the split-K partial sums.
    ReduceParams { partial: DevicePtr, out: DevicePtr, len: i64, splits: i64, accumulate: u32, pad: u32 }
);
params!(
    /// `batchnorm_*_f32` (see `kernels/norm.cu`).
    NormParams {
        x: DevicePtr, dy: DevicePtr, gamma: DevicePtr, beta: DevicePtr, running_mean: DevicePtr,
        running_var: DevicePtr, y: DevicePtr, save_mean: DevicePtr, save_invstd: DevicePtr,
        dgamma: DevicePtr, dbeta: DevicePtr, sums: DevicePtr, partials: DevicePtr,
        n: i64, c: i64, hw: i64, slices: i64, slice_images: i64, total: i64,
        eps: f32, momentum: f32, accumulate: u32, phase: u32, relu: u32, pad_: u32,
    }
);
params!(
    /// `maxpool_*_f32`, `avgpool_*_f32` (see `kernels/pool.cu`).
    PoolParams {
        x: DevicePtr, dy: DevicePtr, y: DevicePtr, n: i64, c: i64, h: i64, w: i64, k: i64, stride: i64,
        pad: i64, ho: i64, wo: i64, accumulate: u32, pad_: u32,
    }
);
params!(
    /// `softmax_xent_forward_f32`.
    XentParams {
        logits: DevicePtr, labels: DevicePtr, dlogits: DevicePtr, stats: DevicePtr, n: i64, classes: i64,
        with_grad: u32, pad: u32,
    }
);
params!(
    /// `bias_forward_f32`, `bias_backward_f32`.
    BiasParams { b: DevicePtr, y: DevicePtr, db: DevicePtr, n: i64, d: i64 }
);

/// Tile of C one convolution block computes (`BM` x `BN` in `kernels/conv.cu`).
pub const CONV_TILE: usize = 128;
/// K step of the convolution tiles (`BK`).
pub const CONV_TILE_K: usize = 8;
/// Threads per convolution block.
pub const CONV_THREADS: u32 = 256;
/// Blocks a convolution launch aims for before it splits K: two waves of two blocks per
/// multiprocessor on a 132-multiprocessor GPU, rounded.
pub const CONV_TARGET_BLOCKS: usize = 512;
/// Fewest K steps a slice of a split launch runs.
pub const CONV_MIN_SPLIT_STEPS: usize = 16;
/// Most K slices of a split launch.
pub const CONV_MAX_SPLITS: usize = 64;

/// How many slices to cut `steps` K steps into for an M x N output: enough blocks to fill
/// the GPU when the output has few tiles, at least [`CONV_MIN_SPLIT_STEPS`] steps per
/// slice, and at most [`CONV_MAX_SPLITS`].
pub fn conv_splits(m: usize, n: usize, steps: usize) -> usize {
    let tiles = m.div_ceil(CONV_TILE) * n.div_ceil(CONV_TILE);
    let by_blocks = CONV_TARGET_BLOCKS.div_ceil(tiles.max(1));
    let by_steps = steps / CONV_MIN_SPLIT_STEPS;
    by_blocks.min(by_steps).clamp(1, CONV_MAX_SPLITS)
}

/// Columns of C in the largest phase of a pass: N, or for the phases of a strided data
/// gradient (`phases` > 1) the dX pixels of phase (0, 0) (see `kernels/conv.cu`).
pub fn conv_phase_cols(p: &ConvParams) -> usize {
    if p.phases > 1 {
        let s = p.stride as usize;
        p.n as usize * (p.h as usize).div_ceil(s) * (p.w as usize).div_ceil(s)
    } else {
        p.ncols as usize
    }
}

/// Geometry of a convolution pass with its parameters' M, N, phases and K steps per slice.
pub fn conv(p: &ConvParams) -> Launch {
    let splits = (p.steps as usize).div_ceil(p.split_steps.max(1) as usize).max(1);
    Launch {
        grid: [
            conv_phase_cols(p).div_ceil(CONV_TILE) as u32,
            (p.m as usize).div_ceil(CONV_TILE) as u32,
            (p.phases as usize * splits) as u32,
        ],
        block: [CONV_THREADS, 1, 1],
        shared: 0,
    }
}

/// Threads of the batch-norm blocks (`NORM_THREADS`).
pub const NORM_THREADS: u32 = 256;
/// Blocks a batch-norm launch aims for: several per multiprocessor of a large GPU.
pub const NORM_TARGET_BLOCKS: usize = 1024;
/// Fewest elements a batch-norm block covers (16 per thread), unless the channel has fewer.
pub const NORM_MIN_SLICE: usize = 4096;

/// How a batch-norm launch cuts each channel's `n` images of `hw` pixels: (slices, images
/// per slice), enough slices for [`NORM_TARGET_BLOCKS`] blocks over `c` channels, each
/// slice at least [`NORM_MIN_SLICE`] elements.
pub fn norm_slices(n: usize, c: usize, hw: usize) -> (usize, usize) {
    let by_blocks = NORM_TARGET_BLOCKS.div_ceil(c.max(1));
    let images = n
        .div_ceil(by_blocks)
        .max(NORM_MIN_SLICE.div_ceil(hw.max(1)))
        .min(n)
        .max(1);
    (n.div_ceil(images).max(1), images)
}

/// Geometry of a batch-norm kernel: a block per (slice, channel).
pub fn norm(p: &NormParams) -> Launch {
    Launch {
        grid: [p.slices as u32, p.c as u32, 1],
        block: [NORM_THREADS, 1, 1],
        shared: 0,
    }
}
/// Threads of the single softmax cross-entropy block (`XENT_THREADS`).
pub const XENT_THREADS: u32 = 256;
