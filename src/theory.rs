//! `loft theory`: Theorem 1 of the paper, shown. On a one-hidden-layer CNN
//! `f(X, W) = (1/sqrt(m)) sum_r a_r sum_p relu(<w_r, x_p>)` (m filters, fixed output signs
//! a_r, only W trained, squared loss), the LoFT trajectory approaches full-batch gradient
//! descent's as the width m grows.
//!
//! Data: n Fashion-MNIST training images, each cut into its 16 non-overlapping 7x7 patches
//! (unit-normalised), target +1 for classes 0-4 and -1 for 5-9. GD takes T full-batch steps.
//! LoFT takes T / K rounds: each round a random permutation of the m filters is dealt
//! round-robin to S workers; worker k runs K full-batch GD steps on its own filters, with its
//! sub-network's output scaled by S (so that it estimates the full network's output) and the
//! step size divided by S (so that a filter moves as far per step as under GD), and the
//! filters return to their places. Both start from the same W_0 and a (a symmetric
//! initialisation: filters in pairs of opposite output sign, so f(W_0) = 0). Reported per width
//! (several seeds): `||W_T - W_T^GD||_F^2` and the prediction gap summed over the rounds,
//! `sum_t ||f(W_t) - f(W_t^GD)||^2 / n`; the slope of log(distance) against log(m) with a 95%
//! confidence interval; loss curves of both methods at the largest width.

use crate::backend::cpu::gemm::{matmul, Mat};
use crate::rng::{Purpose, Rng};
use crate::{Error, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `loft theory` runs.
#[derive(Clone, Debug, Serialize)]
pub struct TheoryConfig {
    /// Widths m = 2^k for k in this range (inclusive).
    pub log2_widths: (u32, u32),
    pub seeds: u64,
    /// Numbers of LoFT workers S.
    pub workers: Vec<usize>,
    pub local_steps: usize,
    /// Full-batch steps T (a multiple of the local steps).
    pub steps: usize,
    pub lr: f32,
    pub samples: usize,
    pub data_dir: PathBuf,
    pub out: PathBuf,
}

/// Patches of the n images, `(n * P, d)` row-major, and the targets.
struct Problem {
    x: Vec<f32>,
    y: Vec<f32>,
    n: usize,
    patches: usize,
    d: usize,
}

fn problem(dir: &Path, n: usize) -> Result<Problem> {
    let split = crate::data::idx::load_fashion_mnist(dir)?;
    let t = &split.train;
    if t.len() < n {
        return Err(Error::config(format!(
            "--samples {n}: the training set has {}",
            t.len()
        )));
    }
    let (side, k) = (t.width, 7);
    let per = side / k;
    let (patches, d) = (per * per, k * k);
    let mut x = vec![0f32; n * patches * d];
    for i in 0..n {
        let img = &t.pixels[i * t.image_len()..(i + 1) * t.image_len()];
        for (pi, (py, px)) in (0..per).flat_map(|a| (0..per).map(move |b| (a, b))).enumerate() {
            let row = &mut x[(i * patches + pi) * d..(i * patches + pi + 1) * d];
            for dy in 0..k {
                for dx in 0..k {
                    row[dy * k + dx] = img[(py * k + dy) * side + px * k + dx] as f32 / 255.0;
                }
            }
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
    let y = t.labels[..n].iter().map(|&l| if l < 5 { 1.0 } else { -1.0 }).collect();
    Ok(Problem { x, y, n, patches, d })
}

/// Predictions of the filters `w` `(k, d)` with signs `a` `(k)` and output scale `scale`;
/// `z` `(n * P, k)` receives the pre-activations.
fn predict(pb: &Problem, w: &[f32], a: &[f32], scale: f32, z: &mut Vec<f32>) -> Vec<f32> {
    let (rows, k) = (pb.n * pb.patches, a.len());
    z.resize(rows * k, 0.0);
    matmul(
        z,
        k,
        Mat::rm(&pb.x, rows, pb.d),
        Mat::rm_t(w, pb.d, k),
        false,
        rayon::current_num_threads(),
    );
    (0..pb.n)
        .map(|i| {
            let mut s = 0f64;
            for row in z[i * pb.patches * k..(i + 1) * pb.patches * k].chunks_exact(k) {
                for (v, &ar) in row.iter().zip(a) {
                    if *v > 0.0 {
                        s += (ar * v) as f64;
                    }
                }
            }
            (s * scale as f64) as f32
        })
        .collect()
}

/// `steps` full-batch GD steps of loss `sum_i (f_i - y_i)^2 / (2n)` on the filters `w`.
fn descend(pb: &Problem, w: &mut [f32], a: &[f32], scale: f32, lr: f32, steps: usize) {
    let (rows, k) = (pb.n * pb.patches, a.len());
    let (mut z, mut g) = (Vec::new(), vec![0f32; k * pb.d]);
    for _ in 0..steps {
        let f = predict(pb, w, a, scale, &mut z);
        // e (n*P, k) = (f_i - y_i) a_r [z > 0], then G = e^T X
        for i in 0..pb.n {
            let r = f[i] - pb.y[i];
            for row in z[i * pb.patches * k..(i + 1) * pb.patches * k].chunks_exact_mut(k) {
                for (v, &ar) in row.iter_mut().zip(a) {
                    *v = if *v > 0.0 { r * ar } else { 0.0 };
                }
            }
        }
        matmul(
            &mut g,
            pb.d,
            Mat::rm_t(&z, k, rows),
            Mat::rm(&pb.x, rows, pb.d),
            false,
            rayon::current_num_threads(),
        );
        let step = lr * scale / pb.n as f32;
        for (wv, gv) in w.iter_mut().zip(&g) {
            *wv -= step * gv;
        }
    }
}

fn loss(pb: &Problem, f: &[f32]) -> f64 {
    f.iter().zip(&pb.y).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / (2.0 * pb.n as f64)
}

/// One width, one seed: GD and LoFT with each S side by side.
#[derive(Clone, Debug, Serialize)]
pub struct Trajectory {
    pub width: usize,
    pub seed: u64,
    pub workers: usize,
    /// `||W_T - W_T^GD||_F^2`.
    pub weight_distance: f64,
    /// `sum over rounds of ||f(W_t) - f(W_t^GD)||^2 / n`.
    pub prediction_gap: f64,
    /// Loss after every round: GD, LoFT.
    pub loss_gd: Vec<f64>,
    pub loss_loft: Vec<f64>,
}

fn trajectories(cfg: &TheoryConfig, pb: &Problem, m: usize, seed: u64) -> Vec<Trajectory> {
    // symmetric initialisation: filter r + m/2 copies filter r with the opposite sign, so
    // f(W_0) = 0 and every width starts from the same loss
    let mut rng = Rng::stream(seed, Purpose::Init, &[m as u64]);
    let half: Vec<f32> = (0..m / 2 * pb.d).map(|_| rng.normal() as f32).collect();
    let w0: Vec<f32> = half.iter().chain(&half).copied().collect();
    let a: Vec<f32> = (0..m).map(|r| if r < m / 2 { 1.0 } else { -1.0 }).collect();
    let scale = 1.0 / (m as f32).sqrt();
    let rounds = cfg.steps / cfg.local_steps;
    let mut z = Vec::new();
    // the GD trajectory once: its predictions and loss after every round, and W_T
    let mut gd = w0.clone();
    let (mut f_gd, mut loss_gd) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        descend(pb, &mut gd, &a, scale, cfg.lr, cfg.local_steps);
        let f = predict(pb, &gd, &a, scale, &mut z);
        loss_gd.push(loss(pb, &f));
        f_gd.push(f);
    }
    cfg.workers
        .iter()
        .map(|&s| {
            let mut lo = w0.clone();
            let (mut gap, mut loss_loft) = (0.0, Vec::new());
            for (t, fg) in f_gd.iter().enumerate() {
                let perm = Rng::stream(seed, Purpose::Partition, &[m as u64, s as u64, t as u64]).permutation(m);
                for k in 0..s {
                    let mine: Vec<usize> = perm.iter().skip(k).step_by(s).copied().collect();
                    let mut w: Vec<f32> = mine
                        .iter()
                        .flat_map(|&r| lo[r * pb.d..(r + 1) * pb.d].to_vec())
                        .collect();
                    let ak: Vec<f32> = mine.iter().map(|&r| a[r]).collect();
                    // output scaled by S (an estimate of the full output), step by 1/S: each
                    // filter then moves as far per step as under GD
                    descend(pb, &mut w, &ak, scale * s as f32, cfg.lr / s as f32, cfg.local_steps);
                    for (j, &r) in mine.iter().enumerate() {
                        lo[r * pb.d..(r + 1) * pb.d].copy_from_slice(&w[j * pb.d..(j + 1) * pb.d]);
                    }
                }
                let fl = predict(pb, &lo, &a, scale, &mut z);
                gap += fg.iter().zip(&fl).map(|(p, q)| ((p - q) as f64).powi(2)).sum::<f64>() / pb.n as f64;
                loss_loft.push(loss(pb, &fl));
            }
            let weight_distance = gd.iter().zip(&lo).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
            Trajectory {
                width: m,
                seed,
                workers: s,
                weight_distance,
                prediction_gap: gap,
                loss_gd: loss_gd.clone(),
                loss_loft,
            }
        })
        .collect()
}

/// Least-squares slope of y on x with its 95% confidence interval (t quantile).
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Slope {
    pub slope: f64,
    pub lo: f64,
    pub hi: f64,
}

/// The two-sided 95% quantile of Student's t with `df` degrees of freedom.
fn t975(df: usize) -> f64 {
    const T: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
    ];
    if df == 0 {
        f64::INFINITY
    } else {
        T.get(df - 1).copied().unwrap_or(1.96 + 2.4 / df as f64)
    }
}

pub fn fit(points: &[(f64, f64)]) -> Slope {
    let n = points.len() as f64;
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = sxy / sxx;
    let res: f64 = points.iter().map(|p| (p.1 - my - slope * (p.0 - mx)).powi(2)).sum();
    let df = points.len().saturating_sub(2);
    let se = if df > 0 {
        (res / df as f64 / sxx).sqrt()
    } else {
        f64::INFINITY
    };
    let half = t975(df) * se;
    Slope {
        slope,
        lo: slope - half,
        hi: slope + half,
    }
}

/// What `loft theory` writes to `theory.json`.
#[derive(Clone, Debug, Serialize)]
pub struct TheoryReport {
    pub config: TheoryConfig,
    pub runs: Vec<Trajectory>,
    /// Per S: slope of log weight distance and of log prediction gap against log m.
    pub slopes: Vec<(usize, Slope, Slope)>,
}

/// Run the sweep, write `theory.json`, `theory.md` and the plots; return the report.
pub fn run(cfg: &TheoryConfig, progress: bool) -> Result<TheoryReport> {
    if cfg.local_steps == 0 || cfg.steps < cfg.local_steps || cfg.seeds == 0 || cfg.workers.iter().any(|&s| s < 2) {
        return Err(Error::config(
            "--steps must be a positive multiple of --local-steps, --seeds at least 1, every S at least 2",
        ));
    }
    if cfg.log2_widths.0 > cfg.log2_widths.1 || cfg.log2_widths.1 > 20 {
        return Err(Error::config(
            "--widths LO..HI: powers of two 2^LO .. 2^HI, HI at most 20",
        ));
    }
    let pb = problem(&cfg.data_dir, cfg.samples)?;
    crate::rundir::prepare(&cfg.out)?;
    let mut runs = Vec::new();
    for k in cfg.log2_widths.0..=cfg.log2_widths.1 {
        for seed in 1..=cfg.seeds {
            if progress {
                eprintln!("theory: m = 2^{k}, seed {seed}");
            }
            runs.extend(trajectories(cfg, &pb, 1 << k, seed));
        }
    }
    let slopes = cfg
        .workers
        .iter()
        .map(|&s| {
            let pts = |f: fn(&Trajectory) -> f64| -> Vec<(f64, f64)> {
                runs.iter()
                    .filter(|r| r.workers == s)
                    .map(|r| ((r.width as f64).ln(), f(r).max(1e-300).ln()))
                    .collect()
            };
            (s, fit(&pts(|r| r.weight_distance)), fit(&pts(|r| r.prediction_gap)))
        })
        .collect();
    let report = TheoryReport {
        config: cfg.clone(),
        runs,
        slopes,
    };
    crate::rundir::write_json(&cfg.out.join("theory.json"), &report)?;
    crate::rundir::write_atomic(&cfg.out.join("theory.md"), markdown(&report).as_bytes())?;
    crate::experiment::report::plots::theory(&report, &cfg.out)?;
    Ok(report)
}

/// The table (means over seeds) and the slopes.
pub fn markdown(r: &TheoryReport) -> String {
    let c = &r.config;
    let mut s = format!(
        "### Theorem 1: LoFT against gradient descent as the width grows\n\n\
         One-hidden-layer CNN on {} Fashion-MNIST images (16 patches of 7x7), T = {} full-batch steps, \
         LoFT rounds of {} local steps, lr {}, {} seed(s) per width; means over seeds.\n\n\
         | m | S | ‖W_T − W_T^GD‖²_F | Σ_t ‖f_t − f_t^GD‖² / n | final loss GD | final loss LoFT |\n|---:|---:|---:|---:|---:|---:|\n",
        c.samples, c.steps, c.local_steps, c.lr, c.seeds
    );
    for k in c.log2_widths.0..=c.log2_widths.1 {
        for &w in &c.workers {
            let rs: Vec<&Trajectory> = r.runs.iter().filter(|t| t.width == 1 << k && t.workers == w).collect();
            let mean = |f: &dyn Fn(&Trajectory) -> f64| rs.iter().map(|t| f(t)).sum::<f64>() / rs.len().max(1) as f64;
            s.push_str(&format!(
                "| 2^{k} | {w} | {:.4e} | {:.4e} | {:.4} | {:.4} |\n",
                mean(&|t| t.weight_distance),
                mean(&|t| t.prediction_gap),
                mean(&|t| *t.loss_gd.last().unwrap_or(&0.0)),
                mean(&|t| *t.loss_loft.last().unwrap_or(&0.0)),
            ));
        }
    }
    s.push_str("\nSlopes of log distance against log m (95% confidence interval):\n\n| S | weight distance | prediction gap |\n|---:|---|---|\n");
    for (w, a, b) in &r.slopes {
        s.push_str(&format!(
            "| {w} | {:.3} [{:.3}, {:.3}] | {:.3} [{:.3}, {:.3}] |\n",
            a.slope, a.lo, a.hi, b.slope, b.lo, b.hi
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_a_known_slope() {
        let pts: Vec<(f64, f64)> = (0..10)
            .map(|i| (i as f64, 3.0 - 0.5 * i as f64 + if i % 2 == 0 { 0.01 } else { -0.01 }))
            .collect();
        let s = fit(&pts);
        assert!((s.slope + 0.5).abs() < 0.01 && s.lo < -0.5 && s.hi > -0.5, "{s:?}");
    }
}
