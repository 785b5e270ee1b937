//! Moving a rank's inner-filter slices between the full model and its narrow sub-network.
//!
//! Full and sub layouts list the same tensors in the same order; a shared tensor has the same
//! shape in both, a partitioned tensor keeps only the owned indices along its partition axis
//! (rows of conv1 and the mid BN, columns of conv2). All copies go through [`runs`], which
//! lists the contiguous (full offset, sub offset, length) runs of one tensor.

use super::partition::Partition;
use crate::model::{Layout, Role};

/// Contiguous runs `(full_offset, sub_offset, len)` that map sub tensor `i` of `sub` onto the
/// full tensor `i` of `full`, for rank `r` of partition `p`.
pub fn runs(full: &Layout, sub: &Layout, i: usize, p: &Partition, r: usize, out: &mut Vec<(usize, usize, usize)>) {
    out.clear();
    let (fe, se) = (&full.entries[i], &sub.entries[i]);
    debug_assert_eq!(fe.name, se.name);
    match fe.role {
        Role::Shared => out.push((fe.offset, se.offset, fe.len)),
        Role::Partitioned { block, axis } => {
            let idx = p.indices(r, block).expect("partitioned block in partition");
            let outer: usize = fe.shape[..axis].iter().product();
            let width = fe.shape[axis];
            let tail: usize = fe.shape[axis + 1..].iter().product();
            let mut s = se.offset;
            for o in 0..outer {
                for &j in idx {
                    out.push((fe.offset + (o * width + j) * tail, s, tail));
                    s += tail;
                }
            }
        }
    }
}

/// Copy rank r's share of every tensor from `full_buf` (full layout) into `sub_buf` (sub layout).
pub fn extract(full: &Layout, sub: &Layout, p: &Partition, r: usize, full_buf: &[f32], sub_buf: &mut [f32]) {
    let mut rs = Vec::new();
    for i in 0..full.entries.len() {
        runs(full, sub, i, p, r, &mut rs);
        for &(f, s, n) in &rs {
            sub_buf[s..s + n].copy_from_slice(&full_buf[f..f + n]);
        }
    }
}

/// Write the partitioned tensors of a sub layout (rank r's slices, packed back to back in
/// layout order, as produced by [`pack_partitioned`]) into `full_buf`.
pub fn insert_partitioned(full: &Layout, sub: &Layout, p: &Partition, r: usize, packed: &[f32], full_buf: &mut [f32]) {
    let mut rs = Vec::new();
    let mut cursor = 0;
    for i in 0..full.entries.len() {
        if full.entries[i].role == Role::Shared {
            continue;
        }
        let base = sub.entries[i].offset;
        runs(full, sub, i, p, r, &mut rs);
        for &(f, s, n) in &rs {
            let at = cursor + (s - base);
            full_buf[f..f + n].copy_from_slice(&packed[at..at + n]);
        }
        cursor += sub.entries[i].len;
    }
}

/// Append the partitioned tensors of a sub-model buffer, in layout order, to `out`.
pub fn pack_partitioned(sub: &Layout, sub_buf: &[f32], out: &mut Vec<f32>) {
    for e in sub.entries.iter().filter(|e| e.role != Role::Shared) {
        out.extend_from_slice(&sub_buf[e.offset..e.offset + e.len]);
    }
}

/// Append the shared tensors of a buffer, in layout order, to `out`.
pub fn pack_shared(layout: &Layout, buf: &[f32], out: &mut Vec<f32>) {
    for e in layout.entries.iter().filter(|e| e.role == Role::Shared) {
        out.extend_from_slice(&buf[e.offset..e.offset + e.len]);
    }
}

/// Write packed shared tensors (as from [`pack_shared`]) into a buffer; returns elements read.
pub fn unpack_shared(layout: &Layout, packed: &[f32], buf: &mut [f32]) -> usize {
    let mut at = 0;
    for e in layout.entries.iter().filter(|e| e.role == Role::Shared) {
        buf[e.offset..e.offset + e.len].copy_from_slice(&packed[at..at + e.len]);
        at += e.len;
    }
    at
}

/// Number of partitioned elements of a layout.
pub fn partitioned_len(layout: &Layout) -> usize {
    layout
        .entries
        .iter()
        .filter(|e| e.role != Role::Shared)
        .map(|e| e.len)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ArchSpec, Graph};

    #[test]
    fn extract_then_insert_of_every_rank_rebuilds_the_full_model() {
        let mut s = ArchSpec::named("resnet18").unwrap();
        s.base_width = 3; // inner widths 12, 24, 48 over 5 ranks: uneven shares
        let full = Graph::build(&s, 16, 16, None).unwrap();
        let workers = 5;
        let p = Partition::draw(&full, 4, 2, workers);
        let values: Vec<f32> = (0..full.params.total).map(|i| i as f32).collect();
        let mut rebuilt = vec![-1.0f32; full.params.total];
        for r in 0..workers {
            let sub = Graph::build(&s, 16, 16, Some(&p.widths(&full, r))).unwrap();
            let mut sub_buf = vec![0.0f32; sub.params.total];
            extract(&full.params, &sub.params, &p, r, &values, &mut sub_buf);
            // conv1 rows of a partitioned block are the owned rows
            let b = p.blocks[0];
            let name = format!("s{}.b{}.conv1.weight", full.blocks[b].stage, full.blocks[b].pos);
            let (fe, se) = (full.params.find(&name).unwrap(), sub.params.find(&name).unwrap());
            let row = fe.len / fe.shape[0];
            let first = p.indices(r, b).unwrap()[0];
            assert_eq!(sub_buf[se.offset], values[fe.offset + first * row]);
            let mut packed = Vec::new();
            pack_partitioned(&sub.params, &sub_buf, &mut packed);
            assert_eq!(packed.len(), partitioned_len(&sub.params));
            insert_partitioned(&full.params, &sub.params, &p, r, &packed, &mut rebuilt);
            let mut shared = Vec::new();
            pack_shared(&sub.params, &sub_buf, &mut shared);
            unpack_shared(&full.params, &shared, &mut rebuilt);
        }
        assert_eq!(rebuilt, values);
    }
}
