//! CPU element-wise ops, pooling, the linear layer, the loss and the SGD update.

use super::gemm::{matmul, Mat};
use super::real::Real;
use crate::backend::Run;
use crate::ops::{Linear, Pool2d, Sgd};
use rayon::prelude::*;

/// Elements per parallel task of element-wise loops.
const GRAIN: usize = 1 << 15;

/// y = max(x, 0).
pub fn relu_forward<T: Real>(x: &[T], y: &mut [T]) {
    y.par_chunks_mut(GRAIN).zip(x.par_chunks(GRAIN)).for_each(|(yc, xc)| {
        for (o, &i) in yc.iter_mut().zip(xc) {
            *o = if i > T::ZERO { i } else { T::ZERO };
        }
    });
}

/// dx (+)= dy where y > 0.
pub fn relu_backward<T: Real>(y: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
    dx.par_chunks_mut(GRAIN)
        .zip(dy.par_chunks(GRAIN).zip(y.par_chunks(GRAIN)))
        .for_each(|(dxc, (dyc, yc))| {
            for ((o, &g), &v) in dxc.iter_mut().zip(dyc).zip(yc) {
                let d = if v > T::ZERO { g } else { T::ZERO };
                if accumulate {
                    *o += d;
                } else {
                    *o = d;
                }
            }
        });
}

/// y = a + b.
pub fn add_forward<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    y.par_chunks_mut(GRAIN)
        .zip(a.par_chunks(GRAIN).zip(b.par_chunks(GRAIN)))
        .for_each(|(yc, (ac, bc))| {
            for ((o, &u), &v) in yc.iter_mut().zip(ac).zip(bc) {
                *o = u + v;
            }
        });
}

/// dst = src or dst += src.
pub fn copy<T: Real>(src: &[T], dst: &mut [T], accumulate: bool) {
    if !accumulate {
        // in parallel: one core's copy bandwidth is well below the machine's
        dst.par_chunks_mut(GRAIN)
            .zip(src.par_chunks(GRAIN))
            .for_each(|(d, s)| d.copy_from_slice(s));
        return;
    }
    dst.par_chunks_mut(GRAIN).zip(src.par_chunks(GRAIN)).for_each(|(d, s)| {
        for (o, &i) in d.iter_mut().zip(s) {
            *o += i;
        }
    });
}

/// x = value, in parallel (one core's store bandwidth is well below the machine's).
pub fn fill<T: Real>(x: &mut [T], value: T) {
    x.par_chunks_mut(GRAIN).for_each(|c| c.fill(value));
}

/// x *= a.
pub fn scale<T: Real>(x: &mut [T], a: T) {
    x.par_chunks_mut(GRAIN).for_each(|c| {
        for v in c {
            *v *= a;
        }
    });
}

/// y += a x.
pub fn axpy<T: Real>(a: T, x: &[T], y: &mut [T]) {
    y.par_chunks_mut(GRAIN).zip(x.par_chunks(GRAIN)).for_each(|(yc, xc)| {
        for (o, &i) in yc.iter_mut().zip(xc) {
            *o += a * i;
        }
    });
}

/// `dst[r.dst..][..r.len] = src[r.src..][..r.len]` for every run (runs do not overlap in dst).
pub fn copy_runs<T: Real>(runs: &[Run], src: &[T], dst: &mut [T]) {
    for r in runs {
        dst[r.dst..r.dst + r.len].copy_from_slice(&src[r.src..r.src + r.len]);
    }
}

/// Max pooling forward, padding never selected.
pub fn maxpool_forward<T: Real>(s: &Pool2d, x: &[T], y: &mut [T]) {
    let (ho, wo) = (s.h_out(), s.w_out());
    y[..s.n * s.c * ho * wo]
        .par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(p, yp)| {
            let xp = &x[p * s.h * s.w..(p + 1) * s.h * s.w];
            for oy in 0..ho {
                for ox in 0..wo {
                    yp[oy * wo + ox] = xp[argmax_window(s, xp, oy, ox)];
                }
            }
        });
}

/// Index (within the plane) of the first maximum of window (oy, ox).
fn argmax_window<T: Real>(s: &Pool2d, xp: &[T], oy: usize, ox: usize) -> usize {
    let mut best = usize::MAX;
    for ky in 0..s.k {
        let iy = (oy * s.stride + ky) as isize - s.pad as isize;
        if iy < 0 || iy >= s.h as isize {
            continue;
        }
        for kx in 0..s.k {
            let ix = (ox * s.stride + kx) as isize - s.pad as isize;
            if ix < 0 || ix >= s.w as isize {
                continue;
            }
            let i = iy as usize * s.w + ix as usize;
            if best == usize::MAX || xp[i] > xp[best] {
                best = i;
            }
        }
    }
    best
}

/// Max pooling backward: each output's gradient goes to the first maximum of its window.
pub fn maxpool_backward<T: Real>(s: &Pool2d, x: &[T], dy: &[T], dx: &mut [T], accumulate: bool) {
    let (ho, wo) = (s.h_out(), s.w_out());
    dx[..s.n * s.c * s.h * s.w]
        .par_chunks_mut(s.h * s.w)
        .enumerate()
        .for_each(|(p, dxp)| {
            if !accumulate {
                dxp.fill(T::ZERO);
            }
            let xp = &x[p * s.h * s.w..(p + 1) * s.h * s.w];
            let dyp = &dy[p * ho * wo..(p + 1) * ho * wo];
            for oy in 0..ho {
                for ox in 0..wo {
                    dxp[argmax_window(s, xp, oy, ox)] += dyp[oy * wo + ox];
                }
            }
        });
}

/// Global average pool: (n, c, hw) -> (n, c).
pub fn avgpool_forward<T: Real>(hw: usize, x: &[T], y: &mut [T]) {
    let inv = 1.0 / hw as f64;
    y.par_iter_mut().enumerate().for_each(|(p, o)| {
        let s: f64 = x[p * hw..(p + 1) * hw].iter().map(|v| v.to_f64()).sum();
        *o = T::from_f64(s * inv);
    });
}

/// Global average pool backward.
pub fn avgpool_backward<T: Real>(hw: usize, dy: &[T], dx: &mut [T], accumulate: bool) {
    let inv = T::from_f64(1.0 / hw as f64);
    dx.par_chunks_mut(hw).zip(dy.par_iter()).for_each(|(d, &g)| {
        let v = g * inv;
        for o in d.iter_mut() {
            if accumulate {
                *o += v;
            } else {
                *o = v;
            }
        }
    });
}

/// y = x w^T + b.
pub fn linear_forward<T: Real>(s: &Linear, x: &[T], w: &[T], b: &[T], y: &mut [T]) {
    let y = &mut y[..s.n * s.d_out];
    for row in y.chunks_mut(s.d_out) {
        row.copy_from_slice(&b[..s.d_out]);
    }
    matmul(
        y,
        s.d_out,
        Mat::rm(&x[..s.n * s.d_in], s.n, s.d_in),
        Mat::rm_t(&w[..s.d_out * s.d_in], s.d_in, s.d_out),
        true,
        1,
    );
}

/// dx (+)= dy w, dw = dy^T x, db = sum dy.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Real>(
    s: &Linear,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: &mut [T],
    accumulate_dx: bool,
) {
    let dy = &dy[..s.n * s.d_out];
    if let Some(dx) = dx {
        matmul(
            &mut dx[..s.n * s.d_in],
            s.d_in,
            Mat::rm(dy, s.n, s.d_out),
            Mat::rm(&w[..s.d_out * s.d_in], s.d_out, s.d_in),
            accumulate_dx,
            1,
        );
    }
    matmul(
        &mut dw[..s.d_out * s.d_in],
        s.d_in,
        Mat::rm_t(dy, s.d_out, s.n),
        Mat::rm(&x[..s.n * s.d_in], s.n, s.d_in),
        false,
        1,
    );
    for (o, d) in db[..s.d_out].iter_mut().enumerate() {
        *d = T::from_f64((0..s.n).map(|i| dy[i * s.d_out + o].to_f64()).sum());
    }
}

/// Softmax cross-entropy; see the backend trait.
pub fn softmax_xent<T: Real>(
    n: usize,
    classes: usize,
    logits: &[T],
    labels: &[T],
    mut dlogits: Option<&mut [T]>,
    stats: &mut [T],
) {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for i in 0..n {
        let row = &logits[i * classes..(i + 1) * classes];
        let label = labels[i].to_f64() as usize;
        let (mut best, mut max) = (0, row[0].to_f64());
        for (j, v) in row.iter().enumerate() {
            if v.to_f64() > max {
                max = v.to_f64();
                best = j;
            }
        }
        let z: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
        let lse = max + z.ln();
        loss += lse - row[label].to_f64();
        correct += usize::from(best == label);
        if let Some(d) = dlogits.as_deref_mut() {
            let drow = &mut d[i * classes..(i + 1) * classes];
            for (j, (o, v)) in drow.iter_mut().zip(row).enumerate() {
                let p = (v.to_f64() - lse).exp();
                let t = if j == label { 1.0 } else { 0.0 };
                *o = T::from_f64((p - t) / n as f64);
            }
        }
    }
    stats[0] = T::from_f64(loss);
    stats[1] = T::from_f64(correct as f64);
}

/// SGD with momentum and weight decay (PyTorch semantics).
pub fn sgd_step<T: Real>(hp: &Sgd, p: &mut [T], g: &mut [T], m: &mut [T]) {
    let (lr, mu, wd) = (
        T::from_f32(hp.lr),
        T::from_f32(hp.momentum),
        T::from_f32(hp.weight_decay),
    );
    p.par_chunks_mut(GRAIN)
        .zip(g.par_chunks_mut(GRAIN).zip(m.par_chunks_mut(GRAIN)))
        .for_each(|(pc, (gc, mc))| {
            for ((pv, gv), mv) in pc.iter_mut().zip(gc.iter_mut()).zip(mc.iter_mut()) {
                let d = *gv + wd * *pv;
                *gv = d;
                *mv = mu * *mv + d;
                *pv -= lr * *mv;
            }
        });
}

/// x *= mask for a 0/1 mask.
pub fn apply_mask<T: Real>(x: &mut [T], mask: &[T]) {
    x.par_chunks_mut(GRAIN)
        .zip(mask.par_chunks(GRAIN))
        .for_each(|(xc, mc)| {
            for (v, &k) in xc.iter_mut().zip(mc) {
                *v *= k;
            }
        });
}
