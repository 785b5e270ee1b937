//! LoFT re-assembly on the device: after the local steps of a round, the ranks' sub-networks
//! become one model again through one allreduce-mean of everything shared (shared
//! parameters, shared BN statistics, and shared momentum when it is kept) and one allgather(v)
//! of the partitioned slices, each packed in canonical order.
//!
//! Every copy is a run table ([`crate::model::slices`]) executed by the backend's
//! `copy_runs`; the host only carries the collectives' payloads. When every worker lives in
//! this process (one rank, or simulated workers) the slices go straight from each sub-network
//! into the full model and nothing is gathered. Both collectives stream through windows of
//! [`crate::comm::window_elements`] (4 MiB over all ranks), so a rank never holds every
//! rank's slices, nor every shared value, at once; every rank moves exactly the bytes of one
//! allreduce and one allgather(v) of the whole (the ledger checks it against the closed form).

use crate::backend::{Backend, Run};
use crate::comm::{Comm, Purpose};
use crate::model::partition::Partition;
use crate::model::slices::{self, End};
use crate::model::{Graph, Model};
use crate::Result;

/// The run tables of one window of the shared allreduce.
struct SharedWindow<B: Backend> {
    /// Elements of the window.
    len: usize,
    /// For each local worker: its parameters, statistics and (kept) momentum into the window.
    pack: Vec<[Option<B::Runs>; 3]>,
    /// The window into the full model's parameters, statistics and momentum.
    unpack: [Option<B::Runs>; 3],
}

/// Buffers and run tables of the re-assembly of one rank.
pub struct Reassembly<B: Backend> {
    /// Every rank's sub-network graph (for the offsets of its slices); fixed over rounds.
    sub_graphs: Vec<Graph>,
    /// Momentum travels with the parameters.
    momentum: bool,
    workers: usize,
    /// Every worker is in this process.
    local_all: bool,
    /// Packed slices of every rank, in rank order (elements).
    counts: Vec<usize>,
    /// The shared allreduce, window by window (fixed over rounds).
    shared_windows: Vec<SharedWindow<B>>,
    /// Packing of this rank's slices (params, stats, momentum) into its packed space, when
    /// gathering; and the elements each rank sends per window.
    pack_own: Option<[Vec<Run>; 3]>,
    window: usize,
    /// A window of the shared sum, and of a second worker's shared values when several
    /// workers are local; a window of this rank's packed slices and of every rank's.
    shared: B::Buf,
    tmp: Option<B::Buf>,
    own: B::Buf,
    gathered: B::Buf,
}

/// Tables that pack the shared tensors of a model's parameters, statistics and (when kept)
/// momentum back to back into one packed space.
fn shared_tables(g: &Graph, momentum: bool) -> [Vec<Run>; 3] {
    let (sp, ss) = (g.params.count(false), g.stats.count(false));
    let shift = |t: Vec<Run>, by: usize| -> Vec<Run> { t.into_iter().map(|r| Run { dst: r.dst + by, ..r }).collect() };
    let params = slices::pack_shared(&g.params);
    let m = if momentum {
        shift(params.clone(), sp + ss)
    } else {
        Vec::new()
    };
    [params, shift(slices::pack_shared(&g.stats), sp), m]
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
        let (sp, ss) = (full.params.count(false), full.stats.count(false));
        let shared_len = sp + ss + if momentum { sp } else { 0 };
        // windows of a multiple of S elements: the bytes of one allreduce of the whole
        let w = crate::comm::window_elements(workers).min(shared_len.max(1));
        let packs: Vec<[Vec<Run>; 3]> = local.iter().map(|&r| shared_tables(&sub_graphs[r], momentum)).collect();
        let unpack = shared_tables(full, momentum).map(|t| slices::reversed(&t));
        let prepare = |t: Vec<Run>| -> Result<Option<B::Runs>> {
            if t.is_empty() {
                Ok(None)
            } else {
                be.prepare_runs(&t).map(Some)
            }
        };
        let mut shared_windows = Vec::new();
        for lo in (0..shared_len).step_by(w) {
            let hi = (lo + w).min(shared_len);
            let mut pack = Vec::new();
            for p in &packs {
                let [a, b, c] = p.each_ref().map(|t| slices::window(t, End::Dst, lo, hi, 0));
                pack.push([prepare(a)?, prepare(b)?, prepare(c)?]);
            }
            let [a, b, c] = unpack.each_ref().map(|t| slices::window(t, End::Src, lo, hi, 0));
            let unpack = [prepare(a)?, prepare(b)?, prepare(c)?];
            shared_windows.push(SharedWindow {
                len: hi - lo,
                pack,
                unpack,
            });
        }
        let (pack_own, window, gathered_len) = if local_all {
            (None, 0, 0)
        } else {
            let g = &sub_graphs[local[0]];
            let (sp, ss) = (slices::partitioned_len(&g.params), slices::partitioned_len(&g.stats));
            let shift = |t: Vec<Run>, by: usize| t.into_iter().map(|r| Run { dst: r.dst + by, ..r }).collect();
            let params = slices::pack_partitioned(&g.params);
            let m = if momentum {
                shift(params.clone(), sp + ss)
            } else {
                Vec::new()
            };
            let tables = [params, shift(slices::pack_partitioned(&g.stats), sp), m];
            let window = (crate::comm::window_elements(workers) / workers)
                .min(counts.iter().copied().max().unwrap_or(0))
                .max(1);
            let gathered: usize = counts.iter().map(|&c| c.min(window)).sum();
            (Some(tables), window, gathered)
        };
        let shared_buf = shared_windows.iter().map(|w| w.len).max().unwrap_or(0);
        Ok(Reassembly {
            shared: be.alloc(shared_buf)?,
            tmp: if local.len() > 1 {
                Some(be.alloc(shared_buf)?)
            } else {
                None
            },
            own: be.alloc(window)?,
            gathered: be.alloc(gathered_len)?,
            sub_graphs,
            momentum,
            workers,
            local_all,
            counts,
            shared_windows,
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
        self.shared_mean(be, subs, full, comm)?;
        if self.local_all {
            for (m, &r) in subs.iter().zip(ranks) {
                self.insert(be, p, r, full, m)?;
            }
        } else {
            self.gather_and_insert(be, p, subs[0], full, comm)?;
        }
        be.sync()
    }

    /// The shared tensors of `full`: the sum over workers in rank order (local workers, then
    /// the ranks), then the mean; a window at a time.
    fn shared_mean(&mut self, be: &B, subs: &[&Model<B>], full: &mut Model<B>, comm: &mut dyn Comm) -> Result<()> {
        for win in &self.shared_windows {
            let n = win.len;
            for (k, m) in subs.iter().enumerate() {
                let dst = if k == 0 {
                    &mut self.shared
                } else {
                    self.tmp.as_mut().expect("second buffer")
                };
                let src = [&m.params, &m.stats, &m.momentum];
                for (t, b) in win.pack[k].iter().zip(src) {
                    if let Some(t) = t {
                        be.copy_runs(t, be.view(b, 0, be.buf_len(b)), be.view_mut(dst, 0, n));
                    }
                }
                if k > 0 {
                    let tmp = self.tmp.as_ref().expect("second buffer");
                    be.axpy(1.0, be.view(tmp, 0, n), be.view_mut(&mut self.shared, 0, n));
                }
            }
            be.with_host_mut(&mut self.shared, 0, n, |h| comm.allreduce_sum(Purpose::Sync, h))?;
            be.scale(be.view_mut(&mut self.shared, 0, n), 1.0 / self.workers as f32);
            let dst = [&mut full.params, &mut full.stats, &mut full.momentum];
            for (t, b) in win.unpack.iter().zip(dst) {
                if let Some(t) = t {
                    let len = be.buf_len(b);
                    be.copy_runs(t, be.view(&self.shared, 0, n), be.view_mut(b, 0, len));
                }
            }
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    //! Re-assembly against values computed by hand from the layouts: every shared tensor is
    //! the mean of the workers' copies, every partitioned filter slice is its owner's copy,
    //! placed at the filter's index along the partitioned axis.
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::comm::single::SingleComm;
    use crate::model::{ArchSpec, Entry, Role};
    use std::sync::Arc;

    /// Distinct values for worker r: easy to tell apart, and exactly representable.
    fn values(n: usize, r: usize, salt: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + salt) % 97) as f32 * 0.25 + 100.0 * r as f32)
            .collect()
    }

    /// Element `idx` (multi-index) of a row-major tensor.
    fn flat(shape: &[usize], idx: &[usize]) -> usize {
        shape.iter().zip(idx).fold(0, |acc, (&d, &i)| acc * d + i)
    }

    /// The expected full buffer: shared entries averaged over the workers, partitioned ones
    /// assembled from their owners. `subs[r]` is worker r's buffer with layout `sub[r]`.
    fn by_hand(full: &[Entry], sub: &[Vec<Entry>], subs: &[Vec<f32>], p: &Partition, total: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; total];
        let workers = subs.len();
        for (k, e) in full.iter().enumerate() {
            let n: usize = e.shape.iter().product();
            match e.role {
                Role::Shared => {
                    for i in 0..n {
                        let sum: f64 = (0..workers).map(|r| subs[r][sub[r][k].offset + i] as f64).sum();
                        out[e.offset + i] = (sum / workers as f64) as f32;
                    }
                }
                Role::Partitioned { block, axis } => {
                    // walk every element of the full tensor; find who owns its index on `axis`
                    let mut idx = vec![0usize; e.shape.len()];
                    for i in 0..n {
                        let mut rest = i;
                        for d in (0..e.shape.len()).rev() {
                            idx[d] = rest % e.shape[d];
                            rest /= e.shape[d];
                        }
                        let j = idx[axis];
                        let (r, pos) = (0..workers)
                            .find_map(|r| {
                                p.indices(r, block)
                                    .unwrap()
                                    .iter()
                                    .position(|&x| x == j)
                                    .map(|pos| (r, pos))
                            })
                            .expect("an owner");
                        let mut sidx = idx.clone();
                        sidx[axis] = pos;
                        let s = &sub[r][k];
                        out[e.offset + i] = subs[r][s.offset + flat(&s.shape, &sidx)];
                    }
                }
            }
        }
        out
    }

    fn check(workers: usize) {
        let be = Arc::new(CpuBackend::<f32>::new());
        let mut spec = ArchSpec::named("preresnet18").unwrap();
        spec.base_width = 2;
        spec.classes = 3;
        spec.partitioned_stages = vec![1, 2, 3, 4];
        let full_graph = Graph::build(&spec, 8, 8, None).unwrap();
        let p = Partition::draw(&full_graph, 5, 3, workers);
        let sub_graphs: Vec<Graph> = (0..workers)
            .map(|r| Graph::build(&spec, 8, 8, Some(&p.widths(&full_graph, r))).unwrap())
            .collect();
        let mut subs = Vec::new();
        let (mut sub_params, mut sub_stats) = (Vec::new(), Vec::new());
        for (r, g) in sub_graphs.iter().enumerate() {
            let mut m = Model::for_evaluation(be.clone(), g.clone(), 1, false).unwrap();
            let (pv, sv) = (values(g.params.total, r, 1), values(g.stats.total, r, 2));
            m.load(&pv, &sv, None).unwrap();
            sub_params.push(pv);
            sub_stats.push(sv);
            subs.push(m);
        }
        let mut full = Model::for_evaluation(be.clone(), full_graph.clone(), 1, false).unwrap();
        let local: Vec<usize> = (0..workers).collect();
        let mut re = Reassembly::new(&*be, &full_graph, sub_graphs.clone(), &local, vec![0; workers], false).unwrap();
        let refs: Vec<&Model<CpuBackend<f32>>> = subs.iter().collect();
        re.sync(&p, &refs, &local, &mut full, &mut SingleComm::new()).unwrap();

        let layouts = |f: fn(&Graph) -> &crate::model::Layout| -> Vec<Vec<Entry>> {
            sub_graphs.iter().map(|g| f(g).entries.clone()).collect()
        };
        let want_p = by_hand(
            &full_graph.params.entries,
            &layouts(|g| &g.params),
            &sub_params,
            &p,
            full_graph.params.total,
        );
        let want_s = by_hand(
            &full_graph.stats.entries,
            &layouts(|g| &g.stats),
            &sub_stats,
            &p,
            full_graph.stats.total,
        );
        let checks = [
            (
                "parameters",
                &full_graph.params.entries,
                want_p,
                be.download(&full.params).unwrap(),
            ),
            (
                "statistics",
                &full_graph.stats.entries,
                want_s,
                be.download(&full.stats).unwrap(),
            ),
        ];
        for (what, entries, want, got) in checks {
            for e in entries {
                let (w, g) = (&want[e.offset..e.offset + e.len], &got[e.offset..e.offset + e.len]);
                if e.role == Role::Shared {
                    // a mean: equal up to the order of the additions
                    for (a, b) in w.iter().zip(g) {
                        assert!(
                            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                            "S = {workers}: {}: by hand {a}, re-assembled {b}",
                            e.name
                        );
                    }
                } else {
                    // an owner's copy: the same bits
                    assert_eq!(w, g, "S = {workers}: {what} {}", e.name);
                }
            }
        }
    }

    #[test]
    fn two_and_three_workers_reassemble_as_computed_by_hand() {
        check(2);
        check(3);
    }
}
