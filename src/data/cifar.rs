//! The binary formats of CIFAR-10 and CIFAR-100 ("binary version" of the archives).
//!
//! Each file is a sequence of fixed-size records: the label byte(s) followed by 3072 pixel
//! bytes (a 32x32 red plane, then green, then blue), which is already our (c, h, w) layout.
//! CIFAR-10 records carry one label byte; CIFAR-100 records a coarse and a fine label byte.
//! A folder in torchvision's layout (pickled dicts) is detected and read by [`cifar_pickle`].

use super::{cifar_pickle, read_data_file, Dataset, Split};
use crate::error::{Error, Result};
use std::path::Path;

/// Pixel bytes per CIFAR image: 3 channels of 32x32.
const IMAGE: usize = 3 * 32 * 32;

/// Where to get the binary version of the data sets.
const CIFAR10_HINT: &str = "download the CIFAR-10 binary version (cifar-10-binary.tar.gz) from \
     https://www.cs.toronto.edu/~kriz/cifar.html, extract it and point --data-dir at \
     cifar-10-batches-bin";
const CIFAR100_HINT: &str = "download the CIFAR-100 binary version (cifar-100-binary.tar.gz) from \
     https://www.cs.toronto.edu/~kriz/cifar.html, extract it and point --data-dir at \
     cifar-100-binary";

/// The layout of one format.
struct Format {
    /// Name of the resulting data set.
    name: &'static str,
    /// Classes of each label byte, in record order; the last one is the label we keep.
    label_classes: &'static [usize],
    /// Hint for a missing file.
    hint: &'static str,
}

const CIFAR10: Format = Format {
    name: "cifar10",
    label_classes: &[10],
    hint: CIFAR10_HINT,
};
const CIFAR100: Format = Format {
    name: "cifar100",
    label_classes: &[20, 100],
    hint: CIFAR100_HINT,
};

impl Format {
    fn record(&self) -> usize {
        self.label_classes.len() + IMAGE
    }

    /// Append the records of one file to `pixels` and `labels`.
    fn read_file(&self, path: &Path, pixels: &mut Vec<u8>, labels: &mut Vec<u32>) -> Result<()> {
        let bytes = read_data_file(path, self.hint)?;
        let record = self.record();
        if bytes.is_empty() {
            return Err(Error::format(path, "empty file: no records"));
        }
        if !bytes.len().is_multiple_of(record) {
            return Err(Error::format(
                path,
                format!("{} bytes is not a whole number of {record}-byte records", bytes.len()),
            ));
        }
        let nl = self.label_classes.len();
        pixels.reserve(bytes.len() / record * IMAGE);
        labels.reserve(bytes.len() / record);
        for (i, rec) in bytes.chunks_exact(record).enumerate() {
            for (k, (&v, &classes)) in rec[..nl].iter().zip(self.label_classes).enumerate() {
                if v as usize >= classes {
                    let which = match (nl, k) {
                        (1, _) => "label",
                        (_, 0) => "coarse label",
                        _ => "fine label",
                    };
                    return Err(Error::format(
                        path,
                        format!("record {i}: {which} {v} is out of range 0..{classes}"),
                    ));
                }
            }
            labels.push(rec[nl - 1] as u32);
            pixels.extend_from_slice(&rec[nl..]);
        }
        Ok(())
    }

    /// A data set from the named files in `dir`.
    fn load(&self, dir: &Path, files: &[&str]) -> Result<Dataset> {
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for f in files {
            self.read_file(&dir.join(f), &mut pixels, &mut labels)?;
        }
        Ok(Dataset {
            name: self.name.into(),
            channels: 3,
            height: 32,
            width: 32,
            classes: *self.label_classes.last().unwrap_or(&0),
            pixels,
            labels,
            folder: None,
        })
    }
}

/// Which of the two CIFAR layouts a folder holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The "binary version": `*.bin` files of fixed-size records.
    Binary,
    /// torchvision's "python version": pickled dicts.
    Pickle,
}

/// The layout of `dir`, told by its first training file; neither is an error that names
/// both layouts (and the binary file it looked for first).
fn layout(dir: &Path, binary: &str, pickle: &str, format: &Format, folders: (&str, &str)) -> Result<Layout> {
    if dir.join(binary).exists() {
        Ok(Layout::Binary)
    } else if dir.join(pickle).exists() {
        Ok(Layout::Pickle)
    } else {
        Err(Error::format(
            dir.join(binary),
            format!(
                "missing file; {dir} holds neither CIFAR layout: the binary version ({binary}, ...: {}) \
                 nor torchvision's python version ({pickle}, ...: {}); {}",
                folders.0,
                folders.1,
                format.hint,
                dir = dir.display()
            ),
        ))
    }
}

/// Load CIFAR-10 from `dir`: the binary version (data_batch_1.bin .. data_batch_5.bin and
/// test_batch.bin) or torchvision's (data_batch_1 .. data_batch_5 and test_batch).
pub fn load_cifar10(dir: &Path) -> Result<Split> {
    const TRAIN: [&str; 5] = [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
    ];
    let folders = ("cifar-10-batches-bin", "cifar-10-batches-py");
    match layout(dir, "data_batch_1.bin", "data_batch_1", &CIFAR10, folders)? {
        Layout::Binary => {
            let files: Vec<String> = TRAIN.iter().map(|f| format!("{f}.bin")).collect();
            let files: Vec<&str> = files.iter().map(String::as_str).collect();
            let train = CIFAR10.load(dir, &files)?;
            let test = CIFAR10.load(dir, &["test_batch.bin"])?;
            Ok(Split { train, val: None, test })
        }
        Layout::Pickle => Ok(Split {
            train: cifar_pickle::load(dir, &TRAIN, "cifar10", "labels", 10)?,
            val: None,
            test: cifar_pickle::load(dir, &["test_batch"], "cifar10", "labels", 10)?,
        }),
    }
}

/// Load CIFAR-100 with its 100 fine labels from `dir`: the binary version (train.bin and
/// test.bin) or torchvision's (train and test).
pub fn load_cifar100(dir: &Path) -> Result<Split> {
    match layout(
        dir,
        "train.bin",
        "train",
        &CIFAR100,
        ("cifar-100-binary", "cifar-100-python"),
    )? {
        Layout::Binary => Ok(Split {
            train: CIFAR100.load(dir, &["train.bin"])?,
            val: None,
            test: CIFAR100.load(dir, &["test.bin"])?,
        }),
        Layout::Pickle => Ok(Split {
            train: cifar_pickle::load(dir, &["train"], "cifar100", "fine_labels", 100)?,
            val: None,
            test: cifar_pickle::load(dir, &["test"], "cifar100", "fine_labels", 100)?,
        }),
    }
}

/// Write a CIFAR binary file: record i is `labels[i]` followed by 3072 bytes of `pixels`.
pub fn write_records(path: &Path, labels: &[Vec<u8>], pixels: &[u8]) -> Result<()> {
    if pixels.len() != labels.len() * IMAGE {
        return Err(Error::format(
            path,
            format!(
                "cannot write {} records from {} pixel bytes (need {IMAGE} per record)",
                labels.len(),
                pixels.len()
            ),
        ));
    }
    let total: usize = labels.iter().map(|l| l.len()).sum::<usize>() + pixels.len();
    let mut bytes = Vec::with_capacity(total);
    for (l, p) in labels.iter().zip(pixels.chunks_exact(IMAGE)) {
        bytes.extend_from_slice(l);
        bytes.extend_from_slice(p);
    }
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    fn pattern(n: usize, salt: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 31 + salt * 7) % 256) as u8).collect()
    }

    fn write_cifar10(dir: &Path, per_batch: usize, n_test: usize) {
        for b in 1..=5 {
            let labels: Vec<Vec<u8>> = (0..per_batch).map(|i| vec![((i + b) % 10) as u8]).collect();
            write_records(
                &dir.join(format!("data_batch_{b}.bin")),
                &labels,
                &pattern(per_batch * IMAGE, b),
            )
            .unwrap();
        }
        let labels: Vec<Vec<u8>> = (0..n_test).map(|i| vec![(i % 10) as u8]).collect();
        write_records(&dir.join("test_batch.bin"), &labels, &pattern(n_test * IMAGE, 9)).unwrap();
    }

    #[test]
    fn cifar10_round_trip() {
        let dir = test_dir("cifar10");
        write_cifar10(&dir, 2, 3);
        let split = load_cifar10(&dir).unwrap();
        assert_eq!(split.train.len(), 10);
        assert_eq!(split.test.len(), 3);
        assert_eq!(
            (split.train.channels, split.train.height, split.train.width),
            (3, 32, 32)
        );
        assert_eq!(split.train.classes, 10);
        assert_eq!(split.train.name, "cifar10");
        assert_eq!(split.train.labels, vec![1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
        let mut expect = Vec::new();
        for b in 1..=5 {
            expect.extend(pattern(2 * IMAGE, b));
        }
        assert_eq!(split.train.pixels, expect);
        assert_eq!(split.test.labels, vec![0, 1, 2]);
        assert_eq!(split.test.pixels, pattern(3 * IMAGE, 9));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cifar100_round_trip_uses_fine_labels() {
        let dir = test_dir("cifar100");
        let train: Vec<Vec<u8>> = vec![vec![3, 97], vec![19, 0], vec![0, 42]];
        write_records(&dir.join("train.bin"), &train, &pattern(3 * IMAGE, 1)).unwrap();
        write_records(&dir.join("test.bin"), &[vec![5, 99]], &pattern(IMAGE, 2)).unwrap();
        let split = load_cifar100(&dir).unwrap();
        assert_eq!(split.train.labels, vec![97, 0, 42]);
        assert_eq!(split.test.labels, vec![99]);
        assert_eq!(split.train.classes, 100);
        assert_eq!(split.train.name, "cifar100");
        assert_eq!(split.train.pixels, pattern(3 * IMAGE, 1));
        assert_eq!(split.test.pixels, pattern(IMAGE, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_length() {
        let dir = test_dir("cifar-len");
        write_cifar10(&dir, 1, 1);
        let path = dir.join("data_batch_3.bin");
        let mut raw = std::fs::read(&path).unwrap();
        raw.push(0);
        std::fs::write(&path, &raw).unwrap();
        let msg = load_cifar10(&dir).unwrap_err().to_string();
        assert!(msg.contains("data_batch_3.bin"), "{msg}");
        assert!(
            msg.contains("3074 bytes is not a whole number of 3073-byte records"),
            "{msg}"
        );
        std::fs::write(&path, []).unwrap();
        let msg = load_cifar10(&dir).unwrap_err().to_string();
        assert!(msg.contains("data_batch_3.bin") && msg.contains("empty"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn label_out_of_range() {
        let dir = test_dir("cifar-label");
        write_cifar10(&dir, 1, 3);
        let labels = vec![vec![1], vec![10], vec![2]];
        write_records(&dir.join("test_batch.bin"), &labels, &pattern(3 * IMAGE, 0)).unwrap();
        let msg = load_cifar10(&dir).unwrap_err().to_string();
        assert!(msg.contains("test_batch.bin"), "{msg}");
        assert!(msg.contains("record 1: label 10"), "{msg}");

        let dir100 = test_dir("cifar100-label");
        write_records(&dir100.join("train.bin"), &[vec![1, 100]], &pattern(IMAGE, 0)).unwrap();
        write_records(&dir100.join("test.bin"), &[vec![1, 1]], &pattern(IMAGE, 0)).unwrap();
        let msg = load_cifar100(&dir100).unwrap_err().to_string();
        assert!(
            msg.contains("train.bin") && msg.contains("record 0: fine label 100"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir100);
    }

    #[test]
    fn missing_file_names_path() {
        let dir = test_dir("cifar-missing");
        let msg = load_cifar100(&dir).unwrap_err().to_string();
        assert!(msg.contains(&*dir.join("train.bin").to_string_lossy()), "{msg}");
        assert!(msg.contains("binary version"), "{msg}");
        write_cifar10(&dir, 1, 1);
        std::fs::remove_file(dir.join("data_batch_4.bin")).unwrap();
        let msg = load_cifar10(&dir).unwrap_err().to_string();
        assert!(
            msg.contains("data_batch_4.bin") && msg.contains("binary version"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_records_checks_sizes() {
        let dir = test_dir("cifar-write");
        let err = write_records(&dir.join("x.bin"), &[vec![0]], &[0; 10]).unwrap_err();
        assert!(err.to_string().contains("x.bin"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
