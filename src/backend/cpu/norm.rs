//! CPU batch normalisation over NCHW tensors (statistics accumulated in f64).

use super::gemm::SendPtr;
use super::real::Real;
use super::simd::{prefetch, simd_leaf};
use crate::backend::SumOverRanks;
use crate::ops::BatchNorm;
use rayon::prelude::*;

/// Independent f64 partial sums per plane: element i goes to lane i mod LANES, and the lanes
/// are added in a fixed tree. The lanes break the add-latency chain (and let the compiler
/// vectorize); the order depends only on the plane length, never on threads.
const LANES: usize = 8;

/// The lanes of [`LANES`] added in a fixed tree.
#[inline]
fn fold_lanes(a: [f64; LANES]) -> f64 {
    ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]))
}

simd_leaf! {
/// Σ f(x_i) over one plane in f64 lanes.
fn plane_sum<T: Real>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0.0; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += f(c[k].to_f64());
        }
    }
    for (k, v) in rest.iter().enumerate() {
        acc[k] += f(v.to_f64());
    }
    fold_lanes(acc)
}
}

/// The per-channel `(scale, shift)` of the training forward, `y = scale x + shift`, from
/// the saved statistics as stored (rounded to T): the backward recomputes the very same
/// values, so `x scale + shift > 0` there is bit for bit the forward's ReLU mask.
fn fused_affine<T: Real>(gamma: T, beta: T, mean: T, invstd: T) -> (T, T) {
    let scale = gamma.to_f64() * invstd.to_f64();
    (T::from_f64(scale), T::from_f64(beta.to_f64() - mean.to_f64() * scale))
}

/// The fused ReLU's gate of one element: the forward's pre-activation `x a + b` (written
/// as [`normalise_plane`] writes it, so the same bits).
#[inline(always)]
fn gate<T: Real>(x: T, a: T, b: T) -> T {
    x * a + b
}

simd_leaf! {
/// (Σ g, Σ g (x - mean)) over one plane in f64 lanes, with g = dy, or with the fused ReLU
/// (`MASK`) g = dy [x a + b > 0], the forward's mask recomputed from x.
fn plane_grad_sums<T: Real, const MASK: bool>(dy: &[T], x: &[T], ab: (T, T), mean: f64) -> (f64, f64) {
    let (mut sg, mut sgx) = ([0.0; LANES], [0.0; LANES]);
    let (dc, xc) = (dy.chunks_exact(LANES), x.chunks_exact(LANES));
    let (dr, xr) = (dc.remainder(), xc.remainder());
    for (d, v) in dc.zip(xc) {
        grad_sums_chunk::<T, MASK>(d, v, ab, mean, &mut sg, &mut sgx);
    }
    grad_sums_chunk::<T, MASK>(dr, xr, ab, mean, &mut sg, &mut sgx);
    (fold_lanes(sg), fold_lanes(sgx))
}
}

/// One chunk (at most [`LANES`] elements) of [`plane_grad_sums`]: a function forced inline,
/// not a closure, so that it is compiled into the wide version (a closure called twice
/// stays a separate function at the baseline width).
#[inline(always)]
fn grad_sums_chunk<T: Real, const MASK: bool>(
    d: &[T],
    v: &[T],
    (a, b): (T, T),
    mean: f64,
    sg: &mut [f64; LANES],
    sgx: &mut [f64; LANES],
) {
    // the mask as a bitwise AND in a first loop, the f64 sums in a second: written together
    // the compiler turns the mask into per-element branches, which mispredict (about half
    // the elements are masked, unpredictably)
    let mut g = [T::ZERO; LANES];
    for k in 0..d.len() {
        g[k] = if MASK { d[k].masked_by(gate(v[k], a, b)) } else { d[k] };
    }
    for k in 0..d.len() {
        let gk = g[k].to_f64();
        sg[k] += gk;
        sgx[k] += gk * (v[k].to_f64() - mean);
    }
}

/// Per-channel (mean, sum of squared deviations) computed in two passes, in f64.
fn channel_moments<T: Real>(s: &BatchNorm, x: &[T], c: usize) -> (f64, f64) {
    let m = (s.n * s.hw) as f64;
    let mean = channel_sum(s, x, c) / m;
    (mean, channel_squares(s, x, c, mean))
}

/// The sum over the channel's elements, in f64 (plane by plane, in order).
fn channel_sum<T: Real>(s: &BatchNorm, x: &[T], c: usize) -> f64 {
    (0..s.n)
        .map(|b| {
            if b + 1 < s.n {
                prefetch(&x[((b + 1) * s.c + c) * s.hw..][..s.hw]);
            }
            plane_sum(&x[(b * s.c + c) * s.hw..][..s.hw], |v| v)
        })
        .sum()
}

/// The sum of squared deviations from `mean` over the channel's elements, in f64.
fn channel_squares<T: Real>(s: &BatchNorm, x: &[T], c: usize, mean: f64) -> f64 {
    (0..s.n)
        .map(|b| {
            plane_sum(&x[(b * s.c + c) * s.hw..][..s.hw], |v| {
                let d = v - mean;
                d * d
            })
        })
        .sum()
}

/// Per-channel (mean, sum of squared deviations) of the global batch, from this rank's `x`
/// and `sync` (c + 1 values: the sums and the sample count; then c: the squared deviations),
/// written as pairs into `work` (2c); returns the global sample count.
fn global_moments<T: Real>(s: &BatchNorm, x: &[T], work: &mut [f64], sync: &mut dyn FnMut(&mut [f64])) -> f64 {
    let mut sums: Vec<f64> = (0..s.c).into_par_iter().map(|c| channel_sum(s, x, c)).collect();
    sums.push((s.n * s.hw) as f64);
    sync(&mut sums);
    let m = sums[s.c];
    let means: Vec<f64> = sums[..s.c].iter().map(|v| v / m).collect();
    let mut squares: Vec<f64> = (0..s.c)
        .into_par_iter()
        .map(|c| channel_squares(s, x, c, means[c]))
        .collect();
    sync(&mut squares);
    for c in 0..s.c {
        work[2 * c] = means[c];
        work[2 * c + 1] = squares[c];
    }
    m
}

simd_leaf! {
/// `y = a x + b` over one plane, then `max(y, 0)` with `relu`.
fn normalise_plane<T: Real>(yp: &mut [T], xp: &[T], a: T, b: T, relu: bool) {
    if relu {
        for (o, &i) in yp.iter_mut().zip(xp) {
            let v = gate(i, a, b);
            *o = v.masked_by(v);
        }
    } else {
        for (o, &i) in yp.iter_mut().zip(xp) {
            *o = i * a + b;
        }
    }
}
}

simd_leaf! {
/// `dx (+)= a g + bx x + c0` over one plane, with g = dy, or with `relu` g = dy [x s + t >
/// 0] (`st` = (s, t), the forward's scale and shift).
#[allow(clippy::too_many_arguments)]
fn dx_plane<T: Real>(dxp: &mut [T], dys: &[T], xs: &[T], st: (T, T), a: T, bx: T, c0: T, relu: bool, accumulate: bool) {
    let term = |g: T, v: T| {
        let g = if relu { g.masked_by(gate(v, st.0, st.1)) } else { g };
        a * g + bx * v + c0
    };
    let inputs = dys.iter().zip(xs);
    if accumulate {
        for (o, (&g, &v)) in dxp.iter_mut().zip(inputs) {
            *o += term(g, v);
        }
    } else {
        for (o, (&g, &v)) in dxp.iter_mut().zip(inputs) {
            *o = term(g, v);
        }
    }
}
}

/// y = scale x + shift per channel (then max(y, 0) with `s.relu`), applied per (image,
/// channel) plane; `affine` is `(c, 2)` = (scale, shift).
fn normalise<T: Real>(s: &BatchNorm, x: &[T], y: &mut [T], affine: &[f64]) {
    y[..s.len()]
        .par_chunks_mut(s.hw)
        .zip(x[..s.len()].par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let c = p % s.c;
            let (a, b) = (T::from_f64(affine[2 * c]), T::from_f64(affine[2 * c + 1]));
            normalise_plane(yp, xp, a, b, s.relu);
        });
}

/// Training-mode forward with running-statistics update, over this rank's batch or (with
/// `sync`) the global one. `work` holds at least `2 c` f64.
#[allow(clippy::too_many_arguments)]
pub fn forward_train<T: Real>(
    s: &BatchNorm,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &mut [T],
    running_var: &mut [T],
    y: &mut [T],
    save_mean: &mut [T],
    save_invstd: &mut [T],
    work: &mut [f64],
    sync: SumOverRanks<'_>,
) {
    let work = &mut work[..2 * s.c];
    let invstd_of = |ss: f64, m: f64| 1.0 / (ss / m + s.eps as f64).sqrt();
    // (scale, shift) from the statistics as saved (see fused_affine)
    let affine =
        |c: usize, mean: f64, invstd: f64| fused_affine(gamma[c], beta[c], T::from_f64(mean), T::from_f64(invstd));
    // saved and running statistics from the (mean, squared deviations) pairs of `work`
    let mom = s.momentum as f64;
    let mut record = |work: &[f64], m: f64| {
        for c in 0..s.c {
            let (mean, ss) = (work[2 * c], work[2 * c + 1]);
            let var = ss / m;
            save_mean[c] = T::from_f64(mean);
            save_invstd[c] = T::from_f64(invstd_of(ss, m));
            let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
            running_mean[c] = T::from_f64((1.0 - mom) * running_mean[c].to_f64() + mom * mean);
            running_var[c] = T::from_f64((1.0 - mom) * running_var[c].to_f64() + mom * unbiased);
        }
    };
    match sync {
        Some(f) => {
            let m = global_moments(s, x, work, f);
            record(work, m);
            for c in 0..s.c {
                let (a, b) = affine(c, work[2 * c], invstd_of(work[2 * c + 1], m));
                work[2 * c] = a.to_f64();
                work[2 * c + 1] = b.to_f64();
            }
            normalise(s, x, y, work);
        }
        None => {
            // channel by channel, statistics then normalisation, while the channel's planes
            // are still in cache (one pass over memory instead of three)
            let m = (s.n * s.hw) as f64;
            let out = SendPtr(y.as_mut_ptr());
            assert!(y.len() >= s.len(), "batch norm: output too small");
            work.par_chunks_mut(2).enumerate().for_each(|(c, w)| {
                let (mean, ss) = channel_moments(s, x, c);
                let (a, b) = affine(c, mean, invstd_of(ss, m));
                for bi in 0..s.n {
                    let off = (bi * s.c + c) * s.hw;
                    // SAFETY: off + hw <= s.len() <= y.len(); the planes of channel c are
                    // written by this task only.
                    let yp = unsafe { std::slice::from_raw_parts_mut(out.add(off).0, s.hw) };
                    normalise_plane(yp, &x[off..off + s.hw], a, b, s.relu);
                }
                w[0] = mean;
                w[1] = ss;
            });
            record(work, m);
        }
    }
}

/// Evaluation-mode forward with the running statistics. `work` holds at least `2 c` f64.
#[allow(clippy::too_many_arguments)]
pub fn forward_eval<T: Real>(
    s: &BatchNorm,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    rm: &[T],
    rv: &[T],
    y: &mut [T],
    work: &mut [f64],
) {
    for c in 0..s.c {
        let invstd = 1.0 / (rv[c].to_f64() + s.eps as f64).sqrt();
        let scale = gamma[c].to_f64() * invstd;
        work[2 * c] = scale;
        work[2 * c + 1] = beta[c].to_f64() - rm[c].to_f64() * scale;
    }
    normalise(s, x, y, &work[..2 * s.c]);
}

/// Training-mode backward: dx = gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)), with
/// the sums and M of this rank's batch or (with `sync`, 2c + 1 values: the sums of dy, of
/// dy xhat and the sample count) of the global one; dgamma and dbeta are this rank's sums.
/// With `s.relu`, dy is first masked by the fused ReLU's gate `x scale + shift > 0`,
/// recomputed from x, gamma, beta and the saved statistics exactly as the forward computed
/// it (so the fused output itself is not read: one stream of memory less).
/// `work` holds at least `2 c + 1` f64.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    s: &BatchNorm,
    x: &[T],
    dy: &[T],
    gamma: &[T],
    beta: &[T],
    save_mean: &[T],
    save_invstd: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    accumulate: bool,
    work: &mut [f64],
    sync: SumOverRanks<'_>,
) {
    let mut m = (s.n * s.hw) as f64;
    let sums = &mut work[..2 * s.c];
    // (Σ dy, Σ dy xhat) of channel c over this rank's batch
    // the fused ReLU's (scale, shift) of channel c
    let gate_of = |c: usize| fused_affine(gamma[c], beta[c], save_mean[c], save_invstd[c]);
    let channel_sums = |c: usize| {
        let (mean, invstd) = (save_mean[c].to_f64(), save_invstd[c].to_f64());
        let st = gate_of(c);
        let (mut sdy, mut sdyx) = (0.0, 0.0);
        for b in 0..s.n {
            let off = (b * s.c + c) * s.hw;
            if b + 1 < s.n {
                let next = off + s.c * s.hw;
                prefetch(&dy[next..next + s.hw]);
                prefetch(&x[next..next + s.hw]);
            }
            let (dys, xs) = (&dy[off..off + s.hw], &x[off..off + s.hw]);
            let (g, gx) = if s.relu {
                plane_grad_sums::<T, true>(dys, xs, st, mean)
            } else {
                plane_grad_sums::<T, false>(dys, xs, st, mean)
            };
            sdy += g;
            sdyx += gx;
        }
        (sdy, sdyx * invstd)
    };
    // dx of one plane p (channel c) from the channel's sums over M samples
    let dx_of = |p: usize, dxp: &mut [T], sdy: f64, sdyx: f64, m: f64| {
        let c = p % s.c;
        let off = p * s.hw;
        let (mean, invstd) = (save_mean[c].to_f64(), save_invstd[c].to_f64());
        let k = gamma[c].to_f64() * invstd / m;
        // dx = k (M dy - sdy - xhat sdyx) = a dy + b x + c0 with xhat = (x - mean) invstd
        let a = T::from_f64(k * m);
        let bx = T::from_f64(-k * sdyx * invstd);
        let c0 = T::from_f64(k * (-sdy + sdyx * invstd * mean));
        let xs = &x[off..off + s.hw];
        let dys = &dy[off..off + s.hw];
        dx_plane(dxp, dys, xs, gate_of(c), a, bx, c0, s.relu, accumulate);
    };
    let Some(f) = sync else {
        // channel by channel, sums then dx, while the channel's planes are still in cache
        let out = SendPtr(dx.as_mut_ptr());
        assert!(dx.len() >= s.len(), "batch norm: gradient too small");
        sums.par_chunks_mut(2).enumerate().for_each(|(c, o)| {
            (o[0], o[1]) = channel_sums(c);
            for b in 0..s.n {
                let p = b * s.c + c;
                // SAFETY: (p + 1) hw <= s.len() <= dx.len(); the planes of channel c are
                // written by this task only.
                let dxp = unsafe { std::slice::from_raw_parts_mut(out.add(p * s.hw).0, s.hw) };
                dx_of(p, dxp, o[0], o[1], m);
            }
        });
        for c in 0..s.c {
            dbeta[c] = T::from_f64(sums[2 * c]);
            dgamma[c] = T::from_f64(sums[2 * c + 1]);
        }
        return;
    };
    sums.par_chunks_mut(2).enumerate().for_each(|(c, o)| {
        (o[0], o[1]) = channel_sums(c);
    });
    for c in 0..s.c {
        dbeta[c] = T::from_f64(sums[2 * c]);
        dgamma[c] = T::from_f64(sums[2 * c + 1]);
    }
    // (sum dy of every channel, sum dy xhat of every channel, samples) over the ranks
    let mut v: Vec<f64> = (0..2 * s.c).map(|i| sums[2 * (i % s.c) + i / s.c]).collect();
    v.push(m);
    f(&mut v);
    for c in 0..s.c {
        sums[2 * c] = v[c];
        sums[2 * c + 1] = v[s.c + c];
    }
    m = v[2 * s.c];
    let sums: &[f64] = sums;
    dx[..s.len()].par_chunks_mut(s.hw).enumerate().for_each(|(p, dxp)| {
        let c = p % s.c;
        dx_of(p, dxp, sums[2 * c], sums[2 * c + 1], m);
    });
}
