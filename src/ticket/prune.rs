//! Pruning: turn a pre-trained checkpoint into a ticket, either a physically narrower network
//! (the default) or the full network with the pruned filters held at zero by a mask.
//!
//! Pruning inner filter j of a block removes row j of its `conv1` weight, channel j of the BN
//! that follows it (weight, bias, running mean and variance) and input channel j of `conv2`.
//! These are exactly the tensors LoFT partitions, so the copy goes through the same slice
//! machinery, with one "rank" owning the kept filters of every prunable block.

use super::{kept, prunable_blocks, validate_ratio, Criterion};
pub use crate::checkpoint::TicketInfo;
use crate::checkpoint::{Checkpoint, CheckpointOf, Kind, State};
use crate::data::DatasetKind;
use crate::model::partition::Partition;
use crate::model::slices;
use crate::model::{ArchSpec, Graph, Layout, Role};
use crate::{Error, Result};
use std::path::Path;

/// The architecture and input size a checkpoint's configuration describes.
pub fn arch_of(c: &CheckpointOf<'_>, path: &Path) -> Result<(ArchSpec, usize, usize)> {
    let cfg: serde_json::Value = serde_json::from_str(&c.config)
        .map_err(|e| Error::format(path, format!("its configuration is not valid JSON: {e}")))?;
    let arch: ArchSpec = serde_json::from_value(cfg["arch"].clone())
        .map_err(|e| Error::format(path, format!("its configuration has no valid architecture: {e}")))?;
    let dataset: DatasetKind = serde_json::from_value(cfg["dataset"].clone())
        .map_err(|e| Error::format(path, format!("its configuration has no valid data set: {e}")))?;
    let (_, h, w, _) = dataset.shape();
    Ok((arch, h, w))
}

/// The graphs of a ticket: with every stage partitioned (so that the partitioned blocks are
/// exactly the prunable ones), full and pruned, and the training graph (the original
/// partitioning; full when masked, narrow otherwise). Returns (all-full, all-pruned, train,
/// indices of the prunable blocks).
pub fn ticket_graphs(
    arch: &ArchSpec,
    h: usize,
    w: usize,
    info: &TicketInfo,
) -> Result<(Graph, Graph, Graph, Vec<usize>)> {
    let mut all = arch.clone();
    all.partitioned_stages = vec![1, 2, 3, 4];
    let full_all = Graph::build(&all, h, w, None)?;
    let idx: Vec<usize> = full_all
        .blocks
        .iter()
        .filter(|b| b.partitioned)
        .map(|b| b.index)
        .collect();
    if idx.len() != info.kept.len() {
        return Err(Error::Shape(format!(
            "the ticket keeps filters of {} blocks but the network has {} prunable blocks",
            info.kept.len(),
            idx.len()
        )));
    }
    let mut widths: Vec<usize> = full_all.blocks.iter().map(|b| b.inner).collect();
    for (i, &b) in idx.iter().enumerate() {
        if info.widths[i] != widths[b] || info.kept[i].iter().any(|&j| j >= widths[b]) {
            return Err(Error::Shape(format!(
                "the ticket does not fit block {}",
                info.blocks[i]
            )));
        }
        widths[b] = info.kept[i].len();
    }
    let pruned_all = Graph::build(&all, h, w, Some(&widths))?;
    let train = Graph::build(arch, h, w, if info.masked { None } else { Some(&widths) })?;
    Ok((full_all, pruned_all, train, idx))
}

/// The partition in which one worker owns the kept filters of every prunable block.
pub fn keep_partition(idx: &[usize], info: &TicketInfo) -> Partition {
    Partition {
        round: 0,
        blocks: idx.to_vec(),
        owned: vec![info.kept.clone()],
    }
}

/// 1 where a value survives pruning, 0 where it is pruned, for a buffer of `layout` (whose
/// partitioned tensors are the prunable blocks' tensors).
pub fn mask(layout: &Layout, idx: &[usize], info: &TicketInfo) -> Vec<f32> {
    let mut m = vec![1.0f32; layout.total];
    for e in &layout.entries {
        if let Role::Partitioned { block, axis } = e.role {
            let i = idx.iter().position(|&b| b == block).expect("prunable block");
            let outer: usize = e.shape[..axis].iter().product();
            let width = e.shape[axis];
            let tail: usize = e.shape[axis + 1..].iter().product();
            for o in 0..outer {
                for j in 0..width {
                    if info.kept[i].binary_search(&j).is_err() {
                        let at = e.offset + (o * width + j) * tail;
                        m[at..at + tail].fill(0.0);
                    }
                }
            }
        }
    }
    m
}

/// How to prune.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pruning {
    /// The ratio p: every pruned block keeps floor((1-p) wC) inner filters.
    pub ratio: f64,
    pub criterion: Criterion,
    /// Full shapes with a mask instead of a narrower network.
    pub masked: bool,
    /// Seed of `Criterion::Random`.
    pub seed: u64,
    /// Leave the first block of every stage whole (the released code's choice; the paper
    /// prunes every block without a projection).
    pub keep_first_blocks: bool,
}

impl Pruning {
    /// The paper's pruning at `ratio`: largest norms, narrow network, every prunable block.
    pub fn paper(ratio: f64) -> Self {
        Pruning {
            ratio,
            criterion: Criterion::Largest,
            masked: false,
            seed: 0,
            keep_first_blocks: false,
        }
    }
}

/// Whether a prunable block (named `s<stage>.b<pos>`) is the first of its stage.
fn first_of_stage(name: &str) -> bool {
    name.ends_with(".b0")
}

/// Prune checkpoint `c` (read from `path`): the ticket, as a checkpoint of kind "ticket"
/// holding the pre-trained weights of the kept filters (no rewinding) and a fresh optimizer.
pub fn prune(c: &CheckpointOf<'_>, path: &Path, how: &Pruning) -> Result<Checkpoint> {
    let Pruning {
        ratio,
        criterion,
        masked,
        seed,
        keep_first_blocks,
    } = *how;
    validate_ratio(ratio)?;
    if c.kind == Kind::Ticket {
        return Err(Error::format(
            path,
            "is already a ticket; prune the pre-trained checkpoint",
        ));
    }
    let (arch, h, w) = arch_of(c, path)?;
    let full = Graph::build(&arch, h, w, None)?;
    if full.params != c.param_layout {
        return Err(Error::format(
            path,
            "its parameters do not match the network its configuration describes",
        ));
    }
    let blocks = prunable_blocks(&full.params);
    let mut kept = kept(&blocks, &c.params, ratio, criterion, seed);
    if keep_first_blocks {
        for (k, b) in kept.iter_mut().zip(&blocks).filter(|(_, b)| first_of_stage(&b.name)) {
            *k = (0..b.conv1.shape[0]).collect();
        }
    }
    let info = TicketInfo {
        ratio,
        criterion,
        source: path.display().to_string(),
        masked,
        widths: blocks.iter().map(|b| b.conv1.shape[0]).collect(),
        kept,
        blocks: blocks.into_iter().map(|b| b.name).collect(),
    };
    let (full_all, pruned_all, train, idx) = ticket_graphs(&arch, h, w, &info)?;
    let (params, stats): (Vec<f32>, Vec<f32>) = if masked {
        let (mp, ms) = (mask(&full_all.params, &idx, &info), mask(&full_all.stats, &idx, &info));
        (
            c.params.iter().zip(&mp).map(|(v, m)| v * m).collect(),
            c.stats.iter().zip(&ms).map(|(v, m)| v * m).collect(),
        )
    } else {
        let p = keep_partition(&idx, &info);
        let mut params = vec![0.0; pruned_all.params.total];
        let mut stats = vec![0.0; pruned_all.stats.total];
        slices::extract(&full_all.params, &pruned_all.params, &p, 0, &c.params, &mut params);
        slices::extract(&full_all.stats, &pruned_all.stats, &p, 0, &c.stats, &mut stats);
        (params, stats)
    };
    Ok(Checkpoint {
        kind: Kind::Ticket,
        method: c.method,
        config: c.config.clone(),
        state: State {
            workers: 1,
            data: c.state.data.clone(),
            last_acc: c.state.last_acc,
            best_acc: c.state.best_acc,
            ..State::default()
        },
        seed,
        momentum: vec![0.0; params.len()].into(),
        params: params.into(),
        param_layout: train.params.clone(),
        stats: stats.into(),
        stat_layout: train.stats.clone(),
        data_position: Vec::new(),
        partition: None,
        ledgers: Vec::new(),
        metrics_log: String::new(),
        ticket: Some(info),
        reference: None,
    })
}

/// `loft prune`: write the ticket of `checkpoint` to `out`.
pub fn run(checkpoint: &Path, how: &Pruning, out: &Path) -> Result<()> {
    let (ratio, masked) = (how.ratio, how.masked);
    let c = Checkpoint::read(checkpoint)?;
    let t = prune(&c, checkpoint, how)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    t.write(out)?;
    let info = t.ticket.as_ref().expect("ticket");
    let kept: usize = info.kept.iter().map(|k| k.len()).sum();
    let total: usize = info.widths.iter().sum();
    println!(
        "ticket at ratio {ratio} ({}, {}): {kept} of {total} inner filters kept in {} blocks, {} parameters (from {}); written to {}",
        info.criterion.name(),
        if masked { "masked" } else { "narrow" },
        info.blocks.len(),
        if masked {
            t.params.iter().filter(|v| **v != 0.0).count()
        } else {
            t.params.len()
        },
        c.params.len(),
        out.display()
    );
    Ok(())
}
