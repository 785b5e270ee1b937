//! `loft evaluate`: a checkpoint or ticket on its test (or training) set: loss, top-1 and
//! top-5 accuracy, per-class accuracy and a confusion matrix (table, JSON, PNG).
//!
//! The network, the data set, the test subset and the input normalisation come from the
//! checkpoint, so the loss and top-1 accuracy are the ones its training log printed for it
//! (for runs that evaluate with the BN statistics they train with: dense training and
//! fine-tuning; LoFT pre-training re-estimates the statistics before its evaluations).
//! Under mpirun every rank evaluates a shard and the counts are summed.

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::comm::{Comm, Purpose};
use crate::data::{self, Augment, DatasetKind, Loader};
use crate::model::{ArchSpec, Graph, Model};
use crate::ticket::prune;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Which half of the data set to evaluate on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// The held-out test set (the checkpoint's test subset, if it used one).
    Test,
    /// The training set (the checkpoint's training subset, if it used one).
    Train,
    /// The validation images the checkpoint's run held out of the training set.
    Val,
}

impl Split {
    /// "test", "training" or "validation".
    pub fn noun(self) -> &'static str {
        match self {
            Split::Test => "test",
            Split::Train => "training",
            Split::Val => "validation",
        }
    }
}

/// What to evaluate and how.
pub struct Request {
    pub checkpoint: PathBuf,
    pub split: Split,
    /// Where the data set is, if not where the checkpoint's run read it.
    pub data_dir: Option<PathBuf>,
    pub batch: usize,
}

/// The parts of a checkpoint's configuration evaluation needs.
#[derive(Deserialize)]
struct Config {
    arch: ArchSpec,
    dataset: DatasetKind,
    #[serde(default)]
    data_dir: PathBuf,
    #[serde(default)]
    train_subset: usize,
    #[serde(default)]
    test_subset: usize,
    #[serde(default)]
    val_size: usize,
}

/// Accuracy on one class.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClassAccuracy {
    pub class: usize,
    pub samples: u64,
    pub correct: u64,
    pub accuracy: f64,
}

/// The numbers `loft evaluate` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluated {
    pub checkpoint: String,
    pub kind: String,
    pub dataset: String,
    pub split: Split,
    pub samples: u64,
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 and top-5 accuracy, percent.
    pub top1: f64,
    pub top5: f64,
    pub per_class: Vec<ClassAccuracy>,
    /// `confusion[true][predicted]`: sample counts.
    pub confusion: Vec<Vec<u64>>,
    pub backend: String,
}

/// The network of a checkpoint on h x w inputs (a ticket's narrow network, or its masked
/// full one).
fn graph_of(c: &Checkpoint, arch: &ArchSpec, h: usize, w: usize) -> Result<Graph> {
    match &c.ticket {
        Some(info) => Ok(prune::ticket_graphs(arch, h, w, info)?.2),
        None => Graph::build(arch, h, w, None),
    }
}

/// Evaluate on this rank's shard and sum over the ranks (every rank gets the result).
pub fn run<B: Backend>(req: &Request, comm: &mut dyn Comm, be: Arc<B>) -> Result<Evaluated> {
    if req.batch == 0 {
        return Err(Error::config("--batch-size must be at least 1"));
    }
    let c = Checkpoint::read(&req.checkpoint)?;
    let cfg: Config = serde_json::from_str(&c.config).map_err(|e| {
        Error::format(
            &req.checkpoint,
            format!("configuration without a network or data set: {e}"),
        )
    })?;
    let dir = req.data_dir.clone().unwrap_or_else(|| cfg.data_dir.clone());
    let split = data::load(&cfg.dataset, &dir)?.carve(cfg.val_size, cfg.train_subset, cfg.test_subset)?;
    let set = match req.split {
        Split::Test => &split.test,
        Split::Train => &split.train,
        Split::Val => split.val.as_ref().ok_or_else(|| {
            Error::format(
                &req.checkpoint,
                "its run held no validation images out of the training set (it ran with --val-size 0)",
            )
        })?,
    };
    let graph = graph_of(&c, &cfg.arch, set.height, set.width)?;
    let classes = cfg.arch.classes;
    let mut model = Model::for_evaluation(be.clone(), graph, req.batch, false)?;
    model.load(&c.params, &c.stats, None)?;
    // its own activation buffers (no training model to borrow from), shared along the walk
    let loan = model.borrow_buffers(None)?;
    let (mean, std) = (c.state.data.mean.clone(), c.state.data.std.clone());
    if mean.len() != set.channels {
        return Err(Error::format(
            &req.checkpoint,
            "its input normalisation does not fit the data set",
        ));
    }
    let loader = Loader::new(set, req.batch, mean, std, Augment::none(), false, false, 0, 0)
        .with_shard(comm.rank(), comm.size());
    // counts: loss sum, top-1, top-5, samples, then the confusion matrix
    let mut counts = vec![0.0f64; 4 + classes * classes];
    let (mut x, mut y) = (vec![0f32; req.batch * set.image_len()], vec![0u32; req.batch]);
    let order = loader.order(0);
    for b in 0..loader.batches_per_epoch() {
        let n = loader.fill(&order, 0, b, &mut x, &mut y)?;
        model.set_batch(n, &x, &y)?;
        let (loss, correct) = model.eval_step(n)?;
        let logits = model.logits_host(n)?;
        counts[0] += loss;
        counts[1] += correct as f64;
        counts[3] += n as f64;
        for (i, row) in logits.chunks_exact(classes).enumerate() {
            let label = y[i] as usize;
            let (top5, predicted) = rank_of(row, label);
            counts[2] += f64::from(u8::from(top5 < 5));
            counts[4 + label * classes + predicted] += 1.0;
        }
    }
    be.sync()?;
    model.return_buffers(None, loan);
    if comm.size() > 1 {
        comm.allreduce_sum_f64(Purpose::Metrics, &mut counts);
    }
    Ok(summarise(req, &c, &cfg, &counts, classes, be.name()))
}

/// (how many classes score above the label's, the first class with the highest score).
fn rank_of(row: &[f32], label: usize) -> (usize, usize) {
    let above = row.iter().filter(|&&v| v > row[label]).count();
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    (above, best)
}

fn summarise(
    req: &Request,
    c: &Checkpoint,
    cfg: &Config,
    counts: &[f64],
    classes: usize,
    backend: String,
) -> Evaluated {
    let samples = counts[3].max(1.0);
    let confusion: Vec<Vec<u64>> = (0..classes)
        .map(|t| (0..classes).map(|p| counts[4 + t * classes + p] as u64).collect())
        .collect();
    let per_class = confusion
        .iter()
        .enumerate()
        .map(|(class, row)| {
            let n: u64 = row.iter().sum();
            ClassAccuracy {
                class,
                samples: n,
                correct: row[class],
                accuracy: 100.0 * row[class] as f64 / n.max(1) as f64,
            }
        })
        .collect();
    Evaluated {
        checkpoint: req.checkpoint.display().to_string(),
        kind: c.kind.name().to_string(),
        dataset: cfg.dataset.name().to_string(),
        split: req.split,
        samples: counts[3] as u64,
        loss: counts[0] / samples,
        top1: 100.0 * counts[1] / samples,
        top5: 100.0 * counts[2] / samples,
        per_class,
        confusion,
        backend,
    }
}

/// The text report: totals, then per-class accuracy.
pub fn table(e: &Evaluated) -> String {
    let mut s = format!(
        "{} ({} checkpoint) on the {} set of {} ({} samples, {}):\n  loss {:.4}  top-1 {:.2}%  top-5 {:.2}%\n\n| class | samples | correct | accuracy |\n|---:|---:|---:|---:|\n",
        e.checkpoint,
        e.kind,
        e.split.noun(),
        e.dataset,
        e.samples,
        e.backend,
        e.loss,
        e.top1,
        e.top5
    );
    for c in e.per_class.iter().filter(|c| c.samples > 0) {
        s.push_str(&format!(
            "| {} | {} | {} | {:.2}% |\n",
            c.class, c.samples, c.correct, c.accuracy
        ));
    }
    s
}

/// Draw the confusion matrix (rows: true class, columns: predicted; shade: share of the row).
pub fn confusion_png(e: &Evaluated, path: &Path) -> Result<()> {
    crate::experiment::report::plots::confusion(&e.confusion, &format!("{} ({} set)", e.dataset, e.split.noun()), path)
}
