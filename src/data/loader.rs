//! Deterministic mini-batch assembly: sample order, normalisation and augmentation.
//!
//! A [`Loader`] reads one [`Dataset`] in batches. The order of an epoch comes from the
//! stream (seed, [`Purpose::DataOrder`], [epoch, rank]); the random crop and flip of a sample
//! from (seed, [`Purpose::Augment`], [epoch, rank, sample index]), so the values of a sample
//! do not depend on the batch size, the batch it lands in or the number of threads.

use super::imagenet::{self, Folder};
use super::Dataset;
use crate::error::{Error, Result};
use crate::rng::{Purpose, Rng};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Random augmentation of training images.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Pad each side by this many zero pixels and take a random crop of the original size
    /// (0: no cropping).
    pub crop_pad: usize,
    /// Mirror horizontally with probability 1/2.
    pub flip: bool,
}

impl Augment {
    /// No augmentation.
    pub const fn none() -> Self {
        Augment {
            crop_pad: 0,
            flip: false,
        }
    }

    fn is_none(&self) -> bool {
        self.crop_pad == 0 && !self.flip
    }
}

/// Mini-batches of one data set, normalised and augmented.
pub struct Loader<'a> {
    data: &'a Dataset,
    batch_size: usize,
    /// Normalised value of every pixel value, per channel: `table[c * 256 + p]`.
    table: Vec<f32>,
    /// The per-channel mean and std (images decoded from files are normalised from them).
    mean: Vec<f32>,
    std: Vec<f32>,
    augment: Augment,
    shuffle: bool,
    drop_last: bool,
    seed: u64,
    rank: u64,
    part: usize,
    parts: usize,
    /// Micro-batches: this loader takes micro-batch `micro.0` of `micro.1` of every global
    /// batch of `batch_size * micro.1` samples (1 of 1: whole batches).
    micro: (usize, usize),
    /// Image folders: the next batch, decoded in the background.
    prefetch: Prefetch,
}

/// Everything decoding a sample of an image folder needs, owned by the thread doing it.
#[derive(Clone)]
struct Decoder {
    folder: Arc<Folder>,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Training: random resized crop (and flip); else the centre crop.
    augment: bool,
    flip: bool,
    seed: u64,
    rank: u64,
}

impl Decoder {
    /// Decode, crop, resample and normalise sample `i` of `epoch` into `out` (3 x 224 x 224).
    /// The crop and the flip come from the sample's own stream, as for in-memory sets.
    fn sample(&self, i: usize, epoch: u64, out: &mut [f32]) -> Result<()> {
        let (rgb, w, h) = imagenet::decode(&self.folder.files[i].0)?;
        let (win, flip) = if self.augment {
            let mut rng = Rng::stream(self.seed, Purpose::Augment, &[epoch, self.rank, i as u64]);
            let win = imagenet::random_window(w, h, &mut rng);
            (win, self.flip && rng.next_u64() >> 63 == 1)
        } else {
            (imagenet::centre_window(w, h), false)
        };
        imagenet::render(&rgb, w, h, win, flip, &self.mean, &self.std, out);
        Ok(())
    }

    /// A whole batch, in parallel.
    fn batch(&self, samples: &[usize], epoch: u64, out: &mut [f32]) -> Result<()> {
        let len = out.len() / samples.len().max(1);
        out.par_chunks_mut(len)
            .zip(samples.par_iter())
            .map(|(o, &i)| self.sample(i, epoch, o))
            .collect()
    }
}

/// A batch being decoded in the background: its samples, its epoch, and the thread that
/// returns its values.
type Pending = (Vec<usize>, u64, JoinHandle<Result<Vec<f32>>>);

/// The batch being decoded in the background, if any.
#[derive(Default)]
struct Prefetch {
    pending: Mutex<Option<Pending>>,
}

impl Prefetch {
    /// Start decoding `samples` of `epoch` in the background (replacing any earlier batch).
    fn start(&self, l: &Loader<'_>, samples: Vec<usize>, epoch: u64) {
        let d = l.decoder();
        let len = l.data.image_len();
        let list = samples.clone();
        let handle = std::thread::spawn(move || {
            let mut out = vec![0f32; list.len() * len];
            d.batch(&list, epoch, &mut out).map(|()| out)
        });
        *self.pending.lock().unwrap() = Some((samples, epoch, handle));
    }

    /// The batch from the background when it is the one asked for, else decoded now.
    fn take_or_decode(&self, l: &Loader<'_>, samples: &[usize], epoch: u64, out: &mut [f32]) -> Result<()> {
        let pending = self.pending.lock().unwrap().take();
        if let Some((s, e, handle)) = pending {
            if s == samples && e == epoch {
                let decoded = handle
                    .join()
                    .map_err(|_| Error::Backend("the image decoding thread failed".into()))??;
                out.copy_from_slice(&decoded);
                return Ok(());
            }
        }
        l.decoder().batch(samples, epoch, out)
    }
}

impl<'a> Loader<'a> {
    /// mean/std: per-channel (usually the train set's channel_stats). shuffle=false gives the
    /// natural order (for evaluation). A std that is zero, negative or not finite is taken
    /// as 1 (a constant channel is then only shifted).
    ///
    /// # Panics
    /// If `batch_size` is 0 or `mean`/`std` do not have one value per channel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        data: &'a Dataset,
        batch_size: usize,
        mean: Vec<f32>,
        std: Vec<f32>,
        augment: Augment,
        shuffle: bool,
        drop_last: bool,
        seed: u64,
        rank: u64,
    ) -> Self {
        assert!(batch_size > 0, "Loader: batch size must be at least 1");
        assert!(
            mean.len() == data.channels && std.len() == data.channels,
            "Loader: {} means and {} stds for {} channels",
            mean.len(),
            std.len(),
            data.channels
        );
        let std: Vec<f32> = std
            .iter()
            .map(|&s| if s > 0.0 && s.is_finite() { s } else { 1.0 })
            .collect();
        let mut table = Vec::with_capacity(data.channels * 256);
        for (&m, &s) in mean.iter().zip(&std) {
            table.extend((0..256).map(|p| (p as f32 / 255.0 - m) / s));
        }
        Loader {
            data,
            batch_size,
            table,
            mean,
            std,
            augment,
            shuffle,
            drop_last,
            seed,
            rank,
            part: 0,
            parts: 1,
            micro: (0, 1),
            prefetch: Prefetch::default(),
        }
    }

    /// Restrict to the samples i with i % parts == part (for splitting a test set over
    /// ranks). Default parts=1.
    ///
    /// # Panics
    /// If `parts` is 0 or `part >= parts`.
    pub fn with_shard(mut self, part: usize, parts: usize) -> Self {
        assert!(
            parts > 0 && part < parts,
            "Loader: shard {part} of {parts} does not exist"
        );
        self.part = part;
        self.parts = parts;
        self
    }

    /// Take micro-batch `part` of `parts` of every global batch: the epoch's order is the
    /// whole set's, a global batch holds `batch_size * parts` samples, and this loader fills
    /// positions `[part * batch_size, (part + 1) * batch_size)` of it. Loaders built with the
    /// same seed and rank key but different parts together deliver exactly the global batches
    /// of a loader with batch `batch_size * parts`. A short last global batch is dropped.
    ///
    /// # Panics
    /// If `parts` is 0, `part >= parts`, or the loader is also sharded.
    pub fn with_micro(mut self, part: usize, parts: usize) -> Self {
        assert!(
            parts > 0 && part < parts && self.parts == 1,
            "Loader: micro-batch {part} of {parts} does not exist (or the loader is sharded)"
        );
        self.micro = (part, parts);
        self.drop_last |= parts > 1;
        self
    }

    /// Samples in one global batch.
    fn global_batch(&self) -> usize {
        self.batch_size * self.micro.1
    }

    /// Samples in this loader's shard.
    fn shard_len(&self) -> usize {
        let n = self.data.len();
        if self.part >= n {
            0
        } else {
            (n - self.part - 1) / self.parts + 1
        }
    }

    /// Batches in one epoch (a short last batch counts unless drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.shard_len();
        if self.drop_last {
            n / self.global_batch()
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Samples delivered in one epoch.
    pub fn samples_per_epoch(&self) -> usize {
        if self.drop_last {
            self.batches_per_epoch() * self.batch_size
        } else {
            self.shard_len()
        }
    }

    /// The sample order of an epoch: a permutation of the (sharded) indices from
    /// Rng::stream(seed, Purpose::DataOrder, &[epoch, rank]) when shuffle, else ascending.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut v: Vec<usize> = (self.part..self.data.len()).step_by(self.parts).collect();
        if self.shuffle {
            Rng::stream(self.seed, Purpose::DataOrder, &[epoch, self.rank]).shuffle(&mut v);
        }
        v
    }

    /// Fill batch `b` of epoch `epoch` given that epoch's `order`: x gets (n, c, h, w) f32
    /// normalised (`(pixel/255 - mean[c]) / std[c]`) with augmentation, y gets labels; returns n
    /// (the last batch may be short when !drop_last; with drop_last a short batch gives 0).
    /// x.len() >= n*c*h*w, y.len() >= n. Images decoded from files fail with the file named;
    /// for them the next batch is decoded in the background while the caller computes.
    ///
    /// # Panics
    /// If `x` or `y` is too short or `order` holds an index outside the data set.
    pub fn fill(&self, order: &[usize], epoch: u64, b: usize, x: &mut [f32], y: &mut [u32]) -> Result<usize> {
        let Some(range) = self.batch_range(order.len(), b) else {
            return Ok(0);
        };
        let n = range.len();
        let len = self.data.image_len();
        assert!(
            x.len() >= n * len && y.len() >= n,
            "Loader::fill: buffers of {} values and {} labels for {n} samples of {len} values",
            x.len(),
            y.len()
        );
        let batch = &order[range];
        for (l, &i) in y.iter_mut().zip(batch) {
            *l = self.data.labels[i];
        }
        if len == 0 {
            return Ok(n);
        }
        if self.data.folder.is_some() {
            self.prefetch.take_or_decode(self, batch, epoch, &mut x[..n * len])?;
            // the next batch of this epoch, in the background
            if let Some(next) = self.batch_range(order.len(), b + 1) {
                self.prefetch.start(self, order[next].to_vec(), epoch);
            }
            return Ok(n);
        }
        x[..n * len]
            .par_chunks_mut(len)
            .zip(batch.par_iter())
            .for_each(|(out, &i)| self.write_sample(i, epoch, out));
        Ok(n)
    }

    /// Positions in an epoch's order of batch `b`; None past the end (or a short last batch
    /// with drop_last).
    fn batch_range(&self, samples: usize, b: usize) -> Option<std::ops::Range<usize>> {
        let global = b.saturating_mul(self.global_batch());
        if global >= samples {
            return None;
        }
        if self.drop_last && samples - global < self.global_batch() {
            return None;
        }
        let start = global + self.micro.0 * self.batch_size;
        Some(start..samples.min(start + self.batch_size))
    }

    /// What decoding a sample of an image folder needs, owned (for the background thread).
    fn decoder(&self) -> Decoder {
        Decoder {
            folder: self.data.folder.clone().expect("an image folder"),
            mean: self.mean.clone(),
            std: self.std.clone(),
            augment: !self.augment.is_none(),
            flip: self.augment.flip,
            seed: self.seed,
            rank: self.rank,
        }
    }

    /// Normalise and augment sample `i` into `out` (image_len values).
    fn write_sample(&self, i: usize, epoch: u64, out: &mut [f32]) {
        let d = self.data;
        let (h, w) = (d.height, d.width);
        let plane = h * w;
        let len = d.image_len();
        let img = &d.pixels[i * len..(i + 1) * len];
        if self.augment.is_none() {
            for (ch, (o, src)) in out.chunks_exact_mut(plane).zip(img.chunks_exact(plane)).enumerate() {
                let table = &self.table[ch * 256..(ch + 1) * 256];
                for (v, &p) in o.iter_mut().zip(src) {
                    *v = table[p as usize];
                }
            }
            return;
        }
        let pad = self.augment.crop_pad;
        // Window offsets in padded coordinates; `pad` means no shift.
        let mut rng = Rng::stream(self.seed, Purpose::Augment, &[epoch, self.rank, i as u64]);
        let (mut dy, mut dx) = (pad, pad);
        if pad > 0 {
            let span = 2 * pad as u64 + 1;
            dy = rng.below(span) as usize;
            dx = rng.below(span) as usize;
        }
        let flip = self.augment.flip && rng.next_u64() >> 63 == 1;
        for (ch, (o, src)) in out.chunks_exact_mut(plane).zip(img.chunks_exact(plane)).enumerate() {
            let table = &self.table[ch * 256..(ch + 1) * 256];
            let zero = table[0];
            for (yy, row_out) in o.chunks_exact_mut(w).enumerate() {
                let sy = yy + dy;
                if sy < pad || sy - pad >= h {
                    row_out.fill(zero);
                    continue;
                }
                let row = &src[(sy - pad) * w..(sy - pad + 1) * w];
                for (xx, v) in row_out.iter_mut().enumerate() {
                    let cx = if flip { w - 1 - xx } else { xx };
                    let sx = cx + dx;
                    *v = if sx < pad || sx - pad >= w {
                        zero
                    } else {
                        table[row[sx - pad] as usize]
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// n images of c x h x w with distinct-ish pixels; label i % 3.
    fn data(n: usize, c: usize, h: usize, w: usize) -> Dataset {
        let len = c * h * w;
        Dataset {
            name: "test".into(),
            channels: c,
            height: h,
            width: w,
            classes: 3,
            pixels: (0..n * len).map(|i| (i * 7 % 253 + 1) as u8).collect(),
            labels: (0..n).map(|i| (i % 3) as u32).collect(),
            folder: None,
        }
    }

    fn plain(d: &Dataset, bs: usize, augment: Augment, shuffle: bool, drop_last: bool) -> Loader<'_> {
        let c = d.channels;
        Loader::new(d, bs, vec![0.0; c], vec![1.0; c], augment, shuffle, drop_last, 5, 0)
    }

    /// The whole epoch as (x, y) with batch size bs.
    fn epoch(l: &Loader, e: u64) -> (Vec<f32>, Vec<u32>) {
        let order = l.order(e);
        let len = l.data.image_len();
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        let mut x = vec![0.0; l.batch_size * len];
        let mut y = vec![0; l.batch_size];
        for b in 0..l.batches_per_epoch() {
            let n = l.fill(&order, e, b, &mut x, &mut y).unwrap();
            xs.extend_from_slice(&x[..n * len]);
            ys.extend_from_slice(&y[..n]);
        }
        (xs, ys)
    }

    #[test]
    fn micro_batches_split_every_global_batch_exactly() {
        let d = data(53, 1, 3, 3);
        let aug = Augment {
            crop_pad: 1,
            flip: true,
        };
        let whole = plain(&d, 12, aug, true, true);
        let parts: Vec<Loader> = (0..3)
            .map(|p| plain(&d, 4, aug, true, false).with_micro(p, 3))
            .collect();
        assert_eq!(whole.batches_per_epoch(), 4);
        let order = whole.order(2);
        let len = d.image_len();
        let (mut x, mut y) = (vec![0.0; 12 * len], vec![0; 12]);
        let (mut xm, mut ym) = (vec![0.0; 4 * len], vec![0; 4]);
        for b in 0..4 {
            assert_eq!(whole.fill(&order, 2, b, &mut x, &mut y).unwrap(), 12);
            for (p, l) in parts.iter().enumerate() {
                assert_eq!(l.batches_per_epoch(), 4);
                assert_eq!(l.order(2), order);
                assert_eq!(l.fill(&order, 2, b, &mut xm, &mut ym).unwrap(), 4);
                assert_eq!(&ym[..], &y[p * 4..(p + 1) * 4], "batch {b} part {p}");
                assert_eq!(&xm[..], &x[p * 4 * len..(p + 1) * 4 * len], "batch {b} part {p}");
            }
        }
        // the short last global batch (5 samples) is dropped by every part
        assert_eq!(parts[0].fill(&order, 2, 4, &mut xm, &mut ym).unwrap(), 0);
        assert_eq!(parts[2].samples_per_epoch(), 16);
    }

    #[test]
    fn order_is_a_deterministic_permutation() {
        let d = data(50, 1, 2, 2);
        let mk = |rank| Loader::new(&d, 8, vec![0.0], vec![1.0], Augment::none(), true, false, 9, rank);
        let a = mk(0);
        let o = a.order(3);
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_ne!(o, sorted);
        assert_eq!(o, mk(0).order(3));
        assert_ne!(o, a.order(4));
        assert_ne!(o, mk(1).order(3));
        let unshuffled = plain(&d, 8, Augment::none(), false, false);
        assert_eq!(unshuffled.order(3), sorted);
    }

    #[test]
    fn shards_cover_the_set_once() {
        let d = data(23, 1, 1, 1);
        let parts = 4;
        let mut all = Vec::new();
        let mut total = 0;
        for part in 0..parts {
            let l = plain(&d, 5, Augment::none(), true, false).with_shard(part, parts);
            let o = l.order(0);
            assert!(o.iter().all(|&i| i % parts == part));
            assert_eq!(l.samples_per_epoch(), o.len());
            assert_eq!(l.batches_per_epoch(), o.len().div_ceil(5));
            total += l.samples_per_epoch();
            all.extend(o);
        }
        all.sort_unstable();
        assert_eq!(all, (0..23).collect::<Vec<_>>());
        assert_eq!(total, 23);
        // More parts than samples: the surplus shards are empty.
        let l = plain(&d, 5, Augment::none(), false, false).with_shard(30, 31);
        assert_eq!((l.samples_per_epoch(), l.batches_per_epoch()), (0, 0));
    }

    #[test]
    fn normalises_a_known_pixel() {
        let mut d = data(2, 2, 1, 2);
        d.pixels = vec![0, 51, 102, 255, 255, 0, 0, 0];
        let l = Loader::new(
            &d,
            2,
            vec![0.5, 0.25],
            vec![0.25, 0.5],
            Augment::none(),
            false,
            false,
            0,
            0,
        );
        let mut x = vec![0.0; 8];
        let mut y = vec![9; 2];
        assert_eq!(l.fill(&l.order(0), 0, 0, &mut x, &mut y).unwrap(), 2);
        let want = [
            (0.0 - 0.5) / 0.25,
            (0.2 - 0.5) / 0.25,
            (0.4 - 0.25) / 0.5,
            (1.0 - 0.25) / 0.5,
            (1.0 - 0.5) / 0.25,
            (0.0 - 0.5) / 0.25,
        ];
        for (k, (&got, want)) in x.iter().zip(want).enumerate() {
            assert!((got - want).abs() < 1e-6, "value {k}: {got} vs {want}");
        }
        assert_eq!(y, vec![0, 1]);
    }

    #[test]
    fn pad_zero_without_flip_is_identity() {
        let d = data(6, 3, 4, 5);
        let aug = Augment {
            crop_pad: 0,
            flip: false,
        };
        let (x, y) = epoch(&plain(&d, 4, aug, false, false), 2);
        let want: Vec<f32> = d.pixels.iter().map(|&p| p as f32 / 255.0).collect();
        assert_eq!(x, want);
        assert_eq!(y, d.labels);
    }

    #[test]
    fn flip_mirrors() {
        let (c, h, w) = (2, 3, 4);
        let d = data(40, c, h, w);
        let aug = Augment {
            crop_pad: 0,
            flip: true,
        };
        let (x, _) = epoch(&plain(&d, 16, aug, false, false), 1);
        let len = c * h * w;
        let (mut flipped, mut kept) = (0, 0);
        for (i, img) in x.chunks(len).enumerate() {
            let src = &d.pixels[i * len..(i + 1) * len];
            let same = img.iter().zip(src).all(|(&v, &p)| v == p as f32 / 255.0);
            let mirrored = (0..len).all(|k| {
                let (row, col) = (k / w, k % w);
                img[k] == src[row * w + (w - 1 - col)] as f32 / 255.0
            });
            assert!(same ^ mirrored, "sample {i} is neither kept nor mirrored");
            flipped += mirrored as usize;
            kept += same as usize;
        }
        assert!(flipped >= 8 && kept >= 8, "{flipped} flipped, {kept} kept");
    }

    #[test]
    fn crop_is_a_shift_with_zero_padding() {
        let (c, h, w, pad) = (1, 5, 6, 2);
        let d = data(30, c, h, w);
        let mean = 0.1f32;
        let l = Loader::new(
            &d,
            7,
            vec![mean],
            vec![2.0],
            Augment {
                crop_pad: pad,
                flip: false,
            },
            true,
            false,
            3,
            1,
        );
        let order = l.order(0);
        let (x, _) = epoch(&l, 0);
        let len = c * h * w;
        let zero = (0.0 - mean) / 2.0;
        let mut shifted = 0;
        for (k, img) in x.chunks(len).enumerate() {
            let i = order[k];
            let src = &d.pixels[i * len..(i + 1) * len];
            let matches = |dy: isize, dx: isize| {
                (0..h).all(|yy| {
                    (0..w).all(|xx| {
                        let (sy, sx) = (yy as isize + dy, xx as isize + dx);
                        let want = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                            zero
                        } else {
                            (src[sy as usize * w + sx as usize] as f32 / 255.0 - mean) / 2.0
                        };
                        img[yy * w + xx] == want
                    })
                })
            };
            let p = pad as isize;
            let found: Vec<(isize, isize)> = (-p..=p)
                .flat_map(|dy| (-p..=p).map(move |dx| (dy, dx)))
                .filter(|&(dy, dx)| matches(dy, dx))
                .collect();
            assert_eq!(found.len(), 1, "sample {i}: shifts {found:?}");
            shifted += (found[0] != (0, 0)) as usize;
        }
        assert!(shifted > 15, "only {shifted} of 30 shifted");
    }

    #[test]
    fn augmentation_is_independent_of_batch_size() {
        let d = data(21, 3, 4, 4);
        let aug = Augment {
            crop_pad: 1,
            flip: true,
        };
        let (x4, y4) = epoch(&plain(&d, 4, aug, true, false), 7);
        let (x16, y16) = epoch(&plain(&d, 16, aug, true, false), 7);
        assert_eq!(x4, x16);
        assert_eq!(y4, y16);
        let (x_other, _) = epoch(&plain(&d, 4, aug, true, false), 8);
        assert_ne!(x4, x_other);
    }

    #[test]
    fn short_last_batch_and_drop_last() {
        let d = data(10, 1, 2, 2);
        let l = plain(&d, 4, Augment::none(), false, false);
        assert_eq!(l.batches_per_epoch(), 3);
        assert_eq!(l.samples_per_epoch(), 10);
        let order = l.order(0);
        let mut x = vec![f32::NAN; 16];
        let mut y = vec![99; 4];
        assert_eq!(l.fill(&order, 0, 2, &mut x, &mut y).unwrap(), 2);
        assert_eq!(y[..2], [8 % 3, 9 % 3]);
        assert_eq!(y[2..], [99, 99]);
        assert!(x[8..].iter().all(|v| v.is_nan()));
        assert_eq!(l.fill(&order, 0, 3, &mut x, &mut y).unwrap(), 0);

        let l = plain(&d, 4, Augment::none(), true, true);
        assert_eq!(l.batches_per_epoch(), 2);
        assert_eq!(l.samples_per_epoch(), 8);
        let order = l.order(0);
        assert_eq!(l.fill(&order, 0, 1, &mut x, &mut y).unwrap(), 4);
        assert_eq!(l.fill(&order, 0, 2, &mut x, &mut y).unwrap(), 0);
    }

    #[test]
    fn degenerate_std_is_treated_as_one() {
        let mut d = data(1, 1, 1, 2);
        d.pixels = vec![51, 51];
        let l = Loader::new(&d, 1, vec![0.2], vec![0.0], Augment::none(), false, false, 0, 0);
        let mut x = vec![1.0; 2];
        let mut y = vec![0; 1];
        l.fill(&l.order(0), 0, 0, &mut x, &mut y).unwrap();
        assert!(x.iter().all(|v| v.abs() < 1e-6), "{x:?}");
    }
}
