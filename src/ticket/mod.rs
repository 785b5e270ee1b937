//! Lottery tickets: which inner filters of each prunable block a ticket keeps, and the filter
//! distance between two models (spec sections 5 and 6).
//!
//! A block is prunable when it has no projection shortcut (every stage, stage 1 included).
//! The score of inner filter j of a block is the squared L2 norm of row j of its `conv1`
//! weight `(wC, C, k, k)`. A ticket at ratio p keeps the floor((1-p) wC) best filters of every
//! prunable block (at least one).

pub mod prune;

use crate::model::{Entry, Layout};
use crate::rng::{Purpose, Rng};
use crate::{Error, Result};
use serde::Serialize;

pub use crate::checkpoint::Criterion;

/// A prunable block as seen in a parameter layout.
#[derive(Clone, Debug, PartialEq)]
pub struct PrunableBlock {
    /// Name prefix, e.g. `s2.b1`.
    pub name: String,
    /// Its `conv1.weight` entry; `shape[0]` is the inner width wC.
    pub conv1: Entry,
}

/// The prunable blocks of a network, in network order: every block with a `conv1.weight` and
/// no `proj.weight`.
pub fn prunable_blocks(layout: &Layout) -> Vec<PrunableBlock> {
    layout
        .entries
        .iter()
        .filter_map(|e| {
            let prefix = e.name.strip_suffix(".conv1.weight")?;
            let has_proj = layout.find(&format!("{prefix}.proj.weight")).is_some();
            (!has_proj).then(|| PrunableBlock {
                name: prefix.to_string(),
                conv1: e.clone(),
            })
        })
        .collect()
}

/// Squared L2 norm of every inner filter (conv1 row) of `b`, in f64.
pub fn scores(b: &PrunableBlock, params: &[f32]) -> Vec<f64> {
    let rows = b.conv1.shape[0];
    let row_len = b.conv1.len / rows;
    let w = &params[b.conv1.offset..b.conv1.offset + b.conv1.len];
    w.chunks(row_len)
        .map(|r| r.iter().map(|&x| x as f64 * x as f64).sum())
        .collect()
}

/// Filters kept of a block of width `width` at pruning ratio `ratio`: floor((1-p) width), at
/// least one.
pub fn keep_count(width: usize, ratio: f64) -> usize {
    (((1.0 - ratio) * width as f64 + 1e-9).floor() as usize).clamp(1, width)
}

/// The sorted indices a ticket keeps in every prunable block. Ties go to the lower index.
pub fn kept(blocks: &[PrunableBlock], params: &[f32], ratio: f64, criterion: Criterion, seed: u64) -> Vec<Vec<usize>> {
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let s = scores(b, params);
            let k = keep_count(s.len(), ratio);
            let mut order: Vec<usize> = match criterion {
                Criterion::Random => Rng::stream(seed, Purpose::Prune, &[i as u64]).permutation(s.len()),
                Criterion::Largest => {
                    let mut o: Vec<usize> = (0..s.len()).collect();
                    o.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
                    o
                }
                Criterion::Smallest => {
                    let mut o: Vec<usize> = (0..s.len()).collect();
                    o.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
                    o
                }
            };
            order.truncate(k);
            order.sort_unstable();
            order
        })
        .collect()
}

/// Check a pruning ratio: p in [0, 1).
pub fn validate_ratio(ratio: f64) -> Result<()> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::config(format!("--ratio must be in [0, 1), got {ratio}")));
    }
    Ok(())
}

/// Distance of one block.
#[derive(Clone, Debug, Serialize)]
pub struct BlockDistance {
    pub block: String,
    /// Filters kept in B, and how many of them A keeps too.
    pub kept: usize,
    pub common: usize,
    /// ||U(A) - U(B)||_F / ||U(B)||_F over the rows B keeps, each scaled to unit norm.
    pub weight: f64,
}

/// The filter distance between models A and B at ratio p (spec section 6).
#[derive(Clone, Debug, Serialize)]
pub struct Distance {
    pub ratio: f64,
    /// D_idx = 1 - sum |T(A) ∩ T(B)| / sum |T(B)|, in [0, 1].
    pub index: f64,
    /// D_w: the mean over blocks of the weight distances.
    pub weight: f64,
    pub blocks: Vec<BlockDistance>,
}

/// Row `j` of a conv1 weight in a parameter buffer.
fn row<'p>(b: &PrunableBlock, params: &'p [f32], j: usize) -> &'p [f32] {
    let row_len = b.conv1.len / b.conv1.shape[0];
    &params[b.conv1.offset + j * row_len..b.conv1.offset + (j + 1) * row_len]
}

/// A row scaled to unit norm (zero rows stay zero).
fn unit(r: &[f32]) -> Vec<f64> {
    let n = r.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    r.iter().map(|&x| if n > 0.0 { x as f64 / n } else { 0.0 }).collect()
}

/// D_idx and D_w between parameter buffers `a` and `b` of the same `layout`.
pub fn distance(layout: &Layout, a: &[f32], b: &[f32], ratio: f64) -> Result<Distance> {
    check_len(layout, a)?;
    check_len(layout, b)?;
    validate_ratio(ratio)?;
    let blocks = prunable_blocks(layout);
    let kb = kept(&blocks, b, ratio, Criterion::Largest, 0);
    between(&blocks, a, &kb, |i, j| row(&blocks[i], b, j), ratio)
}

/// D_idx and D_w between a parameter buffer `a` of `layout` and the rows kept of another
/// (at their ratio).
pub fn distance_to(layout: &Layout, a: &[f32], b: &Rows) -> Result<Distance> {
    check_len(layout, a)?;
    let blocks = prunable_blocks(layout);
    between(&blocks, a, &b.kept, |i, j| b.row(i, j), b.ratio)
}

fn check_len(layout: &Layout, v: &[f32]) -> Result<()> {
    if v.len() != layout.total {
        return Err(Error::Shape(format!(
            "distance: a buffer of {} values for a layout of {}",
            v.len(),
            layout.total
        )));
    }
    Ok(())
}

/// The distance of A (`a`, with its prunable `blocks`) to B, given B's kept filters `kb` and
/// its rows (`b_row(block, filter)`).
fn between<'b>(
    blocks: &[PrunableBlock],
    a: &[f32],
    kb: &[Vec<usize>],
    b_row: impl Fn(usize, usize) -> &'b [f32],
    ratio: f64,
) -> Result<Distance> {
    if blocks.is_empty() {
        return Err(Error::config("the network has no prunable block"));
    }
    let ka = kept(blocks, a, ratio, Criterion::Largest, 0);
    let mut out = Vec::with_capacity(blocks.len());
    for (i, blk) in blocks.iter().enumerate() {
        let common = kb[i].iter().filter(|j| ka[i].binary_search(j).is_ok()).count();
        let (mut diff, mut norm) = (0.0f64, 0.0f64);
        for &j in &kb[i] {
            let (ua, ub) = (unit(row(blk, a, j)), unit(b_row(i, j)));
            diff += ua.iter().zip(&ub).map(|(x, y)| (x - y) * (x - y)).sum::<f64>();
            norm += ub.iter().map(|y| y * y).sum::<f64>();
        }
        out.push(BlockDistance {
            block: blk.name.clone(),
            kept: kb[i].len(),
            common,
            weight: if norm > 0.0 { (diff / norm).sqrt() } else { 0.0 },
        });
    }
    let (common, total): (usize, usize) = out.iter().fold((0, 0), |(c, t), d| (c + d.common, t + d.kept));
    Ok(Distance {
        ratio,
        index: 1.0 - common as f64 / total as f64,
        weight: out.iter().map(|d| d.weight).sum::<f64>() / out.len() as f64,
        blocks: out,
    })
}

/// What the filter distance at one ratio reads of a parameter buffer: the filters each
/// prunable block keeps, and their `conv1` rows (for PreResNet-18 at ratio 0.5, an eighth of
/// the parameters). Pre-training keeps this much of its last recorded point.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    ratio: f64,
    /// The prunable blocks (offsets into the full buffer).
    blocks: Vec<PrunableBlock>,
    /// Kept filters of every block, and their rows back to back.
    kept: Vec<Vec<usize>>,
    values: Vec<Vec<f32>>,
}

impl Rows {
    /// The rows of `params` (a buffer of `layout`) kept at `ratio`.
    pub fn of(layout: &Layout, params: &[f32], ratio: f64) -> Rows {
        let blocks = prunable_blocks(layout);
        let mut r = Rows {
            ratio,
            kept: Vec::new(),
            values: vec![Vec::new(); blocks.len()],
            blocks,
        };
        r.set(params);
        r
    }

    /// Take the rows of `params` (a buffer of the same layout), reusing the storage.
    pub fn set(&mut self, params: &[f32]) {
        self.kept = kept(&self.blocks, params, self.ratio, Criterion::Largest, 0);
        for ((b, k), v) in self.blocks.iter().zip(&self.kept).zip(&mut self.values) {
            v.clear();
            for &j in k {
                v.extend_from_slice(row(b, params, j));
            }
        }
    }

    /// Row of filter `j` (a kept one) of block `i`.
    fn row(&self, i: usize, j: usize) -> &[f32] {
        let row_len = self.blocks[i].conv1.len / self.blocks[i].conv1.shape[0];
        let at = self.kept[i].binary_search(&j).expect("a kept filter");
        &self.values[i][at * row_len..(at + 1) * row_len]
    }

    /// The rows as runs of a full buffer: (offset, values). The full buffer is zero elsewhere;
    /// read back with [`Rows::of`] at the same ratio it gives these rows again (the rows kept
    /// are the largest, and every other row is zero).
    pub fn runs(&self) -> Vec<(usize, &[f32])> {
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate() {
            let row_len = b.conv1.len / b.conv1.shape[0];
            for (at, &j) in self.kept[i].iter().enumerate() {
                out.push((
                    b.conv1.offset + j * row_len,
                    &self.values[i][at * row_len..(at + 1) * row_len],
                ));
            }
        }
        out
    }

    /// Values held.
    pub fn len(&self) -> usize {
        self.values.iter().map(|v| v.len()).sum()
    }

    /// True when no block is prunable.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `loft distance A B --ratio p [--json]`: the filter distance between two checkpoints.
pub fn run_distance(a: &std::path::Path, b: &std::path::Path, ratio: f64, as_json: bool) -> Result<()> {
    validate_ratio(ratio)?;
    let ca = crate::checkpoint::Checkpoint::read(a)?;
    let cb = crate::checkpoint::Checkpoint::read(b)?;
    if ca.param_layout != cb.param_layout {
        return Err(Error::format(
            b,
            format!(
                "holds a different network than {}; the distance needs the same architecture",
                a.display()
            ),
        ));
    }
    let d = distance(&ca.param_layout, &ca.params, &cb.params, ratio)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&d).expect("json"));
        return Ok(());
    }
    println!(
        "filter distance at ratio {ratio}: D_idx {:.4}  D_w {:.4}",
        d.index, d.weight
    );
    println!("{:<10} {:>6} {:>8} {:>8}", "block", "kept", "common", "D_w");
    for blk in &d.blocks {
        println!(
            "{:<10} {:>6} {:>8} {:>8.4}",
            blk.block, blk.kept, blk.common, blk.weight
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArchSpec, Graph, Model};
    use std::sync::Arc;

    fn model(seed: u64) -> (Graph, Vec<f32>) {
        let mut s = ArchSpec::named("preresnet18").unwrap();
        s.base_width = 4;
        let g = Graph::build(&s, 32, 32, None).unwrap();
        let be = Arc::new(crate::backend::cpu::CpuBackend::<f32>::new());
        let mut m = Model::new(be, g.clone(), 1).unwrap();
        m.init(seed).unwrap();
        (g, m.params.clone())
    }

    #[test]
    fn the_kept_rows_give_the_distance_of_the_whole_buffer() {
        let (g, a) = model(1);
        let (_, b) = model(2);
        let rows = Rows::of(&g.params, &b, 0.5);
        assert!(rows.len() < b.len() / 4, "{} of {}", rows.len(), b.len());
        let whole = distance(&g.params, &a, &b, 0.5).unwrap();
        let kept = distance_to(&g.params, &a, &rows).unwrap();
        assert_eq!((whole.index, whole.weight), (kept.index, kept.weight));
        assert!(whole.index > 0.0 && whole.weight > 0.0);
        // stored as runs of a zero buffer and read back: the same rows
        let mut full = vec![0.0f32; g.params.total];
        for (at, v) in rows.runs() {
            full[at..at + v.len()].copy_from_slice(v);
        }
        assert_eq!(Rows::of(&g.params, &full, 0.5), rows);
        assert_eq!(distance(&g.params, &a, &full, 0.5).unwrap().index, whole.index);
        let mut moved = rows.clone();
        moved.set(&a);
        assert_eq!(distance_to(&g.params, &a, &moved).unwrap().index, 0.0);
    }

    #[test]
    fn prunable_blocks_are_those_without_projection() {
        let (g, _) = model(1);
        let names: Vec<String> = prunable_blocks(&g.params).into_iter().map(|b| b.name).collect();
        // PreResNet-18: the first block of stages 2-4 has a projection
        assert_eq!(names, ["s1.b0", "s1.b1", "s2.b1", "s3.b1", "s4.b1"]);
        let from_arch: usize = g.blocks.iter().filter(|b| b.prunable).count();
        assert_eq!(names.len(), from_arch);
    }

    #[test]
    fn largest_keeps_the_biggest_rows_and_counts_follow_the_ratio() {
        let (g, mut p) = model(1);
        let blocks = prunable_blocks(&g.params);
        // make row 5 of the first block the largest by far
        let e = &blocks[0].conv1;
        let row = e.len / e.shape[0];
        for v in &mut p[e.offset + 5 * row..e.offset + 6 * row] {
            *v = 10.0;
        }
        let k = kept(&blocks, &p, 0.8, Criterion::Largest, 0);
        assert_eq!(k[0].len(), keep_count(8, 0.8));
        assert!(k[0].contains(&5));
        let small = kept(&blocks, &p, 0.8, Criterion::Smallest, 0);
        assert!(!small[0].contains(&5));
        for (kk, b) in k.iter().zip(&blocks) {
            assert_eq!(kk.len(), keep_count(b.conv1.shape[0], 0.8));
            assert!(kk.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(keep_count(16, 0.3), 11);
        assert_eq!(keep_count(16, 0.5), 8);
        assert_eq!(keep_count(10, 0.3), 7); // 0.7 * 10 is 7, not 6.9999
        assert_eq!(keep_count(4, 0.99), 1);
        let r1 = kept(&blocks, &p, 0.5, Criterion::Random, 3);
        assert_eq!(r1, kept(&blocks, &p, 0.5, Criterion::Random, 3));
        assert_ne!(r1, kept(&blocks, &p, 0.5, Criterion::Random, 4));
    }

    #[test]
    fn distance_is_zero_to_itself_and_positive_between_models() {
        let (g, a) = model(1);
        let (_, b) = model(2);
        let same = distance(&g.params, &a, &a, 0.5).unwrap();
        assert_eq!((same.index, same.weight), (0.0, 0.0));
        let d = distance(&g.params, &a, &b, 0.5).unwrap();
        assert!(d.index > 0.0 && d.index <= 1.0, "{}", d.index);
        assert!(d.weight > 0.0);
        // scaling every weight changes neither the kept indices nor the unit rows
        let scaled: Vec<f32> = a.iter().map(|v| v * 4.0).collect();
        let s = distance(&g.params, &scaled, &a, 0.5).unwrap();
        assert_eq!(s.index, 0.0);
        assert!(s.weight < 1e-6);
        // hand-computed on one block: D_idx from the overlap
        let blk = &prunable_blocks(&g.params)[0];
        let (ka, kb) = (
            kept(std::slice::from_ref(blk), &a, 0.5, Criterion::Largest, 0),
            kept(std::slice::from_ref(blk), &b, 0.5, Criterion::Largest, 0),
        );
        let common = kb[0].iter().filter(|j| ka[0].contains(j)).count();
        assert_eq!(d.blocks[0].common, common);
        assert!(distance(&g.params, &a, &b, 1.0).is_err());
    }
}

#[cfg(test)]
mod by_hand {
    //! D_idx and D_w on two blocks whose kept filters and unit rows are worked out by hand.
    use super::*;
    use crate::model::Role;

    #[test]
    fn index_and_weight_distances_match_values_worked_out_by_hand() {
        let mut layout = Layout::default();
        layout.push("s1.b0.conv1.weight", &[4, 1, 1, 2], Role::Shared);
        layout.push("s1.b1.conv1.weight", &[3, 1, 1, 2], Role::Shared);
        // block 0: B's squared row norms 9, 1, 8, 0.25 keep {0, 2} at p = 0.5; A's 1, 16, 2, 0
        // keep {1, 2}. Block 1: B's 1, 4, 2 keep {1} (one of three); A's 9, 1, 0 keep {0}.
        let b = [3.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.0, 0.5, 1.0, 0.0, 0.0, 2.0, 1.0, 1.0];
        let a = [0.0, 1.0, 4.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 0.0, 0.0, 0.0];
        let d = distance(&layout, &a, &b, 0.5).unwrap();
        // D_idx = 1 - (|{1,2} ∩ {0,2}| + |{0} ∩ {1}|) / (2 + 1) = 1 - 1/3
        assert!((d.index - 2.0 / 3.0).abs() < 1e-12, "{d:?}");
        // block 0: U(B) = [(1,0); (1,1)/√2], U(A) on B's rows = [(0,1); (1,1)/√2]:
        //   ||U(A) - U(B)||_F / ||U(B)||_F = √2 / √2 = 1
        // block 1: U(B) = [(0,1)], U(A) = [(1,0)]: √2 / 1
        let want = (1.0 + 2f64.sqrt()) / 2.0;
        assert!((d.weight - want).abs() < 1e-12, "D_w {} vs {want}", d.weight);
        assert_eq!(
            (
                d.blocks[0].kept,
                d.blocks[0].common,
                d.blocks[1].kept,
                d.blocks[1].common
            ),
            (2, 1, 1, 0)
        );
        // the same from the rows of B kept at the distance ratio
        let rows = Rows::of(&layout, &b, 0.5);
        let e = distance_to(&layout, &a, &rows).unwrap();
        assert_eq!((e.index, e.weight), (d.index, d.weight));
    }
}
