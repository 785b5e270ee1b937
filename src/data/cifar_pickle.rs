//! CIFAR as torchvision keeps it: the "python version" archives (`cifar-10-batches-py`,
//! `cifar-100-python`), whose files are pickled dicts.
//!
//! Each file holds `data`, a uint8 numpy array `(n, 3072)` (red plane, green plane, blue
//! plane: already our `(c, h, w)` layout), and the labels as a list of ints: `labels` in
//! CIFAR-10, `fine_labels` (and `coarse_labels`) in CIFAR-100. Keys are byte strings in the
//! original Python 2 pickles and text in pickles written by Python 3; both are read. The
//! pickle is decoded by `serde-pickle`; a numpy array arrives as the state numpy pickles
//! it with: `(version, shape, dtype, fortran_order, raw bytes)`.

use super::{read_data_file, Dataset};
use crate::error::{Error, Result};
use serde_pickle::{DeOptions, HashableValue, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Pixel bytes per CIFAR image.
const IMAGE: usize = 3 * 32 * 32;

/// The entry `key` of a pickled dict (byte-string or text key).
fn entry<'v>(dict: &'v BTreeMap<HashableValue, Value>, key: &str) -> Option<&'v Value> {
    dict.iter()
        .find(|(k, _)| match k {
            HashableValue::Bytes(b) => b == key.as_bytes(),
            HashableValue::String(s) => s == key,
            _ => false,
        })
        .map(|(_, v)| v)
}

/// The raw bytes and shape of a pickled uint8 numpy array.
fn array(v: &Value) -> Option<(&[u8], Vec<i64>)> {
    let state = match v {
        Value::Tuple(t) | Value::List(t) => t,
        _ => return None,
    };
    let shape = match state.get(1)? {
        Value::Tuple(s) | Value::List(s) => s
            .iter()
            .map(|d| match d {
                Value::I64(n) => Some(*n),
                _ => None,
            })
            .collect::<Option<Vec<i64>>>()?,
        _ => return None,
    };
    let raw = match state.last()? {
        Value::Bytes(b) => b.as_slice(),
        _ => return None,
    };
    Some((raw, shape))
}

/// Append the images and labels (under `label_key`, each `< classes`) of one pickled batch.
pub fn read_batch(
    path: &Path,
    label_key: &str,
    classes: usize,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let bytes = read_data_file(
        path,
        "the torchvision layout of CIFAR (cifar-10-batches-py, cifar-100-python)",
    )?;
    let bad = |msg: String| Error::format(path, msg);
    let value = serde_pickle::value_from_slice(&bytes, DeOptions::new().replace_unresolved_globals())
        .map_err(|e| bad(format!("not a readable pickle: {e}")))?;
    let dict = match &value {
        Value::Dict(d) => d,
        _ => return Err(bad("not a pickled dict".into())),
    };
    let data = entry(dict, "data").ok_or_else(|| bad("no 'data' entry".into()))?;
    let (raw, shape) = array(data).ok_or_else(|| bad("'data' is not a numpy array".into()))?;
    let n = match shape.as_slice() {
        [n, w] if *w == IMAGE as i64 && *n >= 0 => *n as usize,
        _ => return Err(bad(format!("'data' has shape {shape:?}, expected (n, {IMAGE})"))),
    };
    if raw.len() != n * IMAGE {
        return Err(bad(format!("'data' holds {} bytes for {n} uint8 images", raw.len())));
    }
    let list = match entry(dict, label_key) {
        Some(Value::List(l)) => l,
        _ => return Err(bad(format!("no '{label_key}' list"))),
    };
    if list.len() != n {
        return Err(bad(format!("{} labels for {n} images", list.len())));
    }
    for (i, v) in list.iter().enumerate() {
        match v {
            Value::I64(l) if (0..classes as i64).contains(l) => labels.push(*l as u32),
            other => return Err(bad(format!("label {i} is {other:?}, not a class in 0..{classes}"))),
        }
    }
    pixels.extend_from_slice(raw);
    Ok(())
}

/// A data set from the named pickled batches in `dir`.
pub fn load(dir: &Path, files: &[&str], name: &str, label_key: &str, classes: usize) -> Result<Dataset> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in files {
        read_batch(&dir.join(f), label_key, classes, &mut pixels, &mut labels)?;
    }
    Ok(Dataset {
        name: name.into(),
        channels: 3,
        height: 32,
        width: 32,
        classes,
        pixels,
        labels,
        folder: None,
    })
}
