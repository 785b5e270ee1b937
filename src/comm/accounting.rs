//! Closed-form communication volumes: the paper's accounting, what loft moves, data-parallel
//! training and GPipe. Every count here is in bytes of f32 payload; GB = 1e9 bytes.

use crate::model::{Graph, Role};
use serde::Serialize;

/// Bytes of one f32.
pub const F32: u64 = 4;

/// Element counts of a model that the formulas need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelCounts {
    /// Shared parameters.
    pub shared: u64,
    /// Partitioned parameters.
    pub partitioned: u64,
    /// Shared BN running statistics (mean and variance).
    pub shared_stats: u64,
    /// Partitioned BN running statistics.
    pub partitioned_stats: u64,
}

impl ModelCounts {
    /// Counts of a (full-width) graph.
    pub fn of(g: &Graph) -> Self {
        let stats = |partitioned: bool| {
            g.stats
                .entries
                .iter()
                .filter(|e| matches!(e.role, Role::Partitioned { .. }) == partitioned)
                .map(|e| e.len as u64)
                .sum()
        };
        ModelCounts {
            shared: g.params.count(false) as u64,
            partitioned: g.params.count(true) as u64,
            shared_stats: stats(false),
            partitioned_stats: stats(true),
        }
    }
}

/// The paper's accounting (parameter-server view: every worker downloads and uploads its
/// sub-model once per round): `R * 4 * 2 * (S * P_shared + P_partitioned)` bytes.
pub fn paper_bytes(c: &ModelCounts, workers: u64, rounds: u64) -> u64 {
    rounds * F32 * 2 * (workers * c.shared + c.partitioned)
}

/// GB with two decimals, truncated as the paper prints them.
pub fn gb_truncated(bytes: u64) -> String {
    let hundredths = bytes / 10_000_000; // 1e9 / 100
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// How `n` elements are split into `s` contiguous chunks: chunk j has `n / s` elements plus
/// one for the first `n % s` chunks.
pub fn chunk_len(n: u64, s: u64, j: u64) -> u64 {
    n / s + u64::from(j < n % s)
}

/// Bytes (sent, received) by rank r of loft's deterministic allreduce of n elements over s
/// ranks: an all-to-all of chunks (rank j reduces chunk j in rank order) followed by an
/// allgather of the reduced chunks.
pub fn allreduce_rank_bytes(n: u64, s: u64, r: u64) -> (u64, u64) {
    if s <= 1 {
        return (0, 0);
    }
    let own = chunk_len(n, s, r);
    let phase = (n - own) + (s - 1) * own;
    (F32 * phase, F32 * phase)
}

/// Bytes (sent, received) by rank r of an allgather(v) with per-rank counts.
pub fn allgatherv_rank_bytes(counts: &[u64], r: usize) -> (u64, u64) {
    let s = counts.len() as u64;
    let total: u64 = counts.iter().sum();
    (F32 * (s - 1) * counts[r], F32 * (total - counts[r]))
}

/// Number of inner filters rank r owns when `width` filters are dealt round-robin to `s` ranks.
pub fn share(width: u64, s: u64, r: u64) -> u64 {
    width / s + u64::from(r < width % s)
}

/// What one LoFT sync moves: (allreduce elements, allgatherv counts per rank).
/// Allreduce: shared parameters and shared BN statistics. Allgather: every rank's slices of
/// the partitioned parameters and BN statistics. With `momentum` (momentum kept across
/// rounds) the momentum buffer travels too: its shared part in the allreduce, its slices in
/// the allgather.
pub fn loft_sync_elements(g: &Graph, s: u64, momentum: bool) -> (u64, Vec<u64>) {
    let c = ModelCounts::of(g);
    let mut counts = vec![0u64; s as usize];
    let momentum_entries = if momentum { &g.params.entries[..] } else { &[] };
    for e in g.params.entries.iter().chain(&g.stats.entries).chain(momentum_entries) {
        if let Role::Partitioned { axis, block } = e.role {
            let width = g.inner[block] as u64;
            let per_filter = e.len as u64 / e.shape[axis] as u64;
            for (r, cnt) in counts.iter_mut().enumerate() {
                *cnt += per_filter * share(width, s, r as u64);
            }
        }
    }
    let shared_momentum = if momentum { c.shared } else { 0 };
    (c.shared + c.shared_stats + shared_momentum, counts)
}

/// Total bytes sent by all ranks in one LoFT sync (equal to the total received).
pub fn loft_round_bytes(g: &Graph, s: u64, momentum: bool) -> u64 {
    let (n, counts) = loft_sync_elements(g, s, momentum);
    (0..s)
        .map(|r| allreduce_rank_bytes(n, s, r).0 + allgatherv_rank_bytes(&counts, r as usize).0)
        .sum()
}

/// Total bytes sent by all ranks per step of data-parallel training (gradient allreduce of
/// every parameter).
pub fn data_parallel_step_bytes(g: &Graph, s: u64) -> u64 {
    let n = g.params.total as u64;
    (0..s).map(|r| allreduce_rank_bytes(n, s, r).0).sum()
}

/// Total bytes sent by all ranks per step of loft's data-parallel training (`loft train`,
/// `loft finetune` on s ranks): the gradient allreduce, the allreduce that averages the BN
/// running statistics, and synchronized batch norm, whose every layer of c channels adds
/// c + 1 and c sums in the forward pass and 2c + 1 in the backward pass over the ranks
/// (allgathers of f64 values).
pub fn data_parallel_train_step_bytes(g: &Graph, s: u64) -> u64 {
    if s <= 1 {
        return 0;
    }
    let stats = g.stats.total as u64;
    let stats_bytes: u64 = (0..s).map(|r| allreduce_rank_bytes(stats, s, r).0).sum();
    let bn_values: u64 = g
        .ops
        .iter()
        .filter_map(|op| match op {
            crate::model::Op::Bn { c, .. } => Some(4 * *c as u64 + 2),
            _ => None,
        })
        .sum();
    data_parallel_step_bytes(g, s) + stats_bytes + s * (s - 1) * 8 * bn_values
}

/// Where GPipe cuts the network: after a stage (the output of its last block), or after one
/// block (`s<stage>.b<pos>`, its output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub enum Cut {
    Stage(usize),
    Block { stage: usize, pos: usize },
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Stage(s) => write!(f, "{s}"),
            Cut::Block { stage, pos } => write!(f, "s{stage}.b{pos}"),
        }
    }
}

impl From<Cut> for String {
    fn from(c: Cut) -> String {
        c.to_string()
    }
}

impl std::str::FromStr for Cut {
    type Err = crate::Error;
    /// "2" (after stage 2) or "s1.b0" (after block 0 of stage 1).
    fn from_str(s: &str) -> crate::Result<Cut> {
        let bad = || {
            crate::Error::config(format!(
                "--cuts: '{s}' is neither a stage (1..=3) nor a block (e.g. s1.b0)"
            ))
        };
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('s') {
            let (stage, pos) = rest.split_once(".b").ok_or_else(bad)?;
            return Ok(Cut::Block {
                stage: stage.parse().map_err(|_| bad())?,
                pos: pos.parse().map_err(|_| bad())?,
            });
        }
        s.parse().map(Cut::Stage).map_err(|_| bad())
    }
}

/// The block whose output a cut carries (its index in `g.blocks`), if the network has it.
fn cut_block(g: &Graph, cut: Cut) -> Option<usize> {
    match cut {
        Cut::Stage(stage) => g.blocks.iter().rposition(|b| b.stage == stage),
        Cut::Block { stage, pos } => g.blocks.iter().position(|b| b.stage == stage && b.pos == pos),
    }
}

/// Check that every cut names a block of `g` other than the last (after which nothing is
/// left to pipeline).
pub fn check_cuts(g: &Graph, cuts: &[Cut]) -> crate::Result<()> {
    for &c in cuts {
        match cut_block(g, c) {
            Some(b) if b + 1 < g.blocks.len() => {}
            _ => {
                return Err(crate::Error::config(format!(
                    "--cuts: {c} is not a boundary inside the network (stages 1..=3, or a block s<stage>.b<pos> before the last)"
                )))
            }
        }
    }
    Ok(())
}

/// Per-sample activation elements crossing pipeline cuts: the output of each cut's block.
pub fn gpipe_cut_elements(g: &Graph, cuts: &[Cut]) -> u64 {
    let mut total = 0;
    for &cut in cuts {
        let Some(b) = cut_block(g, cut) else { continue };
        // the residual add (pre-activation) or the ReLU after it (post-activation) that ends
        // the block
        let prefix = format!("s{}.b{}", g.blocks[b].stage, g.blocks[b].pos);
        let out =
            g.ops.iter().rev().map(|op| op.output()).find(|&t| {
                g.tensors[t].name == format!("{prefix}.add") || g.tensors[t].name == format!("{prefix}.relu")
            });
        if let Some(t) = out {
            total += g.tensors[t].len() as u64;
        }
    }
    total
}

/// GPipe with s stages cut evenly between the 4 stages of the network.
pub fn default_cuts(s: usize) -> Vec<Cut> {
    let stages: &[usize] = match s {
        0 | 1 => &[],
        2 => &[2],
        3 => &[1, 2],
        _ => &[1, 2, 3],
    };
    stages.iter().map(|&st| Cut::Stage(st)).collect()
}

/// GPipe bytes for `samples` samples: every activation crosses each cut forward and its
/// gradient crosses back.
pub fn gpipe_bytes(g: &Graph, cuts: &[Cut], samples: u64) -> u64 {
    F32 * 2 * samples * gpipe_cut_elements(g, cuts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArchSpec, Stem};

    fn graph(arch: &str, classes: usize, stem: Stem) -> Graph {
        let mut s = ArchSpec::named(arch).unwrap();
        s.classes = classes;
        s.stem = stem;
        let hw = if stem == Stem::Imagenet { 224 } else { 32 };
        Graph::build(&s, hw, hw, None).unwrap()
    }

    #[test]
    fn the_paper_loft_figures_are_reproduced_to_the_printed_digit() {
        let c10 = ModelCounts::of(&graph("preresnet34", 10, Stem::Cifar));
        let c100 = ModelCounts::of(&graph("preresnet34", 100, Stem::Cifar));
        let inet = ModelCounts::of(&graph("preresnet18", 1000, Stem::Imagenet));
        assert_eq!(gb_truncated(paper_bytes(&c10, 2, 250)), "104.59");
        assert_eq!(gb_truncated(paper_bytes(&c10, 4, 250)), "144.27");
        assert_eq!(gb_truncated(paper_bytes(&c100, 2, 250)), "104.77");
        assert_eq!(gb_truncated(paper_bytes(&c100, 4, 250)), "144.64");
        assert_eq!(gb_truncated(paper_bytes(&inet, 2, 3000)), "791.09");
        let r10 = ModelCounts::of(&graph("resnet34", 10, Stem::Cifar));
        assert_eq!(gb_truncated(paper_bytes(&r10, 2, 250)), "104.60");
        assert_eq!(gb_truncated(paper_bytes(&r10, 4, 250)), "144.30");
    }

    #[test]
    fn gpipe4_over_gpipe2_is_exactly_3_5_on_cifar() {
        let g = graph("preresnet34", 10, Stem::Cifar);
        let two = gpipe_bytes(&g, &default_cuts(2), 1000);
        let four = gpipe_bytes(&g, &default_cuts(4), 1000);
        assert_eq!(2 * four, 7 * two);
        assert_eq!(gpipe_cut_elements(&g, &[Cut::Stage(2)]), 128 * 16 * 16);
    }

    #[test]
    fn cuts_inside_stages_give_the_papers_imagenet_ratio() {
        let g = graph("preresnet18", 1000, Stem::Imagenet);
        // stage 1 of the ImageNet stem: 64 x 56 x 56; stage 2: 128 x 28 x 28
        let (s1, s2) = (64 * 56 * 56, 128 * 28 * 28);
        let cut = |c: &str| -> Cut { c.parse().unwrap() };
        assert_eq!(gpipe_cut_elements(&g, &[cut("s1.b0")]), s1);
        assert_eq!(gpipe_cut_elements(&g, &[cut("1")]), s1);
        assert_eq!(gpipe_cut_elements(&g, &[cut("s2.b0")]), s2);
        let two = gpipe_bytes(&g, &[cut("1")], 1000);
        let four = gpipe_bytes(&g, &[cut("s1.b0"), cut("1"), cut("s2.b0")], 1000);
        assert_eq!(2 * four, 5 * two);
        assert!(check_cuts(&g, &[cut("s4.b1")]).is_err());
        assert!(check_cuts(&g, &[cut("s4.b0"), cut("3")]).is_ok());
        assert!("s1b0".parse::<Cut>().is_err() && "x".parse::<Cut>().is_err());
        assert_eq!(cut("s2.b1").to_string(), "s2.b1");
    }

    #[test]
    fn collective_byte_formulas_balance() {
        // every byte sent is received by someone
        for (n, s) in [(10u64, 3u64), (1000, 4), (7, 2), (5, 8)] {
            let sent: u64 = (0..s).map(|r| allreduce_rank_bytes(n, s, r).0).sum();
            let recv: u64 = (0..s).map(|r| allreduce_rank_bytes(n, s, r).1).sum();
            assert_eq!(sent, recv);
            assert_eq!(sent, F32 * 2 * (s - 1) * n);
            let counts: Vec<u64> = (0..s).map(|r| share(n, s, r)).collect();
            assert_eq!(counts.iter().sum::<u64>(), n);
            let sent: u64 = (0..s as usize).map(|r| allgatherv_rank_bytes(&counts, r).0).sum();
            let recv: u64 = (0..s as usize).map(|r| allgatherv_rank_bytes(&counts, r).1).sum();
            assert_eq!(sent, recv);
        }
    }

    #[test]
    fn gb_truncates() {
        assert_eq!(gb_truncated(144_279_120_000), "144.27");
        assert_eq!(gb_truncated(5_000_000), "0.00");
        assert_eq!(gb_truncated(1_010_000_000), "1.01");
    }
}
