//! CPU batch normalisation over NCHW tensors (statistics accumulated in f64).

use super::real::Real;
use crate::ops::BatchNorm;
use rayon::prelude::*;

/// Per-channel (sum, sum of squared deviations) computed in two passes, in f64.
fn channel_moments<T: Real>(s: &BatchNorm, x: &[T], c: usize) -> (f64, f64) {
    let m = (s.n * s.hw) as f64;
    let mut sum = 0.0;
    for b in 0..s.n {
        let plane = &x[(b * s.c + c) * s.hw..][..s.hw];
        sum += plane.iter().map(|v| v.to_f64()).sum::<f64>();
    }
    let mean = sum / m;
    let mut ss = 0.0;
    for b in 0..s.n {
        let plane = &x[(b * s.c + c) * s.hw..][..s.hw];
        ss += plane
            .iter()
            .map(|v| {
                let d = v.to_f64() - mean;
                d * d
            })
            .sum::<f64>();
    }
    (mean, ss)
}

/// y = scale x + shift per channel, applied per (image, channel) plane; `affine` is `(c, 2)`
/// = (scale, shift).
fn normalise<T: Real>(s: &BatchNorm, x: &[T], y: &mut [T], affine: &[f64]) {
    y[..s.len()]
        .par_chunks_mut(s.hw)
        .zip(x[..s.len()].par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let c = p % s.c;
            let (a, b) = (T::from_f64(affine[2 * c]), T::from_f64(affine[2 * c + 1]));
            for (o, &i) in yp.iter_mut().zip(xp) {
                *o = i * a + b;
            }
        });
}

/// Training-mode forward with running-statistics update. `work` holds at least `2 c` f64.
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
) {
    let m = (s.n * s.hw) as f64;
    let work = &mut work[..2 * s.c];
    work.par_chunks_mut(2).enumerate().for_each(|(c, w)| {
        let (mean, ss) = channel_moments(s, x, c);
        w[0] = mean;
        w[1] = ss;
    });
    let mom = s.momentum as f64;
    for c in 0..s.c {
        let (mean, ss) = (work[2 * c], work[2 * c + 1]);
        let var = ss / m;
        let invstd = 1.0 / (var + s.eps as f64).sqrt();
        save_mean[c] = T::from_f64(mean);
        save_invstd[c] = T::from_f64(invstd);
        let scale = gamma[c].to_f64() * invstd;
        work[2 * c] = scale;
        work[2 * c + 1] = beta[c].to_f64() - mean * scale;
        let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
        running_mean[c] = T::from_f64((1.0 - mom) * running_mean[c].to_f64() + mom * mean);
        running_var[c] = T::from_f64((1.0 - mom) * running_var[c].to_f64() + mom * unbiased);
    }
    normalise(s, x, y, work);
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

/// Training-mode backward: dx = gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)).
/// `work` holds at least `2 c` f64.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    s: &BatchNorm,
    x: &[T],
    dy: &[T],
    gamma: &[T],
    save_mean: &[T],
    save_invstd: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    accumulate: bool,
    work: &mut [f64],
) {
    let m = (s.n * s.hw) as f64;
    let sums = &mut work[..2 * s.c];
    sums.par_chunks_mut(2).enumerate().for_each(|(c, out)| {
        let (mean, invstd) = (save_mean[c].to_f64(), save_invstd[c].to_f64());
        let (mut sdy, mut sdyx) = (0.0, 0.0);
        for b in 0..s.n {
            let off = (b * s.c + c) * s.hw;
            for (&g, &v) in dy[off..off + s.hw].iter().zip(&x[off..off + s.hw]) {
                let g = g.to_f64();
                sdy += g;
                sdyx += g * (v.to_f64() - mean) * invstd;
            }
        }
        out[0] = sdy;
        out[1] = sdyx;
    });
    let sums: &[f64] = sums;
    for c in 0..s.c {
        dbeta[c] = T::from_f64(sums[2 * c]);
        dgamma[c] = T::from_f64(sums[2 * c + 1]);
    }
    dx[..s.len()].par_chunks_mut(s.hw).enumerate().for_each(|(p, dxp)| {
        let c = p % s.c;
        let off = p * s.hw;
        let (mean, invstd) = (save_mean[c].to_f64(), save_invstd[c].to_f64());
        let k = gamma[c].to_f64() * invstd / m;
        let (sdy, sdyx) = (sums[2 * c], sums[2 * c + 1]);
        // dx = k (M dy - sdy - xhat sdyx) = a dy + b x + c0 with xhat = (x - mean) invstd
        let a = T::from_f64(k * m);
        let bx = T::from_f64(-k * sdyx * invstd);
        let c0 = T::from_f64(k * (-sdy + sdyx * invstd * mean));
        let xs = &x[off..off + s.hw];
        let dys = &dy[off..off + s.hw];
        if accumulate {
            for ((o, &g), &v) in dxp.iter_mut().zip(dys).zip(xs) {
                *o += a * g + bx * v + c0;
            }
        } else {
            for ((o, &g), &v) in dxp.iter_mut().zip(dys).zip(xs) {
                *o = a * g + bx * v + c0;
            }
        }
    });
}
