//! Dense training: the epoch loop, evaluation, the metric log and the run directory.
//!
//! A run directory holds `config.json` (the resolved configuration) and `metrics.jsonl` (one
//! JSON object per epoch). Fields ending in `_s` or `_per_s` are timings; everything else is
//! a deterministic function of the configuration, so two runs with the same seed write the
//! same log apart from those fields.

use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::data::{self, Augment, DatasetKind, Loader};
use crate::model::{ArchSpec, Graph, Model};
use crate::ops::Sgd;
use crate::progress::{Mode, Progress};
use crate::schedule::{Kind, Schedule};
use crate::{Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything a dense training run needs, resolved.
#[derive(Clone, Debug, Serialize)]
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

/// Train and evaluate; returns the summary. Writes the run directory as it goes.
pub fn run(cfg: &TrainConfig) -> Result<TrainSummary> {
    cfg.validate()?;
    prepare_out_dir(&cfg.out)?;
    let mode = Mode::parse(&cfg.progress)?;
    let wall = Instant::now();
    let split = load_for(
        &cfg.arch,
        &cfg.dataset,
        &cfg.data_dir,
        cfg.train_subset,
        cfg.test_subset,
    )?;
    let (train, test) = (&split.train, &split.test);
    let graph = Graph::build(&cfg.arch, train.height, train.width, None)?;
    let (shared, partitioned) = graph.param_counts();
    let be = Arc::new(CpuBackend::<f32>::new());
    let mut model = Model::new(be.clone(), graph, cfg.batch_size)?;
    model.init(cfg.seed)?;

    let (mean, std) = train.channel_stats();
    let train_loader = Loader::new(
        train,
        cfg.batch_size,
        mean.clone(),
        std.clone(),
        cfg.augment,
        true,
        false,
        cfg.seed,
        0,
    );
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
    );
    let steps_per_epoch = train_loader.batches_per_epoch();
    let sched = Schedule {
        base_lr: cfg.lr,
        kind: cfg.schedule.clone(),
        warmup_steps: (cfg.warmup_epochs * steps_per_epoch as f64).round() as usize,
        steps_per_epoch,
        total_steps: steps_per_epoch * cfg.epochs,
    };

    let resolved = serde_json::json!({
        "config": cfg,
        "device": be.name(),
        "threads": rayon::current_num_threads(),
        "params": { "shared": shared, "partitioned": partitioned, "total": shared + partitioned },
        "train_samples": train.len(),
        "test_samples": test.len(),
        "steps_per_epoch": steps_per_epoch,
        "normalisation": { "mean": &mean, "std": &std },
        "version": env!("CARGO_PKG_VERSION"),
    });
    write_atomic(
        &cfg.out.join("config.json"),
        serde_json::to_string_pretty(&resolved).expect("json").as_bytes(),
    )?;
    let log_path = cfg.out.join("metrics.jsonl");
    let mut log = std::fs::File::create(&log_path).map_err(|e| Error::io(&log_path, e))?;

    if mode != Mode::Quiet {
        eprintln!(
            "loft train: {} (base {}, inner x{}) {:.2}M params on {} ({} train / {} test), {}, {} epochs x {} steps",
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
    }
    let sample_len = train.image_len();
    let mut x = vec![0f32; cfg.batch_size * sample_len];
    let mut y = vec![0u32; cfg.batch_size];
    let mut step = 0;
    let mut best = 0.0f64;
    let mut last = 0.0f64;
    for epoch in 0..cfg.epochs {
        let t0 = Instant::now();
        let order = train_loader.order(epoch as u64);
        let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        let mut bar = Progress::new(mode, format!("epoch {}/{}", epoch + 1, cfg.epochs), steps_per_epoch);
        let mut lr = sched.lr(step);
        for b in 0..steps_per_epoch {
            let n = train_loader.fill(&order, epoch as u64, b, &mut x, &mut y);
            model.set_batch(n, &x, &y)?;
            lr = sched.lr(step);
            let hp = Sgd {
                lr: lr as f32,
                momentum: cfg.momentum as f32,
                weight_decay: cfg.weight_decay as f32,
            };
            let (l, c) = model.train_step(n, &hp)?;
            if !l.is_finite() {
                bar.finish();
                return Err(Error::config(format!(
                    "training diverged at epoch {} step {} (loss {l}); lower --lr or add --warmup-epochs",
                    epoch + 1,
                    b + 1
                )));
            }
            loss_sum += l;
            correct += c;
            seen += n;
            step += 1;
            let ips = seen as f64 / t0.elapsed().as_secs_f64();
            bar.update(b + 1, || {
                format!(
                    "loss {:.4} acc {:.2}% lr {lr:.4} {ips:.0} img/s",
                    loss_sum / seen as f64,
                    100.0 * correct as f64 / seen as f64
                )
            });
        }
        bar.finish();
        let train_time = t0.elapsed().as_secs_f64();
        let (test_loss, test_acc) = evaluate(&mut model, &test_loader, &mut x, &mut y)?;
        last = test_acc;
        best = best.max(test_acc);
        let rec = EpochRecord {
            epoch: epoch + 1,
            step,
            lr,
            train_loss: loss_sum / seen as f64,
            train_acc: 100.0 * correct as f64 / seen as f64,
            test_loss,
            test_acc,
            epoch_time_s: t0.elapsed().as_secs_f64(),
            train_images_per_s: seen as f64 / train_time,
        };
        writeln!(log, "{}", serde_json::to_string(&rec).expect("json")).map_err(|e| Error::io(&log_path, e))?;
        log.flush().map_err(|e| Error::io(&log_path, e))?;
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
    }
    let summary = TrainSummary {
        final_test_acc: last,
        best_test_acc: best,
        wall_s: wall.elapsed().as_secs_f64(),
        out: cfg.out.clone(),
    };
    write_atomic(
        &cfg.out.join("summary.json"),
        serde_json::to_string_pretty(&summary).expect("json").as_bytes(),
    )?;
    Ok(summary)
}

/// Mean loss and accuracy (%) over a loader's samples, with running BN statistics.
pub fn evaluate(
    model: &mut Model<CpuBackend<f32>>,
    loader: &Loader<'_>,
    x: &mut [f32],
    y: &mut [u32],
) -> Result<(f64, f64)> {
    let order = loader.order(0);
    let (mut loss, mut correct, mut seen) = (0.0, 0usize, 0usize);
    for b in 0..loader.batches_per_epoch() {
        let n = loader.fill(&order, 0, b, x, y);
        model.set_batch(n, x, y)?;
        let (l, c) = model.eval_step(n)?;
        loss += l;
        correct += c;
        seen += n;
    }
    Ok((loss / seen.max(1) as f64, 100.0 * correct as f64 / seen.max(1) as f64))
}
