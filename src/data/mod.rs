//! Image classification data sets: in-memory storage, file formats, synthetic data and batching.
//!
//! A [`Dataset`] holds every image of one half (train or test) as `u8` pixels in
//! `(n, channels, height, width)` order. [`load`] reads a [`DatasetKind`] from disk (IDX for
//! Fashion-MNIST, the binary CIFAR formats) or generates it ([`synthetic`]), and a
//! [`Loader`] turns a data set into normalised, augmented `f32` mini-batches.

pub mod cifar;
pub mod cifar_pickle;
pub mod idx;
pub mod imagenet;
pub mod loader;
pub mod synthetic;

pub use loader::{Augment, Loader};

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// An in-memory image classification set. pixels: (n, channels, height, width) u8, row-major.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Name of the data set (the CLI name, e.g. "cifar10").
    pub name: String,
    /// Channels per image.
    pub channels: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// Number of classes; every label is below this.
    pub classes: usize,
    /// All pixels, `len() * image_len()` bytes.
    pub pixels: Vec<u8>,
    /// One label per image, each `< classes`.
    pub labels: Vec<u32>,
    /// Images decoded from files when a batch needs them (ImageNet); `pixels` is then
    /// empty, and `height` x `width` is the size of the decoded, cropped sample.
    pub folder: Option<std::sync::Arc<imagenet::Folder>>,
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set holds no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image: channels * height * width.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Per-channel mean and std of pixel/255 over the whole set (f64 accumulation), as f32.
    ///
    /// The std is the population standard deviation. An empty set gives mean 0 and std 1.
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        if self.folder.is_some() {
            // images decoded on demand: ImageNet's published statistics
            return (imagenet::MEAN.to_vec(), imagenet::STD.to_vec());
        }
        let c = self.channels;
        let plane = self.height * self.width;
        let n = self.len();
        if n == 0 || self.image_len() == 0 {
            return (vec![0.0; c], vec![1.0; c]);
        }
        // Integer sums are exact: even 1e6 images of 1e4 pixels stay far below u64::MAX.
        let mut sum = vec![0u64; c];
        let mut sum_sq = vec![0u64; c];
        for image in self.pixels.chunks_exact(self.image_len()).take(n) {
            for (ch, values) in image.chunks_exact(plane).enumerate() {
                let (mut s, mut q) = (0u64, 0u64);
                for &p in values {
                    let p = p as u64;
                    s += p;
                    q += p * p;
                }
                sum[ch] += s;
                sum_sq[ch] += q;
            }
        }
        let count = (n * plane) as f64;
        let mut mean = Vec::with_capacity(c);
        let mut std = Vec::with_capacity(c);
        for ch in 0..c {
            let m = sum[ch] as f64 / 255.0 / count;
            let m2 = sum_sq[ch] as f64 / (255.0 * 255.0) / count;
            mean.push(m as f32);
            std.push((m2 - m * m).max(0.0).sqrt() as f32);
        }
        (mean, std)
    }

    /// The samples at `idx`, in that order.
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn select(&self, idx: &[usize]) -> Dataset {
        let len = self.image_len();
        let mut d = Dataset {
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            pixels: Vec::new(),
            folder: None,
            name: self.name.clone(),
            ..*self
        };
        if let Some(f) = &self.folder {
            let mut f = (**f).clone();
            f.files = idx.iter().map(|&i| f.files[i].clone()).collect();
            d.folder = Some(std::sync::Arc::new(f));
        } else {
            d.pixels.reserve(idx.len() * len);
            for &i in idx {
                d.pixels.extend_from_slice(&self.pixels[i * len..(i + 1) * len]);
            }
        }
        d
    }

    /// Remove `n` samples, evenly spaced over the set (sample `floor(i * len / n)` for i in
    /// 0..n, so a folder listed class by class gives every class its share), and return
    /// them; the rest keep their order. n >= len takes every sample.
    pub fn hold_out(&mut self, n: usize) -> Dataset {
        let len = self.len();
        let n = n.min(len);
        let picked: Vec<usize> = (0..n).map(|i| i * len / n).collect();
        let mut keep = Vec::with_capacity(len - n);
        let mut next = picked.iter().peekable();
        for i in 0..len {
            if next.peek() == Some(&&i) {
                next.next();
            } else {
                keep.push(i);
            }
        }
        let held = self.select(&picked);
        *self = self.select(&keep);
        held
    }

    /// Keep only the first n samples (n >= len is a no-op). An image folder, listed class by
    /// class, keeps n samples evenly spaced over the list instead, so every class stays.
    pub fn truncate(&mut self, n: usize) {
        if let Some(folder) = self.folder.as_mut().filter(|_| n < self.labels.len()) {
            let len = self.labels.len();
            let keep: Vec<usize> = (0..n).map(|i| i * len / n).collect();
            let f = std::sync::Arc::make_mut(folder);
            f.files = keep.iter().map(|&i| f.files[i].clone()).collect();
            self.labels = keep.iter().map(|&i| self.labels[i]).collect();
            return;
        }
        if n < self.len() {
            self.labels.truncate(n);
            self.pixels.truncate(n * self.image_len());
        }
    }
}

/// Train and test halves of a data set, and the validation images held out of the training
/// half, if any.
#[derive(Clone, Debug)]
pub struct Split {
    /// The training half (without the validation images).
    pub train: Dataset,
    /// Validation images held out of the training half (see [`Dataset::hold_out`]).
    pub val: Option<Dataset>,
    /// The held-out test half.
    pub test: Dataset,
}

impl Split {
    /// Hold `val` images out of the training half (0: none), then keep the first
    /// `train_subset` of the remaining training images and the first `test_subset` test
    /// images (0: all). The validation images never depend on the subsets, so runs with
    /// different subsets select on the same images.
    pub fn carve(mut self, val: usize, train_subset: usize, test_subset: usize) -> Result<Split> {
        if val > 0 {
            if val >= self.train.len() {
                return Err(Error::config(format!(
                    "--val-size {val} leaves no training images ({} in the training set)",
                    self.train.len()
                )));
            }
            self.val = Some(self.train.hold_out(val));
        }
        if train_subset > 0 {
            self.train.truncate(train_subset);
        }
        if test_subset > 0 {
            self.test.truncate(test_subset);
        }
        Ok(self)
    }
}

/// Which data set to load.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum DatasetKind {
    /// Fashion-MNIST: 28x28 grey images, 10 classes (IDX files).
    FashionMnist,
    /// CIFAR-10: 32x32 colour images, 10 classes (binary version).
    Cifar10,
    /// CIFAR-100: 32x32 colour images, 100 fine classes (binary version).
    Cifar100,
    /// ImageNet in its folder layout (`train/<class>/*.JPEG`, `val/<class>/*.JPEG`), decoded on
    /// demand to 3x224x224; 1000 classes.
    Imagenet,
    /// A generated, learnable set (no files).
    Synthetic(synthetic::SyntheticSpec),
}

/// The `--dataset` choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Name {
    /// Fashion-MNIST IDX files.
    FashionMnist,
    /// CIFAR-10: the binary version or torchvision's (cifar-10-batches-py).
    Cifar10,
    /// CIFAR-100: the binary version or torchvision's (cifar-100-python).
    Cifar100,
    /// ImageNet folders: DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG.
    Imagenet,
    /// Generated data (no files).
    Synthetic,
}

/// The CLI names accepted by [`DatasetKind::parse`].
const KIND_NAMES: &str = "fashion-mnist, cifar10, cifar100, imagenet, synthetic";

impl DatasetKind {
    /// Parse a CLI name ("fashion-mnist", "cifar10", "cifar100", "synthetic"). Unknown name ->
    /// Error::config listing the valid names.
    pub fn parse(s: &str) -> Result<Self> {
        use clap::ValueEnum;
        Name::from_str(s, false)
            .map(DatasetKind::of)
            .map_err(|_| Error::config(format!("unknown data set `{s}`; valid names: {KIND_NAMES}")))
    }

    /// The data set a CLI name means (synthetic uses `SyntheticSpec::default()`).
    pub fn of(name: Name) -> Self {
        match name {
            Name::FashionMnist => DatasetKind::FashionMnist,
            Name::Cifar10 => DatasetKind::Cifar10,
            Name::Cifar100 => DatasetKind::Cifar100,
            Name::Imagenet => DatasetKind::Imagenet,
            Name::Synthetic => DatasetKind::Synthetic(synthetic::SyntheticSpec::default()),
        }
    }

    /// The CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Imagenet => "imagenet",
            DatasetKind::Synthetic(_) => "synthetic",
        }
    }

    /// Where the files are looked for when no `--data-dir` is given (empty for synthetic); for
    /// CIFAR the binary version's folder, else torchvision's when only that one exists.
    pub fn default_dir(&self) -> PathBuf {
        match self {
            DatasetKind::FashionMnist => PathBuf::from("/usr/share/datasets/fashion-mnist"),
            DatasetKind::Cifar10 => first_present(&["data/cifar-10-batches-bin", "data/cifar-10-batches-py"]),
            DatasetKind::Cifar100 => first_present(&["data/cifar-100-binary", "data/cifar-100-python"]),
            DatasetKind::Imagenet => PathBuf::from("data/imagenet"),
            DatasetKind::Synthetic(_) => PathBuf::new(),
        }
    }

    /// (channels, height, width, classes) without loading.
    pub fn shape(&self) -> (usize, usize, usize, usize) {
        match self {
            DatasetKind::FashionMnist => (1, 28, 28, 10),
            DatasetKind::Cifar10 => (3, 32, 32, 10),
            DatasetKind::Cifar100 => (3, 32, 32, 100),
            DatasetKind::Imagenet => (3, imagenet::SIZE, imagenet::SIZE, 1000),
            DatasetKind::Synthetic(s) => (s.channels, s.height, s.width, s.classes),
        }
    }

    /// Default augmentation: fashion-mnist crop_pad 2 + flip; cifar crop_pad 4 + flip;
    /// synthetic none.
    pub fn default_augment(&self) -> Augment {
        match self {
            DatasetKind::FashionMnist => Augment {
                crop_pad: 2,
                flip: true,
            },
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => Augment {
                crop_pad: 4,
                flip: true,
            },
            // for decoded images: the random resized crop, and the flip
            DatasetKind::Imagenet => Augment {
                crop_pad: 0,
                flip: true,
            },
            DatasetKind::Synthetic(_) => Augment::none(),
        }
    }
}

/// The first of `dirs` that exists, else the first.
fn first_present(dirs: &[&str]) -> PathBuf {
    PathBuf::from(dirs.iter().find(|d| Path::new(d).is_dir()).unwrap_or(&dirs[0]))
}

/// Load both halves. `dir` is where the files are (ignored for synthetic data).
pub fn load(kind: &DatasetKind, dir: &Path) -> Result<Split> {
    match kind {
        DatasetKind::FashionMnist => idx::load_fashion_mnist(dir),
        DatasetKind::Cifar10 => cifar::load_cifar10(dir),
        DatasetKind::Cifar100 => cifar::load_cifar100(dir),
        DatasetKind::Imagenet => imagenet::load(dir),
        DatasetKind::Synthetic(spec) => {
            spec.validate()?;
            Ok(synthetic::generate(spec))
        }
    }
}

/// Read a whole data file; a missing file gives a format error carrying `missing_hint`.
pub(crate) fn read_data_file(path: &Path, missing_hint: &str) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Error::format(path, format!("missing file; {missing_hint}")))
        }
        Err(e) => Err(Error::io(path, e)),
    }
}

/// A fresh, empty directory under the system temp dir for one test.
#[cfg(test)]
pub(crate) fn test_dir(tag: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("loft-data-{}-{tag}-{k}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create test dir");
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        // 2 images, 2 channels, 1x2 pixels.
        Dataset {
            name: "tiny".into(),
            channels: 2,
            height: 1,
            width: 2,
            classes: 3,
            pixels: vec![0, 255, 51, 51, 255, 255, 51, 102],
            labels: vec![0, 2],
            folder: None,
        }
    }

    #[test]
    fn channel_stats_on_known_set() {
        let (mean, std) = tiny().channel_stats();
        // channel 0: 0, 1, 1, 1 -> mean 0.75, var 0.1875
        assert!((mean[0] - 0.75).abs() < 1e-6, "{mean:?}");
        assert!((std[0] - 0.1875f32.sqrt()).abs() < 1e-6, "{std:?}");
        // channel 1: 0.2, 0.2, 0.2, 0.4 -> mean 0.25, var 0.0075
        assert!((mean[1] - 0.25).abs() < 1e-6, "{mean:?}");
        assert!((std[1] - 0.0075f32.sqrt()).abs() < 1e-6, "{std:?}");
    }

    /// n one-pixel grey images whose pixel and label are the index (mod 256 / mod 10).
    fn numbered(n: usize) -> Dataset {
        Dataset {
            name: "numbered".into(),
            channels: 1,
            height: 1,
            width: 1,
            classes: 10,
            pixels: (0..n).map(|i| i as u8).collect(),
            labels: (0..n).map(|i| (i % 10) as u32).collect(),
            folder: None,
        }
    }

    #[test]
    fn hold_out_takes_evenly_spaced_samples_and_keeps_the_rest_in_order() {
        let mut d = numbered(10);
        let v = d.hold_out(3);
        // floor(i * 10 / 3) for i = 0, 1, 2
        assert_eq!(v.pixels, vec![0, 3, 6]);
        assert_eq!(v.labels, vec![0, 3, 6]);
        assert_eq!(d.pixels, vec![1, 2, 4, 5, 7, 8, 9]);
        assert_eq!(d.labels, vec![1, 2, 4, 5, 7, 8, 9]);
        assert_eq!((v.channels, v.classes, v.name.as_str()), (1, 10, "numbered"));
    }

    #[test]
    fn carve_holds_out_before_the_subset_and_refuses_an_empty_training_set() {
        let split = || Split {
            train: numbered(20),
            val: None,
            test: numbered(5),
        };
        let s = split().carve(4, 6, 2).unwrap();
        assert_eq!(s.val.as_ref().unwrap().pixels, vec![0, 5, 10, 15]);
        assert_eq!(s.train.pixels, vec![1, 2, 3, 4, 6, 7]);
        assert_eq!(s.test.len(), 2);
        // the validation images do not depend on the training subset
        let t = split().carve(4, 0, 0).unwrap();
        assert_eq!(t.val.unwrap().pixels, vec![0, 5, 10, 15]);
        assert_eq!(t.train.len(), 16);
        assert!(split().carve(0, 0, 0).unwrap().val.is_none());
        let e = split().carve(20, 0, 0).unwrap_err().to_string();
        assert!(e.contains("--val-size 20 leaves no training images"), "{e}");
    }

    #[test]
    fn truncate_keeps_prefix() {
        let mut d = tiny();
        d.truncate(5);
        assert_eq!(d.len(), 2);
        d.truncate(1);
        assert_eq!(d.len(), 1);
        assert_eq!(d.pixels, vec![0, 255, 51, 51]);
        assert_eq!(d.labels, vec![0]);
        assert!(!d.is_empty());
        d.truncate(0);
        assert!(d.is_empty());
        assert!(d.pixels.is_empty());
    }

    #[test]
    fn kinds_parse_and_name() {
        for name in ["fashion-mnist", "cifar10", "cifar100", "synthetic"] {
            assert_eq!(DatasetKind::parse(name).unwrap().name(), name);
        }
        let msg = DatasetKind::parse("mnist").unwrap_err().to_string();
        assert!(msg.contains("mnist") && msg.contains("cifar100"), "{msg}");
        assert_eq!(DatasetKind::Cifar100.shape(), (3, 32, 32, 100));
        assert_eq!(DatasetKind::FashionMnist.shape(), (1, 28, 28, 10));
        assert_eq!(DatasetKind::Cifar10.default_augment().crop_pad, 4);
        assert_eq!(DatasetKind::FashionMnist.default_augment().crop_pad, 2);
        assert_eq!(
            DatasetKind::parse("synthetic").unwrap().default_augment(),
            Augment::none()
        );
    }

    #[test]
    fn kind_serde_round_trip() {
        let k = DatasetKind::parse("synthetic").unwrap();
        let s = serde_json::to_string(&k).unwrap();
        let back: DatasetKind = serde_json::from_str(&s).unwrap();
        assert_eq!(k, back);
    }

    #[test]
    fn load_synthetic_validates() {
        let mut spec = synthetic::SyntheticSpec {
            train: 20,
            test: 10,
            ..Default::default()
        };
        let split = load(&DatasetKind::Synthetic(spec.clone()), Path::new("")).unwrap();
        assert_eq!((split.train.len(), split.test.len()), (20, 10));
        spec.classes = 0;
        let err = load(&DatasetKind::Synthetic(spec), Path::new("")).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
    }
}
