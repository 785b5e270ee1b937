//! The IDX file format of MNIST and Fashion-MNIST, plain or gzip-compressed.
//!
//! An IDX file is a big-endian header (magic `0x0000080D`, where `D` is the number of
//! dimensions, then one u32 per dimension) followed by the u8 payload. Images use three
//! dimensions (n, rows, cols), labels one (n).

use super::{Dataset, Split};
use crate::error::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Magic number of an IDX file of u8 images (3 dimensions).
const IMAGE_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of u8 labels (1 dimension).
const LABEL_MAGIC: u32 = 0x0000_0801;
/// Fashion-MNIST image side.
const SIDE: usize = 28;
/// Fashion-MNIST classes.
const CLASSES: usize = 10;

/// The bytes of `path`, gunzipped when the file is a gzip stream.
fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Big-endian u32 at word `i` of the header (the caller checked the length).
fn be_u32(bytes: &[u8], i: usize) -> u32 {
    let b = &bytes[4 * i..4 * i + 4];
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Check magic and header length; returns the dimensions.
fn parse_header(path: &Path, bytes: &[u8], magic: u32, what: &str) -> Result<Vec<usize>> {
    if bytes.len() < 4 {
        return Err(Error::format(
            path,
            format!("truncated: {} bytes is too short for an IDX header", bytes.len()),
        ));
    }
    let found = be_u32(bytes, 0);
    if found != magic {
        let hint = match found {
            IMAGE_MAGIC => " (this is an IDX image file)",
            LABEL_MAGIC => " (this is an IDX label file)",
            _ => "",
        };
        return Err(Error::format(
            path,
            format!("bad magic 0x{found:08x}, expected 0x{magic:08x} for IDX {what}{hint}"),
        ));
    }
    let ndims = (magic & 0xff) as usize;
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(Error::format(
            path,
            format!(
                "truncated: expected a {header}-byte header, found {} bytes",
                bytes.len()
            ),
        ));
    }
    Ok((1..=ndims).map(|i| be_u32(bytes, i) as usize).collect())
}

/// Check that the payload after `header` bytes is exactly `expected` bytes long.
fn check_payload(path: &Path, bytes: &[u8], header: usize, expected: usize, what: &str) -> Result<()> {
    let found = bytes.len() - header;
    if found < expected {
        return Err(Error::format(
            path,
            format!("truncated: expected {expected} bytes of {what}, found {found}"),
        ));
    }
    if found > expected {
        return Err(Error::format(
            path,
            format!(
                "trailing data: expected {expected} bytes of {what}, found {found} ({} extra)",
                found - expected
            ),
        ));
    }
    Ok(())
}

/// Read an IDX image file: (n, rows, cols, pixels).
pub fn read_images(path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let mut bytes = read_bytes(path)?;
    let dims = parse_header(path, &bytes, IMAGE_MAGIC, "images")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(Error::format(path, format!("bad dimensions: {rows}x{cols} images")));
    }
    let expected = n.checked_mul(rows).and_then(|v| v.checked_mul(cols)).ok_or_else(|| {
        Error::format(
            path,
            format!("bad dimensions: {n} images of {rows}x{cols} is too large"),
        )
    })?;
    let header = 16;
    check_payload(path, &bytes, header, expected, "pixels")?;
    bytes.drain(..header);
    Ok((n, rows, cols, bytes))
}

/// Read an IDX label file.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let mut bytes = read_bytes(path)?;
    let dims = parse_header(path, &bytes, LABEL_MAGIC, "labels")?;
    let header = 8;
    check_payload(path, &bytes, header, dims[0], "labels")?;
    bytes.drain(..header);
    Ok(bytes)
}

/// Write `bytes` to `path`, gzip-compressed when the name ends with `.gz`.
fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    let gz = path.extension().is_some_and(|e| e == "gz");
    let out = if gz {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).map_err(|e| Error::io(path, e))?;
        enc.finish().map_err(|e| Error::io(path, e))?
    } else {
        bytes.to_vec()
    };
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

/// Write an IDX image file of `pixels.len() / (rows * cols)` images (gzip if `path` ends with .gz).
pub fn write_images(path: &Path, rows: usize, cols: usize, pixels: &[u8]) -> Result<()> {
    let image = rows * cols;
    if image == 0 || !pixels.len().is_multiple_of(image) {
        return Err(Error::format(
            path,
            format!("cannot write {} pixels as whole {rows}x{cols} images", pixels.len()),
        ));
    }
    let n = pixels.len() / image;
    let too_big = |v: usize| {
        u32::try_from(v).map_err(|_| Error::format(path, format!("dimension {v} does not fit in an IDX header")))
    };
    let mut bytes = Vec::with_capacity(16 + pixels.len());
    bytes.extend_from_slice(&IMAGE_MAGIC.to_be_bytes());
    for d in [n, rows, cols] {
        bytes.extend_from_slice(&too_big(d)?.to_be_bytes());
    }
    bytes.extend_from_slice(pixels);
    write_bytes(path, &bytes)
}

/// Write an IDX label file (gzip if `path` ends with .gz).
pub fn write_labels(path: &Path, labels: &[u8]) -> Result<()> {
    let n = u32::try_from(labels.len())
        .map_err(|_| Error::format(path, format!("{} labels do not fit in an IDX header", labels.len())))?;
    let mut bytes = Vec::with_capacity(8 + labels.len());
    bytes.extend_from_slice(&LABEL_MAGIC.to_be_bytes());
    bytes.extend_from_slice(&n.to_be_bytes());
    bytes.extend_from_slice(labels);
    write_bytes(path, &bytes)
}

/// `dir/name` if it exists, else `dir/name.gz`, else an error naming the missing file.
fn find(dir: &Path, name: &str) -> Result<PathBuf> {
    let plain = dir.join(name);
    if plain.is_file() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(Error::format(
        &plain,
        format!(
            "missing file (nor {name}.gz); install the data with \
             `apt-get install dataset-fashion-mnist` or point --data-dir at the IDX files"
        ),
    ))
}

/// One half of Fashion-MNIST from its image and label file names.
fn load_half(dir: &Path, images: &str, labels: &str) -> Result<Dataset> {
    let image_path = find(dir, images)?;
    let label_path = find(dir, labels)?;
    let (n, rows, cols, pixels) = read_images(&image_path)?;
    if (rows, cols) != (SIDE, SIDE) {
        return Err(Error::format(
            &image_path,
            format!("expected {SIDE}x{SIDE} images, found {rows}x{cols}"),
        ));
    }
    if n == 0 {
        return Err(Error::format(&image_path, "no images"));
    }
    let raw = read_labels(&label_path)?;
    if raw.len() != n {
        return Err(Error::format(
            &label_path,
            format!(
                "count mismatch: {} labels but {} holds {n} images",
                raw.len(),
                image_path.display()
            ),
        ));
    }
    if let Some((i, &v)) = raw.iter().enumerate().find(|(_, &v)| v as usize >= CLASSES) {
        return Err(Error::format(
            &label_path,
            format!("label {i} is {v}, out of range 0..{CLASSES}"),
        ));
    }
    Ok(Dataset {
        name: "fashion-mnist".into(),
        channels: 1,
        height: rows,
        width: cols,
        classes: CLASSES,
        pixels,
        labels: raw.into_iter().map(u32::from).collect(),
        folder: None,
    })
}

/// Load Fashion-MNIST (60000 train, 10000 test images) from the four IDX files in `dir`.
pub fn load_fashion_mnist(dir: &Path) -> Result<Split> {
    let train = load_half(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?;
    let test = load_half(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?;
    Ok(Split { train, val: None, test })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_dir;

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 37 % 251) as u8).collect()
    }

    /// Write a small but complete Fashion-MNIST directory.
    fn write_set(dir: &Path, suffix: &str, n_train: usize, n_test: usize) {
        let px = SIDE * SIDE;
        write_images(
            &dir.join(format!("train-images-idx3-ubyte{suffix}")),
            SIDE,
            SIDE,
            &pattern(n_train * px),
        )
        .unwrap();
        let labels: Vec<u8> = (0..n_train).map(|i| (i % 10) as u8).collect();
        write_labels(&dir.join(format!("train-labels-idx1-ubyte{suffix}")), &labels).unwrap();
        write_images(
            &dir.join(format!("t10k-images-idx3-ubyte{suffix}")),
            SIDE,
            SIDE,
            &pattern(n_test * px),
        )
        .unwrap();
        let labels: Vec<u8> = (0..n_test).map(|i| (9 - i % 10) as u8).collect();
        write_labels(&dir.join(format!("t10k-labels-idx1-ubyte{suffix}")), &labels).unwrap();
    }

    #[test]
    fn round_trip_plain_and_gz() {
        let dir = test_dir("idx-rt");
        for name in ["img", "img.gz"] {
            let path = dir.join(name);
            let pixels = pattern(3 * 4 * 5);
            write_images(&path, 4, 5, &pixels).unwrap();
            let (n, r, c, back) = read_images(&path).unwrap();
            assert_eq!((n, r, c), (3, 4, 5));
            assert_eq!(back, pixels);
        }
        for name in ["lab", "lab.gz"] {
            let path = dir.join(name);
            write_labels(&path, &[3, 1, 4, 1, 5]).unwrap();
            assert_eq!(read_labels(&path).unwrap(), vec![3, 1, 4, 1, 5]);
        }
        // The .gz file really is compressed.
        let raw = std::fs::read(dir.join("img.gz")).unwrap();
        assert_eq!(&raw[..2], &[0x1f, 0x8b]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_small_set_plain_and_gz() {
        for suffix in ["", ".gz"] {
            let dir = test_dir("idx-load");
            write_set(&dir, suffix, 7, 3);
            let split = load_fashion_mnist(&dir).unwrap();
            assert_eq!(split.train.len(), 7);
            assert_eq!(split.test.len(), 3);
            assert_eq!(split.train.classes, 10);
            assert_eq!(split.train.channels, 1);
            assert_eq!(split.train.name, "fashion-mnist");
            assert_eq!(split.train.labels, vec![0, 1, 2, 3, 4, 5, 6]);
            assert_eq!(split.test.labels, vec![9, 8, 7]);
            assert_eq!(split.train.pixels, pattern(7 * SIDE * SIDE));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn bad_magic() {
        let dir = test_dir("idx-magic");
        let path = dir.join("labels-as-images");
        write_labels(&path, &[1, 2]).unwrap();
        let msg = read_images(&path).unwrap_err().to_string();
        assert!(msg.contains("bad magic 0x00000801"), "{msg}");
        assert!(msg.contains("labels-as-images"), "{msg}");
        std::fs::write(&path, [0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]).unwrap();
        let msg = read_labels(&path).unwrap_err().to_string();
        assert!(msg.contains("bad magic 0xdeadbeef"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn truncated_and_trailing() {
        let dir = test_dir("idx-trunc");
        let path = dir.join("images");
        write_images(&path, 2, 2, &pattern(12)).unwrap();
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 5]).unwrap();
        let msg = read_images(&path).unwrap_err().to_string();
        assert!(msg.contains("truncated: expected 12 bytes of pixels, found 7"), "{msg}");
        assert!(msg.contains("images"), "{msg}");
        std::fs::write(&path, &full[..10]).unwrap();
        let msg = read_images(&path).unwrap_err().to_string();
        assert!(msg.contains("truncated"), "{msg}");
        let mut long = full.clone();
        long.extend_from_slice(&[0, 0, 0]);
        std::fs::write(&path, &long).unwrap();
        let msg = read_images(&path).unwrap_err().to_string();
        assert!(msg.contains("trailing data") && msg.contains("3 extra"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_gzip() {
        let dir = test_dir("idx-gz");
        let path = dir.join("images.gz");
        write_images(&path, 2, 2, &pattern(400)).unwrap();
        let mut raw = std::fs::read(&path).unwrap();
        let half = raw.len() / 2;
        raw.truncate(half);
        std::fs::write(&path, &raw).unwrap();
        let msg = read_images(&path).unwrap_err().to_string();
        assert!(msg.contains("images.gz") && msg.contains("gzip"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn label_out_of_range() {
        let dir = test_dir("idx-label");
        write_set(&dir, "", 4, 2);
        write_labels(&dir.join("train-labels-idx1-ubyte"), &[0, 1, 12, 3]).unwrap();
        let msg = load_fashion_mnist(&dir).unwrap_err().to_string();
        assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");
        assert!(msg.contains("label 2 is 12"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn count_mismatch() {
        let dir = test_dir("idx-count");
        write_set(&dir, "", 4, 2);
        write_labels(&dir.join("t10k-labels-idx1-ubyte"), &[0, 1, 2]).unwrap();
        let msg = load_fashion_mnist(&dir).unwrap_err().to_string();
        assert!(msg.contains("t10k-labels-idx1-ubyte"), "{msg}");
        assert!(msg.contains("3 labels") && msg.contains("2 images"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_image_size() {
        let dir = test_dir("idx-size");
        write_set(&dir, "", 2, 2);
        write_images(&dir.join("train-images-idx3-ubyte"), 4, 4, &pattern(32)).unwrap();
        let msg = load_fashion_mnist(&dir).unwrap_err().to_string();
        assert!(msg.contains("expected 28x28 images, found 4x4"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_file_names_path() {
        let dir = test_dir("idx-missing");
        write_set(&dir, "", 2, 2);
        std::fs::remove_file(dir.join("t10k-images-idx3-ubyte")).unwrap();
        let msg = load_fashion_mnist(&dir).unwrap_err().to_string();
        let expected = dir.join("t10k-images-idx3-ubyte");
        assert!(msg.contains(&*expected.to_string_lossy()), "{msg}");
        assert!(msg.contains("apt-get install dataset-fashion-mnist"), "{msg}");
        assert!(msg.contains("--data-dir"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn real_fashion_mnist_if_installed() {
        let dir = Path::new("/usr/share/datasets/fashion-mnist");
        if !dir.is_dir() {
            assert!(
                std::env::var_os("LOFT_REQUIRE_DATA").is_none(),
                "LOFT_REQUIRE_DATA is set but {} is missing",
                dir.display()
            );
            println!("note: {} not found; skipping the real-data test", dir.display());
            return;
        }
        let split = load_fashion_mnist(dir).unwrap();
        assert_eq!(split.train.len(), 60000);
        assert_eq!(split.test.len(), 10000);
        assert_eq!(split.train.classes, 10);
        assert_eq!(split.train.pixels.len(), 60000 * 784);
        let mut seen = [0usize; 10];
        for &l in &split.train.labels {
            seen[l as usize] += 1;
        }
        assert!(seen.iter().all(|&c| c == 6000), "{seen:?}");
    }
}
