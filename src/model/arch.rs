//! Architectures as data: the spec of a residual network and the blocks it expands to.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Block style.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    /// Pre-activation (PreResNet): BN-ReLU before each convolution.
    PreAct,
    /// Post-activation (ResNet): convolution-BN-ReLU, ReLU after the residual add.
    PostAct,
}

/// Input stem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Stem {
    /// conv3x3 stride 1 + BN (+ReLU for post-activation).
    Cifar,
    /// conv7x7 stride 2 + BN + ReLU + maxpool 3x3 stride 2.
    Imagenet,
}

impl Stem {
    /// Parse "cifar" or "imagenet".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cifar" => Ok(Stem::Cifar),
            "imagenet" => Ok(Stem::Imagenet),
            _ => Err(Error::config(format!(
                "unknown stem '{s}' (expected cifar or imagenet)"
            ))),
        }
    }
    /// CLI name.
    pub fn name(&self) -> &'static str {
        match self {
            Stem::Cifar => "cifar",
            Stem::Imagenet => "imagenet",
        }
    }
}

/// Architecture names accepted by `--arch`.
pub const ARCHS: [&str; 4] = ["preresnet18", "preresnet34", "resnet18", "resnet34"];

/// A residual network: family, depth, widths, stem, input channels and classes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchSpec {
    pub family: Family,
    pub depth: usize,
    /// Planes of stage 1 (stages have base, 2 base, 4 base, 8 base).
    pub base_width: usize,
    /// Inner width factor w: a block maps C -> wC -> C.
    pub inner_width: usize,
    pub stem: Stem,
    pub in_channels: usize,
    pub classes: usize,
    /// Stages (1-based) whose projection-free blocks are split among LoFT workers.
    pub partitioned_stages: Vec<usize>,
}

/// One residual block after expansion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// Global block index (0-based, in network order).
    pub index: usize,
    /// Stage 1..=4.
    pub stage: usize,
    /// Index within the stage.
    pub pos: usize,
    pub c_in: usize,
    pub c_out: usize,
    /// Full inner width wC of the block.
    pub inner: usize,
    pub stride: usize,
    pub has_proj: bool,
    /// Split among LoFT workers.
    pub partitioned: bool,
    /// Pruned when extracting a ticket.
    pub prunable: bool,
}

impl ArchSpec {
    /// The spec for an `--arch` name with default widths (base 64, inner 2, CIFAR stem,
    /// 3 channels, 10 classes, stages 2-4 partitioned).
    pub fn named(name: &str) -> Result<Self> {
        let (family, depth) = match name {
            "preresnet18" => (Family::PreAct, 18),
            "preresnet34" => (Family::PreAct, 34),
            "resnet18" => (Family::PostAct, 18),
            "resnet34" => (Family::PostAct, 34),
            _ => {
                return Err(Error::config(format!(
                    "unknown arch '{name}' (expected one of: {})",
                    ARCHS.join(", ")
                )))
            }
        };
        Ok(ArchSpec {
            family,
            depth,
            base_width: 64,
            inner_width: 2,
            stem: Stem::Cifar,
            in_channels: 3,
            classes: 10,
            partitioned_stages: vec![2, 3, 4],
        })
    }

    /// The `--arch` name.
    pub fn name(&self) -> String {
        let f = match self.family {
            Family::PreAct => "preresnet",
            Family::PostAct => "resnet",
        };
        format!("{f}{}", self.depth)
    }

    /// Blocks per stage.
    pub fn stage_blocks(&self) -> [usize; 4] {
        match self.depth {
            18 => [2, 2, 2, 2],
            _ => [3, 4, 6, 3],
        }
    }

    /// Check every value is usable.
    pub fn validate(&self) -> Result<()> {
        if self.depth != 18 && self.depth != 34 {
            return Err(Error::config(format!("depth must be 18 or 34, got {}", self.depth)));
        }
        for (v, what) in [
            (self.base_width, "--base-width"),
            (self.inner_width, "--inner-width"),
            (self.in_channels, "input channels"),
            (self.classes, "--classes"),
        ] {
            if v == 0 {
                return Err(Error::config(format!("{what} must be at least 1")));
            }
        }
        if self.classes < 2 {
            return Err(Error::config("--classes must be at least 2"));
        }
        if let Some(s) = self.partitioned_stages.iter().find(|&&s| !(1..=4).contains(&s)) {
            return Err(Error::config(format!("partitioned stage {s} is not in 1..=4")));
        }
        Ok(())
    }

    /// Output channels of the stem.
    pub fn stem_width(&self) -> usize {
        self.base_width
    }

    /// Width of the feature vector fed to the classifier.
    pub fn feature_width(&self) -> usize {
        8 * self.base_width
    }

    /// The blocks in network order.
    pub fn blocks(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        let mut c_in = self.stem_width();
        for (si, &nb) in self.stage_blocks().iter().enumerate() {
            let stage = si + 1;
            let planes = self.base_width << si;
            for pos in 0..nb {
                let stride = if pos == 0 && si > 0 { 2 } else { 1 };
                let has_proj = stride != 1 || c_in != planes;
                out.push(BlockInfo {
                    index: out.len(),
                    stage,
                    pos,
                    c_in,
                    c_out: planes,
                    inner: self.inner_width * planes,
                    stride,
                    has_proj,
                    partitioned: !has_proj && self.partitioned_stages.contains(&stage),
                    prunable: !has_proj,
                });
                c_in = planes;
            }
        }
        out
    }
}
