//! The network as a list of ops over numbered activation tensors, with its parameter layout.
//!
//! [`Graph::build`] expands an [`ArchSpec`] (and optionally per-block inner widths, for the
//! narrower sub-networks of LoFT workers and pruned tickets) into: the parameter layout, the
//! BN-statistics layout, the activation tensors `(c, h, w)` per sample, and the ops in forward
//! order. The forward and backward walks in [`super::Model`] are loops over these ops.

use super::arch::{ArchSpec, BlockInfo, Family, Stem};
use super::layout::{Layout, Role};
use crate::ops::{Conv2d, Pool2d};
use crate::{Error, Result};
use serde::Serialize;

/// Index of an activation tensor.
pub type TensorId = usize;

/// Per-sample shape of an activation tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl TensorSpec {
    /// Elements per sample.
    pub fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One op of the forward walk. Parameter fields are indices into the parameter layout;
/// `gamma`'s beta is the next entry, `mean`'s variance the next stats entry, and a linear
/// layer's bias follows its weight.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Op {
    /// Convolution (geometry with n = 0; the walk sets the batch).
    Conv {
        x: TensorId,
        y: TensorId,
        w: usize,
        geom: Conv2d,
    },
    /// Batch norm; `save` numbers its saved (mean, invstd) buffer. With `relu`, a ReLU fused
    /// after it (y is the ReLU's output; the normalised values are never stored).
    Bn {
        x: TensorId,
        y: TensorId,
        gamma: usize,
        mean: usize,
        c: usize,
        hw: usize,
        save: usize,
        relu: bool,
    },
    /// ReLU.
    Relu { x: TensorId, y: TensorId },
    /// Residual add.
    Add { a: TensorId, b: TensorId, y: TensorId },
    /// Max pooling (geometry with n = 0).
    MaxPool { x: TensorId, y: TensorId, geom: Pool2d },
    /// Global average pooling.
    AvgPool {
        x: TensorId,
        y: TensorId,
        c: usize,
        hw: usize,
    },
    /// Fully connected layer.
    Linear {
        x: TensorId,
        y: TensorId,
        w: usize,
        d_in: usize,
        d_out: usize,
    },
}

impl Op {
    /// Input tensors.
    pub fn inputs(&self) -> Vec<TensorId> {
        match *self {
            Op::Add { a, b, .. } => vec![a, b],
            Op::Conv { x, .. }
            | Op::Bn { x, .. }
            | Op::Relu { x, .. }
            | Op::MaxPool { x, .. }
            | Op::AvgPool { x, .. }
            | Op::Linear { x, .. } => vec![x],
        }
    }
    /// Output tensor.
    pub fn output(&self) -> TensorId {
        match *self {
            Op::Conv { y, .. }
            | Op::Bn { y, .. }
            | Op::Relu { y, .. }
            | Op::Add { y, .. }
            | Op::MaxPool { y, .. }
            | Op::AvgPool { y, .. }
            | Op::Linear { y, .. } => y,
        }
    }
}

/// The expanded network.
#[derive(Clone, Debug)]
pub struct Graph {
    pub spec: ArchSpec,
    /// Inner width of each block as built (full width unless narrowed).
    pub inner: Vec<usize>,
    pub blocks: Vec<BlockInfo>,
    pub params: Layout,
    /// BN running statistics (mean then variance for each BN).
    pub stats: Layout,
    pub tensors: Vec<TensorSpec>,
    pub ops: Vec<Op>,
    /// For each op and each of its inputs (at most two): accumulate into that input's
    /// gradient (it already received one from an op later in the network) instead of
    /// overwriting it.
    pub accumulate: Vec<[bool; 2]>,
    pub input: TensorId,
    pub logits: TensorId,
    /// Number of BN ops (saved-statistics buffers).
    pub bn_count: usize,
}

struct Builder {
    params: Layout,
    stats: Layout,
    tensors: Vec<TensorSpec>,
    ops: Vec<Op>,
    bn_count: usize,
}

impl Builder {
    fn tensor(&mut self, name: String, c: usize, h: usize, w: usize) -> TensorId {
        self.tensors.push(TensorSpec { name, c, h, w });
        self.tensors.len() - 1
    }

    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: &str,
        x: TensorId,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
        role: Role,
    ) -> TensorId {
        let t = self.tensors[x].clone();
        let geom = Conv2d {
            n: 0,
            c_in: t.c,
            h: t.h,
            w: t.w,
            c_out,
            kh: k,
            kw: k,
            stride,
            pad,
        };
        let w = self.params.push(format!("{name}.weight"), &[c_out, t.c, k, k], role);
        let y = self.tensor(name.to_string(), c_out, geom.h_out(), geom.w_out());
        self.ops.push(Op::Conv { x, y, w, geom });
        y
    }

    fn bn(&mut self, name: &str, x: TensorId, role: Role) -> TensorId {
        self.bn_op(name, x, role, false)
    }

    /// Batch norm followed by ReLU, as one op.
    fn bn_relu(&mut self, name: &str, x: TensorId, role: Role) -> TensorId {
        self.bn_op(name, x, role, true)
    }

    fn bn_op(&mut self, name: &str, x: TensorId, role: Role, relu: bool) -> TensorId {
        let t = self.tensors[x].clone();
        let gamma = self.params.push(format!("{name}.weight"), &[t.c], role);
        self.params.push(format!("{name}.bias"), &[t.c], role);
        let mean = self.stats.push(format!("{name}.running_mean"), &[t.c], role);
        self.stats.push(format!("{name}.running_var"), &[t.c], role);
        let y = self.tensor(
            if relu { format!("{name}.relu") } else { name.to_string() },
            t.c,
            t.h,
            t.w,
        );
        self.ops.push(Op::Bn {
            x,
            y,
            gamma,
            mean,
            c: t.c,
            hw: t.h * t.w,
            save: self.bn_count,
            relu,
        });
        self.bn_count += 1;
        y
    }

    fn relu(&mut self, name: &str, x: TensorId) -> TensorId {
        let t = self.tensors[x].clone();
        let y = self.tensor(format!("{name}.relu"), t.c, t.h, t.w);
        self.ops.push(Op::Relu { x, y });
        y
    }

    fn add(&mut self, name: &str, a: TensorId, b: TensorId) -> TensorId {
        let t = self.tensors[a].clone();
        let y = self.tensor(format!("{name}.add"), t.c, t.h, t.w);
        self.ops.push(Op::Add { a, b, y });
        y
    }
}

impl Graph {
    /// Expand `spec` for `(h, w)` inputs. `inner` overrides the inner width of every block
    /// (length = number of blocks); `None` builds the full network.
    pub fn build(spec: &ArchSpec, h: usize, w: usize, inner: Option<&[usize]>) -> Result<Graph> {
        spec.validate()?;
        let blocks = spec.blocks();
        let inner: Vec<usize> = match inner {
            Some(v) if v.len() != blocks.len() => {
                return Err(Error::Shape(format!(
                    "{} inner widths given for {} blocks",
                    v.len(),
                    blocks.len()
                )))
            }
            Some(v) => v.to_vec(),
            None => blocks.iter().map(|b| b.inner).collect(),
        };
        if let Some(i) = inner.iter().position(|&v| v == 0) {
            return Err(Error::Shape(format!("block {i} would have zero inner filters")));
        }
        let min_hw = match spec.stem {
            Stem::Cifar => 8,
            Stem::Imagenet => 32,
        };
        if h < min_hw || w < min_hw {
            return Err(Error::Shape(format!(
                "input {h}x{w} is too small for the {} stem (at least {min_hw}x{min_hw})",
                spec.stem.name()
            )));
        }
        let mut b = Builder {
            params: Layout::default(),
            stats: Layout::default(),
            tensors: Vec::new(),
            ops: Vec::new(),
            bn_count: 0,
        };
        let shared = Role::Shared;
        let input = b.tensor("input".into(), spec.in_channels, h, w);
        let mut x = match spec.stem {
            Stem::Cifar => {
                let c = b.conv("stem.conv", input, spec.stem_width(), 3, 1, 1, shared);
                match spec.family {
                    Family::PreAct => b.bn("stem.bn", c, shared),
                    Family::PostAct => b.bn_relu("stem.bn", c, shared),
                }
            }
            Stem::Imagenet => {
                let c = b.conv("stem.conv", input, spec.stem_width(), 7, 2, 3, shared);
                let r = b.bn_relu("stem.bn", c, shared);
                let t = b.tensors[r].clone();
                let geom = Pool2d {
                    n: 0,
                    c: t.c,
                    h: t.h,
                    w: t.w,
                    k: 3,
                    stride: 2,
                    pad: 1,
                };
                let y = b.tensor("stem.pool".into(), t.c, geom.h_out(), geom.w_out());
                b.ops.push(Op::MaxPool { x: r, y, geom });
                y
            }
        };
        for (blk, &width) in blocks.iter().zip(&inner) {
            let p = format!("s{}.b{}", blk.stage, blk.pos);
            let part = |axis| {
                if blk.partitioned {
                    Role::Partitioned { block: blk.index, axis }
                } else {
                    Role::Shared
                }
            };
            x = match spec.family {
                Family::PreAct => {
                    let h = b.bn_relu(&format!("{p}.bn_in"), x, shared);
                    let short = if blk.has_proj {
                        b.conv(&format!("{p}.proj"), h, blk.c_out, 1, blk.stride, 0, shared)
                    } else {
                        x
                    };
                    let a = b.conv(&format!("{p}.conv1"), h, width, 3, blk.stride, 1, part(0));
                    let a = b.bn_relu(&format!("{p}.bn_mid"), a, part(0));
                    let c = b.conv(&format!("{p}.conv2"), a, blk.c_out, 3, 1, 1, part(1));
                    b.add(&p, c, short)
                }
                Family::PostAct => {
                    let short = if blk.has_proj {
                        let s = b.conv(&format!("{p}.proj"), x, blk.c_out, 1, blk.stride, 0, shared);
                        b.bn(&format!("{p}.proj_bn"), s, shared)
                    } else {
                        x
                    };
                    let a = b.conv(&format!("{p}.conv1"), x, width, 3, blk.stride, 1, part(0));
                    let a = b.bn_relu(&format!("{p}.bn_mid"), a, part(0));
                    let c = b.conv(&format!("{p}.conv2"), a, blk.c_out, 3, 1, 1, part(1));
                    let c = b.bn(&format!("{p}.bn_out"), c, shared);
                    let s = b.add(&p, c, short);
                    b.relu(&p, s)
                }
            };
        }
        let t = b.tensors[x].clone();
        let pooled = b.tensor("pool".into(), t.c, 1, 1);
        b.ops.push(Op::AvgPool {
            x,
            y: pooled,
            c: t.c,
            hw: t.h * t.w,
        });
        let fc = b.params.push("fc.weight", &[spec.classes, t.c], shared);
        b.params.push("fc.bias", &[spec.classes], shared);
        let logits = b.tensor("logits".into(), spec.classes, 1, 1);
        b.ops.push(Op::Linear {
            x: pooled,
            y: logits,
            w: fc,
            d_in: t.c,
            d_out: spec.classes,
        });

        // Gradient bookkeeping: walking backwards, the first op to reach a tensor writes its
        // gradient, later ones add to it.
        let mut seen = vec![false; b.tensors.len()];
        let mut accumulate = vec![[false; 2]; b.ops.len()];
        for (i, op) in b.ops.iter().enumerate().rev() {
            for (j, t) in op.inputs().into_iter().enumerate() {
                accumulate[i][j] = seen[t];
                seen[t] = true;
            }
        }
        Ok(Graph {
            spec: spec.clone(),
            inner,
            blocks,
            params: b.params,
            stats: b.stats,
            tensors: b.tensors,
            ops: b.ops,
            accumulate,
            input,
            logits,
            bn_count: b.bn_count,
        })
    }

    /// Shared and partitioned parameter counts.
    pub fn param_counts(&self) -> (usize, usize) {
        (self.params.count(false), self.params.count(true))
    }

    /// Forward FLOPs per sample of the convolutions and the linear layer.
    pub fn flops_per_sample(&self) -> f64 {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Conv { geom, .. } => geom.with_n(1).flops(),
                Op::Linear { d_in, d_out, .. } => 2.0 * (*d_in * *d_out) as f64,
                _ => 0.0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(arch: &str, inner: usize, classes: usize, stem: Stem) -> (usize, usize) {
        let mut s = ArchSpec::named(arch).unwrap();
        s.inner_width = inner;
        s.classes = classes;
        s.stem = stem;
        let hw = if stem == Stem::Imagenet { 224 } else { 32 };
        Graph::build(&s, hw, hw, None).unwrap().param_counts()
    }

    #[test]
    fn preresnet34x2_cifar10_counts_match_the_paper() {
        assert_eq!(counts("preresnet34", 2, 10, Stem::Cifar), (9_922_122, 32_451_072));
    }

    #[test]
    fn preresnet34x2_cifar100_counts_match_the_paper() {
        assert_eq!(counts("preresnet34", 2, 100, Stem::Cifar).0, 9_968_292);
    }

    #[test]
    fn preresnet18x2_imagenet_counts_match_the_paper() {
        assert_eq!(counts("preresnet18", 2, 1000, Stem::Imagenet), (10_286_248, 12_389_888));
    }

    #[test]
    fn preresnet34_inner_width_1_total() {
        let (s, p) = counts("preresnet34", 1, 10, Stem::Cifar);
        assert_eq!(s + p, 21_279_434);
    }

    #[test]
    fn resnet34x2_has_2688_more_shared_than_preresnet34x2() {
        let pre = counts("preresnet34", 2, 10, Stem::Cifar);
        let post = counts("resnet34", 2, 10, Stem::Cifar);
        assert_eq!(post.0, pre.0 + 2688);
        assert_eq!(post.1, pre.1);
    }

    #[test]
    fn narrowed_blocks_shrink_only_their_partitioned_tensors() {
        let s = ArchSpec::named("preresnet18").unwrap();
        let full = Graph::build(&s, 32, 32, None).unwrap();
        let mut inner = full.inner.clone();
        for (i, b) in full.blocks.iter().enumerate() {
            if b.partitioned {
                inner[i] = b.inner / 2;
            }
        }
        let half = Graph::build(&s, 32, 32, Some(&inner)).unwrap();
        assert_eq!(half.param_counts().0, full.param_counts().0);
        assert_eq!(half.param_counts().1 * 2, full.param_counts().1);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let s = ArchSpec::named("preresnet18").unwrap();
        assert!(Graph::build(&s, 4, 4, None).is_err());
        assert!(Graph::build(&s, 32, 32, Some(&[1, 2])).is_err());
        assert!(ArchSpec::named("vgg16").is_err());
    }
}
