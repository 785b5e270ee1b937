//! LoFT pre-training (and its dense baseline) across ranks.
//!
//! Every rank holds the full model. Each round, rank r extracts its narrow sub-network (the
//! inner filters it owns in this round's [`Partition`] plus every shared tensor), runs
//! `local_steps` SGD steps on its own data stream with a fresh optimizer, and the ranks
//! re-assemble the model: one allreduce-mean of the shared parameters and shared BN
//! statistics, one allgather(v) of the packed partitioned slices. With `simulate` the S
//! workers run one after another in one process; the result is bit-identical to S ranks.
//!
//! The dense method trains the full model: one rank, or data-parallel over S ranks with a
//! gradient allreduce (mean) every step.

pub mod partition;
pub mod slices;

use crate::backend::cpu::CpuBackend;
use crate::checkpoint::{self, Checkpoint, DataIdentity, State};
use crate::comm::accounting;
use crate::comm::{sum_in_rank_order, Comm, Purpose};
use crate::data::{Augment, DatasetKind, Loader};
use crate::model::{ArchSpec, Graph, Model};
use crate::ops::Sgd;
use crate::progress::{Mode, Progress};
use crate::schedule::{Kind, Schedule};
use crate::train::{log_line, prepare_out_dir, start_log, write_atomic, Ending, RunControl};
use crate::{Error, Result};
use partition::Partition;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Pre-training method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Loft,
    Dense,
}

/// A resolved pre-training configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub method: Method,
    pub arch: ArchSpec,
    pub dataset: DatasetKind,
    pub data_dir: PathBuf,
    pub train_subset: usize,
    pub test_subset: usize,
    pub rounds: usize,
    pub local_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: Kind,
    pub warmup_rounds: f64,
    /// Dense only: zero the momentum every `local_steps` steps (LoFT's fresh optimizer).
    pub reset_momentum: bool,
    /// LoFT only: keep each filter's momentum across rounds (it travels with the filter at
    /// sync) instead of a fresh optimizer every round.
    pub keep_momentum: bool,
    pub augment: Augment,
    pub seed: u64,
    pub eval_every: usize,
    /// Workers simulated one after another in this process (0: one worker per rank).
    pub simulate: usize,
    /// After every sync, check that all ranks hold bit-identical parameters.
    pub verify: bool,
    /// Before each evaluation, re-estimate the BN running statistics of the assembled model
    /// with this many training-mode forward passes (the trained statistics were gathered on
    /// narrow sub-networks). Evaluation only: the training state is restored afterwards.
    pub bn_recalibrate: usize,
    pub out: PathBuf,
    pub progress: String,
    /// Record the filter distance to the previous recorded point every N rounds (0: never).
    #[serde(default)]
    pub distance_every: usize,
    /// Pruning ratio of the recorded distances.
    #[serde(default = "default_ratio")]
    pub distance_ratio: f64,
    /// Early-Bird style stop: end pre-training once the last 4 recorded D_idx are all <= EPS.
    #[serde(default)]
    pub early_stop: Option<f64>,
}

fn default_ratio() -> f64 {
    0.5
}

/// Recorded distances the early stop looks at.
pub const EARLY_STOP_WINDOW: usize = 4;

/// One LoFT worker: its narrow model and its data stream.
struct Worker<'a> {
    rank: usize,
    graph: Graph,
    model: Model<CpuBackend<f32>>,
    loader: Loader<'a>,
    order: Vec<usize>,
    order_epoch: u64,
    /// Batches drawn so far.
    drawn: u64,
    x: Vec<f32>,
    y: Vec<u32>,
}

impl Worker<'_> {
    /// Load the next batch of this worker's stream into its model; returns its size.
    fn next_batch(&mut self) -> Result<usize> {
        let bpe = self.loader.batches_per_epoch() as u64;
        let (epoch, b) = (self.drawn / bpe, self.drawn % bpe);
        if epoch != self.order_epoch || self.order.is_empty() {
            self.order = self.loader.order(epoch);
            self.order_epoch = epoch;
        }
        let n = self
            .loader
            .fill(&self.order, epoch, b as usize, &mut self.x, &mut self.y);
        self.drawn += 1;
        self.model.set_batch(n, &self.x, &self.y)?;
        Ok(n)
    }
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
pub struct RoundRecord {
    pub round: usize,
    pub step: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: Option<f64>,
    pub test_acc: Option<f64>,
    /// Filter distance (D_idx, D_w) to the previous recorded point, when recorded.
    pub distance_idx: Option<f64>,
    pub distance_w: Option<f64>,
    pub round_time_s: f64,
    pub compute_s: f64,
    pub sync_s: f64,
}

/// Result of a pre-training run.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainSummary {
    pub final_test_acc: f64,
    pub wall_s: f64,
    /// Rank 0's local compute and sync seconds.
    pub compute_s: f64,
    pub sync_s: f64,
    /// Per rank: compute seconds, sync seconds (milliseconds as integers) and peak RSS bytes.
    pub per_rank_compute_ms: Vec<u64>,
    pub per_rank_sync_ms: Vec<u64>,
    pub per_rank_peak_rss_bytes: Vec<u64>,
    /// Parameters (shared + partitioned) held by rank 0's worker model.
    pub worker_params: usize,
    /// Forward FLOPs per sample of rank 0's worker model, and of the full model.
    pub worker_flops_per_sample: f64,
    pub full_flops_per_sample: f64,
    /// Bytes of rank 0's worker model buffers (parameters, gradients, momentum, statistics,
    /// activations and their gradients at the batch size), and of the full model kept for
    /// re-assembly and evaluation.
    pub worker_model_bytes: usize,
    pub full_model_bytes: usize,
    pub sync_bytes_sent: u64,
    pub sync_bytes_closed_form: u64,
    pub ending: Ending,
}

impl PretrainConfig {
    /// Check values before any work.
    pub fn validate(&self) -> Result<()> {
        for (v, what) in [
            (self.rounds, "--rounds"),
            (self.local_steps, "--local-steps"),
            (self.eval_every, "--eval-every"),
        ] {
            if v == 0 {
                return Err(Error::config(format!("{what} must be at least 1")));
            }
        }
        crate::train::validate_sgd(self.batch_size, self.lr, self.momentum, self.weight_decay)?;
        if !(self.warmup_rounds >= 0.0 && self.warmup_rounds.is_finite()) {
            return Err(Error::config("--warmup-rounds must be >= 0"));
        }
        if self.simulate > 0 && self.method == Method::Dense {
            return Err(Error::config("--simulate-workers applies to --method loft only"));
        }
        crate::ticket::validate_ratio(self.distance_ratio)?;
        if let Some(eps) = self.early_stop {
            if !(eps >= 0.0 && eps.is_finite()) || self.distance_every == 0 {
                return Err(Error::config(
                    "--early-stop EPS needs EPS >= 0 and distances recorded (--distance-every >= 1)",
                ));
            }
        }
        if self.keep_momentum && self.method == Method::Dense {
            return Err(Error::config(
                "--keep-momentum applies to --method loft only (dense keeps it unless --reset-momentum)",
            ));
        }
        self.arch.validate()
    }
}

/// LoFT re-assembly: one allreduce-mean of everything shared, one allgatherv of the slices.
struct Reassembly<'g> {
    full_graph: &'g Graph,
    /// Every rank's sub-network (for unpacking its slices).
    sub_graphs: &'g [Graph],
    /// Packed slice length of every rank.
    counts: &'g [usize],
    /// Shared parameters + shared BN statistics (+ shared momentum).
    shared_len: usize,
    workers: usize,
    /// Momentum travels with the parameters.
    momentum: bool,
    /// Every worker is in this process (simulation, or one rank).
    local_all: bool,
    /// Buffers: the shared sum `(shared_len)`, each local worker's shared pack, this rank's
    /// packed slices, and every rank's slices in rank order `(sum counts)`.
    shared: Vec<f32>,
    parts: Vec<Vec<f32>>,
    own: Vec<f32>,
    gathered: Vec<f32>,
}

impl Reassembly<'_> {
    /// Re-assemble `full` from the local workers (and, through `comm`, the other ranks).
    fn sync(&mut self, p: &Partition, ws: &[Worker<'_>], full: &mut Model<CpuBackend<f32>>, comm: &mut dyn Comm) {
        let g = self.full_graph;
        // shared parameters and statistics: mean over workers, summed in rank order
        self.parts.resize_with(ws.len(), Vec::new);
        for (v, wk) in self.parts.iter_mut().zip(ws) {
            v.clear();
            slices::pack_shared(&wk.graph.params, &wk.model.params, v);
            slices::pack_shared(&wk.graph.stats, &wk.model.stats, v);
            if self.momentum {
                slices::pack_shared(&wk.graph.params, &wk.model.momentum, v);
            }
        }
        self.shared.resize(self.shared_len, 0.0);
        let refs: Vec<&[f32]> = self.parts.iter().map(|v| &v[..]).collect();
        sum_in_rank_order(&refs, &mut self.shared);
        comm.allreduce_sum(Purpose::Sync, &mut self.shared);
        let inv = self.workers as f32;
        for v in self.shared.iter_mut() {
            *v /= inv;
        }
        let mut used = slices::unpack_shared(&g.params, &self.shared, &mut full.params);
        used += slices::unpack_shared(&g.stats, &self.shared[used..], &mut full.stats);
        if self.momentum {
            slices::unpack_shared(&g.params, &self.shared[used..], &mut full.momentum);
        }
        // partitioned slices: every worker's, in rank order
        if self.local_all {
            self.gathered.clear();
            for wk in ws {
                pack_slices(wk, self.momentum, &mut self.gathered);
            }
        } else {
            self.own.clear();
            pack_slices(&ws[0], self.momentum, &mut self.own);
            comm.allgatherv(Purpose::Sync, &self.own, self.counts, &mut self.gathered);
        }
        let mut at = 0;
        for (r, sg) in self.sub_graphs.iter().enumerate() {
            let np = slices::partitioned_len(&sg.params);
            let ns = slices::partitioned_len(&sg.stats);
            let packed = &self.gathered[at..];
            slices::insert_partitioned(&g.params, &sg.params, p, r, &packed[..np], &mut full.params);
            slices::insert_partitioned(&g.stats, &sg.stats, p, r, &packed[np..np + ns], &mut full.stats);
            at += np + ns;
            if self.momentum {
                slices::insert_partitioned(
                    &g.params,
                    &sg.params,
                    p,
                    r,
                    &packed[np + ns..2 * np + ns],
                    &mut full.momentum,
                );
                at += np;
            }
        }
    }
}

/// Evaluation of the assembled model: optional BN recalibration on training batches, then the
/// test set (each rank its shard), with loss and accuracy summed over ranks.
struct Evaluation<'a, 'd> {
    test: &'a Loader<'d>,
    recal: &'a Loader<'d>,
    recal_batches: usize,
}

impl Evaluation<'_, '_> {
    /// (mean test loss, test accuracy %) of `full`. Its BN statistics are restored afterwards,
    /// so evaluation never changes the training state.
    fn run(
        &self,
        full: &mut Model<CpuBackend<f32>>,
        comm: &mut dyn Comm,
        round: u64,
        x: &mut [f32],
        y: &mut [u32],
    ) -> Result<(f64, f64)> {
        let saved_stats = (self.recal_batches > 0).then(|| full.stats.clone());
        if self.recal_batches > 0 {
            let order = self.recal.order(round);
            for b in 0..self.recal_batches.min(self.recal.batches_per_epoch()) {
                let n = self.recal.fill(&order, round, b, x, y);
                full.set_batch(n, x, y)?;
                full.forward(n, true);
            }
            if comm.size() > 1 {
                comm.allreduce_sum(Purpose::Metrics, &mut full.stats);
                let inv = comm.size() as f32;
                for v in full.stats.iter_mut() {
                    *v /= inv;
                }
            }
        }
        let (mut loss, mut correct, mut seen) = (0.0, 0.0, 0.0);
        let order = self.test.order(0);
        for b in 0..self.test.batches_per_epoch() {
            let n = self.test.fill(&order, 0, b, x, y);
            full.set_batch(n, x, y)?;
            let (l, c) = full.eval_step(n)?;
            loss += l;
            correct += c as f64;
            seen += n as f64;
        }
        if let Some(st) = saved_stats {
            full.stats.copy_from_slice(&st);
        }
        let mut e = [loss, correct, seen];
        comm.allreduce_sum_f64(Purpose::Metrics, &mut e);
        Ok((e[0] / e[2].max(1.0), 100.0 * e[1] / e[2].max(1.0)))
    }
}

/// Append a worker's partitioned slices in the canonical order: parameters, BN statistics,
/// then (when momentum is kept) the momentum.
fn pack_slices(wk: &Worker<'_>, momentum: bool, out: &mut Vec<f32>) {
    slices::pack_partitioned(&wk.graph.params, &wk.model.params, out);
    slices::pack_partitioned(&wk.graph.stats, &wk.model.stats, out);
    if momentum {
        slices::pack_partitioned(&wk.graph.params, &wk.model.momentum, out);
    }
}

/// FNV-1a over the bits of the parameters and statistics.
pub fn fingerprint(params: &[f32], stats: &[f32]) -> u64 {
    params.iter().chain(stats).fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Run LoFT or dense pre-training on this rank. `comm` spans the ranks of the job.
pub fn run(cfg: &PretrainConfig, ctl: &RunControl, comm: &mut dyn Comm) -> Result<PretrainSummary> {
    cfg.validate()?;
    ctl.saver.validate()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    if cfg.simulate > 0 && ranks > 1 {
        return Err(Error::config(
            "--simulate-workers runs in one process; start it without mpirun",
        ));
    }
    let workers = if cfg.simulate > 0 { cfg.simulate } else { ranks };
    let lead = rank == 0;
    if lead {
        prepare_out_dir(&cfg.out)?;
        ctl.saver.prepare()?;
    }
    let mode = if lead { Mode::parse(&cfg.progress)? } else { Mode::Quiet };
    let wall = Instant::now();
    let split = crate::train::load_for(
        &cfg.arch,
        &cfg.dataset,
        &cfg.data_dir,
        cfg.train_subset,
        cfg.test_subset,
    )?;
    let (train, test) = (&split.train, &split.test);
    let (h, w) = (train.height, train.width);
    let full_graph = Graph::build(&cfg.arch, h, w, None)?;
    let be = Arc::new(CpuBackend::<f32>::new());
    let mut full = Model::new(be.clone(), full_graph.clone(), cfg.batch_size)?;
    full.init(cfg.seed)?;
    let identity = DataIdentity::of(train, test);
    let (mean, std) = (identity.mean.clone(), identity.std.clone());

    // The local workers: one per rank, or all S when simulating.
    let local: Vec<usize> = if cfg.simulate > 0 {
        (0..workers).collect()
    } else {
        vec![rank]
    };
    let p0 = Partition::draw(&full_graph, cfg.seed, 0, workers);
    // Sub-layouts of every rank (for unpacking their slices); fixed over rounds.
    let sub_graphs: Vec<Graph> = match cfg.method {
        Method::Loft => (0..workers)
            .map(|r| Graph::build(&cfg.arch, h, w, Some(&p0.widths(&full_graph, r))))
            .collect::<Result<_>>()?,
        Method::Dense => Vec::new(),
    };
    let mut ws = Vec::new();
    for &r in &local {
        let graph = match cfg.method {
            Method::Loft => sub_graphs[r].clone(),
            Method::Dense => full_graph.clone(),
        };
        let mut model = Model::new(be.clone(), graph.clone(), cfg.batch_size)?;
        if cfg.method == Method::Dense {
            // the dense worker trains the full model itself, from the same initial weights
            model.params.copy_from_slice(&full.params);
            model.stats.copy_from_slice(&full.stats);
        }
        let loader = Loader::new(
            train,
            cfg.batch_size,
            mean.clone(),
            std.clone(),
            cfg.augment,
            true,
            false,
            cfg.seed,
            r as u64,
        );
        ws.push(Worker {
            rank: r,
            graph,
            model,
            loader,
            order: Vec::new(),
            order_epoch: 0,
            drawn: 0,
            x: vec![0.0; cfg.batch_size * train.image_len()],
            y: vec![0; cfg.batch_size],
        });
    }
    // Where the run starts: the beginning, or a checkpoint.
    let mut st = State {
        workers,
        data: identity.clone(),
        ..State::default()
    };
    let mut log_text = String::new();
    if let Some(f) = &ctl.resume {
        let c = &f.checkpoint;
        if c.kind != "pretrain" {
            return Err(Error::format(
                &f.path,
                format!("is a {} checkpoint; resume it with loft {}", c.kind, c.kind),
            ));
        }
        c.check_fits(&f.path, &full_graph.params, &full_graph.stats, &identity, workers)?;
        if let Some(saved) = &c.partition {
            if *saved != Partition::draw(&full_graph, cfg.seed, saved.round, workers) {
                return Err(Error::format(
                    &f.path,
                    format!("the partition of round {} differs from the one this loft draws; it was written by an incompatible version", saved.round + 1),
                ));
            }
        }
        full.params.copy_from_slice(&c.params);
        full.stats.copy_from_slice(&c.stats);
        full.momentum.copy_from_slice(&c.momentum);
        for wk in ws.iter_mut() {
            wk.drawn = c.data_position[wk.rank];
            if cfg.method == Method::Dense {
                wk.model.params.copy_from_slice(&c.params);
                wk.model.stats.copy_from_slice(&c.stats);
                wk.model.momentum.copy_from_slice(&c.momentum);
            }
        }
        checkpoint::restore_ledger(comm, c, if cfg.simulate > 0 { 0 } else { rank });
        st = c.state.clone();
        log_text = c.metrics_log.clone();
    }
    let test_loader = Loader::new(
        test,
        cfg.batch_size,
        mean.clone(),
        std.clone(),
        Augment::none(),
        false,
        false,
        cfg.seed,
        0,
    )
    .with_shard(
        if cfg.simulate > 0 { 0 } else { rank },
        if cfg.simulate > 0 { 1 } else { ranks },
    );
    // training batches for BN recalibration: a stream of their own
    let recal_loader = Loader::new(
        train,
        cfg.batch_size,
        mean.clone(),
        std.clone(),
        cfg.augment,
        true,
        false,
        cfg.seed ^ 0x6263_7265_6361_6c00,
        if cfg.simulate > 0 { 0 } else { rank as u64 },
    );
    let steps_per_epoch = ws[0].loader.batches_per_epoch();
    let sched = Schedule {
        base_lr: cfg.lr,
        kind: cfg.schedule.clone(),
        warmup_steps: (cfg.warmup_rounds * cfg.local_steps as f64).round() as usize,
        steps_per_epoch,
        total_steps: cfg.rounds * cfg.local_steps,
    };
    let (shared_n, counts) = accounting::loft_sync_elements(&full_graph, workers as u64, cfg.keep_momentum);
    let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
    let mut log = None;
    if lead {
        let (sh, pa) = full_graph.param_counts();
        let resolved = serde_json::json!({
            "config": cfg, "workers": workers, "ranks": ranks, "device": "cpu",
            "threads": rayon::current_num_threads(),
            "params": { "shared": sh, "partitioned": pa },
            "sync_elements": { "allreduce": shared_n, "allgather_counts": &counts },
            "resumed_from": ctl.resume.as_ref().map(|f| &f.path),
            "version": env!("CARGO_PKG_VERSION"),
        });
        write_atomic(
            &cfg.out.join("config.json"),
            serde_json::to_string_pretty(&resolved).expect("json").as_bytes(),
        )?;
        let path = cfg.out.join("metrics.jsonl");
        log = Some((start_log(&path, &log_text)?, path));
        if mode != Mode::Quiet {
            eprintln!(
                "loft pretrain: {:?} with {workers} worker(s) on {ranks} rank(s), {} (base {}, inner x{}), {} rounds x {} local steps, batch {}",
                cfg.method, cfg.arch.name(), cfg.arch.base_width, cfg.arch.inner_width, cfg.rounds, cfg.local_steps, cfg.batch_size
            );
            if let Some(f) = &ctl.resume {
                eprintln!("resuming from {} after round {}", f.path.display(), st.round);
            }
        }
    }

    let mut x_eval = vec![0.0f32; cfg.batch_size * test.image_len()];
    let mut y_eval = vec![0u32; cfg.batch_size];
    let mut bar = Progress::new(mode, "pretrain", cfg.rounds);
    let (mut compute_s, mut sync_s) = (st.compute_s, st.sync_s);
    let mut last_acc = st.last_acc;
    let mut step = st.step as usize;
    let wall_before = st.wall_s;
    let config_json = serde_json::to_string(cfg).expect("json");
    let mut ending = None;
    // parameters at the last distance record
    let mut reference: Option<Vec<f32>> = ctl.resume.as_ref().and_then(|f| f.checkpoint.reference.clone());
    let mut reassembly = Reassembly {
        full_graph: &full_graph,
        sub_graphs: &sub_graphs,
        counts: &counts,
        shared_len: shared_n as usize,
        workers,
        momentum: cfg.keep_momentum,
        local_all: cfg.simulate > 0 || ranks == 1,
        shared: Vec::new(),
        parts: Vec::new(),
        own: Vec::new(),
        gathered: vec![0.0f32; counts.iter().sum()],
    };
    for t in st.round as usize..cfg.rounds {
        let t0 = Instant::now();
        crate::comm::injected_failure(rank, t)?;
        let p = Partition::draw(&full_graph, cfg.seed, t as u64, workers);
        if cfg.verify {
            p.check_cover(&full_graph)?;
        }
        if cfg.method == Method::Loft && ranks > 1 {
            let hashes = comm.allgather_u64(Purpose::Metrics, p.hash());
            if hashes.iter().any(|&h| h != hashes[0]) {
                return Err(Error::config(format!(
                    "round {t}: ranks disagree on the partition (hashes {hashes:x?})"
                )));
            }
        }
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0.0f64, 0.0f64);
        let mut lr = sched.lr(step);
        let tc = Instant::now();
        for wk in ws.iter_mut() {
            match cfg.method {
                Method::Loft => {
                    slices::extract(
                        &full_graph.params,
                        &wk.graph.params,
                        &p,
                        wk.rank,
                        &full.params,
                        &mut wk.model.params,
                    );
                    slices::extract(
                        &full_graph.stats,
                        &wk.graph.stats,
                        &p,
                        wk.rank,
                        &full.stats,
                        &mut wk.model.stats,
                    );
                    if cfg.keep_momentum {
                        let (fl, sl) = (&full_graph.params, &wk.graph.params);
                        slices::extract(fl, sl, &p, wk.rank, &full.momentum, &mut wk.model.momentum);
                    } else {
                        wk.model.reset_momentum();
                    }
                }
                Method::Dense => {
                    if cfg.reset_momentum {
                        wk.model.reset_momentum();
                    }
                }
            }
            for k in 0..cfg.local_steps {
                lr = sched.lr(step + k);
                let hp = Sgd {
                    lr: lr as f32,
                    momentum: cfg.momentum as f32,
                    weight_decay: cfg.weight_decay as f32,
                };
                let n = wk.next_batch()?;
                let (l, c) = match cfg.method {
                    Method::Loft => wk.model.train_step(n, &hp)?,
                    Method::Dense => {
                        wk.model.forward(n, true);
                        let r = wk.model.loss(n, true)?;
                        wk.model.backward(n);
                        if ranks > 1 {
                            let ts = Instant::now();
                            comm.allreduce_sum(Purpose::Gradients, &mut wk.model.grads);
                            let inv = ranks as f32;
                            for g in wk.model.grads.iter_mut() {
                                *g /= inv;
                            }
                            sync_s += ts.elapsed().as_secs_f64();
                        }
                        wk.model.sgd_step(&hp);
                        r
                    }
                };
                if !l.is_finite() {
                    return Err(Error::config(format!(
                        "training diverged in round {} (loss {l}); lower --lr or add --warmup-rounds",
                        t + 1
                    )));
                }
                loss_sum += l;
                correct += c as f64;
                seen += n as f64;
            }
        }
        step += cfg.local_steps;
        let compute = tc.elapsed().as_secs_f64();
        // Re-assemble the model.
        let ts = Instant::now();
        match cfg.method {
            Method::Loft => reassembly.sync(&p, &ws, &mut full, comm),
            Method::Dense => {
                let wk = &mut ws[0];
                if ranks > 1 {
                    // gradients were averaged every step; BN running statistics are local,
                    // so average them once per round to keep the replicas identical
                    comm.allreduce_sum(Purpose::Sync, &mut wk.model.stats);
                    let inv = ranks as f32;
                    for v in wk.model.stats.iter_mut() {
                        *v /= inv;
                    }
                }
                full.params.copy_from_slice(&wk.model.params);
                full.stats.copy_from_slice(&wk.model.stats);
            }
        }
        let sync = ts.elapsed().as_secs_f64();
        if cfg.verify && ranks > 1 {
            let h = fingerprint(&full.params, &full.stats);
            let all = comm.allgather_u64(Purpose::Metrics, h);
            if all.iter().any(|&x| x != all[0]) {
                return Err(Error::config(format!(
                    "round {}: ranks hold different parameters after sync ({all:x?})",
                    t + 1
                )));
            }
        }
        compute_s += compute;
        sync_s += sync;
        // metrics, averaged over ranks
        // the fourth entry: how many ranks were asked to stop (all stop together)
        let mut m = [loss_sum, correct, seen, ctl.stop.requested() as u8 as f64];
        comm.allreduce_sum_f64(Purpose::Metrics, &mut m);
        // the filter distance to the previous recorded point (replicated: no communication)
        let mut distance = None;
        if cfg.distance_every > 0 && (t + 1) % cfg.distance_every == 0 {
            if let Some(prev) = &reference {
                let d = crate::ticket::distance(&full_graph.params, &full.params, prev, cfg.distance_ratio)?;
                st.recent_distances.push(d.index);
                if st.recent_distances.len() > EARLY_STOP_WINDOW {
                    st.recent_distances.remove(0);
                }
                distance = Some(d);
            }
            reference = Some(full.params.clone());
        }
        let early = cfg.early_stop.is_some_and(|eps| {
            st.recent_distances.len() == EARLY_STOP_WINDOW && st.recent_distances.iter().all(|&d| d <= eps)
        });
        let evaluate = (t + 1) % cfg.eval_every == 0 || t + 1 == cfg.rounds || early;
        let (mut test_loss, mut test_acc) = (None, None);
        if evaluate {
            let eval = Evaluation {
                test: &test_loader,
                recal: &recal_loader,
                recal_batches: cfg.bn_recalibrate,
            };
            let (l, a) = eval.run(&mut full, comm, t as u64, &mut x_eval, &mut y_eval)?;
            test_loss = Some(l);
            test_acc = Some(a);
            last_acc = a;
        }
        let rec = RoundRecord {
            round: t + 1,
            step,
            lr,
            train_loss: m[0] / m[2],
            train_acc: 100.0 * m[1] / m[2],
            test_loss,
            test_acc,
            distance_idx: distance.as_ref().map(|d| d.index),
            distance_w: distance.as_ref().map(|d| d.weight),
            round_time_s: t0.elapsed().as_secs_f64(),
            compute_s: compute,
            sync_s: sync,
        };
        if let Some((f, path)) = log.as_mut() {
            log_line(f, path, &mut log_text, &rec)?;
        }
        bar.update(t + 1, || {
            let test = test_acc.map(|a| format!(" test {a:.2}%")).unwrap_or_default();
            format!("loss {:.4} acc {:.2}%{test}", rec.train_loss, rec.train_acc)
        });
        if evaluate && mode == Mode::Lines {
            eprintln!(
                "round {}/{}: train loss {:.4} acc {:.2}% test acc {last_acc:.2}%",
                t + 1,
                cfg.rounds,
                rec.train_loss,
                rec.train_acc
            );
        }
        st.round = (t + 1) as u64;
        st.step = step as u64;
        st.last_acc = last_acc;
        st.best_acc = st.best_acc.max(test_acc.unwrap_or(0.0));
        (st.compute_s, st.sync_s) = (compute_s, sync_s);
        st.wall_s = wall_before + wall.elapsed().as_secs_f64();
        st.done = t + 1 == cfg.rounds || early;
        if early && mode != Mode::Quiet {
            eprintln!(
                "loft pretrain: early stop after round {}: the last {EARLY_STOP_WINDOW} filter distances are all <= {}",
                t + 1,
                cfg.early_stop.unwrap_or(0.0)
            );
        }
        let stop = m[3] > 0.0;
        if st.done || stop || ctl.saver.due(t + 1) {
            let make = || Checkpoint {
                kind: "pretrain".into(),
                method: serde_json::to_value(cfg.method)
                    .expect("json")
                    .as_str()
                    .unwrap_or("")
                    .into(),
                config: config_json.clone(),
                state: st.clone(),
                seed: cfg.seed,
                params: full.params.clone(),
                param_layout: full_graph.params.clone(),
                stats: full.stats.clone(),
                stat_layout: full_graph.stats.clone(),
                momentum: match cfg.method {
                    Method::Dense => ws[0].model.momentum.clone(),
                    Method::Loft => full.momentum.clone(),
                },
                data_position: Vec::new(),
                partition: (cfg.method == Method::Loft).then(|| p.clone()),
                ledgers: Vec::new(),
                metrics_log: log_text.clone(),
                ticket: None,
                reference: reference.clone(),
            };
            let positions: Vec<u64> = ws.iter().map(|w| w.drawn).collect();
            let path = checkpoint::save_across_ranks(&ctl.saver, comm, make, &positions, ws.len() == workers, st.step)?;
            if st.done {
                ending = Some(Ending::Completed(path));
                break;
            } else if stop {
                bar.finish();
                if mode != Mode::Quiet {
                    eprintln!(
                        "loft pretrain: stopped by a signal after round {}; checkpoint {}",
                        t + 1,
                        path.display()
                    );
                }
                ending = Some(Ending::Stopped(path));
                break;
            }
        }
    }
    bar.finish();
    // resumed from the final checkpoint of a finished run: nothing was left to do
    let ending =
        ending.unwrap_or_else(|| Ending::Completed(ctl.resume.as_ref().map(|f| f.path.clone()).unwrap_or_default()));
    let completed = matches!(ending, Ending::Completed(_));

    // Ledger: measured against the closed form, per rank.
    let sync_tally = comm.ledger().purpose_total(Purpose::Sync);
    let closed: u64 = match cfg.method {
        Method::Loft if ranks > 1 => {
            let (n, c) = accounting::loft_sync_elements(&full_graph, ranks as u64, cfg.keep_momentum);
            cfg.rounds as u64
                * (accounting::allreduce_rank_bytes(n, ranks as u64, rank as u64).0
                    + accounting::allgatherv_rank_bytes(&c, rank).0)
        }
        _ => 0,
    };
    let sent_all = comm.allgather_u64(Purpose::Metrics, sync_tally.bytes_sent);
    let recv_all = comm.allgather_u64(Purpose::Metrics, sync_tally.bytes_received);
    let closed_all = comm.allgather_u64(Purpose::Metrics, closed);
    if lead && completed {
        let counts_model = accounting::ModelCounts::of(&full_graph);
        let report = serde_json::json!({
            "ranks": ranks,
            "workers": workers,
            "rounds": cfg.rounds,
            "per_rank_sync_bytes_sent": sent_all,
            "per_rank_sync_bytes_received": recv_all,
            "per_rank_sync_bytes_closed_form": closed_all,
            "rank0_ledger": comm.ledger().to_json(),
            "closed_form": {
                "loft_total_bytes": cfg.rounds as u64 * accounting::loft_round_bytes(&full_graph, workers as u64, cfg.keep_momentum),
                "paper_accounting_bytes": accounting::paper_bytes(&counts_model, workers as u64, cfg.rounds as u64),
            },
        });
        write_atomic(
            &cfg.out.join("ledger.json"),
            serde_json::to_string_pretty(&report).expect("json").as_bytes(),
        )?;
        let params_path = cfg.out.join("params.f32");
        let bytes: Vec<u8> = full
            .params
            .iter()
            .chain(full.stats.iter())
            .flat_map(|v| v.to_le_bytes())
            .collect();
        write_atomic(&params_path, &bytes)?;
    }
    let per_rank_compute_ms = comm.allgather_u64(Purpose::Metrics, (compute_s * 1e3) as u64);
    let per_rank_sync_ms = comm.allgather_u64(Purpose::Metrics, (sync_s * 1e3) as u64);
    let rss = crate::bench::peak_rss_bytes().unwrap_or(0);
    let per_rank_peak_rss_bytes = comm.allgather_u64(Purpose::Metrics, rss);
    let summary = PretrainSummary {
        final_test_acc: last_acc,
        wall_s: wall.elapsed().as_secs_f64(),
        compute_s,
        sync_s,
        per_rank_compute_ms,
        per_rank_sync_ms,
        per_rank_peak_rss_bytes,
        worker_params: ws[0].graph.params.total,
        worker_flops_per_sample: ws[0].graph.flops_per_sample(),
        full_flops_per_sample: full_graph.flops_per_sample(),
        worker_model_bytes: ws[0].model.device_bytes(),
        full_model_bytes: full.device_bytes(),
        sync_bytes_sent: sync_tally.bytes_sent,
        sync_bytes_closed_form: closed,
        ending,
    };
    if lead && completed {
        write_atomic(
            &cfg.out.join("summary.json"),
            serde_json::to_string_pretty(&summary).expect("json").as_bytes(),
        )?;
    }
    Ok(summary)
}
