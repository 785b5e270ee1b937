//! Dense training: the epoch loop, evaluation, the metric log and the run directory.
//!
//! A run directory holds `config.json` (the resolved configuration) and `metrics.jsonl` (one
//! JSON object per epoch). Fields ending in `_s` or `_per_s` are timings; everything else is
//! a deterministic function of the configuration, so two runs with the same seed write the
//! same log apart from those fields.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::checkpoint::{self, Checkpoint, DataIdentity, Found, Saver, State};
use crate::comm::{Comm, Purpose};
use crate::data::{self, Augment, DatasetKind, Loader};
use crate::model::{ArchSpec, Graph, Model};
use crate::ops::Sgd;
use crate::progress::{Mode, Progress};
use crate::schedule::{Kind, Schedule};
use crate::stop::StopFlag;
use crate::ticket::prune::{self, TicketInfo};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
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
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub schedule: Kind,
    pub warmup_epochs: f64,
    pub augment: Augment,
    pub seed: u64,
    pub out: PathBuf,
    pub progress: String,
    /// Fine-tuning: the ticket whose weights the run starts from (None: initialise from the
    /// seed).
    #[serde(default)]
    pub ticket: Option<PathBuf>,
}

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct EpochRecord {
    pub epoch: usize,
    pub step: usize,
    pub lr: f64,
    pub train_loss: f64,
    pub train_acc: f64,
    pub test_loss: f64,
    pub test_acc: f64,
    pub epoch_time_s: f64,
    pub train_images_per_s: f64,
}

/// Result of a run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub final_test_acc: f64,
    pub best_test_acc: f64,
    pub wall_s: f64,
    pub out: PathBuf,
    pub ending: Ending,
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Check the optimizer flags shared by every training command.
pub fn validate_sgd(batch_size: usize, lr: f64, momentum: f64, weight_decay: f64) -> Result<()> {
    if batch_size == 0 {
        return Err(Error::config("--batch-size must be at least 1"));
    }
    if !(lr > 0.0 && lr.is_finite()) {
        return Err(Error::config(format!("--lr must be a positive number, got {lr}")));
    }
    if !(0.0..1.0).contains(&momentum) {
        return Err(Error::config(format!("--momentum must be in [0, 1), got {momentum}")));
    }
    if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
        return Err(Error::config(format!(
            "--weight-decay must be >= 0, got {weight_decay}"
        )));
    }
    Ok(())
}

impl TrainConfig {
    /// Check every value before any work starts.
    pub fn validate(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(Error::config("--epochs must be at least 1"));
        }
        validate_sgd(self.batch_size, self.lr, self.momentum, self.weight_decay)?;
        if !(self.warmup_epochs >= 0.0 && self.warmup_epochs.is_finite()) {
            return Err(Error::config(format!(
                "--warmup-epochs must be >= 0, got {}",
                self.warmup_epochs
            )));
        }
        if let Kind::Step { milestones, .. } = &self.schedule {
            if let Some(m) = milestones.iter().find(|&&m| m == 0 || m > self.epochs) {
                return Err(Error::config(format!(
                    "milestone {m} is outside 1..={} epochs",
                    self.epochs
                )));
            }
        }
        self.arch.validate()
    }
}

/// Create the run directory and check that it is writable.
pub fn prepare_out_dir(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let probe = out.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| Error::io(out, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Load a data set (optionally only its first samples) and check that `arch` fits it.
pub fn load_for(
    arch: &ArchSpec,
    dataset: &DatasetKind,
    dir: &Path,
    train_subset: usize,
    test_subset: usize,
) -> Result<data::Split> {
    let mut split = data::load(dataset, dir)?;
    if train_subset > 0 {
        split.train.truncate(train_subset);
    }
    if test_subset > 0 {
        split.test.truncate(test_subset);
    }
    if split.train.is_empty() || split.test.is_empty() {
        return Err(Error::config("the training and test sets must not be empty"));
    }
    if arch.classes < split.train.classes {
        return Err(Error::config(format!(
            "--classes {} is fewer than the {} classes of {}",
            arch.classes,
            split.train.classes,
            dataset.name()
        )));
    }
    if arch.in_channels != split.train.channels {
        return Err(Error::Shape(format!(
            "the model takes {} input channels but {} images have {}",
            arch.in_channels,
            dataset.name(),
            split.train.channels
        )));
    }
    Ok(split)
}

/// How a run checkpoints, resumes and stops.
pub struct RunControl {
    /// Where and how often checkpoints are written.
    pub saver: Saver,
    /// The checkpoint to continue from.
    pub resume: Option<Found>,
    /// Set by SIGTERM / SIGUSR1 / SIGINT.
    pub stop: StopFlag,
}

impl RunControl {
    /// Checkpoints every `every` rounds or epochs into `out/checkpoints`, keeping `keep`; no
    /// resume; no signal handling.
    pub fn new(out: &Path, every: usize, keep: usize) -> Self {
        RunControl {
            saver: Saver {
                dir: out.join("checkpoints"),
                every,
                keep,
            },
            resume: None,
            stop: StopFlag::never(),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub enum Ending {
    /// Every epoch or round ran; the final checkpoint.
    Completed(PathBuf),
    /// A signal stopped it; the checkpoint to resume from.
    Stopped(PathBuf),
}

/// Open `metrics.jsonl` for appending after writing `text` (the log so far) into it.
pub fn start_log(path: &Path, text: &str) -> Result<std::fs::File> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(text.as_bytes()).map_err(|e| Error::io(path, e))?;
    Ok(f)
}

/// Append one record to the log file and to its in-memory copy.
pub fn log_line(f: &mut std::fs::File, path: &Path, text: &mut String, rec: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(rec).expect("json") + "\n";
    f.write_all(line.as_bytes()).map_err(|e| Error::io(path, e))?;
    f.flush().map_err(|e| Error::io(path, e))?;
    text.push_str(&line);
    Ok(())
}

/// The network a training run trains: a fresh one, or a ticket (narrow, or full with masks).
struct Net {
    graph: Graph,
    /// The ticket and, in masked mode, the masks of the parameters and the BN statistics.
    ticket: Option<TicketInfo>,
    masks: Option<(Vec<f32>, Vec<f32>)>,
}

impl Net {
    fn build(cfg: &TrainConfig, h: usize, w: usize, ticket: Option<TicketInfo>) -> Result<Net> {
        let Some(info) = ticket else {
            return Ok(Net {
                graph: Graph::build(&cfg.arch, h, w, None)?,
                ticket: None,
                masks: None,
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
        })
    }

    /// Hold the pruned values at zero (masked tickets): parameters, momentum, statistics.
    fn apply_masks(&self, model: &mut Model<CpuBackend<f32>>) {
        if let Some((mp, ms)) = &self.masks {
            for (v, m) in model.params.iter_mut().zip(mp) {
                *v *= m;
            }
            for (v, m) in model.momentum.iter_mut().zip(mp) {
                *v *= m;
            }
            for (v, m) in model.stats.iter_mut().zip(ms) {
                *v *= m;
            }
        }
    }
}

/// Train and evaluate on every rank of `comm` (data-parallel when there are several: each
/// rank trains on its shard with the gradients averaged every step); returns the summary.
/// Rank 0 writes the run directory as it goes.
pub fn run(cfg: &TrainConfig, ctl: &RunControl, comm: &mut dyn Comm) -> Result<TrainSummary> {
    cfg.validate()?;
    ctl.saver.validate()?;
    let (rank, ranks) = (comm.rank(), comm.size());
    let lead = rank == 0;
    let kind = if cfg.ticket.is_some() { "finetune" } else { "train" };
    if lead {
        prepare_out_dir(&cfg.out)?;
        ctl.saver.prepare()?;
    }
    let mode = if lead { Mode::parse(&cfg.progress)? } else { Mode::Quiet };
    let wall = Instant::now();
    let split = load_for(
        &cfg.arch,
        &cfg.dataset,
        &cfg.data_dir,
        cfg.train_subset,
        cfg.test_subset,
    )?;
    let (train, test) = (&split.train, &split.test);
    let identity = DataIdentity::of(train, test);
    let (mean, std) = (identity.mean.clone(), identity.std.clone());
    // The ticket (fine-tuning): from the checkpoint being resumed, else from its file.
    let ticket_file = match (&cfg.ticket, &ctl.resume) {
        (Some(t), None) => {
            let c = Checkpoint::read(t)?;
            if c.kind != "ticket" || c.ticket.is_none() {
                return Err(Error::format(
                    t,
                    format!("is a {} checkpoint, not a ticket (make one with loft prune)", c.kind),
                ));
            }
            Some(c)
        }
        _ => None,
    };
    let info = match (&ctl.resume, &ticket_file) {
        (Some(f), _) => f.checkpoint.ticket.clone(),
        (None, Some(t)) => t.ticket.clone(),
        (None, None) => None,
    };
    let net = Net::build(cfg, train.height, train.width, info)?;
    let (shared, partitioned) = net.graph.param_counts();
    let be = Arc::new(CpuBackend::<f32>::new());
    let mut model = Model::new(be.clone(), net.graph.clone(), cfg.batch_size)?;
    model.init(cfg.seed)?;
    if let (Some(t), Some(path)) = (&ticket_file, &cfg.ticket) {
        // fine-tuning may use other data than pre-training (e.g. the full training set)
        t.check_network(path, &model.graph.params, &model.graph.stats)?;
        model.params.copy_from_slice(&t.params);
        model.stats.copy_from_slice(&t.stats);
    }

    // Data: one shard per rank when data-parallel; every rank takes the same number of
    // full batches per epoch.
    let mut train_loader = Loader::new(
        train,
        cfg.batch_size,
        mean.clone(),
        std.clone(),
        cfg.augment,
        true,
        false,
        cfg.seed,
        rank as u64,
    );
    if ranks > 1 {
        train_loader = train_loader.with_shard(rank, ranks);
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
    .with_shard(rank, ranks);
    let steps_per_epoch = if ranks > 1 {
        (train.len() / ranks) / cfg.batch_size
    } else {
        train_loader.batches_per_epoch()
    };
    if steps_per_epoch == 0 {
        return Err(Error::config(format!(
            "{} training samples over {ranks} rank(s) do not fill one batch of {}",
            train.len(),
            cfg.batch_size
        )));
    }
    let sched = Schedule {
        base_lr: cfg.lr,
        kind: cfg.schedule.clone(),
        warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
        steps_per_epoch,
        total_steps: steps_per_epoch * cfg.epochs,
    };

    // Where the run starts: the beginning, or a checkpoint.
    let mut st = State {
        workers: ranks,
        data: identity.clone(),
        ..State::default()
    };
    let mut log_text = String::new();
    if let Some(f) = &ctl.resume {
        let c = &f.checkpoint;
        if c.kind != kind {
            return Err(Error::format(
                &f.path,
                format!("is a {} checkpoint; resume it with loft {}", c.kind, c.kind),
            ));
        }
        c.check_fits(&f.path, &model.graph.params, &model.graph.stats, &identity, ranks)?;
        model.params.copy_from_slice(&c.params);
        model.stats.copy_from_slice(&c.stats);
        model.momentum.copy_from_slice(&c.momentum);
        checkpoint::restore_ledger(comm, c, rank);
        st = c.state.clone();
        log_text = c.metrics_log.clone();
    }

    let resolved = serde_json::json!({
        "config": cfg,
        "kind": kind,
        "device": be.name(),
        "ranks": ranks,
        "threads": rayon::current_num_threads(),
        "params": { "shared": shared, "partitioned": partitioned, "total": shared + partitioned },
        "ticket": &net.ticket,
        "train_samples": train.len(),
        "test_samples": test.len(),
        "steps_per_epoch": steps_per_epoch,
        "normalisation": { "mean": &mean, "std": &std },
        "resumed_from": ctl.resume.as_ref().map(|f| &f.path),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let log_path = cfg.out.join("metrics.jsonl");
    let mut log = None;
    if lead {
        write_atomic(
            &cfg.out.join("config.json"),
            serde_json::to_string_pretty(&resolved).expect("json").as_bytes(),
        )?;
        log = Some(start_log(&log_path, &log_text)?);
    }

    if mode != Mode::Quiet {
        eprintln!(
            "loft {kind}: {} (base {}, inner x{}) {:.2}M params on {} ({} train / {} test), {}, {ranks} rank(s), {} epochs x {} steps",
            cfg.arch.name(),
            cfg.arch.base_width,
            cfg.arch.inner_width,
            (shared + partitioned) as f64 / 1e6,
            cfg.dataset.name(),
            train.len(),
            test.len(),
            be.name(),
            cfg.epochs,
            steps_per_epoch
        );
        if let Some(f) = &ctl.resume {
            eprintln!(
                "resuming from {} (epoch {}, batch {}, step {})",
                f.path.display(),
                st.epoch,
                st.batch,
                st.step
            );
        }
    }
    let config_json = serde_json::to_string(cfg).expect("json");
    let wall_before = st.wall_s;
    // The checkpoint of the current (replicated) state.
    let save = |model: &Model<CpuBackend<f32>>, st: &State, log_text: &str, comm: &mut dyn Comm| -> Result<PathBuf> {
        let mut st = st.clone();
        st.wall_s = wall_before + wall.elapsed().as_secs_f64();
        let step = st.step;
        let make = || Checkpoint {
            kind: kind.into(),
            method: "dense".into(),
            config: config_json.clone(),
            data_position: Vec::new(),
            state: st,
            seed: cfg.seed,
            params: model.params.clone(),
            param_layout: model.graph.params.clone(),
            stats: model.stats.clone(),
            stat_layout: model.graph.stats.clone(),
            momentum: model.momentum.clone(),
            partition: None,
            ledgers: Vec::new(),
            metrics_log: log_text.to_string(),
            ticket: net.ticket.clone(),
            reference: None,
        };
        checkpoint::save_across_ranks(&ctl.saver, comm, make, &[step], ranks == 1, step)
    };
    let sample_len = train.image_len();
    let mut x = vec![0f32; cfg.batch_size * sample_len];
    let mut y = vec![0u32; cfg.batch_size];
    let mut ending = None;
    let inv = 1.0 / ranks as f32;
    while (st.epoch as usize) < cfg.epochs && ending.is_none() {
        let epoch = st.epoch as usize;
        let t0 = Instant::now();
        let order = train_loader.order(epoch as u64);
        let seen_before = st.accum[2];
        let mut bar = Progress::new(mode, format!("epoch {}/{}", epoch + 1, cfg.epochs), steps_per_epoch);
        let mut lr = sched.lr(st.step as usize);
        while (st.batch as usize) < steps_per_epoch {
            let b = st.batch as usize;
            let n = train_loader.fill(&order, epoch as u64, b, &mut x, &mut y);
            model.set_batch(n, &x, &y)?;
            lr = sched.lr(st.step as usize);
            let hp = Sgd {
                lr: lr as f32,
                momentum: cfg.momentum as f32,
                weight_decay: cfg.weight_decay as f32,
            };
            // one step; the sums of this step over all ranks, and whether any rank must stop
            let mut m = if ranks == 1 {
                let (l, c) = model.train_step(n, &hp)?;
                [l, c as f64, n as f64, ctl.stop.requested() as u8 as f64]
            } else {
                model.forward(n, true);
                let (l, c) = model.loss(n, true)?;
                model.backward(n);
                comm.allreduce_sum(Purpose::Gradients, &mut model.grads);
                model.grads.iter_mut().for_each(|g| *g *= inv);
                model.sgd_step(&hp);
                // running statistics are linear in the batch statistics: averaging them every
                // step keeps the replicas identical at every step
                comm.allreduce_sum(Purpose::Gradients, &mut model.stats);
                model.stats.iter_mut().for_each(|v| *v *= inv);
                let mut m = [l, c as f64, n as f64, ctl.stop.requested() as u8 as f64];
                comm.allreduce_sum_f64(Purpose::Metrics, &mut m);
                m
            };
            net.apply_masks(&mut model);
            if !m[0].is_finite() {
                bar.finish();
                return Err(Error::config(format!(
                    "training diverged at epoch {} step {} (loss {}); lower --lr or add --warmup-epochs",
                    epoch + 1,
                    b + 1,
                    m[0]
                )));
            }
            for (a, v) in st.accum.iter_mut().zip(&mut m[..3]) {
                *a += *v;
            }
            st.step += 1;
            st.batch += 1;
            let [loss_sum, correct, seen] = st.accum;
            let ips = (seen - seen_before) / t0.elapsed().as_secs_f64();
            bar.update(b + 1, || {
                format!(
                    "loss {:.4} acc {:.2}% lr {lr:.4} {ips:.0} img/s",
                    loss_sum / seen,
                    100.0 * correct / seen
                )
            });
            if m[3] > 0.0 && (st.batch as usize) < steps_per_epoch {
                bar.finish();
                ending = Some(Ending::Stopped(save(&model, &st, &log_text, comm)?));
                break;
            }
        }
        if ending.is_some() {
            break;
        }
        bar.finish();
        let train_time = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = evaluate_on(&mut model, &test_loader, &mut x, &mut y, comm)?;
        st.last_acc = test_acc;
        st.best_acc = st.best_acc.max(test_acc);
        let [loss_sum, correct, seen] = st.accum;
        let rec = EpochRecord {
            epoch: epoch + 1,
            step: st.step as usize,
            lr,
            train_loss: loss_sum / seen,
            train_acc: 100.0 * correct / seen,
            test_loss,
            test_acc,
            epoch_time_s: t0.elapsed().as_secs_f64(),
            train_images_per_s: (seen - seen_before) / train_time,
        };
        if let Some(f) = log.as_mut() {
            log_line(f, &log_path, &mut log_text, &rec)?;
        }
        if mode != Mode::Quiet {
            eprintln!(
                "epoch {}/{}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | {:.1}s, {:.0} img/s",
                epoch + 1,
                cfg.epochs,
                rec.train_loss,
                rec.train_acc,
                test_loss,
                test_acc,
                rec.epoch_time_s,
                rec.train_images_per_s
            );
        }
        st.epoch += 1;
        st.batch = 0;
        st.accum = [0.0; 3];
        st.done = st.epoch as usize == cfg.epochs;
        // every rank agrees on stopping (a signal may reach the ranks at different times)
        let mut stop = [ctl.stop.requested() as u8 as f64];
        if ranks > 1 {
            comm.allreduce_sum_f64(Purpose::Control, &mut stop);
        }
        if st.done {
            ending = Some(Ending::Completed(save(&model, &st, &log_text, comm)?));
        } else if stop[0] > 0.0 {
            ending = Some(Ending::Stopped(save(&model, &st, &log_text, comm)?));
        } else if ctl.saver.due(st.epoch as usize) {
            save(&model, &st, &log_text, comm)?;
        }
    }
    let ending = match ending {
        Some(e) => e,
        // resumed from the final checkpoint of a finished run: nothing left to do
        None => Ending::Completed(ctl.resume.as_ref().map(|f| f.path.clone()).unwrap_or_default()),
    };
    if let Ending::Stopped(p) = &ending {
        if mode != Mode::Quiet {
            eprintln!(
                "loft {kind}: stopped by {} at epoch {} batch {}; checkpoint {}",
                ctl.stop.signal_name(),
                st.epoch + 1,
                st.batch,
                p.display()
            );
        }
    }
    let summary = TrainSummary {
        final_test_acc: st.last_acc,
        best_test_acc: st.best_acc,
        wall_s: wall.elapsed().as_secs_f64(),
        out: cfg.out.clone(),
        ending,
    };
    if lead && matches!(summary.ending, Ending::Completed(_)) {
        write_atomic(
            &cfg.out.join("summary.json"),
            serde_json::to_string_pretty(&summary).expect("json").as_bytes(),
        )?;
    }
    Ok(summary)
}

/// Mean loss and accuracy (%) of the model (running BN statistics) over the test shards of
/// all ranks, i.e. over the whole set.
pub fn evaluate_on(
    model: &mut Model<CpuBackend<f32>>,
    loader: &Loader<'_>,
    x: &mut [f32],
    y: &mut [u32],
    comm: &mut dyn Comm,
) -> Result<(f64, f64)> {
    let order = loader.order(0);
    let (mut loss, mut correct, mut seen) = (0.0, 0.0, 0.0);
    for b in 0..loader.batches_per_epoch() {
        let n = loader.fill(&order, 0, b, x, y);
        model.set_batch(n, x, y)?;
        let (l, c) = model.eval_step(n)?;
        loss += l;
        correct += c as f64;
        seen += n as f64;
    }
    let mut e = [loss, correct, seen];
    if comm.size() > 1 {
        comm.allreduce_sum_f64(Purpose::Metrics, &mut e);
    }
    Ok((e[0] / e[2].max(1.0), 100.0 * e[1] / e[2].max(1.0)))
}
