//! LoFT re-assembly on the device: after the local steps of a round, the ranks' sub-networks
//! become one model again through one allreduce-mean of everything shared (shared
//! parameters, shared BN statistics, and shared momentum when it is kept) and one allgather(v)
//! of the partitioned slices, each packed in canonical order.
//!
//! Every copy is a run table ([`crate::model::slices`]) executed by the backend's
//! `copy_runs`; the host only carries the collectives' payloads. When every worker lives in
//! this process (one rank, or simulated workers) the slices go straight from each sub-network
//! into the full model and nothing is gathered.

use crate::backend::Backend;
use crate::comm::{Comm, Purpose};
use crate::model::partition::Partition;
use crate::model::{slices, Graph, Layout, Model};
use crate::Result;

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
    /// Packed slices of this rank's sub-network (params, stats), when gathering.
    pack_own: Option<[B::Runs; 2]>,
    /// The shared sum `(shared len)`, a second worker's pack `(shared len)` when several
    /// workers are local, this rank's packed slices and every rank's `(sum counts)`.
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
        let (pack_own, own_len, gathered_len) = if local_all {
            (None, 0, 0)
        } else {
            let g = &sub_graphs[local[0]];
            let runs = [
                prepared(&g.params, slices::pack_partitioned)?,
                prepared(&g.stats, slices::pack_partitioned)?,
            ];
            (Some(runs), counts[local[0]], counts.iter().sum())
        };
        Ok(Reassembly {
            shared: be.alloc(shared_len)?,
            tmp: if local.len() > 1 {
                Some(be.alloc(shared_len)?)
            } else {
                None
            },
            own: be.alloc(own_len)?,
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
                self.insert(be, p, r, full, Source::Sub(m))?;
            }
        } else {
            self.gather(be, subs[0], comm)?;
            for r in 0..self.workers {
                self.insert(be, p, r, full, Source::Gathered)?;
            }
        }
        be.sync()
    }

    /// Pack this rank's slices and gather every rank's.
    fn gather(&mut self, be: &B, m: &Model<B>, comm: &mut dyn Comm) -> Result<()> {
        let [pp, ps] = self.pack_own.as_ref().expect("pack tables when gathering");
        let g = &m.graph;
        let seg = segments(
            slices::partitioned_len(&g.params),
            slices::partitioned_len(&g.stats),
            self.momentum,
        );
        be.copy_runs(
            pp,
            be.view(&m.params, 0, g.params.total),
            be.view_mut(&mut self.own, seg[0].0, seg[0].1),
        );
        be.copy_runs(
            ps,
            be.view(&m.stats, 0, g.stats.total),
            be.view_mut(&mut self.own, seg[1].0, seg[1].1),
        );
        if self.momentum {
            be.copy_runs(
                pp,
                be.view(&m.momentum, 0, g.params.total),
                be.view_mut(&mut self.own, seg[2].0, seg[2].1),
            );
        }
        let own_len = be.buf_len(&self.own);
        let send = be.read_host(&self.own, 0, own_len)?;
        let total = be.buf_len(&self.gathered);
        be.with_host_mut(&mut self.gathered, 0, total, |recv| {
            comm.allgatherv(Purpose::Sync, &send, &self.counts, recv)
        })
    }

    /// Copy rank r's partitioned slices into `full`: from its sub-network, or from its part
    /// of the gathered buffer.
    fn insert(&self, be: &B, p: &Partition, r: usize, full: &mut Model<B>, src: Source<'_, B>) -> Result<()> {
        let sg = &self.sub_graphs[r];
        let fg = &full.graph;
        let (np, ns) = (fg.params.total, fg.stats.total);
        let base: usize = self.counts[..r].iter().sum();
        let (sp, ss) = (slices::partitioned_len(&sg.params), slices::partitioned_len(&sg.stats));
        let at = |off: usize| matches!(src, Source::Gathered).then_some(base + off);
        let tp = be.prepare_runs(&slices::insert_runs(&fg.params, &sg.params, p, r, at(0)))?;
        let ts = be.prepare_runs(&slices::insert_runs(&fg.stats, &sg.stats, p, r, at(sp)))?;
        let tm = if self.momentum {
            Some(be.prepare_runs(&slices::insert_runs(&fg.params, &sg.params, p, r, at(sp + ss)))?)
        } else {
            None
        };
        match src {
            Source::Sub(m) => {
                let (mp, ms) = (m.graph.params.total, m.graph.stats.total);
                be.copy_runs(&tp, be.view(&m.params, 0, mp), be.view_mut(&mut full.params, 0, np));
                be.copy_runs(&ts, be.view(&m.stats, 0, ms), be.view_mut(&mut full.stats, 0, ns));
                if let Some(tm) = &tm {
                    be.copy_runs(tm, be.view(&m.momentum, 0, mp), be.view_mut(&mut full.momentum, 0, np));
                }
            }
            Source::Gathered => {
                let g = be.view(&self.gathered, 0, be.buf_len(&self.gathered));
                be.copy_runs(&tp, g, be.view_mut(&mut full.params, 0, np));
                be.copy_runs(&ts, g, be.view_mut(&mut full.stats, 0, ns));
                if let Some(tm) = &tm {
                    be.copy_runs(tm, g, be.view_mut(&mut full.momentum, 0, np));
                }
            }
        }
        Ok(())
    }
}

/// Where a rank's slices come from.
enum Source<'m, B: Backend> {
    /// Its sub-network, in this process.
    Sub(&'m Model<B>),
    /// Its part of the gathered buffer.
    Gathered,
}
