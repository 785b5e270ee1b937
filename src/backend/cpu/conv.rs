//! CPU convolution: im2col + GEMM over chunks of images, col2im for the data gradient.
//!
//! The batch is processed in chunks whose size depends only on the shapes (never on the
//! thread count), so results are bit-identical for any number of threads. Each chunk's
//! im2col matrix is `(k, nb * ho * wo)` with k = c_in * kh * kw and one column per output
//! pixel of each image; one GEMM then covers the whole chunk. Scratch buffers are owned by
//! the backend and grow once to the largest shape seen, so the training loop allocates nothing.

use super::gemm::{matmul, Mat};
use super::real::Real;
use crate::ops::Conv2d;
use rayon::prelude::*;

/// Target number of im2col columns per chunk: wide enough for an efficient GEMM, small enough
/// to stay in cache-friendly scratch.
const TARGET_COLS: usize = 4096;

/// Images per chunk for this geometry.
pub fn chunk_images(s: &Conv2d) -> usize {
    let hw = s.h_out() * s.w_out();
    (TARGET_COLS / hw.max(1)).clamp(1, s.n.max(1))
}

/// Scratch elements needed: (im2col, gather) buffers.
pub fn scratch_len(s: &Conv2d) -> (usize, usize) {
    let nb = chunk_images(s);
    let cols = nb * s.h_out() * s.w_out();
    (s.k() * cols, s.c_out * cols)
}

fn grow<T: Real>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::ZERO);
    }
}

/// Fill `col (k, nb*hw_out)` from images `b0..b0+nb` of x.
fn im2col<T: Real>(s: &Conv2d, x: &[T], b0: usize, nb: usize, col: &mut [T]) {
    let (ho, wo) = (s.h_out(), s.w_out());
    let hwo = ho * wo;
    let ncols = nb * hwo;
    let img = s.c_in * s.h * s.w;
    col[..s.k() * ncols]
        .par_chunks_mut(ncols)
        .enumerate()
        .for_each(|(r, row)| {
            let ci = r / (s.kh * s.kw);
            let ky = (r / s.kw) % s.kh;
            let kx = r % s.kw;
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
                    // valid ox: 0 <= ox*stride + kx - pad < w
                    let lo = s.pad.saturating_sub(kx).div_ceil(s.stride);
                    let hi = if s.w + s.pad > kx {
                        ((s.w + s.pad - kx - 1) / s.stride + 1).min(wo)
                    } else {
                        0
                    };
                    let lo = lo.min(hi);
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
        });
}

/// Add (or write) `col (k, nb*hw_out)` back into images `b0..b0+nb` of dx.
fn col2im<T: Real>(s: &Conv2d, col: &[T], b0: usize, nb: usize, dx: &mut [T], accumulate: bool) {
    let (ho, wo) = (s.h_out(), s.w_out());
    let hwo = ho * wo;
    let ncols = nb * hwo;
    let plane_len = s.h * s.w;
    let img = s.c_in * plane_len;
    dx[b0 * img..(b0 + nb) * img]
        .par_chunks_mut(plane_len)
        .enumerate()
        .for_each(|(p, plane)| {
            let bi = p / s.c_in;
            let ci = p % s.c_in;
            if !accumulate {
                plane.fill(T::ZERO);
            }
            for ky in 0..s.kh {
                for kx in 0..s.kw {
                    let r = (ci * s.kh + ky) * s.kw + kx;
                    let row = &col[r * ncols + bi * hwo..r * ncols + (bi + 1) * hwo];
                    let lo = s.pad.saturating_sub(kx).div_ceil(s.stride);
                    let hi = if s.w + s.pad > kx {
                        ((s.w + s.pad - kx - 1) / s.stride + 1).min(wo)
                    } else {
                        0
                    };
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
        });
}

/// Copy images `b0..b0+nb` of t `(n, c, hw)` into g `(c, nb*hw)`.
fn gather_chunk<T: Real>(t: &[T], c: usize, hw: usize, b0: usize, nb: usize, g: &mut [T]) {
    g[..c * nb * hw]
        .par_chunks_mut(nb * hw)
        .enumerate()
        .for_each(|(ch, row)| {
            for bi in 0..nb {
                let src = &t[((b0 + bi) * c + ch) * hw..][..hw];
                row[bi * hw..(bi + 1) * hw].copy_from_slice(src);
            }
        });
}

/// Copy g `(c, nb*hw)` into images `b0..b0+nb` of t `(n, c, hw)`.
fn scatter_chunk<T: Real>(g: &[T], c: usize, hw: usize, b0: usize, nb: usize, t: &mut [T]) {
    t[b0 * c * hw..(b0 + nb) * c * hw]
        .par_chunks_mut(hw)
        .enumerate()
        .for_each(|(p, dst)| {
            let bi = p / c;
            let ch = p % c;
            dst.copy_from_slice(&g[ch * nb * hw + bi * hw..][..hw]);
        });
}

/// Forward: y = conv(x, w).
pub fn forward<T: Real>(s: &Conv2d, x: &[T], w: &[T], y: &mut [T], col: &mut Vec<T>, tmp: &mut Vec<T>, threads: usize) {
    assert!(x.len() >= s.x_len() && w.len() >= s.w_len() && y.len() >= s.y_len(), "conv2d_forward: buffer sizes");
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let nb_max = chunk_images(s);
    let (col_len, tmp_len) = scratch_len(s);
    grow(col, col_len);
    grow(tmp, tmp_len);
    let wm = Mat::rm(w, s.c_out, k);
    let mut b0 = 0;
    while b0 < s.n {
        let nb = nb_max.min(s.n - b0);
        let ncols = nb * hwo;
        let rhs = if s.is_pointwise() && nb == 1 {
            Mat::rm(&x[b0 * k * hwo..(b0 + 1) * k * hwo], k, ncols)
        } else {
            im2col(s, x, b0, nb, col);
            Mat::rm(&col[..k * ncols], k, ncols)
        };
        if nb == 1 {
            let dst = &mut y[b0 * s.c_out * hwo..(b0 + 1) * s.c_out * hwo];
            matmul(dst, ncols, wm, rhs, false, threads);
        } else {
            matmul(&mut tmp[..s.c_out * ncols], ncols, wm, rhs, false, threads);
            scatter_chunk(tmp, s.c_out, hwo, b0, nb, y);
        }
        b0 += nb;
    }
}

/// Data gradient: dx (+)= conv_transpose(dy, w).
#[allow(clippy::too_many_arguments)]
pub fn backward_data<T: Real>(
    s: &Conv2d,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
    accumulate: bool,
    col: &mut Vec<T>,
    tmp: &mut Vec<T>,
    threads: usize,
) {
    assert!(dx.len() >= s.x_len() && w.len() >= s.w_len() && dy.len() >= s.y_len(), "conv2d_backward_data: buffer sizes");
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let nb_max = chunk_images(s);
    let (col_len, tmp_len) = scratch_len(s);
    grow(col, col_len);
    grow(tmp, tmp_len);
    let wt = Mat::rm_t(w, k, s.c_out); // (k, c_out)
    let mut b0 = 0;
    while b0 < s.n {
        let nb = nb_max.min(s.n - b0);
        let ncols = nb * hwo;
        let dyc = if nb == 1 {
            Mat::rm(&dy[b0 * s.c_out * hwo..(b0 + 1) * s.c_out * hwo], s.c_out, ncols)
        } else {
            gather_chunk(dy, s.c_out, hwo, b0, nb, tmp);
            Mat::rm(&tmp[..s.c_out * ncols], s.c_out, ncols)
        };
        if s.is_pointwise() && nb == 1 {
            let dst = &mut dx[b0 * k * hwo..(b0 + 1) * k * hwo];
            matmul(dst, ncols, wt, dyc, accumulate, threads);
        } else {
            matmul(&mut col[..k * ncols], ncols, wt, dyc, false, threads);
            col2im(s, col, b0, nb, dx, accumulate);
        }
        b0 += nb;
    }
}

/// Filter gradient: dw (+)= sum over the batch of dy x^T (in im2col form).
#[allow(clippy::too_many_arguments)]
pub fn backward_filter<T: Real>(
    s: &Conv2d,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    accumulate: bool,
    col: &mut Vec<T>,
    tmp: &mut Vec<T>,
    threads: usize,
) {
    assert!(x.len() >= s.x_len() && dw.len() >= s.w_len() && dy.len() >= s.y_len(), "conv2d_backward_filter: buffer sizes");
    let hwo = s.h_out() * s.w_out();
    let k = s.k();
    let nb_max = chunk_images(s);
    let (col_len, tmp_len) = scratch_len(s);
    grow(col, col_len);
    grow(tmp, tmp_len);
    if s.n == 0 && !accumulate {
        dw[..s.w_len()].fill(T::ZERO);
    }
    let mut b0 = 0;
    while b0 < s.n {
        let nb = nb_max.min(s.n - b0);
        let ncols = nb * hwo;
        let dyc = if nb == 1 {
            Mat::rm(&dy[b0 * s.c_out * hwo..(b0 + 1) * s.c_out * hwo], s.c_out, ncols)
        } else {
            gather_chunk(dy, s.c_out, hwo, b0, nb, tmp);
            Mat::rm(&tmp[..s.c_out * ncols], s.c_out, ncols)
        };
        let colt = if s.is_pointwise() && nb == 1 {
            Mat::rm_t(&x[b0 * k * hwo..(b0 + 1) * k * hwo], ncols, k)
        } else {
            im2col(s, x, b0, nb, col);
            Mat::rm_t(&col[..k * ncols], ncols, k)
        };
        matmul(&mut dw[..s.w_len()], k, dyc, colt, accumulate || b0 > 0, threads);
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
