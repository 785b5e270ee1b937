//! ImageNet in its standard folder layout: `train/<class>/*.JPEG` and `val/<class>/*.JPEG`,
//! class index = position of the folder name in sorted order (torchvision's ImageFolder).
//!
//! Images are not held in memory: a [`Folder`] lists the files and their labels, and every
//! sample is decoded when a batch needs it (in parallel, see `Loader::fill`; the next batch
//! is prefetched while the step runs). Decoding uses the `image` crate (zune-jpeg): grey and
//! CMYK JPEGs and a PNG saved under a `.JPEG` name (the real training set holds such files)
//! all become RGB; a file that does not decode is an error that names it.
//!
//! Transforms, as torchvision's ImageNet recipe: training takes a random resized crop (area
//! 8-100% of the image, aspect ratio 3/4-4/3, 10 tries, else the centre crop) resampled to
//! 224 x 224, mirrored with probability 1/2; evaluation resizes the short side to 256 and
//! takes the centre 224 x 224 (one resampling of the matching source window). Resampling is
//! separable with a triangle (bilinear) kernel widened by the downscale factor
//! (antialiased, as PIL does). Normalised with ImageNet's mean and std.

use crate::error::{Error, Result};
use crate::rng::Rng;
use std::path::{Path, PathBuf};

/// Output side of every sample.
pub const SIZE: usize = 224;
/// Short side evaluation resizes to before the centre crop.
pub const RESIZE: usize = 256;
/// ImageNet's per-channel mean and std of pixel / 255 (torchvision's constants).
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Extensions taken as images (case-insensitive), as torchvision's IMG_EXTENSIONS.
const EXTENSIONS: [&str; 6] = ["jpg", "jpeg", "png", "bmp", "webp", "ppm"];

/// The files of one half (train or val) and their labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Folder {
    pub root: PathBuf,
    /// Class folder names, sorted: class i is `classes[i]`.
    pub classes: Vec<String>,
    /// (file, label), ordered by class then file name.
    pub files: Vec<(PathBuf, u32)>,
}

impl Folder {
    /// List `root/<class>/<image>`; classes are the sorted sub-folders.
    pub fn scan(root: &Path) -> Result<Folder> {
        let entries = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        let mut classes: Vec<String> = Vec::new();
        for e in entries {
            let e = e.map_err(|e| Error::io(root, e))?;
            if e.path().is_dir() {
                classes.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(Error::format(
                root,
                "no class folders (expected <class>/<image>.JPEG inside)",
            ));
        }
        let mut files = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| Error::io(&dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension()
                            .and_then(|x| x.to_str())
                            .is_some_and(|x| EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
                })
                .collect();
            names.sort();
            files.extend(names.into_iter().map(|p| (p, label as u32)));
        }
        if files.is_empty() {
            return Err(Error::format(root, "no images in its class folders"));
        }
        Ok(Folder {
            root: root.to_path_buf(),
            classes,
            files,
        })
    }
}

/// The two halves of an ImageNet folder: DIR/train and DIR/val.
pub fn load(dir: &Path) -> Result<super::Split> {
    let half = |name: &str| -> Result<super::Dataset> {
        let root = dir.join(name);
        if !root.is_dir() {
            return Err(Error::format(
                &root,
                "missing folder; ImageNet is read from DIR/train/<class>/*.JPEG and DIR/val/<class>/*.JPEG (--data-dir DIR)",
            ));
        }
        let f = Folder::scan(&root)?;
        Ok(super::Dataset {
            name: "imagenet".into(),
            channels: 3,
            height: SIZE,
            width: SIZE,
            classes: f.classes.len(),
            pixels: Vec::new(),
            labels: f.files.iter().map(|(_, l)| *l).collect(),
            folder: Some(std::sync::Arc::new(f)),
        })
    };
    let (train, test) = (half("train")?, half("val")?);
    let (a, b) = (
        train.folder.as_ref().map(|f| &f.classes),
        test.folder.as_ref().map(|f| &f.classes),
    );
    if a != b {
        return Err(Error::format(dir.join("val"), "its class folders differ from train's"));
    }
    Ok(super::Split { train, val: None, test })
}

/// Decode an image file (any format the content says, whatever its name) to RGB: (pixels
/// as interleaved RGB, width, height).
pub fn decode(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img =
        image::load_from_memory(&bytes).map_err(|e| Error::format(path, format!("cannot decode the image: {e}")))?;
    let rgb = img.to_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::format(path, "an empty image"));
    }
    Ok((rgb.into_raw(), w, h))
}

/// A window of the source image, in source pixels (fractional).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Window {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

/// torchvision's RandomResizedCrop window (scale 0.08-1, ratio 3/4-4/3).
pub fn random_window(w: usize, h: usize, rng: &mut Rng) -> Window {
    let area = (w * h) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * (0.08 + 0.92 * rng.uniform());
        let ratio = (lo + (hi - lo) * rng.uniform()).exp();
        let cw = (target * ratio).sqrt().round() as usize;
        let ch = (target / ratio).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let y = rng.below((h - ch + 1) as u64) as usize;
            let x = rng.below((w - cw + 1) as u64) as usize;
            return Window {
                x: x as f64,
                y: y as f64,
                w: cw as f64,
                h: ch as f64,
            };
        }
    }
    // fallback: the centre crop with the ratio clamped to the allowed range
    let r = w as f64 / h as f64;
    let (cw, ch) = if r < 3.0 / 4.0 {
        (w as f64, (w as f64 / (3.0 / 4.0)).round())
    } else if r > 4.0 / 3.0 {
        ((h as f64 * 4.0 / 3.0).round(), h as f64)
    } else {
        (w as f64, h as f64)
    };
    Window {
        x: ((w as f64 - cw) / 2.0).floor(),
        y: ((h as f64 - ch) / 2.0).floor(),
        w: cw,
        h: ch,
    }
}

/// The evaluation window: resize the short side to 256, take the centre 224 x 224.
pub fn centre_window(w: usize, h: usize) -> Window {
    let scale = RESIZE as f64 / w.min(h) as f64;
    let side = SIZE as f64 / scale;
    Window {
        x: (w as f64 - side) / 2.0,
        y: (h as f64 - side) / 2.0,
        w: side,
        h: side,
    }
}

/// Weights of a 1-D antialiased bilinear resampling of source span [start, start + len)
/// onto `out` samples: for each output sample, (first source index, weights).
fn taps(start: f64, len: f64, out: usize, src_len: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = len / out as f64;
    let support = scale.max(1.0);
    (0..out)
        .map(|o| {
            let centre = start + (o as f64 + 0.5) * scale;
            let lo = ((centre - support).floor().max(0.0)) as usize;
            let hi = ((centre + support).ceil() as usize).min(src_len);
            let mut w: Vec<f64> = (lo..hi)
                .map(|s| (1.0 - ((s as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum > 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            } else {
                // a window outside the image: the nearest pixel
                let near = (centre.floor().max(0.0) as usize).min(src_len - 1);
                return (near, vec![1.0]);
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Resample `win` of an RGB image to SIZE x SIZE, optionally mirrored, normalised into `out`
/// as (3, SIZE, SIZE) with `mean`/`std` of pixel / 255.
#[allow(clippy::too_many_arguments)]
pub fn render(rgb: &[u8], w: usize, h: usize, win: Window, flip: bool, mean: &[f32], std: &[f32], out: &mut [f32]) {
    let tx = taps(win.x, win.w, SIZE, w);
    let ty = taps(win.y, win.h, SIZE, h);
    // horizontal pass: every source row the vertical taps touch, (rows, SIZE, 3)
    let row_lo = ty.iter().map(|t| t.0).min().unwrap_or(0);
    let row_hi = ty.iter().map(|t| t.0 + t.1.len()).max().unwrap_or(0);
    let mut mid = vec![0f32; (row_hi - row_lo) * SIZE * 3];
    for (r, sy) in (row_lo..row_hi).enumerate() {
        let row = &rgb[sy * w * 3..(sy + 1) * w * 3];
        for (ox, (first, wts)) in tx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wt) in wts.iter().enumerate() {
                let p = &row[(first + k) * 3..(first + k) * 3 + 3];
                for c in 0..3 {
                    acc[c] += wt * p[c] as f32;
                }
            }
            let dst = if flip { SIZE - 1 - ox } else { ox };
            mid[(r * SIZE + dst) * 3..(r * SIZE + dst) * 3 + 3].copy_from_slice(&acc);
        }
    }
    // vertical pass and normalisation
    let plane = SIZE * SIZE;
    for (oy, (first, wts)) in ty.iter().enumerate() {
        for ox in 0..SIZE {
            let mut acc = [0f32; 3];
            for (k, &wt) in wts.iter().enumerate() {
                let m = &mid[((first + k - row_lo) * SIZE + ox) * 3..][..3];
                for c in 0..3 {
                    acc[c] += wt * m[c];
                }
            }
            for c in 0..3 {
                let v = acc[c].clamp(0.0, 255.0) / 255.0;
                out[c * plane + oy * SIZE + ox] = (v - mean[c]) / std[c];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resampling_a_flat_image_keeps_its_value_and_flip_mirrors() {
        let (w, h) = (50, 30);
        // a horizontal ramp in red, flat green and blue
        let rgb: Vec<u8> = (0..w * h).flat_map(|i| [(i % w * 5) as u8, 100, 200]).collect();
        let mut out = vec![0f32; 3 * SIZE * SIZE];
        let unit = [0.0f32; 3];
        let one = [1.0f32 / 255.0; 3];
        render(&rgb, w, h, centre_window(w, h), false, &unit, &one, &mut out);
        let plane = SIZE * SIZE;
        assert!(out[plane..2 * plane].iter().all(|&v| (v - 100.0).abs() < 1e-3));
        assert!(out[2 * plane..].iter().all(|&v| (v - 200.0).abs() < 1e-3));
        // red increases left to right; mirrored, right to left
        assert!(out[10] < out[200]);
        let mut flipped = vec![0f32; 3 * SIZE * SIZE];
        render(&rgb, w, h, centre_window(w, h), true, &unit, &one, &mut flipped);
        assert!((flipped[10] - out[SIZE - 1 - 10]).abs() < 1e-4);
    }

    #[test]
    fn windows_lie_inside_the_image() {
        let mut rng = Rng::new(3);
        for (w, h) in [(500, 375), (100, 400), (7, 7), (1000, 20)] {
            for _ in 0..200 {
                let win = random_window(w, h, &mut rng);
                assert!(win.x >= 0.0 && win.y >= 0.0 && win.w > 0.0 && win.h > 0.0, "{win:?}");
                assert!(
                    win.x + win.w <= w as f64 + 1e-9 && win.y + win.h <= h as f64 + 1e-9,
                    "{win:?} in {w}x{h}"
                );
            }
            let c = centre_window(w, h);
            assert!((c.w - c.h).abs() < 1e-9 && c.w <= w.min(h) as f64);
        }
    }
}
