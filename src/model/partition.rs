//! LoFT partitions: which inner filters of each partitioned block every rank owns in a round.
//!
//! For round t and block b, a uniformly random permutation of the block's wC inner filters is
//! drawn from (seed, t, b) and dealt round-robin: rank r gets positions r, r+S, r+2S, ...
//! Every rank computes every rank's share itself; nothing is broadcast. Each share is kept
//! sorted, which is the canonical order of packed slices.

use crate::model::Graph;
use crate::rng::{Purpose, Rng};

/// The partition of one round: `owned[r][i]` = sorted inner-filter indices of block
/// `blocks[i]` owned by rank r.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub round: u64,
    /// Global indices of the partitioned blocks.
    pub blocks: Vec<usize>,
    pub owned: Vec<Vec<Vec<usize>>>,
}

impl Partition {
    /// Draw the partition of `round` for `workers` ranks.
    pub fn draw(g: &Graph, seed: u64, round: u64, workers: usize) -> Self {
        let blocks: Vec<usize> = g.blocks.iter().filter(|b| b.partitioned).map(|b| b.index).collect();
        let mut owned = vec![Vec::with_capacity(blocks.len()); workers];
        for &b in &blocks {
            let width = g.blocks[b].inner;
            let perm = Rng::stream(seed, Purpose::Partition, &[round, b as u64]).permutation(width);
            for (r, own) in owned.iter_mut().enumerate() {
                let mut mine: Vec<usize> = perm.iter().skip(r).step_by(workers).copied().collect();
                mine.sort_unstable();
                own.push(mine);
            }
        }
        Partition { round, blocks, owned }
    }

    /// Inner widths of rank r's sub-network, one per block of the graph.
    pub fn widths(&self, g: &Graph, r: usize) -> Vec<usize> {
        let mut w: Vec<usize> = g.blocks.iter().map(|b| b.inner).collect();
        for (i, &b) in self.blocks.iter().enumerate() {
            w[b] = self.owned[r][i].len();
        }
        w
    }

    /// Indices rank r owns in block `block` (None when the block is not partitioned).
    pub fn indices(&self, r: usize, block: usize) -> Option<&[usize]> {
        self.blocks
            .iter()
            .position(|&b| b == block)
            .map(|i| &self.owned[r][i][..])
    }

    /// Check that every inner filter of every partitioned block is owned by exactly one rank.
    pub fn check_cover(&self, g: &Graph) -> crate::Result<()> {
        for (i, &b) in self.blocks.iter().enumerate() {
            let mut seen = vec![0u32; g.blocks[b].inner];
            for own in &self.owned {
                for &j in &own[i] {
                    seen[j] += 1;
                }
            }
            if let Some(j) = seen.iter().position(|&c| c != 1) {
                return Err(crate::Error::config(format!(
                    "round {}: inner filter {j} of block {b} is owned {} times",
                    self.round, seen[j]
                )));
            }
        }
        Ok(())
    }

    /// A 64-bit fingerprint (FNV-1a over every index), to check that ranks agree.
    pub fn hash(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64 ^ self.round;
        for rank in &self.owned {
            for block in rank {
                for &i in block {
                    h = (h ^ i as u64).wrapping_mul(0x0100_0000_01b3);
                }
                h = (h ^ 0xff).wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ArchSpec;

    #[test]
    fn every_inner_filter_is_owned_exactly_once() {
        let mut s = ArchSpec::named("preresnet18").unwrap();
        s.base_width = 6; // inner widths 24, 48, 96: not all divisible by 5
        let g = Graph::build(&s, 32, 32, None).unwrap();
        for workers in [1, 2, 3, 4, 5] {
            for round in 0..3 {
                let p = Partition::draw(&g, 9, round, workers);
                p.check_cover(&g).unwrap();
                for (i, &b) in p.blocks.iter().enumerate() {
                    let mut all: Vec<usize> = (0..workers).flat_map(|r| p.owned[r][i].clone()).collect();
                    all.sort_unstable();
                    assert_eq!(all, (0..g.blocks[b].inner).collect::<Vec<_>>());
                    for r in 0..workers {
                        let n = p.owned[r][i].len();
                        let w = g.blocks[b].inner;
                        assert!(n == w / workers || n == w / workers + 1);
                    }
                }
            }
        }
    }

    #[test]
    fn partitions_are_deterministic_and_change_between_rounds() {
        let g = Graph::build(&ArchSpec::named("preresnet18").unwrap(), 32, 32, None).unwrap();
        let a = Partition::draw(&g, 1, 0, 2);
        assert_eq!(a, Partition::draw(&g, 1, 0, 2));
        assert_eq!(a.hash(), Partition::draw(&g, 1, 0, 2).hash());
        let b = Partition::draw(&g, 1, 1, 2);
        assert_ne!(a.owned, b.owned);
        assert_ne!(a.hash(), b.hash());
        assert_eq!(a.blocks.len(), 3); // preresnet18: one partitioned block in stages 2-4
    }
}
