//! CPU convolution: im2col + GEMM fused per task, col2im for the data gradient; 3x3 layers go
//! to the direct convolution ([`super::direct`], AVX-512 CPUs: narrow stride-1 layers and
//! stride 2) or to Winograd ([`super::winograd`]: wide stride-1 layers), pass by pass, as
//! [`Algo::for_shape`] and [`Algo::for_filter_gradient`] choose.
//!
//! Forward and data-gradient passes split the batch into groups of whole images (about
//! [`GROUP_COLS`] output pixels per group); each rayon task builds its group's im2col matrix
//! `(k, cols)` (k = c_in kh kw) in a private scratch buffer and runs one single-threaded GEMM,
//! so the im2col block stays in cache and tasks never share output. The filter gradient is a
//! sum over the batch: it walks chunks of images in order and, within a chunk, splits the k
//! rows of dW among tasks ([`K_BLOCK`] rows each), each building only its rows of im2col.
//! Group, chunk and block sizes depend only on the shapes, never on the thread count, and every
//! output element is summed by one task in a fixed order: results are bit-identical for any
//! number of threads.

use super::direct;
use super::gemm::{matmul, matmul_into_block, Mat, SendPtr};
use super::real::Real;
use super::scratch::ScratchPool;
use super::winograd::{self, Tile};
use crate::ops::Conv2d;
use rayon::prelude::*;

/// Output pixels per forward / data-gradient task.
pub const GROUP_COLS: usize = 1024;
/// Output pixels per filter-gradient chunk.
pub const CHUNK_COLS: usize = 4096;
/// Rows of dW per filter-gradient task.
pub const K_BLOCK: usize = 256;

/// Largest im2col block per task, in elements (2 Mi floats = 8 MiB).
pub const MAX_BLOCK: usize = 1 << 21;

/// Groups are made in multiples of this count (when the batch allows) so that tasks divide
/// evenly among 1, 2, 4 or 8 threads.
pub const TASK_MULTIPLE: usize = 8;

/// Images per group: about `cols` output pixels per group, im2col blocks under
/// [`MAX_BLOCK`] elements where a single image allows, and a group count that is a multiple of
/// [`TASK_MULTIPLE`]. Depends only on the shape.
fn images_per(s: &Conv2d, cols: usize) -> usize {
    let n = s.n.max(1);
    let total = n * s.h_out() * s.w_out();
    let by_cols = total.div_ceil(cols.max(1));
    let by_block = (total * s.k()).div_ceil(MAX_BLOCK);
    let groups = by_cols.max(by_block).max(1).next_multiple_of(TASK_MULTIPLE).min(n);
    n.div_ceil(groups)
}

/// The output columns `lo..hi` of a kernel offset along one axis: positions o with
/// `0 <= o*stride + k - pad < size`, clipped to `0..out`.
#[inline]
fn valid_range(size: usize, pad: usize, stride: usize, k: usize, out: usize) -> (usize, usize) {
    let lo = pad.saturating_sub(k).div_ceil(stride);
    let hi = if size + pad > k {
        ((size + pad - k - 1) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Fill `col (r1 - r0, nb * hw_out)` with rows r0..r1 of the im2col matrix of images
/// `b0..b0+nb` of x.
fn im2col_rows<T: Real>(s: &Conv2d, x: &[T], b0: usize, nb: usize, r0: usize, r1: usize, col: &mut [T]) {
    let (ho, wo) = (s.h_out(), s.w_out());
    let hwo = ho * wo;
    let ncols = nb * hwo;
    let img = s.c_in * s.h * s.w;
    for r in r0..r1 {
        let ci = r / (s.kh * s.kw);
        let ky = (r / s.kw) % s.kh;
        let kx = r % s.kw;
        let (lo, hi) = valid_range(s.w, s.pad, s.stride, kx, wo);
        let row = &mut col[(r - r0) * ncols..(r - r0 + 1) * ncols];
        for bi in 0..nb {
            let plane = &x[(b0 + bi) * img + ci * s.h * s.w..][..s.h * s.w];
            let out = &mut row[bi * hwo..(bi + 1) * hwo];
            for oy in 0..ho {
                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                let orow = &mut out[oy * wo..(oy + 1) * wo];
                if iy < 0 || iy >= s.h as isize {
                    orow.fill(T::ZERO);
                    continue;
                }
                let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                orow[..lo].fill(T::ZERO);
                orow[hi..].fill(T::ZERO);
                if s.stride == 1 {
                    let start = lo + kx - s.pad;
                    orow[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
                } else {
                    for (ox, o) in orow.iter_mut().enumerate().take(hi).skip(lo) {
                        *o = src[ox * s.stride + kx - s.pad];
                    }
                }
            }
        }
    }
}

/// Write (or add) `col (k, nb * hw_out)` into `dx (nb, c_in, h, w)`, the images of one group.
fn col2im<T: Real>(s: &Conv2d, col: &[T], nb: usize, dx: &mut [T], accumulate: bool) {
    let (ho, wo) = (s.h_out(), s.w_out());
    let hwo = ho * wo;
    let ncols = nb * hwo;
    let plane_len = s.h * s.w;
    for (p, plane) in dx[..nb * s.c_in * plane_len].chunks_mut(plane_len).enumerate() {
        let bi = p / s.c_in;
        let ci = p % s.c_in;
        if !accumulate {
            plane.fill(T::ZERO);
        }
        for ky in 0..s.kh {
            for kx in 0..s.kw {
                let r = (ci * s.kh + ky) * s.kw + kx;
                let row = &col[r * ncols + bi * hwo..r * ncols + (bi + 1) * hwo];
                let (lo, hi) = valid_range(s.w, s.pad, s.stride, kx, wo);
                if lo >= hi {
                    continue;
                }
                for oy in 0..ho {
                    let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                    if iy < 0 || iy >= s.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                    let src = &row[oy * wo..(oy + 1) * wo];
                    if s.stride == 1 {
                        let start = lo + kx - s.pad;
                        for (d, &v) in dst[start..start + (hi - lo)].iter_mut().zip(&src[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for ox in lo..hi {
                            dst[ox * s.stride + kx - s.pad] += src[ox];
                        }
                    }
                }
            }
        }
    }
}

/// Copy `t (nb, c, hw)` into `g (c, nb * hw)`.
fn gather<T: Real>(t: &[T], c: usize, hw: usize, nb: usize, g: &mut [T]) {
    for ch in 0..c {
        for bi in 0..nb {
            g[ch * nb * hw + bi * hw..][..hw].copy_from_slice(&t[(bi * c + ch) * hw..][..hw]);
        }
    }
}

/// Copy `g (c, nb * hw)` into `t (nb, c, hw)`.
fn scatter<T: Real>(g: &[T], c: usize, hw: usize, nb: usize, t: &mut [T]) {
    for bi in 0..nb {
        for ch in 0..c {
            t[(bi * c + ch) * hw..][..hw].copy_from_slice(&g[ch * nb * hw + bi * hw..][..hw]);
        }
    }
}

fn check(s: &Conv2d, x: usize, w: usize, y: usize, op: &str) {
    assert!(
        x >= s.x_len() && w >= s.w_len() && y >= s.y_len(),
        "{op}: buffers smaller than {s:?}"
    );
}

/// How a convolution is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    /// im2col + GEMM (any shape).
    Im2col,
    /// Winograd F(2x2, 3x3) or F(4x4, 3x3) (3x3 stride-1 pad-1 only; see
    /// [`super::winograd`]).
    Winograd(Tile),
    /// Direct implicit GEMM over padded images (3x3 stride-1 pad-1, f32 on AVX-512 CPUs;
    /// see [`super::direct`]). Other scalar types take [`Algo::transformed`]'s choice.
    Direct,
}

/// Narrowest channel count (input and output) for which Winograd beats im2col here.
pub const WINOGRAD_MIN_CHANNELS: usize = 16;
/// Narrowest channel count for which F(4x4, 3x3) beats F(2x2, 3x3) here.
pub const WINOGRAD_F4_MIN_CHANNELS: usize = 32;
/// Smallest map side for F(4x4, 3x3): on a 4x4 map it is one tile per image and no faster
/// than F(2x2, 3x3), while its transformed filters take 36/16 the memory.
pub const WINOGRAD_F4_MIN_SIDE: usize = 8;

impl Algo {
    /// The algorithm for this shape: the direct convolution wherever it applies, unless
    /// F(4x4, 3x3) does and the narrowest channel count times the map side is at least
    /// [`F4_OVER_DIRECT`]; else [`Algo::transformed`]: where Winograd applies and both channel
    /// counts are at least [`WINOGRAD_MIN_CHANNELS`], F(4x4, 3x3) from
    /// [`WINOGRAD_F4_MIN_CHANNELS`] up on maps of [`WINOGRAD_F4_MIN_SIDE`] or more, else
    /// F(2x2, 3x3); else im2col. `LOFT_CONV` forces a choice (`forced`).
    pub fn for_shape(s: &Conv2d) -> Algo {
        let force = forced();
        let f4_wins =
            Algo::transformed(s) == Algo::Winograd(Tile::F4) && s.c_in.min(s.c_out) * s.h.min(s.w) >= F4_OVER_DIRECT;
        if direct::applies(s) && (force == "direct" || (force.is_empty() && !f4_wins)) {
            Algo::Direct
        } else {
            Algo::transformed(s)
        }
    }

    /// The algorithm of this shape's filter gradient: as [`Algo::for_shape`], except that
    /// the direct convolution's (outer products over images side by side, `(w + 1) / w` of
    /// the work, and per-lane partial sums of the whole filter) pays on output maps below
    /// [`DIRECT_FILTER_MIN_SIDE`] only up to [`DIRECT_FILTER_SMALL_MAP_PAIRS`] channel pairs.
    pub fn for_filter_gradient(s: &Conv2d) -> Algo {
        let small_map = s.w_out().min(s.h_out()) < DIRECT_FILTER_MIN_SIDE;
        match Algo::for_shape(s) {
            Algo::Direct if forced() != "direct" && small_map && s.c_in * s.c_out > DIRECT_FILTER_SMALL_MAP_PAIRS => {
                Algo::transformed(s)
            }
            algo => algo,
        }
    }

    /// The choice among im2col and Winograd alone (f64, and CPUs without AVX-512).
    pub fn transformed(s: &Conv2d) -> Algo {
        let force = forced();
        let narrowest = s.c_in.min(s.c_out);
        if force == "im2col" || !winograd::applies(s) || narrowest < WINOGRAD_MIN_CHANNELS {
            Algo::Im2col
        } else if narrowest >= WINOGRAD_F4_MIN_CHANNELS && s.h.min(s.w) >= WINOGRAD_F4_MIN_SIDE && force != "f2" {
            Algo::Winograd(Tile::F4)
        } else {
            Algo::Winograd(Tile::F2)
        }
    }
}

/// `LOFT_CONV`, read once: `im2col`, `f2` (no F(4x4, 3x3)), `direct` (wherever it applies)
/// or `winograd` (no direct convolution) force a choice for benchmarks and comparisons.
fn forced() -> &'static str {
    static FORCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FORCE.get_or_init(|| std::env::var("LOFT_CONV").unwrap_or_default())
}

/// From this product of the narrowest channel count and the map side on, F(4x4, 3x3) beats
/// the direct convolution (measured by `loft bench` on the CIFAR networks: the direct one
/// wins on 16 channels at 32x32, 32 at 16x16, 64 at 8x8 and on every 4x4 layer; F(4x4, 3x3)
/// on 64 at 32x32, 128 at 16x16 and 256 at 8x8, by up to 1.6x).
pub const F4_OVER_DIRECT: usize = 1024;

/// Smallest output map side on which the direct filter gradient beats Winograd's and
/// im2col's at any width; below it, see [`DIRECT_FILTER_SMALL_MAP_PAIRS`].
pub const DIRECT_FILTER_MIN_SIDE: usize = 8;

/// Most input x output channel pairs for which the direct filter gradient beats F(2x2, 3x3)
/// on 4x4 outputs (its per-lane partial sums of the whole filter grow with the pairs):
/// measured at batch 128, 1.15-1.2x faster at 256 x 128, 1.3-1.5x slower at 256 x 256 and
/// 512 x 128, 2-3x slower at 512 x 256 and up.
pub const DIRECT_FILTER_SMALL_MAP_PAIRS: usize = 256 * 128;

/// Forward with the algorithm of [`Algo::for_shape`].
pub fn forward<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T], pool: &ScratchPool<T>) {
    forward_with(Algo::for_shape(s), s, x, w, y, pool)
}

/// Data gradient with the algorithm of [`Algo::for_shape`].
pub fn backward_data<T: Real>(s: &Conv2d, dy: &[T], w: &[T], dx: &mut [T], accumulate: bool, pool: &ScratchPool<T>) {
    backward_data_with(Algo::for_shape(s), s, dy, w, dx, accumulate, pool)
}

/// Filter gradient with the algorithm of [`Algo::for_shape`].
pub fn backward_filter<T: Real>(s: &Conv2d, x: &[T], dy: &[T], dw: &mut [T], accumulate: bool, pool: &ScratchPool<T>) {
    backward_filter_with(Algo::for_filter_gradient(s), s, x, dy, dw, accumulate, pool)
}

/// Forward: y = conv(x, w). x `(n, c_in, h, w)`, w `(c_out, k)`, y `(n, c_out, ho, wo)`.
/// Panics if `algo` is Winograd and the shape is not 3x3 stride 1 pad 1.
pub fn forward_with<T: Real>(algo: Algo, s: &Conv2d, x: &[T], w: &[T], y: &mut [T], pool: &ScratchPool<T>) {
    check(s, x.len(), w.len(), y.len(), "conv2d_forward");
    if algo == Algo::Direct {
        assert!(direct::applies(s), "direct convolution on {s:?}");
        return match (T::as_f32(x), T::as_f32(w), T::as_f32_mut(y)) {
            (Some(x), Some(w), Some(y)) => direct::forward(s, x, w, y),
            _ => forward_with(Algo::transformed(s), s, x, w, y, pool),
        };
    }
    if let Algo::Winograd(tile) = algo {
        assert!(winograd::applies(s), "Winograd on {s:?}");
        return winograd::forward(s, tile, x, w, y, pool);
    }
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let g = images_per(s, GROUP_COLS);
    let wm = Mat::rm(&w[..s.w_len()], s.c_out, k);
    y[..s.y_len()]
        .par_chunks_mut(g * s.c_out * hwo)
        .enumerate()
        .for_each(|(gi, yg)| {
            let b0 = gi * g;
            let nb = yg.len() / (s.c_out * hwo);
            let ncols = nb * hwo;
            let direct = s.is_pointwise() && nb == 1;
            let col_len = if direct { 0 } else { k * ncols };
            let tmp_len = if nb == 1 { 0 } else { s.c_out * ncols };
            pool.with(col_len + tmp_len, |buf| {
                let (col, tmp) = buf.split_at_mut(col_len);
                let rhs = if direct {
                    Mat::rm(&x[b0 * k * hwo..(b0 + 1) * k * hwo], k, ncols)
                } else {
                    im2col_rows(s, x, b0, nb, 0, k, col);
                    Mat::rm(&*col, k, ncols)
                };
                if nb == 1 {
                    matmul(yg, ncols, wm, rhs, false, 1);
                } else {
                    matmul(tmp, ncols, wm, rhs, false, 1);
                    scatter(tmp, s.c_out, hwo, nb, yg);
                }
            });
        });
}

/// Whether im2col's data gradient runs as a forward convolution (flipped filters, channels
/// swapped): stride 1, odd square kernel, "same" padding, and fewer output than input
/// channels (otherwise col2im's columns are the fewer).
fn transposes_to_forward(s: &Conv2d) -> bool {
    s.stride == 1 && s.kh == s.kw && s.kh % 2 == 1 && s.kh > 1 && s.pad == s.kh / 2 && s.c_out < s.c_in
}

/// Data gradient: dx (+)= conv_transpose(dy, w).
pub fn backward_data_with<T: Real>(
    algo: Algo,
    s: &Conv2d,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    check(s, dx.len(), w.len(), dy.len(), "conv2d_backward_data");
    if algo == Algo::Direct {
        assert!(direct::applies(s), "direct convolution on {s:?}");
        return match (T::as_f32(dy), T::as_f32(w), T::as_f32_mut(dx)) {
            (Some(dy), Some(w), Some(dx)) => direct::backward_data(s, dy, w, dx, accumulate),
            _ => backward_data_with(Algo::transformed(s), s, dy, w, dx, accumulate, pool),
        };
    }
    if let Algo::Winograd(tile) = algo {
        assert!(winograd::applies(s), "Winograd on {s:?}");
        return winograd::backward_data(s, tile, dy, w, dx, accumulate, pool);
    }
    if transposes_to_forward(s) && !accumulate {
        // a stride-1 "same" convolution's data gradient is the forward convolution of dy
        // with the flipped filters, channels swapped: im2col of dy has c_out k² rows, fewer
        // than the c_in k² rows col2im would write and read back
        let t = Conv2d {
            c_in: s.c_out,
            c_out: s.c_in,
            ..*s
        };
        return pool.with(s.w_len(), |wf| {
            let kk = s.kh * s.kw;
            for co in 0..s.c_out {
                for ci in 0..s.c_in {
                    let from = &w[(co * s.c_in + ci) * kk..][..kk];
                    let to = &mut wf[(ci * s.c_out + co) * kk..][..kk];
                    for (d, &v) in to.iter_mut().zip(from.iter().rev()) {
                        *d = v;
                    }
                }
            }
            forward_with(Algo::Im2col, &t, dy, wf, dx, pool)
        });
    }
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let g = images_per(s, GROUP_COLS);
    let img = s.c_in * s.h * s.w;
    let wt = Mat::rm_t(&w[..s.w_len()], k, s.c_out); // (k, c_out)
    dx[..s.x_len()]
        .par_chunks_mut(g * img)
        .enumerate()
        .for_each(|(gi, dxg)| {
            let b0 = gi * g;
            let nb = dxg.len() / img;
            let ncols = nb * hwo;
            let dy_len = if nb == 1 { 0 } else { s.c_out * ncols };
            let direct = s.is_pointwise() && nb == 1;
            let col_len = if direct { 0 } else { k * ncols };
            pool.with(dy_len + col_len, |buf| {
                let (dyg, col) = buf.split_at_mut(dy_len);
                let dyc = &dy[b0 * s.c_out * hwo..(b0 + nb) * s.c_out * hwo];
                let lhs = if nb == 1 {
                    Mat::rm(dyc, s.c_out, ncols)
                } else {
                    gather(dyc, s.c_out, hwo, nb, dyg);
                    Mat::rm(&*dyg, s.c_out, ncols)
                };
                if direct {
                    matmul(dxg, ncols, wt, lhs, accumulate, 1);
                } else {
                    matmul(col, ncols, wt, lhs, false, 1);
                    col2im(s, col, nb, dxg, accumulate);
                }
            });
        });
}

/// Filter gradient: dw (+)= sum over the batch of dy im2col(x)^T. dw `(c_out, k)`.
pub fn backward_filter_with<T: Real>(
    algo: Algo,
    s: &Conv2d,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    check(s, x.len(), dw.len(), dy.len(), "conv2d_backward_filter");
    if algo == Algo::Direct {
        assert!(direct::applies(s), "direct convolution on {s:?}");
        return match (T::as_f32(x), T::as_f32(dy), T::as_f32_mut(dw)) {
            (Some(x), Some(dy), Some(dw)) => direct::backward_filter(s, x, dy, dw, accumulate),
            _ => backward_filter_with(Algo::transformed(s), s, x, dy, dw, accumulate, pool),
        };
    }
    if let Algo::Winograd(tile) = algo {
        assert!(winograd::applies(s), "Winograd on {s:?}");
        return winograd::backward_filter(s, tile, x, dy, dw, accumulate, pool);
    }
    if s.w_len() <= LANES_MAX_WEIGHT {
        backward_filter_lanes(s, x, dy, dw, accumulate, pool);
    } else {
        backward_filter_kblocks(s, x, dy, dw, accumulate, pool);
    }
}

/// Fixed number of partial sums of the small-filter gradient path.
pub const LANES: usize = 8;
/// Largest weight (elements) that takes the partial-sum path.
pub const LANES_MAX_WEIGHT: usize = 1 << 19;

/// Filter gradient for small weights: image groups are dealt to [`LANES`] lanes (group g to
/// lane g mod LANES); each lane sums its groups' `dy im2col^T` in order into a private
/// partial, and the partials are added in lane order.
fn backward_filter_lanes<T: Real>(
    s: &Conv2d,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let wl = s.w_len();
    let g = images_per(s, GROUP_COLS);
    let groups = s.n.div_ceil(g);
    pool.with(LANES * wl, |partials| {
        partials.par_chunks_mut(wl).enumerate().for_each(|(lane, part)| {
            part.fill(T::ZERO);
            for gi in (lane..groups).step_by(LANES) {
                let b0 = gi * g;
                let nb = g.min(s.n - b0);
                let ncols = nb * hwo;
                let dyc = &dy[b0 * s.c_out * hwo..(b0 + nb) * s.c_out * hwo];
                let direct = s.is_pointwise() && nb == 1;
                let dy_len = if nb == 1 { 0 } else { s.c_out * ncols };
                let col_len = if direct { 0 } else { k * ncols };
                pool.with(dy_len + col_len, |buf| {
                    let (dyg, col) = buf.split_at_mut(dy_len);
                    let lhs = if nb == 1 {
                        Mat::rm(dyc, s.c_out, ncols)
                    } else {
                        gather(dyc, s.c_out, hwo, nb, dyg);
                        Mat::rm(&*dyg, s.c_out, ncols)
                    };
                    let colm = if direct {
                        Mat::rm(&x[b0 * k * hwo..(b0 + 1) * k * hwo], k, ncols)
                    } else {
                        im2col_rows(s, x, b0, nb, 0, k, col);
                        Mat::rm(&*col, k, ncols)
                    };
                    // part is dW^T (k, c_out): this orientation runs faster in gemm.
                    let dyt = Mat {
                        data: lhs.data,
                        rows: ncols,
                        cols: s.c_out,
                        rs: 1,
                        cs: ncols,
                    };
                    matmul(part, s.c_out, colm, dyt, true, 1);
                });
            }
        });
        // sum the lanes, then transpose (k, c_out) into dW (c_out, k)
        let sum: &[T] = add_lanes(partials, wl);
        dw[..wl].par_chunks_mut(k).enumerate().for_each(|(co, row)| {
            for (r, d) in row.iter_mut().enumerate() {
                let v = sum[r * s.c_out + co];
                if accumulate {
                    *d += v;
                } else {
                    *d = v;
                }
            }
        });
    });
}

/// Add the lanes of `partials` (consecutive runs of `len`) into the first, in lane order and
/// in parallel over contiguous pieces (each element summed by one task in a fixed order), and
/// return it.
pub(super) fn add_lanes<T: Real>(partials: &mut [T], len: usize) -> &[T] {
    let (first, rest) = partials.split_at_mut(len);
    first.par_chunks_mut(4096).enumerate().for_each(|(pi, piece)| {
        for lane in rest.chunks(len) {
            for (d, &p) in piece.iter_mut().zip(&lane[pi * 4096..]) {
                *d += p;
            }
        }
    });
    first
}

/// Filter gradient for large weights: chunks of images in order; within a chunk the k
/// columns of dW are split among tasks.
fn backward_filter_kblocks<T: Real>(
    s: &Conv2d,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    pool: &ScratchPool<T>,
) {
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let chunk = images_per(s, CHUNK_COLS);
    let dw = &mut dw[..s.w_len()];
    if s.n == 0 && !accumulate {
        dw.fill(T::ZERO);
    }
    // Task j owns the columns j*K_BLOCK.. of every row of dW.
    let nblocks = k.div_ceil(K_BLOCK);
    let mut b0 = 0;
    while b0 < s.n {
        let nb = chunk.min(s.n - b0);
        let ncols = nb * hwo;
        let dyc = &dy[b0 * s.c_out * hwo..(b0 + nb) * s.c_out * hwo];
        pool.with(if nb == 1 { 0 } else { s.c_out * ncols }, |dyg| {
            let lhs = if nb == 1 {
                Mat::rm(dyc, s.c_out, ncols)
            } else {
                dyg.par_chunks_mut(ncols).enumerate().for_each(|(ch, row)| {
                    for bi in 0..nb {
                        row[bi * hwo..(bi + 1) * hwo].copy_from_slice(&dyc[(bi * s.c_out + ch) * hwo..][..hwo]);
                    }
                });
                Mat::rm(&*dyg, s.c_out, ncols)
            };
            let read = accumulate || b0 > 0;
            let dst = SendPtr(dw.as_mut_ptr());
            (0..nblocks).into_par_iter().for_each(|j| {
                let (r0, r1) = (j * K_BLOCK, ((j + 1) * K_BLOCK).min(k));
                let kb = r1 - r0;
                pool.with(kb * ncols, |col| {
                    let rhs = if s.is_pointwise() && nb == 1 {
                        Mat::rm_t(&x[b0 * k * hwo + r0 * hwo..b0 * k * hwo + r1 * hwo], ncols, kb)
                    } else {
                        im2col_rows(s, x, b0, nb, r0, r1, col);
                        Mat::rm_t(&*col, ncols, kb)
                    };
                    // SAFETY: dW is (c_out, k) row-major with s.w_len() elements (checked at
                    // entry); this task writes only columns r0..r1 of each row, which no
                    // other task of this loop touches, and dw is not otherwise used meanwhile.
                    unsafe { matmul_into_block(dst.add(r0), k, lhs, rhs, read) };
                });
            });
        });
        b0 += nb;
    }
}

/// Direct (slow, obviously correct) convolution for tests: y = conv(x, w).
pub fn reference_forward(s: &Conv2d, x: &[f64], w: &[f64]) -> Vec<f64> {
    let (ho, wo) = (s.h_out(), s.w_out());
    let mut y = vec![0.0; s.y_len()];
    for b in 0..s.n {
        for co in 0..s.c_out {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0.0;
                    for ci in 0..s.c_in {
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.stride + ky) as isize - s.pad as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad as isize;
                                if iy < 0 || ix < 0 || iy >= s.h as isize || ix >= s.w as isize {
                                    continue;
                                }
                                acc += x[((b * s.c_in + ci) * s.h + iy as usize) * s.w + ix as usize]
                                    * w[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx];
                            }
                        }
                    }
                    y[((b * s.c_out + co) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    y
}
