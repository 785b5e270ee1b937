//! Dense training and fine-tuning: the epoch loop of one model on the engine, alone or as
//! data-parallel replicas over the ranks of the job.
//!
//! `batch_size` is the global batch: every step draws one batch of the whole training set
//! (one order per epoch, from the seed) and rank r of S trains on its r-th share of
//! `batch_size / S` samples, with the gradients averaged over the ranks and the BN running
//! statistics averaged too. Batch norm is synchronized: every layer normalises with the
//! statistics of the global batch (its per-channel sums are added over the ranks). So the
//! same command on 1, 2 or 4 ranks sees the same samples with the same augmentation at the
//! same learning rate and computes the same step, up to the order of the sums.
//!
//! With a validation split (`val_size`), every epoch is also evaluated on the validation
//! images, and the summary reports the test accuracy of the epoch with the best validation
//! accuracy beside the final one.
//!
//! The run directory holds `config.json`, `metrics.jsonl` (one [`EpochRecord`] per epoch),
//! `summary.json` and `checkpoints/`. Fields ending in `_s` or `_per_s` are timings;
//! everything else is a deterministic function of the configuration, so two runs with the same
//! seed write the same log apart from those fields.

use crate::backend::{Backend, Device};
use crate::checkpoint::{self, Checkpoint, DataIdentity, Kind, Method, State, TicketInfo};
use crate::comm::{Comm, Purpose};
use crate::data::{Augment, DatasetKind, Loader};
use crate::engine::{self, Ending, Evaluation, Record, RunControl, Stream, Trainer};
use crate::model::{ArchSpec, Graph, Model};
use crate::ops::Sgd;
use crate::progress::{Mode, Progress, Style};
use crate::rundir::{ConfigFile, RunDir};
use crate::schedule::{Kind as ScheduleKind, Schedule};
use crate::ticket::prune;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything a dense training run needs, resolved.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub arch: ArchSpec,
    pub dataset: DatasetKind,
    pub data_dir: PathBuf,
    /// Use only the first N training / test samples (0 = all).
    pub train_subset: usize,
    pub test_subset: usize,
    /// Validation images held out of the training set (0 = none).
    #[serde(default)]
    pub val_size: usize,
    pub epochs: usize,
    /// The global batch (split evenly over the ranks).
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: ScheduleKind,
    pub warmup_epochs: f64,
    pub augment: Augment,
    pub seed: u64,
    pub out: PathBuf,
    pub progress: Style,
    /// Fine-tuning: the ticket whose weights the run starts from (None: initialise from the
    /// seed).
    #[serde(default)]
    pub ticket: Option<PathBuf>,
    /// Where the run computes (checkpoints do not depend on it).
    #[serde(default)]
    pub device: Device,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    /// On the validation images, when the run holds some out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_acc: Option<f64>,
    pub epoch_time_s: f64,
    pub train_images_per_s: f64,
}

/// The epoch chosen on the validation images.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Chosen {
    /// The epoch (1-based) of the best validation accuracy (the first, on ties).
    pub epoch: usize,
    pub val_acc: f64,
    /// The test accuracy of that epoch.
    pub test_acc: f64,
}

/// Result of a run (`summary.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainSummary {
    pub final_test_acc: f64,
    /// The best test accuracy over the epochs (selected on the test set: an optimistic
    /// figure, reported by the paper's released code).
    pub best_test_acc: f64,
    /// The epoch chosen on the validation images, when the run holds some out.
    #[serde(default)]
    pub chosen: Option<Chosen>,
    pub wall_s: f64,
    pub out: PathBuf,
    pub ending: Ending,
    /// The device chosen and the backend it ran on.
    #[serde(default)]
    pub device: Device,
    #[serde(default)]
    pub backend: String,
}

impl TrainConfig {
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

    /// Check every value before any work starts.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("--epochs must be at least 1"));
        }
        engine::validate_sgd(self.batch_size, self.lr, self.momentum, self.weight_decay)?;
        self.arch.validate()?;
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite()) {
            return Err(Error::config(format!(
                "--warmup-epochs must be >= 0, got {}",
                self.warmup_epochs
            )));
        }
        if let ScheduleKind::Step { milestones, .. } = &self.schedule {
            if let Some(m) = milestones.iter().find(|&&m| m == 0 || m > self.epochs) {
                return Err(Error::config(format!(
                    "milestone {m} is outside 1..={} epochs",
                    self.epochs
                )));
            }
        }
        Ok(())
    }

    /// Each rank's share of the global batch on `ranks` ranks.
    pub fn micro_batch(&self, ranks: usize) -> Result<usize> {
        if !self.batch_size.is_multiple_of(ranks) {
            return Err(Error::config(format!(
                "--batch-size {} (the global batch) does not split evenly over {ranks} ranks",
                self.batch_size
            )));
        }
        Ok(self.batch_size / ranks)
    }

    /// The checkpoint kind this configuration writes.
    pub fn kind(&self) -> Kind {
        if self.ticket.is_some() {
            Kind::Finetune
        } else {
            Kind::Train
        }
    }
}

/// The network a run trains: a fresh one, or a ticket (narrow, or full with masks).
struct Net {
    graph: Graph,
    ticket: Option<TicketInfo>,
    /// Masked tickets: the masks of the parameters and of the BN statistics.
    masks: Option<(Vec<f32>, Vec<f32>)>,
    /// The ticket file a fine-tuning run starts from (not when resuming).
    start: Option<Checkpoint>,
}

impl Net {
    /// The network of `cfg` on h x w inputs: from the checkpoint being resumed, else from the
    /// ticket file, else fresh.
    fn resolve(cfg: &TrainConfig, resumed: Option<&checkpoint::Found>, h: usize, w: usize) -> Result<Net> {
        let start = match (&cfg.ticket, resumed) {
            (Some(t), None) => {
                let c = Checkpoint::read(t)?;
                if c.kind != Kind::Ticket || c.ticket.is_none() {
                    return Err(Error::format(
                        t,
                        format!("is a {} checkpoint, not a ticket (make one with loft prune)", c.kind),
                    ));
                }
                Some(c)
            }
            _ => None,
        };
        let info = match (resumed, &start) {
            (Some(f), _) => f.checkpoint.ticket.clone(),
            (None, Some(t)) => t.ticket.clone(),
            (None, None) => None,
        };
        let Some(info) = info else {
            return Ok(Net {
                graph: Graph::build(&cfg.arch, h, w, None)?,
                ticket: None,
                masks: None,
                start,
            });
        };
        let (full_all, _, graph, idx) = prune::ticket_graphs(&cfg.arch, h, w, &info)?;
        let masks = info.masked.then(|| {
            (
                prune::mask(&full_all.params, &idx, &info),
                prune::mask(&full_all.stats, &idx, &info),
            )
        });
        Ok(Net {
            graph,
            ticket: Some(info),
            masks,
            start,
        })
    }
}

/// Command-specific facts of `config.json`.
#[derive(Serialize)]
struct TrainFacts<'a> {
    params: ParamCounts,
    ticket: &'a Option<TicketInfo>,
    train_samples: usize,
    val_samples: usize,
    test_samples: usize,
    steps_per_epoch: usize,
    /// Samples per rank and step (the global batch / ranks).
    batch_per_rank: usize,
    normalisation: Normalisation<'a>,
}

/// Shared, partitioned and total parameters.
#[derive(Serialize)]
struct ParamCounts {
    shared: usize,
    partitioned: usize,
    total: usize,
}

/// Per-channel normalisation of the inputs.
#[derive(Serialize)]
struct Normalisation<'a> {
    mean: &'a [f32],
    std: &'a [f32],
}

/// A training run in progress on one rank.
struct DenseRun<'c, 'd, B: Backend> {
    cfg: &'c TrainConfig,
    ctl: RunControl,
    /// The checkpoint the run continued from.
    resumed: Option<PathBuf>,
    kind: Kind,
    trainer: Trainer<'d, B>,
    eval: Evaluation<'c, 'd>,
    /// Evaluation on the validation images, if any.
    val_eval: Option<Evaluation<'c, 'd>>,
    sched: Schedule,
    steps_per_epoch: usize,
    st: State,
    dir: RunDir,
    mode: Mode,
    ticket: Option<TicketInfo>,
    config_json: String,
    wall: Instant,
    wall_before: f64,
}

/// Train and evaluate on every rank of `comm` on backend `be` (data-parallel when there are
/// several ranks: each rank trains on its shard with the gradients averaged every step).
/// Rank 0 writes the run directory as it goes.
pub fn run<B: Backend>(
    cfg: &TrainConfig,
    mut ctl: RunControl,
    comm: &mut dyn Comm,
    be: Arc<B>,
) -> Result<TrainSummary> {
    cfg.validate()?;
    let kind = cfg.kind();
    // the checkpoint being resumed: its buffers are dropped once the model holds them
    let found = ctl.resume.take();
    if let Some(f) = &found {
        f.expect_kind(kind)?;
    }
    let resumed = found.as_ref();
    let (rank, ranks) = (comm.rank(), comm.size());
    let lead = rank == 0;
    let wall = Instant::now();
    let (split, identity) = engine::start(&ctl, lead, cfg.inputs())?;
    let (train, test) = (&split.train, &split.test);
    let micro = cfg.micro_batch(ranks)?;
    let mut net = Net::resolve(cfg, resumed, train.height, train.width)?;
    let mut model = Model::new(be.clone(), net.graph.clone(), micro)?;
    model.init(cfg.seed)?;
    if let (Some(t), Some(path)) = (net.start.take(), &cfg.ticket) {
        // fine-tuning may use other data than pre-training (e.g. the full training set)
        t.check_network(path, &model.graph.params, &model.graph.stats)?;
        model.load(&t.params, &t.stats, None)?;
    }
    // Data: every rank its share of each global batch.
    let (mean, std) = (identity.mean.clone(), identity.std.clone());
    let (train_loader, test_loader, steps_per_epoch) = loaders(cfg, &split, &identity, rank, ranks)?;
    let val_loader = split.val.as_ref().map(|v| eval_loader(cfg, v, &identity, rank, ranks));
    let mut st = State {
        workers: ranks,
        data: identity.clone(),
        ..State::default()
    };
    let mut log_text = String::new();
    if let Some(f) = resumed {
        let c = &f.checkpoint;
        c.check_fits(&f.path, &model.graph.params, &model.graph.stats, &identity, ranks)?;
        engine::restore(&mut model, c)?;
        checkpoint::restore_ledger(comm, c, rank);
        st = c.state.clone();
        log_text = c.metrics_log.clone();
    }
    let resumed = found.map(|f| f.path);
    let (shared, partitioned) = net.graph.param_counts();
    let mut stream = Stream::new(train_loader, steps_per_epoch, micro, train.image_len());
    stream.drawn = st.epoch * steps_per_epoch as u64 + st.batch;
    let mut trainer = Trainer::new(model, stream);
    if ranks > 1 {
        trainer = trainer.data_parallel(true).synchronized_batchnorm();
    }
    if let Some((mp, ms)) = &net.masks {
        trainer = trainer.with_masks(mp, ms)?;
    }
    let dir = RunDir::open(&cfg.out, lead, log_text)?;
    let facts = TrainFacts {
        params: ParamCounts {
            shared,
            partitioned,
            total: shared + partitioned,
        },
        ticket: &net.ticket,
        train_samples: train.len(),
        val_samples: identity.val_samples,
        test_samples: test.len(),
        steps_per_epoch,
        batch_per_rank: micro,
        normalisation: Normalisation { mean: &mean, std: &std },
    };
    let mode = cfg.progress.mode(lead);
    announce(cfg, &dir, mode, &be.name(), ranks, facts, resumed.as_deref(), &st)?;
    let mut r = DenseRun {
        cfg,
        ctl,
        resumed,
        kind,
        trainer,
        eval: Evaluation::new(&test_loader, micro, test.image_len()),
        val_eval: val_loader.as_ref().map(|l| Evaluation::new(l, micro, test.image_len())),
        sched: Schedule {
            base_lr: cfg.lr,
            kind: cfg.schedule.clone(),
            warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
            steps_per_epoch,
            total_steps: steps_per_epoch * cfg.epochs,
        },
        steps_per_epoch,
        wall_before: st.wall_s,
        st,
        dir,
        mode,
        ticket: net.ticket.clone(),
        config_json: serde_json::to_string(cfg).expect("json"),
        wall,
    };
    r.run(comm, &be.name())
}

/// The training stream's loader (this rank's share of every global batch), the test loader
/// (this rank's shard) and the global batches per epoch (full ones only, so that every rank
/// count takes the same steps).
fn loaders<'d>(
    cfg: &TrainConfig,
    split: &'d crate::data::Split,
    identity: &DataIdentity,
    rank: usize,
    ranks: usize,
) -> Result<(Loader<'d>, Loader<'d>, usize)> {
    let train = &split.train;
    let (mean, std) = (identity.mean.clone(), identity.std.clone());
    // one order and one augmentation stream (rank key 0) for the whole job
    let train_loader = Loader::new(
        train,
        cfg.micro_batch(ranks)?,
        mean,
        std,
        cfg.augment,
        true,
        true,
        cfg.seed,
        0,
    )
    .with_micro(rank, ranks);
    let steps_per_epoch = train_loader.batches_per_epoch();
    if steps_per_epoch == 0 {
        return Err(Error::config(format!(
            "{} training samples do not fill one batch of {}",
            train.len(),
            cfg.batch_size
        )));
    }
    let test_loader = eval_loader(cfg, &split.test, identity, rank, ranks);
    Ok((train_loader, test_loader, steps_per_epoch))
}

/// This rank's shard of an evaluation set, in its natural order.
fn eval_loader<'d>(
    cfg: &TrainConfig,
    set: &'d crate::data::Dataset,
    identity: &DataIdentity,
    rank: usize,
    ranks: usize,
) -> Loader<'d> {
    let (mean, std) = (identity.mean.clone(), identity.std.clone());
    let micro = (cfg.batch_size / ranks).max(1);
    Loader::new(set, micro, mean, std, Augment::none(), false, false, cfg.seed, 0).with_shard(rank, ranks)
}

/// Write `config.json` and print the banner.
#[allow(clippy::too_many_arguments)]
fn announce(
    cfg: &TrainConfig,
    dir: &RunDir,
    mode: Mode,
    backend: &str,
    ranks: usize,
    facts: TrainFacts<'_>,
    resumed: Option<&Path>,
    st: &State,
) -> Result<()> {
    let kind = cfg.kind();
    let (total, steps_per_epoch) = (facts.params.total, facts.steps_per_epoch);
    let (train_samples, test_samples) = (facts.train_samples, facts.test_samples);
    let batch_per_rank = facts.batch_per_rank;
    let val = match facts.val_samples {
        0 => String::new(),
        v => format!(" / {v} validation"),
    };
    dir.write(
        "config.json",
        &ConfigFile {
            config: cfg,
            kind: kind.name(),
            device: backend.to_string(),
            ranks,
            threads: rayon::current_num_threads(),
            extra: facts,
            resumed_from: resumed,
            version: env!("CARGO_PKG_VERSION"),
        },
    )?;
    if mode != Mode::Quiet {
        eprintln!(
            "loft {kind}: {} (base {}, inner x{}) {:.2}M params on {} ({train_samples} train{val} / {test_samples} test), {backend}, {ranks} rank(s), {} epochs x {steps_per_epoch} steps of {} ({} per rank)",
            cfg.arch.name(),
            cfg.arch.base_width,
            cfg.arch.inner_width,
            total as f64 / 1e6,
            cfg.dataset.name(),
            cfg.epochs,
            cfg.batch_size,
            batch_per_rank,
        );
        if let Some(note) = crate::backend::device::auto_note() {
            eprintln!("{note}");
        }
        if let Some(f) = resumed {
            eprintln!(
                "resuming from {} (epoch {}, batch {}, step {})",
                f.display(),
                st.epoch,
                st.batch,
                st.step
            );
        }
    }
    Ok(())
}

impl<B: Backend> DenseRun<'_, '_, B> {
    /// Epochs until the end or a stop; then the summary.
    fn run(&mut self, comm: &mut dyn Comm, backend: &str) -> Result<TrainSummary> {
        let mut ending = None;
        while (self.st.epoch as usize) < self.cfg.epochs && ending.is_none() {
            ending = self.epoch(comm)?;
        }
        let ending = match ending {
            Some(e) => e,
            // resumed from the final checkpoint of a finished run: nothing left to do
            None => Ending::Completed(self.resumed.clone().unwrap_or_default()),
        };
        if let Ending::Stopped(p) = &ending {
            if self.mode != Mode::Quiet {
                eprintln!(
                    "loft {}: stopped by {} at epoch {} batch {}; checkpoint {}",
                    self.kind,
                    self.ctl.stop.signal_name(),
                    self.st.epoch + 1,
                    self.st.batch,
                    p.display()
                );
            }
        }
        let summary = TrainSummary {
            final_test_acc: self.st.last_acc,
            best_test_acc: self.st.best_acc,
            chosen: (self.val_eval.is_some() && self.st.chosen_epoch > 0).then_some(Chosen {
                epoch: self.st.chosen_epoch as usize,
                val_acc: self.st.best_val_acc,
                test_acc: self.st.chosen_test_acc,
            }),
            wall_s: self.wall.elapsed().as_secs_f64(),
            out: self.cfg.out.clone(),
            ending,
            device: self.cfg.device,
            backend: backend.to_string(),
        };
        if matches!(summary.ending, Ending::Completed(_)) {
            self.dir.write("summary.json", &summary)?;
        }
        Ok(summary)
    }

    /// The rest of the current epoch, its evaluation and record, and the checkpoint that is
    /// due. Returns how the run ended, if it did.
    fn epoch(&mut self, comm: &mut dyn Comm) -> Result<Option<Ending>> {
        let epoch = self.st.epoch as usize;
        let t0 = Instant::now();
        let seen_before = self.st.accum[2];
        let label = format!("epoch {}/{}", epoch + 1, self.cfg.epochs);
        let mut bar = Progress::new(self.mode, label, self.steps_per_epoch);
        let mut lr = self.sched.lr(self.st.step as usize);
        while (self.st.batch as usize) < self.steps_per_epoch {
            lr = self.sched.lr(self.st.step as usize);
            let hp = Sgd {
                lr: lr as f32,
                momentum: self.cfg.momentum as f32,
                weight_decay: self.cfg.weight_decay as f32,
            };
            let s = self.trainer.step(&hp, comm)?;
            // the sums of this step over all ranks, and whether any rank must stop
            let mut m = [
                s.loss,
                s.correct as f64,
                s.samples as f64,
                self.ctl.stop.requested() as u8 as f64,
            ];
            if comm.size() > 1 {
                comm.allreduce_sum_f64(Purpose::Metrics, &mut m);
            }
            if !m[0].is_finite() {
                bar.finish();
                let at = format!("at epoch {} step {}", epoch + 1, self.st.batch + 1);
                return Err(engine::diverged(m[0], &at, "lower --lr or add --warmup-epochs"));
            }
            for (a, v) in self.st.accum.iter_mut().zip(&m[..3]) {
                *a += *v;
            }
            self.st.step += 1;
            self.st.batch += 1;
            let [loss_sum, correct, seen] = self.st.accum;
            let ips = (seen - seen_before) / t0.elapsed().as_secs_f64();
            bar.update(self.st.batch as usize, || {
                format!(
                    "loss {:.4} acc {:.2}% lr {lr:.4} {ips:.0} img/s",
                    loss_sum / seen,
                    100.0 * correct / seen
                )
            });
            if m[3] > 0.0 && (self.st.batch as usize) < self.steps_per_epoch {
                bar.finish();
                return Ok(Some(Ending::Stopped(self.save(comm)?)));
            }
        }
        bar.finish();
        let train_time = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = self.eval.run(&mut self.trainer.model, None, comm, 0)?;
        self.st.last_acc = test_acc;
        self.st.best_acc = self.st.best_acc.max(test_acc);
        let (mut val_loss, mut val_acc) = (None, None);
        if let Some(v) = self.val_eval.as_mut() {
            let (l, a) = v.run(&mut self.trainer.model, None, comm, 0)?;
            if self.st.chosen_epoch == 0 || a > self.st.best_val_acc {
                self.st.best_val_acc = a;
                self.st.chosen_epoch = epoch as u64 + 1;
                self.st.chosen_test_acc = test_acc;
            }
            (val_loss, val_acc) = (Some(l), Some(a));
        }
        let [loss_sum, correct, seen] = self.st.accum;
        let rec = EpochRecord {
            epoch: epoch + 1,
            step: self.st.step as usize,
            lr,
            train_loss: loss_sum / seen,
            train_acc: 100.0 * correct / seen,
            test_loss,
            test_acc,
            val_loss,
            val_acc,
            epoch_time_s: t0.elapsed().as_secs_f64(),
            train_images_per_s: (seen - seen_before) / train_time,
        };
        self.dir.log(&rec)?;
        if self.mode != Mode::Quiet {
            let val = match (val_loss, val_acc) {
                (Some(l), Some(a)) => format!(" | val loss {l:.4} acc {a:.2}%"),
                _ => String::new(),
            };
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}%{val} | test loss {:.4} acc {:.2}% | {:.1}s, {:.0} img/s",
                epoch + 1,
                self.cfg.epochs,
                rec.train_loss,
                rec.train_acc,
                test_loss,
                test_acc,
                rec.epoch_time_s,
                rec.train_images_per_s
            );
        }
        self.st.epoch += 1;
        self.st.batch = 0;
        self.st.accum = [0.0; 3];
        self.st.done = self.st.epoch as usize == self.cfg.epochs;
        // every rank agrees on stopping (a signal may reach the ranks at different times)
        let mut stop = [self.ctl.stop.requested() as u8 as f64];
        if comm.size() > 1 {
            comm.allreduce_sum_f64(Purpose::Control, &mut stop);
        }
        Ok(if self.st.done {
            Some(Ending::Completed(self.save(comm)?))
        } else if stop[0] > 0.0 {
            Some(Ending::Stopped(self.save(comm)?))
        } else {
            if self.ctl.saver.due(self.st.epoch as usize) {
                self.save(comm)?;
            }
            None
        })
    }

    /// Write the checkpoint of the current (replicated) state.
    fn save(&self, comm: &mut dyn Comm) -> Result<PathBuf> {
        let mut st = self.st.clone();
        st.wall_s = self.wall_before + self.wall.elapsed().as_secs_f64();
        let step = st.step;
        let model = &self.trainer.model;
        let make = || {
            engine::checkpoint_of(
                model,
                Record {
                    kind: self.kind,
                    method: Method::Dense,
                    config: &self.config_json,
                    state: st,
                    seed: self.cfg.seed,
                    partition: None,
                    metrics_log: self.dir.log_text(),
                    ticket: self.ticket.clone(),
                    reference: None,
                },
            )
        };
        let single = comm.size() == 1;
        checkpoint::save_across_ranks(&self.ctl.saver, comm, make, &[step], single, step)
    }
}
