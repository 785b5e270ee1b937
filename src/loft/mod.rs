//! LoFT pre-training (and its dense baseline) across ranks, on the engine.
//!
//! Each round, rank r extracts its narrow sub-network from the assembled model (the inner
//! filters it owns in this round's [`Partition`] plus every shared tensor), runs `local_steps`
//! SGD steps on its own data stream with a fresh optimizer, and the ranks re-assemble the model
//! (`reassembly`). With `simulate` the S workers run one after another in one process; the
//! result is bit-identical to S ranks.
//!
//! A LoFT rank holds its narrow network's training buffers and the assembled model's
//! parameters and statistics (with the buffers of a forward-only walk for evaluation), not a
//! second full model at training size. The dense method trains the full model: one rank, or
//! data-parallel over S ranks with a gradient allreduce (mean) every step.

mod reassembly;

pub use crate::checkpoint::Method;

use crate::backend::{Backend, Device};
use crate::checkpoint::{self, DataIdentity, Kind, State};
use crate::comm::{accounting, Comm, Purpose};
use crate::data::{Augment, DatasetKind, Loader};
use crate::engine::{self, Ending, Evaluation, Record, RunControl, Stream, Trainer};
use crate::model::partition::Partition;
use crate::model::{slices, ArchSpec, Graph, Model};
use crate::ops::Sgd;
use crate::progress::{Mode, Progress, Style};
use crate::rundir::{ConfigFile, RunDir};
use crate::schedule::{Kind as ScheduleKind, Schedule};
use crate::{Error, Result};
use reassembly::Reassembly;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// A resolved pre-training configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub method: Method,
    pub arch: ArchSpec,
    pub dataset: DatasetKind,
    pub data_dir: PathBuf,
    pub train_subset: usize,
    pub test_subset: usize,
    /// Validation images held out of the training set (never trained on; 0 = none).
    #[serde(default)]
    pub val_size: usize,
    pub rounds: usize,
    pub local_steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: ScheduleKind,
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
    pub progress: Style,
    /// Record the filter distance to the previous recorded point every N rounds (0: never).
    #[serde(default)]
    pub distance_every: usize,
    /// Pruning ratio of the recorded distances.
    #[serde(default = "default_ratio")]
    pub distance_ratio: f64,
    /// Early-Bird style stop: end pre-training once the last 4 recorded D_idx are all <= EPS.
    #[serde(default)]
    pub early_stop: Option<f64>,
    /// Where the run computes (checkpoints do not depend on it).
    #[serde(default)]
    pub device: Device,
}

fn default_ratio() -> f64 {
    0.5
}

/// Recorded distances the early stop looks at.
pub const EARLY_STOP_WINDOW: usize = 4;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// re-assembly and evaluation (LoFT; the dense worker is the full model).
    pub worker_model_bytes: usize,
    pub full_model_bytes: usize,
    /// Where each rank's memory goes.
    #[serde(default)]
    pub per_rank_memory: Vec<RankMemory>,
    pub sync_bytes_sent: u64,
    pub sync_bytes_closed_form: u64,
    pub ending: Ending,
    /// The device chosen and the backend it ran on.
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub backend: String,
}

/// One rank's memory, by what it holds (bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankMemory {
    /// The worker's activations (input batch included) and their gradients.
    pub activations: u64,
    pub activation_grads: u64,
    /// The worker's parameters and statistics, and its gradients and momentum.
    pub worker_params: u64,
    pub worker_grads_and_momentum: u64,
    /// The assembled full model (LoFT): parameters, statistics, kept momentum and the
    /// activations of a forward-only walk.
    pub full_model: u64,
    /// Re-assembly buffers (packed shared tensors and slices).
    pub sync_buffers: u64,
    /// The backend's scratch (im2col and the like).
    pub scratch: u64,
    /// Peak resident memory of the process; what the rest does not explain is the MPI
    /// library, the runtime, the data set and the program.
    pub peak_rss: u64,
}

impl RankMemory {
    /// Peak RSS not explained by the buffers above.
    pub fn runtime_and_data(&self) -> u64 {
        let known = self.activations
            + self.activation_grads
            + self.worker_params
            + self.worker_grads_and_momentum
            + self.full_model
            + self.sync_buffers
            + self.scratch;
        self.peak_rss.saturating_sub(known)
    }

    fn to_vec(self) -> [u64; 8] {
        [
            self.activations,
            self.activation_grads,
            self.worker_params,
            self.worker_grads_and_momentum,
            self.full_model,
            self.sync_buffers,
            self.scratch,
            self.peak_rss,
        ]
    }

    fn from_slice(v: &[u64]) -> Self {
        RankMemory {
            activations: v[0],
            activation_grads: v[1],
            worker_params: v[2],
            worker_grads_and_momentum: v[3],
            full_model: v[4],
            sync_buffers: v[5],
            scratch: v[6],
            peak_rss: v[7],
        }
    }
}

impl PretrainConfig {
    /// Where the run writes and what it reads.
    pub fn inputs(&self) -> engine::Inputs<'_> {
        engine::Inputs {
            out: &self.out,
            arch: &self.arch,
            dataset: &self.dataset,
            data_dir: &self.data_dir,
            train_subset: self.train_subset,
            test_subset: self.test_subset,
            val_size: self.val_size,
        }
    }

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
        engine::validate_sgd(self.batch_size, self.lr, self.momentum, self.weight_decay)?;
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

/// FNV-1a over the bits of the parameters and statistics.
pub fn fingerprint(params: &[f32], stats: &[f32]) -> u64 {
    params.iter().chain(stats).fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `ledger.json`: the bytes every rank moved for re-assembly, against the closed form.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LedgerReport {
    pub ranks: usize,
    pub workers: usize,
    pub rounds: usize,
    pub per_rank_sync_bytes_sent: Vec<u64>,
    pub per_rank_sync_bytes_received: Vec<u64>,
    pub per_rank_sync_bytes_closed_form: Vec<u64>,
    /// Every collective of rank 0, by purpose and kind.
    pub rank0_ledger: serde_json::Value,
    pub closed_form: ClosedForm,
}

/// Closed-form communication of the whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClosedForm {
    pub loft_total_bytes: u64,
    pub paper_accounting_bytes: u64,
}

/// Command-specific facts of `config.json`.
#[derive(Serialize)]
struct PretrainFacts<'a> {
    workers: usize,
    params: SharedCounts,
    sync_elements: SyncElements<'a>,
}

/// Shared and partitioned parameters.
#[derive(Serialize)]
struct SharedCounts {
    shared: usize,
    partitioned: usize,
}

/// Elements of one re-assembly: the allreduce and every rank's allgather share.
#[derive(Serialize)]
struct SyncElements<'a> {
    allreduce: u64,
    allgather_counts: &'a [usize],
}

/// One worker in this process: its rank and the trainer of its sub-network (LoFT) or of the
/// full model (dense).
struct Worker<'d, B: Backend> {
    rank: usize,
    trainer: Trainer<'d, B>,
}

/// A pre-training run in progress on one rank.
struct Pretraining<'c, 'd, B: Backend> {
    cfg: &'c PretrainConfig,
    ctl: RunControl,
    workers: usize,
    full_graph: Graph,
    /// LoFT: the assembled model (parameters, statistics, kept momentum, forward-only
    /// buffers). Dense: none, the worker's model is the full model.
    full: Option<Model<B>>,
    ws: Vec<Worker<'d, B>>,
    reassembly: Option<Reassembly<B>>,
    eval: Evaluation<'c, 'd>,
    sched: Schedule,
    st: State,
    dir: RunDir,
    mode: Mode,
    bar: Progress,
    /// What the filter distance reads of the parameters at the last record (rank 0 only).
    reference: Option<crate::ticket::Rows>,
    compute_s: f64,
    sync_s: f64,
    config_json: String,
    wall: Instant,
    wall_before: f64,
}

/// Run LoFT or dense pre-training on this rank, on backend `be`. `comm` spans the ranks of the
/// job.
pub fn run<B: Backend>(
    cfg: &PretrainConfig,
    mut ctl: RunControl,
    comm: &mut dyn Comm,
    be: Arc<B>,
) -> Result<PretrainSummary> {
    cfg.validate()?;
    // the checkpoint being resumed: its buffers are dropped once the models hold them
    let found = ctl.resume.take();
    if let Some(f) = &found {
        f.expect_kind(Kind::Pretrain)?;
    }
    let (rank, ranks) = (comm.rank(), comm.size());
    if cfg.simulate > 0 && ranks > 1 {
        return Err(Error::config(
            "--simulate-workers runs in one process; start it without mpirun",
        ));
    }
    let workers = if cfg.simulate > 0 { cfg.simulate } else { ranks };
    let lead = rank == 0;
    let wall = Instant::now();
    let (split, identity) = engine::start(&ctl, lead, cfg.inputs())?;
    let (train, test) = (&split.train, &split.test);
    let full_graph = Graph::build(&cfg.arch, train.height, train.width, None)?;
    // The local workers: one per rank, or all S when simulating.
    let local: Vec<usize> = if cfg.simulate > 0 {
        (0..workers).collect()
    } else {
        vec![rank]
    };
    let (ws, full, reassembly) = models(cfg, &be, train, &full_graph, &local, workers, &identity)?;
    let (test_loader, recal_loader) = eval_loaders(cfg, &split, &identity, rank, ranks);
    let eval = Evaluation::new(&test_loader, cfg.batch_size, test.image_len())
        .with_recalibration(&recal_loader, cfg.bn_recalibrate);
    let steps_per_epoch = ws[0].trainer.stream.per_epoch();
    let mut p = Pretraining {
        cfg,
        ctl,
        workers,
        full,
        ws,
        reassembly,
        eval,
        sched: Schedule {
            base_lr: cfg.lr,
            kind: cfg.schedule.clone(),
            warmup_steps: (cfg.warmup_rounds * cfg.local_steps as f64).round() as usize,
            steps_per_epoch,
            total_steps: cfg.rounds * cfg.local_steps,
        },
        st: State {
            workers,
            data: identity.clone(),
            ..State::default()
        },
        dir: RunDir::open(&cfg.out, false, String::new())?,
        mode: cfg.progress.mode(lead),
        bar: Progress::new(Mode::Quiet, "", 0),
        reference: None,
        compute_s: 0.0,
        sync_s: 0.0,
        config_json: serde_json::to_string(cfg).expect("json"),
        wall,
        wall_before: 0.0,
        full_graph,
    };
    if let Some(f) = &found {
        let log = p.resume(f, &identity, comm, if cfg.simulate > 0 { 0 } else { rank })?;
        p.dir = RunDir::open(&cfg.out, lead, log)?;
    } else {
        p.dir = RunDir::open(&cfg.out, lead, String::new())?;
    }
    let resumed = found.map(|f| f.path);
    let (shared_n, counts) = accounting::loft_sync_elements(&p.full_graph, workers as u64, cfg.keep_momentum);
    let counts: Vec<usize> = counts.iter().map(|&c| c as usize).collect();
    p.announce(&be.name(), ranks, (shared_n, &counts), resumed.as_deref())?;
    p.bar = Progress::new(p.mode, "pretrain", cfg.rounds);
    if resumed.is_none() && p.ctl.saver.due(0) {
        p.record_init(comm)?;
    }
    let mut ending = None;
    for t in p.st.round as usize..cfg.rounds {
        ending = p.round(t, comm)?;
        if ending.is_some() {
            break;
        }
    }
    p.bar.finish();
    // resumed from the final checkpoint of a finished run: nothing was left to do
    let ending = ending.unwrap_or_else(|| Ending::Completed(resumed.unwrap_or_default()));
    p.finish(ending, comm, &be.name())
}

impl<B: Backend> Pretraining<'_, '_, B> {
    /// Write `config.json` and print the banner.
    fn announce(
        &self,
        backend: &str,
        ranks: usize,
        sync: (u64, &[usize]),
        resumed: Option<&std::path::Path>,
    ) -> Result<()> {
        let (cfg, workers) = (self.cfg, self.workers);
        let (shared_n, counts) = sync;
        let (sh, pa) = self.full_graph.param_counts();
        self.dir.write(
            "config.json",
            &ConfigFile {
                config: cfg,
                kind: Kind::Pretrain.name(),
                device: backend.to_string(),
                ranks,
                threads: rayon::current_num_threads(),
                extra: PretrainFacts {
                    workers,
                    params: SharedCounts {
                        shared: sh,
                        partitioned: pa,
                    },
                    sync_elements: SyncElements {
                        allreduce: shared_n,
                        allgather_counts: counts,
                    },
                },
                resumed_from: resumed,
                version: env!("CARGO_PKG_VERSION"),
            },
        )?;
        if self.mode != Mode::Quiet {
            eprintln!(
                "loft pretrain: {:?} with {workers} worker(s) on {ranks} rank(s), {} (base {}, inner x{}), {} rounds x {} local steps, batch {}, {}",
                cfg.method,
                cfg.arch.name(),
                cfg.arch.base_width,
                cfg.arch.inner_width,
                cfg.rounds,
                cfg.local_steps,
                cfg.batch_size,
                backend
            );
            if let Some(note) = crate::backend::device::auto_note() {
                eprintln!("{note}");
            }
            if let Some(f) = resumed {
                eprintln!("resuming from {} after round {}", f.display(), self.st.round);
            }
        }
        Ok(())
    }

    /// The assembled model: LoFT's full model, or the dense worker's.
    fn assembled(&self) -> &Model<B> {
        self.full.as_ref().unwrap_or(&self.ws[0].trainer.model)
    }

    /// Continue from checkpoint `f`: the assembled model, the data streams, the ledger of
    /// this rank (`ledger` indexes the checkpoint's ledgers), the state. Returns the log so far.
    fn resume(
        &mut self,
        f: &checkpoint::Found,
        identity: &DataIdentity,
        comm: &mut dyn Comm,
        ledger: usize,
    ) -> Result<String> {
        let (cfg, c) = (self.cfg, &f.checkpoint);
        c.check_fits(
            &f.path,
            &self.full_graph.params,
            &self.full_graph.stats,
            identity,
            self.workers,
        )?;
        if let Some(saved) = &c.partition {
            if *saved != Partition::draw(&self.full_graph, cfg.seed, saved.round, self.workers) {
                return Err(Error::format(
                    &f.path,
                    format!("the partition of round {} differs from the one this loft draws; it was written by an incompatible version", saved.round + 1),
                ));
            }
        }
        match self.full.as_mut() {
            Some(full) => engine::restore(full, c)?,
            None => engine::restore(&mut self.ws[0].trainer.model, c)?,
        }
        for wk in self.ws.iter_mut() {
            wk.trainer.stream.drawn = c.data_position[wk.rank];
        }
        checkpoint::restore_ledger(comm, c, ledger);
        self.st = c.state.clone();
        self.compute_s = self.st.compute_s;
        self.sync_s = self.st.sync_s;
        self.wall_before = self.st.wall_s;
        if comm.rank() == 0 {
            let layout = &self.full_graph.params;
            self.reference = c
                .reference
                .as_ref()
                .map(|r| crate::ticket::Rows::of(layout, &r.to_dense(), cfg.distance_ratio));
        }
        Ok(c.metrics_log.clone())
    }

    /// Round t: partition, local steps, re-assembly, metrics, distance, evaluation, record,
    /// checkpoint. Returns how the run ended, if it did.
    fn round(&mut self, t: usize, comm: &mut dyn Comm) -> Result<Option<Ending>> {
        let cfg = self.cfg;
        let t0 = Instant::now();
        crate::comm::injected_failure(comm.rank(), t)?;
        let p = Partition::draw(&self.full_graph, cfg.seed, t as u64, self.workers);
        if cfg.verify {
            p.check_cover(&self.full_graph)?;
        }
        if cfg.method == Method::Loft && comm.size() > 1 {
            let hashes = comm.allgather_u64(Purpose::Metrics, p.hash());
            if hashes.iter().any(|&h| h != hashes[0]) {
                return Err(Error::config(format!(
                    "round {t}: ranks disagree on the partition (hashes {hashes:x?})"
                )));
            }
        }
        let tc = Instant::now();
        let (sums, lr) = self.local_steps(&p, comm)?;
        let step = self.st.step as usize + cfg.local_steps;
        let compute = tc.elapsed().as_secs_f64();
        let ts = Instant::now();
        self.sync(&p, comm)?;
        let sync = ts.elapsed().as_secs_f64();
        if cfg.verify && comm.size() > 1 {
            let m = self.assembled();
            let np = m.graph.params.total;
            let ns = m.graph.stats.total;
            let h = fingerprint(&m.be.read_host(&m.params, 0, np)?, &m.be.read_host(&m.stats, 0, ns)?);
            let all = comm.allgather_u64(Purpose::Metrics, h);
            if all.iter().any(|&x| x != all[0]) {
                return Err(Error::config(format!(
                    "round {}: ranks hold different parameters after sync ({all:x?})",
                    t + 1
                )));
            }
        }
        self.compute_s += compute;
        self.sync_s += sync;
        // metrics, summed over ranks: loss, correct, samples, how many ranks were asked to
        // stop, and rank 0's filter distance (whether there is one, D_idx, D_w)
        let d = self.distance_on_lead(t, comm.rank() == 0)?;
        let (has, (d_idx, d_w)) = (d.is_some() as u8 as f64, d.unwrap_or_default());
        let stop = self.ctl.stop.requested() as u8 as f64;
        let mut m = [sums[0], sums[1], sums[2], stop, has, d_idx, d_w];
        comm.allreduce_sum_f64(Purpose::Metrics, &mut m);
        let distance = (m[4] > 0.0).then_some((m[5], m[6]));
        if let Some((index, _)) = distance {
            self.st.recent_distances.push(index);
            if self.st.recent_distances.len() > EARLY_STOP_WINDOW {
                self.st.recent_distances.remove(0);
            }
        }
        let early = cfg.early_stop.is_some_and(|eps| {
            self.st.recent_distances.len() == EARLY_STOP_WINDOW && self.st.recent_distances.iter().all(|&d| d <= eps)
        });
        let evaluate = (t + 1).is_multiple_of(cfg.eval_every) || t + 1 == cfg.rounds || early;
        let test = if evaluate {
            // LoFT: the assembled model borrows the idle worker's buffers
            let worker = &mut self.ws[0].trainer.model;
            let r = match self.full.as_mut() {
                Some(full) => self.eval.run(full, Some(worker), comm, t as u64),
                None => self.eval.run(worker, None, comm, t as u64),
            };
            Some(r?)
        } else {
            None
        };
        let rec = RoundRecord {
            round: t + 1,
            step,
            lr,
            train_loss: m[0] / m[2],
            train_acc: 100.0 * m[1] / m[2],
            test_loss: test.map(|(l, _)| l),
            test_acc: test.map(|(_, a)| a),
            distance_idx: distance.map(|d| d.0),
            distance_w: distance.map(|d| d.1),
            round_time_s: t0.elapsed().as_secs_f64(),
            compute_s: compute,
            sync_s: sync,
        };
        self.dir.log(&rec)?;
        self.show(&rec);
        if let Some(a) = rec.test_acc {
            self.st.last_acc = a;
        }
        self.st.round = (t + 1) as u64;
        self.st.step = step as u64;
        self.st.best_acc = self.st.best_acc.max(rec.test_acc.unwrap_or(0.0));
        (self.st.compute_s, self.st.sync_s) = (self.compute_s, self.sync_s);
        self.st.wall_s = self.wall_before + self.wall.elapsed().as_secs_f64();
        self.st.done = t + 1 == cfg.rounds || early;
        if early && self.mode != Mode::Quiet {
            eprintln!(
                "loft pretrain: early stop after round {}: the last {EARLY_STOP_WINDOW} filter distances are all <= {}",
                t + 1,
                cfg.early_stop.unwrap_or(0.0)
            );
        }
        let stop = m[3] > 0.0;
        if !(self.st.done || stop || self.ctl.saver.due(t + 1)) {
            return Ok(None);
        }
        let path = self.save(&p, comm)?;
        if self.st.done {
            return Ok(Some(Ending::Completed(path)));
        }
        if stop {
            self.bar.finish();
            if self.mode != Mode::Quiet {
                eprintln!(
                    "loft pretrain: stopped by a signal after round {}; checkpoint {}",
                    t + 1,
                    path.display()
                );
            }
            return Ok(Some(Ending::Stopped(path)));
        }
        Ok(None)
    }

    /// Progress for one round record.
    fn show(&mut self, rec: &RoundRecord) {
        self.bar.update(rec.round, || {
            let test = rec.test_acc.map(|a| format!(" test {a:.2}%")).unwrap_or_default();
            format!("loss {:.4} acc {:.2}%{test}", rec.train_loss, rec.train_acc)
        });
        if let (Some(a), Mode::Lines) = (rec.test_acc, self.mode) {
            eprintln!(
                "round {}/{}: train loss {:.4} acc {:.2}% test acc {a:.2}%",
                rec.round, self.cfg.rounds, rec.train_loss, rec.train_acc
            );
        }
    }

    /// Every local worker's steps of this round (LoFT: on its sub-network, extracted from the
    /// assembled model first). Returns the sums (loss, correct, samples) and the last rate.
    fn local_steps(&mut self, p: &Partition, comm: &mut dyn Comm) -> Result<([f64; 3], f64)> {
        let cfg = self.cfg;
        let first = self.st.step as usize;
        let mut sums = [0.0f64; 3];
        let mut lr = self.sched.lr(first);
        let mut comm_s = 0.0;
        for wk in self.ws.iter_mut() {
            let m = &mut wk.trainer.model;
            match (&self.full, cfg.method) {
                (Some(full), Method::Loft) => extract(full, m, p, wk.rank, cfg.keep_momentum)?,
                _ if cfg.reset_momentum => m.reset_momentum(),
                _ => {}
            }
            for k in 0..cfg.local_steps {
                lr = self.sched.lr(first + k);
                let hp = Sgd {
                    lr: lr as f32,
                    momentum: cfg.momentum as f32,
                    weight_decay: cfg.weight_decay as f32,
                };
                let s = wk.trainer.step(&hp, comm)?;
                if !s.loss.is_finite() {
                    let at = format!("in round {}", self.st.round + 1);
                    return Err(engine::diverged(s.loss, &at, "lower --lr or add --warmup-rounds"));
                }
                comm_s += s.comm_s;
                sums[0] += s.loss;
                sums[1] += s.correct as f64;
                sums[2] += s.samples as f64;
            }
        }
        self.sync_s += comm_s;
        Ok((sums, lr))
    }

    /// Re-assemble the model after the local steps.
    fn sync(&mut self, p: &Partition, comm: &mut dyn Comm) -> Result<()> {
        match (self.full.as_mut(), self.reassembly.as_mut()) {
            (Some(full), Some(re)) => {
                let subs: Vec<&Model<B>> = self.ws.iter().map(|w| &w.trainer.model).collect();
                let ranks: Vec<usize> = self.ws.iter().map(|w| w.rank).collect();
                re.sync(p, &subs, &ranks, full, comm)
            }
            _ => {
                // dense: gradients were averaged every step; BN running statistics are local,
                // so average them once per round to keep the replicas identical
                let m = &mut self.ws[0].trainer.model;
                if comm.size() > 1 {
                    let be = m.be.clone();
                    engine::allreduce_mean(&*be, comm, Purpose::Sync, &mut m.stats, m.graph.stats.total)?;
                }
                m.be.sync()
            }
        }
    }

    /// Round 0: the initialisation recorded like every other point, as a checkpoint (so the
    /// distance curves start where both methods start) and, on rank 0, as the reference of
    /// the first filter distance.
    fn record_init(&mut self, comm: &mut dyn Comm) -> Result<()> {
        if comm.rank() == 0 && self.cfg.distance_every > 0 {
            let m = self.assembled();
            let params = m.be.read_host(&m.params, 0, m.graph.params.total)?.into_owned();
            let layout = &self.full_graph.params;
            self.reference = Some(crate::ticket::Rows::of(layout, &params, self.cfg.distance_ratio));
        }
        let p = Partition::draw(&self.full_graph, self.cfg.seed, 0, self.workers);
        self.save(&p, comm)?;
        Ok(())
    }

    /// The filter distance (D_idx, D_w) to the previous recorded point, every
    /// `distance_every` rounds, on rank 0 (`lead`) only: it alone keeps the reference (it
    /// writes the checkpoints, which carry it), and the round's metrics allreduce gives the
    /// values to every rank. None before the first recorded point and on the other ranks.
    fn distance_on_lead(&mut self, t: usize, lead: bool) -> Result<Option<(f64, f64)>> {
        let cfg = self.cfg;
        if !lead || cfg.distance_every == 0 || !(t + 1).is_multiple_of(cfg.distance_every) {
            return Ok(None);
        }
        let m = self.full.as_ref().unwrap_or(&self.ws[0].trainer.model);
        let params = m.be.read_host(&m.params, 0, m.graph.params.total)?;
        let layout = &self.full_graph.params;
        let d = match &self.reference {
            Some(prev) => Some(crate::ticket::distance_to(layout, &params, prev)?),
            None => None,
        };
        // the next reference, in place
        match &mut self.reference {
            Some(r) => r.set(&params),
            None => self.reference = Some(crate::ticket::Rows::of(layout, &params, cfg.distance_ratio)),
        }
        Ok(d.map(|d| (d.index, d.weight)))
    }

    /// Write the checkpoint of the assembled (replicated) state after partition `p`.
    fn save(&self, p: &Partition, comm: &mut dyn Comm) -> Result<PathBuf> {
        let positions: Vec<u64> = self.ws.iter().map(|w| w.trainer.stream.drawn).collect();
        let make = || {
            engine::checkpoint_of(
                self.assembled(),
                Record {
                    kind: Kind::Pretrain,
                    method: self.cfg.method,
                    config: &self.config_json,
                    state: self.st.clone(),
                    seed: self.cfg.seed,
                    partition: (self.cfg.method == Method::Loft).then(|| p.clone()),
                    metrics_log: self.dir.log_text(),
                    ticket: None,
                    reference: self.reference.as_ref().map(|r| crate::checkpoint::Reference {
                        len: self.full_graph.params.total,
                        runs: r.runs().into_iter().map(|(at, v)| (at, Cow::Borrowed(v))).collect(),
                    }),
                },
            )
        };
        let all_local = self.ws.len() == self.workers;
        checkpoint::save_across_ranks(&self.ctl.saver, comm, make, &positions, all_local, self.st.step)
    }

    /// This rank's memory, by what holds it.
    fn memory(&self) -> RankMemory {
        let m = self.ws[0].trainer.model.memory();
        let be = &self.ws[0].trainer.model.be;
        RankMemory {
            activations: m.activations as u64,
            activation_grads: m.activation_grads as u64,
            worker_params: m.params_and_stats as u64,
            worker_grads_and_momentum: (m.grads_and_momentum + m.other) as u64,
            full_model: self.full.as_ref().map_or(0, |f| f.device_bytes()) as u64,
            sync_buffers: self.reassembly.as_ref().map_or(0, |r| r.bytes(be)) as u64,
            scratch: be.workspace_bytes() as u64,
            peak_rss: crate::rundir::peak_rss_bytes().unwrap_or(0),
        }
    }

    /// The ledger against the closed form, the final files and the summary.
    fn finish(&mut self, ending: Ending, comm: &mut dyn Comm, backend: &str) -> Result<PretrainSummary> {
        let cfg = self.cfg;
        let completed = matches!(ending, Ending::Completed(_));
        let (rank, ranks) = (comm.rank(), comm.size());
        let g = &self.full_graph;
        let sync_tally = comm.ledger().purpose_total(Purpose::Sync);
        let closed: u64 = match cfg.method {
            Method::Loft if ranks > 1 => {
                let (n, c) = accounting::loft_sync_elements(g, ranks as u64, cfg.keep_momentum);
                cfg.rounds as u64
                    * (accounting::allreduce_rank_bytes(n, ranks as u64, rank as u64).0
                        + accounting::allgatherv_rank_bytes(&c, rank).0)
            }
            _ => 0,
        };
        let sent_all = comm.allgather_u64(Purpose::Metrics, sync_tally.bytes_sent);
        let recv_all = comm.allgather_u64(Purpose::Metrics, sync_tally.bytes_received);
        let closed_all = comm.allgather_u64(Purpose::Metrics, closed);
        if completed {
            let counts_model = accounting::ModelCounts::of(g);
            let w = self.workers as u64;
            self.dir.write(
                "ledger.json",
                &LedgerReport {
                    ranks,
                    workers: self.workers,
                    rounds: cfg.rounds,
                    per_rank_sync_bytes_sent: sent_all,
                    per_rank_sync_bytes_received: recv_all,
                    per_rank_sync_bytes_closed_form: closed_all,
                    rank0_ledger: comm.ledger().to_json(),
                    closed_form: ClosedForm {
                        loft_total_bytes: cfg.rounds as u64 * accounting::loft_round_bytes(g, w, cfg.keep_momentum),
                        paper_accounting_bytes: accounting::paper_bytes(&counts_model, w, cfg.rounds as u64),
                    },
                },
            )?;
            if self.dir.writes() {
                let m = self.assembled();
                let params = m.be.read_host(&m.params, 0, m.graph.params.total)?;
                let stats = m.be.read_host(&m.stats, 0, m.graph.stats.total)?;
                self.dir.write_f32s("params.f32", &[&params, &stats])?;
            }
        }
        let per_rank_compute_ms = comm.allgather_u64(Purpose::Metrics, (self.compute_s * 1e3) as u64);
        let per_rank_sync_ms = comm.allgather_u64(Purpose::Metrics, (self.sync_s * 1e3) as u64);
        let mem = self.memory();
        let per_rank_peak_rss_bytes = comm.allgather_u64(Purpose::Metrics, mem.peak_rss);
        let all_mem = comm.allgather_u64s(Purpose::Metrics, &mem.to_vec());
        let worker = &self.ws[0].trainer.model;
        let summary = PretrainSummary {
            final_test_acc: self.st.last_acc,
            wall_s: self.wall.elapsed().as_secs_f64(),
            compute_s: self.compute_s,
            sync_s: self.sync_s,
            per_rank_compute_ms,
            per_rank_sync_ms,
            per_rank_peak_rss_bytes,
            worker_params: worker.graph.params.total,
            worker_flops_per_sample: worker.graph.flops_per_sample(),
            full_flops_per_sample: g.flops_per_sample(),
            worker_model_bytes: worker.device_bytes(),
            full_model_bytes: self.full.as_ref().map_or(0, |f| f.device_bytes()),
            per_rank_memory: all_mem.chunks(8).map(RankMemory::from_slice).collect(),
            sync_bytes_sent: sync_tally.bytes_sent,
            sync_bytes_closed_form: closed,
            ending,
            device: cfg.device,
            backend: backend.to_string(),
        };
        if completed {
            self.dir.write("summary.json", &summary)?;
        }
        Ok(summary)
    }
}

/// The models of this rank: its workers (`local`), the assembled model and the re-assembly
/// (LoFT), for `workers` workers in all.
#[allow(clippy::type_complexity)]
fn models<'d, B: Backend>(
    cfg: &PretrainConfig,
    be: &Arc<B>,
    train: &'d crate::data::Dataset,
    full_graph: &Graph,
    local: &[usize],
    workers: usize,
    identity: &DataIdentity,
) -> Result<(Vec<Worker<'d, B>>, Option<Model<B>>, Option<Reassembly<B>>)> {
    if cfg.method == Method::Dense {
        // one worker per rank: data-parallel replicas when there are several
        let ws = workers_of(cfg, be, train, local, vec![full_graph.clone()], workers > 1, identity)?;
        return Ok((ws, None, None));
    }
    // sub-layouts of every rank (for unpacking their slices); fixed over rounds
    let p0 = Partition::draw(full_graph, cfg.seed, 0, workers);
    let sub_graphs = (0..workers)
        .map(|r| Graph::build(&cfg.arch, train.height, train.width, Some(&p0.widths(full_graph, r))))
        .collect::<Result<Vec<_>>>()?;
    let graphs = local.iter().map(|&r| sub_graphs[r].clone()).collect();
    let ws = workers_of(cfg, be, train, local, graphs, false, identity)?;
    let mut full = Model::for_evaluation(be.clone(), full_graph.clone(), cfg.batch_size, cfg.keep_momentum)?;
    full.init(cfg.seed)?;
    let (_, counts) = accounting::loft_sync_elements(full_graph, workers as u64, cfg.keep_momentum);
    let counts = counts.iter().map(|&c| c as usize).collect();
    let re = Reassembly::new(&**be, full_graph, sub_graphs, local, counts, cfg.keep_momentum)?;
    Ok((ws, Some(full), Some(re)))
}

/// The loaders of evaluation: this rank's shard of the test set, and its own stream of
/// training batches for BN recalibration.
fn eval_loaders<'d>(
    cfg: &PretrainConfig,
    split: &'d crate::data::Split,
    identity: &DataIdentity,
    rank: usize,
    ranks: usize,
) -> (Loader<'d>, Loader<'d>) {
    let (mean, std) = (identity.mean.clone(), identity.std.clone());
    let (part, parts) = if cfg.simulate > 0 { (0, 1) } else { (rank, ranks) };
    let (train, test) = (&split.train, &split.test);
    let b = cfg.batch_size;
    let test_loader = Loader::new(
        test,
        b,
        mean.clone(),
        std.clone(),
        Augment::none(),
        false,
        false,
        cfg.seed,
        0,
    )
    .with_shard(part, parts);
    let recal_seed = cfg.seed ^ 0x6263_7265_6361_6c00;
    let recal_loader = Loader::new(train, b, mean, std, cfg.augment, true, false, recal_seed, part as u64);
    (test_loader, recal_loader)
}

/// The workers of this process: worker `local[k]` trains a model of `graphs[k]` on its own
/// data stream (dense: from the initial weights, as a data-parallel replica when
/// `data_parallel`; LoFT: extracted every round).
fn workers_of<'d, B: Backend>(
    cfg: &PretrainConfig,
    be: &Arc<B>,
    train: &'d crate::data::Dataset,
    local: &[usize],
    graphs: Vec<Graph>,
    data_parallel: bool,
    identity: &DataIdentity,
) -> Result<Vec<Worker<'d, B>>> {
    let mut ws = Vec::new();
    for (&r, graph) in local.iter().zip(graphs) {
        let mut model = Model::new(be.clone(), graph, cfg.batch_size)?;
        if cfg.method == Method::Dense {
            model.init(cfg.seed)?;
        }
        let (mean, std) = (identity.mean.clone(), identity.std.clone());
        let loader = Loader::new(
            train,
            cfg.batch_size,
            mean,
            std,
            cfg.augment,
            true,
            false,
            cfg.seed,
            r as u64,
        );
        let per_epoch = loader.batches_per_epoch();
        let mut trainer = Trainer::new(model, Stream::new(loader, per_epoch, cfg.batch_size, train.image_len()));
        if data_parallel {
            // gradients every step; the BN statistics once per round, at sync
            trainer = trainer.data_parallel(false);
        }
        ws.push(Worker { rank: r, trainer });
    }
    Ok(ws)
}

/// Copy rank r's share of the assembled model `full` into its sub-network `m` (parameters,
/// statistics, and momentum when it is kept; otherwise a fresh optimizer).
fn extract<B: Backend>(full: &Model<B>, m: &mut Model<B>, p: &Partition, r: usize, keep_momentum: bool) -> Result<()> {
    let be = m.be.clone();
    let (fg, sg) = (&full.graph, &m.graph);
    let tp = be.prepare_runs(&slices::extract_runs(&fg.params, &sg.params, p, r))?;
    let ts = be.prepare_runs(&slices::extract_runs(&fg.stats, &sg.stats, p, r))?;
    let (fp, fs) = (fg.params.total, fg.stats.total);
    let (sp, ss) = (sg.params.total, sg.stats.total);
    be.copy_runs(&tp, be.view(&full.params, 0, fp), be.view_mut(&mut m.params, 0, sp));
    be.copy_runs(&ts, be.view(&full.stats, 0, fs), be.view_mut(&mut m.stats, 0, ss));
    if keep_momentum {
        be.copy_runs(&tp, be.view(&full.momentum, 0, fp), be.view_mut(&mut m.momentum, 0, sp));
    } else {
        m.reset_momentum();
    }
    Ok(())
}
