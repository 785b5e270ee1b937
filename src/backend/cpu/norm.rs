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

/// y = gamma (x - mean) invstd + beta, applied per (image, channel) plane.
fn normalise<T: Real>(s: &BatchNorm, x: &[T], y: &mut [T], scale: &[f64], shift: &[f64]) {
    y[..s.len()]
        .par_chunks_mut(s.hw)
        .zip(x[..s.len()].par_chunks(s.hw))
        .enumerate()
        .for_each(|(p, (yp, xp))| {
            let c = p % s.c;
            let (a, b) = (T::from_f64(scale[c]), T::from_f64(shift[c]));
            for (o, &i) in yp.iter_mut().zip(xp) {
                *o = i * a + b;
            }
        });
}

/// Training-mode forward with running-statistics update.
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
) {
    let m = (s.n * s.hw) as f64;
    let moments: Vec<(f64, f64)> = (0..s.c).into_par_iter().map(|c| channel_moments(s, x, c)).collect();
    let mut scale = vec![0.0; s.c];
    let mut shift = vec![0.0; s.c];
    let mom = s.momentum as f64;
    for c in 0..s.c {
        let (mean, ss) = moments[c];
        let var = ss / m;
        let invstd = 1.0 / (var + s.eps as f64).sqrt();
        save_mean[c] = T::from_f64(mean);
        save_invstd[c] = T::from_f64(invstd);
        scale[c] = gamma[c].to_f64() * invstd;
        shift[c] = beta[c].to_f64() - mean * scale[c];
        let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
        running_mean[c] = T::from_f64((1.0 - mom) * running_mean[c].to_f64() + mom * mean);
        running_var[c] = T::from_f64((1.0 - mom) * running_var[c].to_f64() + mom * unbiased);
    }
    normalise(s, x, y, &scale, &shift);
}

/// Evaluation-mode forward with the running statistics.
pub fn forward_eval<T: Real>(s: &BatchNorm, x: &[T], gamma: &[T], beta: &[T], rm: &[T], rv: &[T], y: &mut [T]) {
    let mut scale = vec![0.0; s.c];
    let mut shift = vec![0.0; s.c];
    for c in 0..s.c {
        let invstd = 1.0 / (rv[c].to_f64() + s.eps as f64).sqrt();
        scale[c] = gamma[c].to_f64() * invstd;
        shift[c] = beta[c].to_f64() - rm[c].to_f64() * scale[c];
    }
    normalise(s, x, y, &scale, &shift);
}

/// Training-mode backward: dx = gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)).
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
) {
    let m = (s.n * s.hw) as f64;
    let sums: Vec<(f64, f64)> = (0..s.c)
        .into_par_iter()
        .map(|c| {
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
            (sdy, sdyx)
        })
        .collect();
    for c in 0..s.c {
        dbeta[c] = T::from_f64(sums[c].0);
        dgamma[c] = T::from_f64(sums[c].1);
    }
    dx[..s.len()]
        .par_chunks_mut(s.hw)
        .enumerate()
        .for_each(|(p, dxp)| {
            let c = p % s.c;
            let off = p * s.hw;
            let (mean, invstd) = (save_mean[c].to_f64(), save_invstd[c].to_f64());
            let k = gamma[c].to_f64() * invstd / m;
            let (sdy, sdyx) = sums[c];
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
