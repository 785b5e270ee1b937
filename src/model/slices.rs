//! Moving inner-filter slices between a full model and a narrow one, as tables of runs.
//!
//! Full and sub layouts list the same tensors in the same order; a shared tensor has the same
//! shape in both, a partitioned tensor keeps only the owned indices along its partition axis
//! (rows of conv1 and the mid BN, columns of conv2). [`runs`] lists the contiguous
//! (full offset, sub offset, length) runs of one tensor; every table below is built from it,
//! and the backend's `copy_runs` executes the tables on the device. Used by LoFT (extract a
//! rank's sub-network, pack its slices, re-assemble), by pruning (extract a ticket) and by
//! the checks of both.
//!
//! A *packed* buffer holds tensors back to back in layout order: the shared tensors of a
//! layout ([`pack_shared`]), or the partitioned tensors of a sub layout ([`pack_partitioned`]).

use super::partition::Partition;
use super::{Layout, Role};
use crate::backend::Run;

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

/// Append a run, merging it into the previous one when both ends continue it.
fn push(table: &mut Vec<Run>, src: usize, dst: usize, len: usize) {
    if let Some(last) = table.last_mut() {
        if last.src + last.len == src && last.dst + last.len == dst {
            last.len += len;
            return;
        }
    }
    table.push(Run { src, dst, len });
}

/// Runs that copy rank r's share of every tensor from a full buffer into a sub buffer.
pub fn extract_runs(full: &Layout, sub: &Layout, p: &Partition, r: usize) -> Vec<Run> {
    let (mut table, mut rs) = (Vec::new(), Vec::new());
    for i in 0..full.entries.len() {
        runs(full, sub, i, p, r, &mut rs);
        for &(f, s, n) in &rs {
            push(&mut table, f, s, n);
        }
    }
    table
}

/// Runs that copy the partitioned tensors of rank r's sub buffer into a full buffer. With
/// `packed_at = Some(base)` the source is instead rank r's packed slices (as
/// [`pack_partitioned`] lays them out) starting at element `base` of a gathered buffer.
pub fn insert_runs(full: &Layout, sub: &Layout, p: &Partition, r: usize, packed_at: Option<usize>) -> Vec<Run> {
    let (mut table, mut rs) = (Vec::new(), Vec::new());
    let mut cursor = packed_at.unwrap_or(0);
    for i in 0..full.entries.len() {
        if full.entries[i].role == Role::Shared {
            continue;
        }
        let base = sub.entries[i].offset;
        runs(full, sub, i, p, r, &mut rs);
        for &(f, s, n) in &rs {
            let src = if packed_at.is_some() { cursor + (s - base) } else { s };
            push(&mut table, src, f, n);
        }
        cursor += sub.entries[i].len;
    }
    table
}

/// Runs that pack the tensors of `layout` with the given sharing, in layout order, into a
/// buffer starting at 0 (gather); [`reversed`] unpacks them (scatter).
fn pack(layout: &Layout, partitioned: bool) -> Vec<Run> {
    let mut table = Vec::new();
    let mut at = 0;
    for e in layout
        .entries
        .iter()
        .filter(|e| (e.role != Role::Shared) == partitioned)
    {
        push(&mut table, e.offset, at, e.len);
        at += e.len;
    }
    table
}

/// Runs that pack the shared tensors of `layout`.
pub fn pack_shared(layout: &Layout) -> Vec<Run> {
    pack(layout, false)
}

/// Runs that pack the partitioned tensors of `layout` (a rank's slices, in canonical order).
pub fn pack_partitioned(layout: &Layout) -> Vec<Run> {
    pack(layout, true)
}

/// Which end of a run a window applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Src,
    Dst,
}

/// The part of a run table whose `end` offsets lie in `[lo, hi)`, with those offsets moved to
/// start at `base` (runs that straddle the window are cut). Streams a packed buffer through a
/// bounded one, a window at a time.
pub fn window(table: &[Run], end: End, lo: usize, hi: usize, base: usize) -> Vec<Run> {
    let mut out = Vec::new();
    for r in table {
        let at = if end == End::Src { r.src } else { r.dst };
        let (a, b) = (at.max(lo), (at + r.len).min(hi));
        if a >= b {
            continue;
        }
        let skip = a - at;
        let (src, dst) = match end {
            End::Src => (a - lo + base, r.dst + skip),
            End::Dst => (r.src + skip, a - lo + base),
        };
        push(&mut out, src, dst, b - a);
    }
    out
}

/// The same copies in the other direction.
pub fn reversed(table: &[Run]) -> Vec<Run> {
    table
        .iter()
        .map(|r| Run {
            src: r.dst,
            dst: r.src,
            len: r.len,
        })
        .collect()
}

/// Number of elements the runs copy.
pub fn copied(table: &[Run]) -> usize {
    table.iter().map(|r| r.len).sum()
}

/// Execute a run table on host slices (what the backends' `copy_runs` does on the device).
pub fn copy_on_host(table: &[Run], src: &[f32], dst: &mut [f32]) {
    for r in table {
        dst[r.dst..r.dst + r.len].copy_from_slice(&src[r.src..r.src + r.len]);
    }
}

/// Copy rank r's share of every tensor from `full_buf` (full layout) into `sub_buf` (sub
/// layout), on the host.
pub fn extract(full: &Layout, sub: &Layout, p: &Partition, r: usize, full_buf: &[f32], sub_buf: &mut [f32]) {
    copy_on_host(&extract_runs(full, sub, p, r), full_buf, sub_buf);
}

/// Number of partitioned elements of a layout.
pub fn partitioned_len(layout: &Layout) -> usize {
    layout.count(true)
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
        let mut via_packed = vec![-1.0f32; full.params.total];
        let mut gathered = Vec::new();
        let mut bases = Vec::new();
        let mut subs = Vec::new();
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
            // straight from the sub buffer
            copy_on_host(
                &insert_runs(&full.params, &sub.params, &p, r, None),
                &sub_buf,
                &mut rebuilt,
            );
            let shared = pack_shared(&sub.params);
            let mut packed = vec![0.0f32; copied(&shared)];
            copy_on_host(&shared, &sub_buf, &mut packed);
            copy_on_host(&reversed(&pack_shared(&full.params)), &packed, &mut rebuilt);
            // through a packed, gathered buffer
            let own = pack_partitioned(&sub.params);
            assert_eq!(copied(&own), partitioned_len(&sub.params));
            let mut mine = vec![0.0f32; copied(&own)];
            copy_on_host(&own, &sub_buf, &mut mine);
            bases.push(gathered.len());
            gathered.extend(mine);
            subs.push(sub);
            copy_on_host(&reversed(&pack_shared(&full.params)), &packed, &mut via_packed);
        }
        for (r, sub) in subs.iter().enumerate() {
            let t = insert_runs(&full.params, &sub.params, &p, r, Some(bases[r]));
            copy_on_host(&t, &gathered, &mut via_packed);
        }
        assert_eq!(rebuilt, values);
        assert_eq!(via_packed, values);
    }

    #[test]
    fn windows_cut_runs_and_cover_the_table_once() {
        let table = [
            Run {
                src: 0,
                dst: 100,
                len: 5,
            },
            Run {
                src: 5,
                dst: 200,
                len: 7,
            },
            Run {
                src: 12,
                dst: 50,
                len: 3,
            },
        ];
        let src: Vec<f32> = (0..15).map(|i| i as f32).collect();
        let mut whole = vec![0.0f32; 210];
        copy_on_host(&table, &src, &mut whole);
        // stream the source through windows of 4, each copied to the start of a small buffer
        let mut streamed = vec![0.0f32; 210];
        for lo in (0..15).step_by(4) {
            let w = window(&table, End::Src, lo, lo + 4, 0);
            let chunk: Vec<f32> = src[lo..(lo + 4).min(15)].to_vec();
            copy_on_host(&w, &chunk, &mut streamed);
        }
        assert_eq!(streamed, whole);
        // the same on the destination side: packing into windows
        let packed = reversed(&table);
        let mut out = vec![0.0f32; 15];
        for lo in (0..15).step_by(6) {
            let w = window(&packed, End::Dst, lo, lo + 6, 0);
            let mut chunk = vec![0.0f32; 6];
            copy_on_host(&w, &whole, &mut chunk);
            let n = (15 - lo).min(6);
            out[lo..lo + n].copy_from_slice(&chunk[..n]);
        }
        assert_eq!(out, src);
        assert_eq!(
            window(&table, End::Src, 3, 6, 10),
            [
                Run {
                    src: 10,
                    dst: 103,
                    len: 2
                },
                Run {
                    src: 12,
                    dst: 200,
                    len: 1
                }
            ]
        );
    }

    #[test]
    fn adjacent_runs_merge() {
        let mut t = Vec::new();
        push(&mut t, 0, 10, 3);
        push(&mut t, 3, 13, 2);
        push(&mut t, 6, 15, 1);
        assert_eq!(
            t,
            [
                Run {
                    src: 0,
                    dst: 10,
                    len: 5
                },
                Run {
                    src: 6,
                    dst: 15,
                    len: 1
                }
            ]
        );
        assert_eq!(copied(&t), 6);
        assert_eq!(
            reversed(&t)[0],
            Run {
                src: 10,
                dst: 0,
                len: 5
            }
        );
    }
}
