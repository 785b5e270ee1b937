//! LoFT re-assembly on the device: after the local steps of a round, the ranks' sub-networks
//! become one model again through one allreduce-mean of everything shared (shared
//! parameters, shared BN statistics, and shared momentum when it is kept) and one allgather(v)
//! of the partitioned slices, each packed in canonical order.
//!
//! Every copy is a run table ([`crate::model::slices`]) executed by the backend's
//! `copy_runs`; the host only carries the collectives' payloads. When every worker lives in
//! this process (one rank, or simulated workers) the slices go straight from each sub-network
//! into the full model and nothing is gathered. Across ranks the packed slices are gathered in
//! windows of at most [`GATHER_BUDGET`] elements in all, so a rank never holds every rank's
//! slices at once; the bytes moved are the same as in one allgather(v).

use crate::backend::{Backend, Run};
use crate::comm::{Comm, Purpose};
use crate::model::partition::Partition;
use crate::model::slices::{self, End};
use crate::model::{Graph, Layout, Model};
use crate::Result;

/// Elements of every rank's packed slices received per allgather(v) call, at most (16 MiB).
pub const GATHER_BUDGET: usize = 1 << 22;

/// The gather budget: [`GATHER_BUDGET`], or (test hook) `LOFT_GATHER_BUDGET` elements, so
/// that small test models are gathered in several windows.
fn gather_budget() -> usize {
    std::env::var("LOFT_GATHER_BUDGET")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(GATHER_BUDGET)
}

/// Buffers and run tables of the re-assembly of one rank.
pub struct Reassembly<B: Backend> {
    /// Every rank's sub-network graph (for the offsets of its slices); fixed over rounds.
    sub_graphs: Vec<Graph>,
    /// Elements of the shared parameters and of the shared statistics.
    shared_params: usize,
    shared_stats: usize,
    /// Momentum travels with the parameters.
    momentum: bool,
    workers: usize,
    /// Every worker is in this process.
    local_all: bool,
    /// Packed slices of every rank, in rank order (elements).
    counts: Vec<usize>,
    /// Shared tensors: pack runs of each local worker's layouts (params, stats) and unpack runs
    /// into the full layouts.
    pack_shared: Vec<[B::Runs; 2]>,
    unpack_shared: [B::Runs; 2],
    /// Packing of this rank's slices (params, stats, momentum) into its packed space, when
    /// gathering; and the elements each rank sends per window.
    pack_own: Option<[Vec<Run>; 3]>,
    window: usize,
    /// The shared sum `(shared len)`, a second worker's pack `(shared len)` when several
    /// workers are local, a window of this rank's packed slices `(window)` and of every
    /// rank's `(<= GATHER_BUDGET)`.
    shared: B::Buf,
    tmp: Option<B::Buf>,
    own: B::Buf,
    gathered: B::Buf,
}

/// Elements of the packed segments of a buffer trio: parameters, statistics, momentum.
fn segments(params: usize, stats: usize, momentum: bool) -> [(usize, usize); 3] {
    [
        (0, params),
        (params, stats),
        (params + stats, if momentum { params } else { 0 }),
    ]
}

impl<B: Backend> Reassembly<B> {
    /// The re-assembly of `full` from the sub-networks `sub_graphs` (one per rank), of which
    /// `local` live in this process; `counts` are the packed slice lengths of every rank.
    pub fn new(
        be: &B,
        full: &Graph,
        sub_graphs: Vec<Graph>,
        local: &[usize],
        counts: Vec<usize>,
        momentum: bool,
    ) -> Result<Self> {
        let workers = sub_graphs.len();
        let local_all = local.len() == workers;
        let shared_params = full.params.count(false);
        let shared_stats = full.stats.count(false);
        let shared_len = shared_params + shared_stats + if momentum { shared_params } else { 0 };
        let prepared = |l: &Layout, f: fn(&Layout) -> Vec<crate::backend::Run>| be.prepare_runs(&f(l));
        let pack_shared = local
            .iter()
            .map(|&r| {
                let g = &sub_graphs[r];
                Ok([
                    prepared(&g.params, slices::pack_shared)?,
                    prepared(&g.stats, slices::pack_shared)?,
                ])
            })
            .collect::<Result<Vec<_>>>()?;
        let unpack = |l: &Layout| be.prepare_runs(&slices::reversed(&slices::pack_shared(l)));
        let unpack_shared = [unpack(&full.params)?, unpack(&full.stats)?];
        let (pack_own, window, gathered_len) = if local_all {
            (None, 0, 0)
        } else {
            let g = &sub_graphs[local[0]];
            let (sp, ss) = (slices::partitioned_len(&g.params), slices::partitioned_len(&g.stats));
            let shift = |t: Vec<Run>, by: usize| t.into_iter().map(|r| Run { dst: r.dst + by, ..r }).collect();
            let params = slices::pack_partitioned(&g.params);
            let momentum = if momentum {
                shift(params.clone(), sp + ss)
            } else {
                Vec::new()
            };
            let tables = [params, shift(slices::pack_partitioned(&g.stats), sp), momentum];
            let window = gather_budget()
                .div_ceil(workers)
                .min(counts.iter().copied().max().unwrap_or(0))
                .max(1);
            let gathered: usize = counts.iter().map(|&c| c.min(window)).sum();
            (Some(tables), window, gathered)
        };
        Ok(Reassembly {
            shared: be.alloc(shared_len)?,
            tmp: if local.len() > 1 {
                Some(be.alloc(shared_len)?)
            } else {
                None
            },
            own: be.alloc(window)?,
            gathered: be.alloc(gathered_len)?,
            sub_graphs,
            shared_params,
            shared_stats,
            momentum,
            workers,
            local_all,
            counts,
            pack_shared,
            unpack_shared,
            pack_own,
            window,
        })
    }

    /// Bytes of the re-assembly buffers.
    pub fn bytes(&self, be: &B) -> usize {
        4 * [&self.shared, &self.own, &self.gathered]
            .into_iter()
            .chain(self.tmp.as_ref())
            .map(|b| be.buf_len(b))
            .sum::<usize>()
    }

    /// Elements of the shared allreduce.
    fn shared_len(&self) -> usize {
        let [.., (at, n)] = segments(self.shared_params, self.shared_stats, self.momentum);
        at + n
    }

    /// Re-assemble `full` from the local sub-networks `subs` (rank `ranks[k]` for `subs[k]`)
    /// and, through `comm`, the other ranks', for partition `p`.
    pub fn sync(
        &mut self,
        p: &Partition,
        subs: &[&Model<B>],
        ranks: &[usize],
        full: &mut Model<B>,
        comm: &mut dyn Comm,
    ) -> Result<()> {
        let be = full.be.clone();
        let be = &*be;
        let n = self.shared_len();
        let seg = segments(self.shared_params, self.shared_stats, self.momentum);
        // shared tensors: the sum over workers in rank order, then the mean
        for (k, m) in subs.iter().enumerate() {
            let dst = if k == 0 {
                &mut self.shared
            } else {
                self.tmp.as_mut().expect("second buffer")
            };
            let [pp, ps] = &self.pack_shared[k];
            be.copy_runs(
                pp,
                be.view(&m.params, 0, m.graph.params.total),
                be.view_mut(dst, seg[0].0, seg[0].1),
            );
            be.copy_runs(
                ps,
                be.view(&m.stats, 0, m.graph.stats.total),
                be.view_mut(dst, seg[1].0, seg[1].1),
            );
            if self.momentum {
                be.copy_runs(
                    pp,
                    be.view(&m.momentum, 0, m.graph.params.total),
                    be.view_mut(dst, seg[2].0, seg[2].1),
                );
            }
            if k > 0 {
                let tmp = self.tmp.as_ref().expect("second buffer");
                be.axpy(1.0, be.view(tmp, 0, n), be.view_mut(&mut self.shared, 0, n));
            }
        }
        be.with_host_mut(&mut self.shared, 0, n, |h| comm.allreduce_sum(Purpose::Sync, h))?;
        be.scale(be.view_mut(&mut self.shared, 0, n), 1.0 / self.workers as f32);
        let (np, ns) = (full.graph.params.total, full.graph.stats.total);
        let [up, us] = &self.unpack_shared;
        be.copy_runs(
            up,
            be.view(&self.shared, seg[0].0, seg[0].1),
            be.view_mut(&mut full.params, 0, np),
        );
        be.copy_runs(
            us,
            be.view(&self.shared, seg[1].0, seg[1].1),
            be.view_mut(&mut full.stats, 0, ns),
        );
        if self.momentum {
            be.copy_runs(
                up,
                be.view(&self.shared, seg[2].0, seg[2].1),
                be.view_mut(&mut full.momentum, 0, np),
            );
        }
        if self.local_all {
            for (m, &r) in subs.iter().zip(ranks) {
                self.insert(be, p, r, full, m)?;
            }
        } else {
            self.gather_and_insert(be, p, subs[0], full, comm)?;
        }
        be.sync()
    }

    /// Gather every rank's packed slices, a window at a time, and copy each window's slices
    /// into `full`.
    fn gather_and_insert(
        &mut self,
        be: &B,
        p: &Partition,
        m: &Model<B>,
        full: &mut Model<B>,
        comm: &mut dyn Comm,
    ) -> Result<()> {
        let me = comm.rank();
        let pack = self.pack_own.take().expect("pack tables when gathering");
        // every rank's slices in its packed space -> the full model's buffers
        let insert: Vec<[Vec<Run>; 3]> = (0..self.workers)
            .map(|r| self.insert_tables(p, r, &full.graph))
            .collect();
        let w = self.window;
        let calls = self.counts.iter().copied().max().unwrap_or(0).div_ceil(w).max(1);
        let sub = [&m.params, &m.stats, &m.momentum];
        let mut result = Ok(());
        for k in 0..calls {
            let lo = k * w;
            let counts: Vec<usize> = self.counts.iter().map(|&c| c.saturating_sub(lo).min(w)).collect();
            for (seg, table) in pack.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
                let t = be.prepare_runs(&slices::window(table, End::Dst, lo, lo + w, 0))?;
                be.copy_runs(
                    &t,
                    be.view(sub[seg], 0, be.buf_len(sub[seg])),
                    be.view_mut(&mut self.own, 0, w),
                );
            }
            let send = be.read_host(&self.own, 0, counts[me])?;
            let total: usize = counts.iter().sum();
            let all = &counts;
            be.with_host_mut(&mut self.gathered, 0, total, |recv| {
                comm.allgatherv(Purpose::Sync, &send, all, recv)
            })?;
            drop(send);
            let mut base = 0;
            for (r, tables) in insert.iter().enumerate() {
                let dst = [&mut full.params, &mut full.stats, &mut full.momentum];
                for (table, buf) in tables.iter().zip(dst).filter(|(t, _)| !t.is_empty()) {
                    let t = be.prepare_runs(&slices::window(table, End::Src, lo, lo + w, base))?;
                    let n = be.buf_len(buf);
                    be.copy_runs(&t, be.view(&self.gathered, 0, total), be.view_mut(buf, 0, n));
                }
                base += counts[r];
            }
            result = be.sync();
            if result.is_err() {
                break;
            }
        }
        self.pack_own = Some(pack);
        result
    }

    /// Rank r's partitioned slices, from its packed space (parameters, statistics, momentum
    /// back to back) into the full model's parameters, statistics and momentum.
    fn insert_tables(&self, p: &Partition, r: usize, fg: &Graph) -> [Vec<Run>; 3] {
        let sg = &self.sub_graphs[r];
        let (sp, ss) = (slices::partitioned_len(&sg.params), slices::partitioned_len(&sg.stats));
        let momentum = if self.momentum {
            slices::insert_runs(&fg.params, &sg.params, p, r, Some(sp + ss))
        } else {
            Vec::new()
        };
        [
            slices::insert_runs(&fg.params, &sg.params, p, r, Some(0)),
            slices::insert_runs(&fg.stats, &sg.stats, p, r, Some(sp)),
            momentum,
        ]
    }

    /// Copy rank r's partitioned slices from its sub-network `m` (in this process) into `full`.
    fn insert(&self, be: &B, p: &Partition, r: usize, full: &mut Model<B>, m: &Model<B>) -> Result<()> {
        let (sg, fg) = (&self.sub_graphs[r], &full.graph);
        let (np, ns) = (fg.params.total, fg.stats.total);
        let (mp, ms) = (m.graph.params.total, m.graph.stats.total);
        let tp = be.prepare_runs(&slices::insert_runs(&fg.params, &sg.params, p, r, None))?;
        let ts = be.prepare_runs(&slices::insert_runs(&fg.stats, &sg.stats, p, r, None))?;
        be.copy_runs(&tp, be.view(&m.params, 0, mp), be.view_mut(&mut full.params, 0, np));
        be.copy_runs(&ts, be.view(&m.stats, 0, ms), be.view_mut(&mut full.stats, 0, ns));
        if self.momentum {
            let tm = be.prepare_runs(&slices::insert_runs(&fg.params, &sg.params, p, r, None))?;
            be.copy_runs(&tm, be.view(&m.momentum, 0, mp), be.view_mut(&mut full.momentum, 0, np));
        }
        Ok(())
    }
}
