//! `loft export`: a checkpoint or ticket as a safetensors file under PyTorch `state_dict` names.
//!
//! loft's tensor names already follow the module tree of the PyTorch network in
//! `docs/pytorch.md` (`stem.conv.weight`, `s2.b1.bn_mid.running_var`, `fc.bias`), so the
//! mapping is the identity, plus one `num_batches_tracked` (int64, the SGD steps the
//! checkpoint has taken) per batch norm, as PyTorch's BatchNorm2d keeps it. The architecture
//! travels in the file's metadata: family, depth, stem, classes, input channels and size,
//! every block's widths and stride (narrow tickets included), and the input normalisation.
//!
//! The safetensors layout: an 8-byte little-endian header length, a JSON header (tensor name
//! -> dtype, shape, byte range; `__metadata__` -> string map), then the tensors' bytes.

use crate::checkpoint::Checkpoint;
use crate::data::DatasetKind;
use crate::model::{ArchSpec, Family};
use crate::rundir;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The parts of a checkpoint's configuration export needs (every run kind has them).
#[derive(Deserialize)]
struct Config {
    arch: ArchSpec,
    dataset: DatasetKind,
}

/// One residual block as the PyTorch module builds it.
#[derive(Serialize, Debug, PartialEq)]
pub struct BlockMeta {
    /// Name prefix of its tensors, e.g. `s2.b0`.
    pub name: String,
    pub c_in: usize,
    /// Width of the inner convolution (narrower in a pruned ticket).
    pub inner: usize,
    pub c_out: usize,
    pub stride: usize,
    /// A 1x1 projection on the shortcut.
    pub proj: bool,
}

/// A tensor of the file: name, dtype, shape and its bytes.
struct Tensor {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Export `checkpoint` (any kind) to `out` (written atomically).
pub fn run(checkpoint: &Path, out: &Path) -> Result<()> {
    let c = Checkpoint::read(checkpoint)?;
    let cfg: Config = serde_json::from_str(&c.config)
        .map_err(|e| Error::format(checkpoint, format!("configuration without an architecture: {e}")))?;
    let blocks = blocks(&cfg.arch, &c)?;
    let (_, h, w, _) = cfg.dataset.shape();
    let mut tensors = Vec::new();
    for (values, layout) in [(&c.params, &c.param_layout), (&c.stats, &c.stat_layout)] {
        for e in &layout.entries {
            let v = &values[e.offset..e.offset + e.len];
            tensors.push(Tensor {
                name: e.name.clone(),
                dtype: "F32",
                shape: e.shape.clone(),
                bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            });
            if let Some(bn) = e.name.strip_suffix(".running_mean") {
                tensors.push(Tensor {
                    name: format!("{bn}.num_batches_tracked"),
                    dtype: "I64",
                    shape: vec![],
                    bytes: (c.state.step as i64).to_le_bytes().to_vec(),
                });
            }
        }
    }
    let a = &cfg.arch;
    let family = match a.family {
        Family::PreAct => "preact",
        Family::PostAct => "postact",
    };
    let mut meta: BTreeMap<&str, String> = BTreeMap::new();
    meta.insert("format", "loft-resnet".into());
    meta.insert("loft_version", env!("CARGO_PKG_VERSION").into());
    meta.insert("kind", c.kind.name().into());
    meta.insert("family", family.into());
    meta.insert("depth", a.depth.to_string());
    meta.insert("stem", a.stem.name().into());
    meta.insert("stem_width", a.stem_width().to_string());
    meta.insert("classes", a.classes.to_string());
    meta.insert("in_channels", a.in_channels.to_string());
    meta.insert("input_size", serde_json::to_string(&[h, w]).expect("json"));
    meta.insert("blocks", serde_json::to_string(&blocks).expect("json"));
    meta.insert("bn_eps", crate::model::BN_EPS.to_string());
    meta.insert("mean", serde_json::to_string(&c.state.data.mean).expect("json"));
    meta.insert("std", serde_json::to_string(&c.state.data.std).expect("json"));
    meta.insert("dataset", cfg.dataset.name().into());
    meta.insert("masked", c.ticket.as_ref().is_some_and(|t| t.masked).to_string());
    meta.insert("source", checkpoint.display().to_string());
    rundir::write_atomic_with(out, |f| write_safetensors(f, &tensors, &meta))
}

/// Every block's widths and stride, the inner width read off the checkpoint's own layout (so
/// a narrow ticket exports its narrow blocks).
fn blocks(arch: &ArchSpec, c: &Checkpoint) -> Result<Vec<BlockMeta>> {
    let shape_of = |name: &str| {
        c.param_layout
            .entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.shape.clone())
    };
    arch.blocks()
        .iter()
        .map(|b| {
            let name = format!("s{}.b{}", b.stage, b.pos);
            let conv1 = shape_of(&format!("{name}.conv1.weight"))
                .ok_or_else(|| Error::Shape(format!("the checkpoint has no {name}.conv1.weight")))?;
            Ok(BlockMeta {
                name,
                c_in: b.c_in,
                inner: conv1[0],
                c_out: b.c_out,
                stride: b.stride,
                proj: b.has_proj,
            })
        })
        .collect()
}

/// The safetensors bytes of `tensors` (in the given order) and `meta`.
fn write_safetensors(f: &mut dyn Write, tensors: &[Tensor], meta: &BTreeMap<&str, String>) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::to_value(meta).expect("json"));
    let mut at = 0usize;
    for t in tensors {
        let end = at + t.bytes.len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [at, end]}),
        );
        at = end;
    }
    let mut text = serde_json::to_string(&header).expect("json").into_bytes();
    // the data starts 8-byte aligned: pad the header with spaces
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(&text)?;
    for t in tensors {
        f.write_all(&t.bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_header_is_aligned_and_the_offsets_cover_the_data() {
        let tensors = vec![
            Tensor {
                name: "a.weight".into(),
                dtype: "F32",
                shape: vec![2, 3],
                bytes: vec![1; 24],
            },
            Tensor {
                name: "a.num_batches_tracked".into(),
                dtype: "I64",
                shape: vec![],
                bytes: vec![2; 8],
            },
        ];
        let meta = BTreeMap::from([("format", "loft-resnet".to_string())]);
        let mut out = Vec::new();
        write_safetensors(&mut out, &tensors, &meta).unwrap();
        let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header: serde_json::Value = serde_json::from_slice(&out[8..8 + n]).unwrap();
        assert_eq!(header["a.weight"]["data_offsets"], serde_json::json!([0, 24]));
        assert_eq!(header["a.num_batches_tracked"]["shape"], serde_json::json!([]));
        assert_eq!(header["__metadata__"]["format"], "loft-resnet");
        assert_eq!(out.len(), 8 + n + 32);
        assert_eq!(out[8 + n + 24], 2);
    }
}
