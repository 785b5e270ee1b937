//! A generated, learnable image set for tests and benchmarks without data files.
//!
//! Every class has a fixed random prototype: a coarse random grid per channel, smoothly
//! (bilinearly) upsampled to the image size. A sample is its class prototype plus
//! independent per-pixel noise, clamped to 0..=255, so a CNN can learn the classes but a
//! single pixel does not give them away. Everything is drawn from [`Rng::stream`] with
//! [`Purpose::Synthetic`]: the prototypes, the train samples and the test samples each from
//! their own streams, one stream per sample, and only portable integer and IEEE arithmetic,
//! so a spec gives the same bytes on every machine.

use super::{Dataset, Split};
use crate::error::{Error, Result};
use crate::rng::{Purpose, Rng};
use rayon::prelude::*;

/// Shape, size and seed of a synthetic data set.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSpec {
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Number of classes.
    pub classes: usize,
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
    /// Seed of all random draws.
    pub seed: u64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            channels: 3,
            height: 32,
            width: 32,
            classes: 10,
            train: 2048,
            test: 512,
            seed: 0,
        }
    }
}

/// Stream ids of the three kinds of draws.
const PROTOTYPE_STREAM: u64 = 0;
const TRAIN_STREAM: u64 = 1;
const TEST_STREAM: u64 = 2;
/// Side of the coarse random grid a prototype channel is upsampled from.
const GRID: usize = 4;
/// Standard deviation of the per-pixel noise, in pixel units.
const NOISE_STD: f64 = 40.0;

impl SyntheticSpec {
    /// Reject sizes that cannot make a data set (zero or overflowing).
    pub(crate) fn validate(&self) -> Result<()> {
        let fields = [
            ("channels", self.channels),
            ("height", self.height),
            ("width", self.width),
            ("classes", self.classes),
            ("train", self.train),
            ("test", self.test),
        ];
        for (name, v) in fields {
            if v == 0 {
                return Err(Error::config(format!("synthetic data set: {name} must be at least 1")));
            }
        }
        if u32::try_from(self.classes).is_err() {
            return Err(Error::config(format!(
                "synthetic data set: {} classes is too many",
                self.classes
            )));
        }
        let image = self
            .channels
            .checked_mul(self.height)
            .and_then(|v| v.checked_mul(self.width));
        let total = image.and_then(|i| i.checked_mul(self.train.max(self.test)));
        if total.is_none_or(|t| t > isize::MAX as usize) {
            return Err(Error::config(format!(
                "synthetic data set: {} x {}x{}x{} images is too large",
                self.train.max(self.test),
                self.channels,
                self.height,
                self.width
            )));
        }
        Ok(())
    }

    fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// Bilinear sample position: (low index, high index, weight of high) of output coordinate
/// `i` of `n` on a grid of `g` points spanning the image.
fn lerp_pos(i: usize, n: usize, g: usize) -> (usize, usize, f64) {
    if g == 1 {
        return (0, 0, 0.0);
    }
    let pos = ((i as f64 + 0.5) / n as f64 * g as f64 - 0.5).clamp(0.0, (g - 1) as f64);
    let lo = (pos.floor() as usize).min(g - 2);
    (lo, lo + 1, pos - lo as f64)
}

/// The prototype images of all classes, as f64 pixel values in 0..=255.
fn prototypes(spec: &SyntheticSpec) -> Vec<f64> {
    let (h, w) = (spec.height, spec.width);
    let (gh, gw) = (GRID.min(h), GRID.min(w));
    let mut out = Vec::with_capacity(spec.classes * spec.image_len());
    let mut grid = vec![0.0f64; gh * gw];
    for class in 0..spec.classes {
        let mut rng = Rng::stream(spec.seed, Purpose::Synthetic, &[PROTOTYPE_STREAM, class as u64]);
        for _ in 0..spec.channels {
            for g in grid.iter_mut() {
                *g = rng.below(256) as f64;
            }
            for y in 0..h {
                let (y0, y1, fy) = lerp_pos(y, h, gh);
                for x in 0..w {
                    let (x0, x1, fx) = lerp_pos(x, w, gw);
                    let top = grid[y0 * gw + x0] * (1.0 - fx) + grid[y0 * gw + x1] * fx;
                    let bottom = grid[y1 * gw + x0] * (1.0 - fx) + grid[y1 * gw + x1] * fx;
                    out.push(top * (1.0 - fy) + bottom * fy);
                }
            }
        }
    }
    out
}

/// Approximately normal noise with std [`NOISE_STD`] from one u64 (sum of four 16-bit
/// uniforms, Irwin-Hall), using exact integer sums and IEEE arithmetic only.
fn noise(r: u64) -> f64 {
    let sum: u64 = (0..4).map(|k| (r >> (16 * k)) & 0xffff).sum();
    // Each 16-bit uniform has variance (65536^2 - 1) / 12; four of them sum to a third of it.
    let std = ((65536.0f64 * 65536.0 - 1.0) / 3.0).sqrt();
    (sum as f64 - 2.0 * 65535.0) / std * NOISE_STD
}

/// One half: `n` samples from stream `stream`, label of sample i = i % classes.
fn half(spec: &SyntheticSpec, protos: &[f64], stream: u64, n: usize) -> Dataset {
    let len = spec.image_len();
    let mut pixels = vec![0u8; n * len];
    let labels: Vec<u32> = (0..n).map(|i| (i % spec.classes) as u32).collect();
    pixels
        .par_chunks_mut(len)
        .zip(labels.par_iter())
        .enumerate()
        .for_each(|(i, (img, &label))| {
            let mut rng = Rng::stream(spec.seed, Purpose::Synthetic, &[stream, i as u64]);
            let proto = &protos[label as usize * len..(label as usize + 1) * len];
            for (p, &base) in img.iter_mut().zip(proto) {
                *p = (base + noise(rng.next_u64())).round().clamp(0.0, 255.0) as u8;
            }
        });
    Dataset {
        name: "synthetic".into(),
        channels: spec.channels,
        height: spec.height,
        width: spec.width,
        classes: spec.classes,
        pixels,
        labels,
        folder: None,
    }
}

/// Generate the train and test halves of `spec` (call [`crate::data::load`] to validate the
/// spec first; zero sizes give empty or degenerate sets here).
pub fn generate(spec: &SyntheticSpec) -> Split {
    if spec.classes == 0 || spec.image_len() == 0 {
        let empty = |n: usize| Dataset {
            name: "synthetic".into(),
            channels: spec.channels,
            height: spec.height,
            width: spec.width,
            classes: spec.classes,
            pixels: Vec::new(),
            labels: if spec.classes == 0 { Vec::new() } else { vec![0; n] },
            folder: None,
        };
        return Split {
            train: empty(spec.train),
            val: None,
            test: empty(spec.test),
        };
    }
    let protos = prototypes(spec);
    Split {
        train: half(spec, &protos, TRAIN_STREAM, spec.train),
        val: None,
        test: half(spec, &protos, TEST_STREAM, spec.test),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            channels: 2,
            height: 8,
            width: 6,
            classes: 4,
            train: 40,
            test: 12,
            seed,
        }
    }

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = generate(&small(1));
        let b = generate(&small(1));
        let c = generate(&small(2));
        assert_eq!(a.train.pixels, b.train.pixels);
        assert_eq!(a.test.pixels, b.test.pixels);
        assert_eq!(a.train.labels, b.train.labels);
        assert_ne!(a.train.pixels, c.train.pixels);
        assert_ne!(a.test.pixels, c.test.pixels);
        assert_ne!(a.train.pixels[..a.test.pixels.len()], a.test.pixels[..]);
    }

    #[test]
    fn shapes_and_labels() {
        let s = generate(&small(3));
        assert_eq!(s.train.len(), 40);
        assert_eq!(s.test.len(), 12);
        assert_eq!(s.train.pixels.len(), 40 * 2 * 8 * 6);
        assert_eq!(s.test.pixels.len(), 12 * 2 * 8 * 6);
        assert!(s.train.labels.iter().all(|&l| l < 4));
        for k in 0..4 {
            assert_eq!(s.train.labels.iter().filter(|&&l| l == k).count(), 10);
        }
        assert_eq!((s.train.channels, s.train.height, s.train.width), (2, 8, 6));
        assert_eq!(s.train.classes, 4);
    }

    #[test]
    fn learnable_by_nearest_class_mean() {
        // Class means of the train half classify the test half far above chance (25%).
        let spec = small(4);
        let s = generate(&spec);
        let len = spec.image_len();
        let mut means = vec![0.0f64; spec.classes * len];
        let mut counts = vec![0usize; spec.classes];
        for (img, &l) in s.train.pixels.chunks(len).zip(&s.train.labels) {
            counts[l as usize] += 1;
            for (m, &p) in means[l as usize * len..].iter_mut().zip(img) {
                *m += p as f64;
            }
        }
        for (k, &c) in counts.iter().enumerate() {
            for m in &mut means[k * len..(k + 1) * len] {
                *m /= c as f64;
            }
        }
        let mut correct = 0;
        for (img, &l) in s.test.pixels.chunks(len).zip(&s.test.labels) {
            let dist = |k: usize| -> f64 {
                img.iter()
                    .zip(&means[k * len..(k + 1) * len])
                    .map(|(&p, &m)| (p as f64 - m).powi(2))
                    .sum()
            };
            let best = (0..spec.classes).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap();
            correct += (best == l as usize) as usize;
        }
        assert!(correct >= 10, "{correct}/12 correct");
    }

    #[test]
    fn noise_has_the_intended_spread() {
        let mut rng = Rng::new(9);
        let n = 100_000;
        let xs: Vec<f64> = (0..n).map(|_| noise(rng.next_u64())).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.5, "{mean}");
        assert!((var.sqrt() - NOISE_STD).abs() < 0.5, "{}", var.sqrt());
    }

    #[test]
    fn validate_rejects_zero_sizes() {
        assert!(small(0).validate().is_ok());
        assert!(SyntheticSpec::default().validate().is_ok());
        let mut s = small(0);
        s.height = 0;
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.contains("height"), "{msg}");
        let mut s = small(0);
        s.train = 0;
        assert!(s.validate().is_err());
        let mut s = small(0);
        s.width = usize::MAX / 2;
        assert!(s.validate().is_err());
    }

    #[test]
    fn tiny_images_work() {
        let spec = SyntheticSpec {
            channels: 1,
            height: 1,
            width: 1,
            classes: 2,
            train: 4,
            test: 2,
            seed: 0,
        };
        let s = generate(&spec);
        assert_eq!(s.train.pixels.len(), 4);
    }
}
