//! HDF5 checkpoints: the whole state of a run, written atomically, read back with every check.
//!
//! One file per checkpoint, `step-NNNNNNNNN.h5` in the run directory's `checkpoints/`. The
//! layout of the file is documented in `docs/checkpoint-format.md`. Rank 0 writes the
//! replicated state (the assembled model after a sync); it first writes a hidden temporary
//! file in the same directory, closes and fsyncs it, then renames it over the final name, so
//! a crash or `kill -9` at any moment leaves the previous checkpoints intact.
//!
//! Random streams are counter-based (every stream is derived from the seed, a purpose and
//! integers such as epoch, rank and round, see [`crate::rng`]), so the random state of a run
//! is the seed plus each worker's position in its data stream.

mod file;
pub mod format;
mod store;

pub use file::{ledger_table, ledgers_from_table, USERBLOCK};
pub use store::{find, list, restore_ledger, save_across_ranks, Found, Saver};

use crate::comm::Ledger;
use crate::model::layout::Layout;
use crate::model::partition::Partition;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::Path;

/// Value of the root attribute `format`.
pub const FORMAT_NAME: &str = "loft-checkpoint";
/// Version of the layout this build writes; it reads this version and older.
pub const FORMAT_VERSION: u64 = 1;
/// Exit status of a run that stopped on SIGTERM / SIGUSR1 / SIGINT after writing a
/// checkpoint (EX_TEMPFAIL: try again, i.e. resume).
pub const EXIT_STOPPED: i32 = 75;

/// The data a run was trained on, to refuse a resume on different data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub train_samples: usize,
    pub test_samples: usize,
    /// Validation images held out of the training set.
    #[serde(default)]
    pub val_samples: usize,
    /// Per-channel mean and standard deviation of the training images.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl DataIdentity {
    /// The identity of a train / (validation) / test split.
    pub fn of(split: &crate::data::Split) -> Self {
        let (mean, std) = split.train.channel_stats();
        DataIdentity {
            train_samples: split.train.len(),
            test_samples: split.test.len(),
            val_samples: split.val.as_ref().map_or(0, |v| v.len()),
            mean,
            std,
        }
    }
}

/// Where a run stands, and the counters it carries (the `/state` dataset, as JSON).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Rounds completed (pre-training).
    pub round: u64,
    /// Epochs completed, and batches done of the epoch in progress (training).
    pub epoch: u64,
    pub batch: u64,
    /// Optimizer steps completed (per worker).
    pub step: u64,
    /// The run had completed when this checkpoint was written.
    pub done: bool,
    /// Workers of the run (LoFT sub-networks or data-parallel replicas).
    pub workers: usize,
    /// Sums of the epoch or round in progress: loss, correct predictions, samples.
    pub accum: [f64; 3],
    /// Best and latest test accuracy (%).
    pub best_acc: f64,
    pub last_acc: f64,
    /// Seconds spent so far (rank 0): computing, synchronizing, in total.
    pub compute_s: f64,
    pub sync_s: f64,
    pub wall_s: f64,
    pub data: DataIdentity,
    /// The latest recorded filter distances (D_idx), for the early stop.
    #[serde(default)]
    pub recent_distances: Vec<f64>,
    /// Training with validation images: the best validation accuracy (%), its epoch
    /// (1-based; 0 before the first evaluation) and that epoch's test accuracy.
    #[serde(default)]
    pub best_val_acc: f64,
    #[serde(default)]
    pub chosen_epoch: u64,
    #[serde(default)]
    pub chosen_test_acc: f64,
}

/// What wrote a checkpoint (the root attribute `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `loft train`.
    Train,
    /// `loft pretrain` (LoFT or dense).
    Pretrain,
    /// `loft finetune`.
    Finetune,
    /// `loft prune`: a ticket, not a run.
    Ticket,
}

impl Kind {
    /// The name stored in files and used by the command of the same name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Train => "train",
            Kind::Pretrain => "pretrain",
            Kind::Finetune => "finetune",
            Kind::Ticket => "ticket",
        }
    }

    /// Parse a stored name.
    pub fn parse(s: &str) -> Option<Kind> {
        [Kind::Train, Kind::Pretrain, Kind::Finetune, Kind::Ticket]
            .into_iter()
            .find(|k| k.name() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a model was (pre-)trained: LoFT's partitioned rounds or ordinary dense SGD.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Filter-wise partitioned rounds with re-assembly.
    Loft,
    /// The full model (data-parallel over ranks).
    Dense,
}

impl Method {
    /// The name stored in files and used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Loft => "loft",
            Method::Dense => "dense",
        }
    }
}

/// Compare with a stored name, as in `checkpoint.method == "loft"`.
impl PartialEq<&str> for Method {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// Compare with a stored name, as in `checkpoint.kind == "ticket"`.
impl PartialEq<&str> for Kind {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which filters a ticket keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Criterion {
    /// The largest conv1 row norms (the method).
    Largest,
    /// The smallest (ablation).
    Smallest,
    /// A uniformly random subset (ablation), drawn from the seed.
    Random,
}

impl Criterion {
    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Largest => "largest",
            Criterion::Smallest => "smallest",
            Criterion::Random => "random",
        }
    }
}

/// What a ticket remembers about its making (the `/ticket` group of its checkpoint).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TicketInfo {
    /// Pruning ratio p and criterion.
    pub ratio: f64,
    pub criterion: Criterion,
    /// The checkpoint it was pruned from.
    pub source: String,
    /// Full shapes with a mask (true), or a narrower network (false).
    pub masked: bool,
    /// Prunable blocks (name prefixes), their full inner widths, and the kept filters.
    pub blocks: Vec<String>,
    pub widths: Vec<usize>,
    pub kept: Vec<Vec<usize>>,
}

/// A flat f32 buffer of a checkpoint: borrowed from a model's buffer when a run writes it (no
/// copy on the CPU), owned when read from a file. Derefs to `[f32]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Values<'a>(pub Cow<'a, [f32]>);

impl std::ops::Deref for Values<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl<'b> IntoIterator for &'b Values<'_> {
    type Item = &'b f32;
    type IntoIter = std::slice::Iter<'b, f32>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Vec<f32>> for Values<'static> {
    fn from(v: Vec<f32>) -> Self {
        Values(Cow::Owned(v))
    }
}

impl<'a> From<Cow<'a, [f32]>> for Values<'a> {
    fn from(v: Cow<'a, [f32]>) -> Self {
        Values(v)
    }
}

/// The filter distance's reference in a pre-training checkpoint: `len` values (the
/// parameters' layout) that are zero except for `runs` (offset, values): the rows the distance
/// reads. A checkpoint read from a file holds it dense, as one run.
#[derive(Clone, Debug, PartialEq)]
pub struct Reference<'a> {
    pub len: usize,
    pub runs: Vec<(usize, Cow<'a, [f32]>)>,
}

impl Reference<'_> {
    /// All `len` values.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut v = vec![0.0f32; self.len];
        for (at, r) in &self.runs {
            v[*at..*at + r.len()].copy_from_slice(r);
        }
        v
    }
}

/// A checkpoint as read from a file (owning its buffers).
pub type Checkpoint = CheckpointOf<'static>;

/// Everything needed to continue a run exactly. The large buffers are borrowed when a run
/// writes a checkpoint straight from its model (no copy on the CPU) and owned when read.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointOf<'a> {
    pub kind: Kind,
    /// The pre-training method (tickets and fine-tuning runs: their source's; train: dense).
    pub method: Method,
    /// The resolved configuration, as JSON.
    pub config: String,
    pub state: State,
    pub seed: u64,
    /// Flat parameters, BN running statistics and SGD momentum, with their layouts.
    pub params: Values<'a>,
    pub param_layout: Layout,
    pub stats: Values<'a>,
    pub stat_layout: Layout,
    pub momentum: Values<'a>,
    /// Batches drawn so far from each worker's data stream.
    pub data_position: Vec<u64>,
    /// The partition of the last completed LoFT round.
    pub partition: Option<Partition>,
    /// Every rank's ledger (one entry on a single process).
    pub ledgers: Vec<Ledger>,
    /// `metrics.jsonl` up to this point.
    pub metrics_log: String,
    /// Tickets and their fine-tuning runs: how the ticket was pruned.
    pub ticket: Option<TicketInfo>,
    /// Pre-training with distance records: the parameters at the last record.
    pub reference: Option<Reference<'a>>,
}

impl CheckpointOf<'_> {
    /// Check that this checkpoint continues a run of this network (same layouts), on the
    /// same data, with the same number of workers.
    pub fn check_fits(
        &self,
        path: &Path,
        params: &Layout,
        stats: &Layout,
        data: &DataIdentity,
        workers: usize,
    ) -> Result<()> {
        self.check_network(path, params, stats)?;
        self.check_data_and_workers(path, data, workers)
    }

    /// Check that this checkpoint holds the network with these layouts.
    pub fn check_network(&self, path: &Path, params: &Layout, stats: &Layout) -> Result<()> {
        for (mine, theirs, what) in [
            (&self.param_layout, params, "parameters"),
            (&self.stat_layout, stats, "BN statistics"),
        ] {
            if mine == theirs {
                continue;
            }
            let diff = mine
                .entries
                .iter()
                .zip(&theirs.entries)
                .find(|(a, b)| a != b)
                .map(|(a, b)| format!("'{}' {:?} there, '{}' {:?} here", a.name, a.shape, b.name, b.shape))
                .unwrap_or_else(|| format!("{} tensors there, {} here", mine.entries.len(), theirs.entries.len()));
            return Err(Error::format(
                path,
                format!("the checkpoint holds a different network ({what}: {diff}); resume with its architecture or start a new run"),
            ));
        }
        Ok(())
    }

    /// Check that this checkpoint was written by a run on `data` with `workers` workers.
    pub fn check_data_and_workers(&self, path: &Path, data: &DataIdentity, workers: usize) -> Result<()> {
        let d = &self.state.data;
        if d != data {
            return Err(Error::format(
                path,
                format!(
                    "the checkpoint was trained on other data ({} train / {} test samples, channel means {:?}; now {} / {}, {:?})",
                    d.train_samples, d.test_samples, d.mean, data.train_samples, data.test_samples, data.mean
                ),
            ));
        }
        if self.state.workers != workers {
            return Err(Error::format(
                path,
                format!(
                    "the checkpoint was written by a run of {} worker(s); resume it with {} (mpirun -np {} or --simulate-workers {})",
                    self.state.workers, self.state.workers, self.state.workers, self.state.workers
                ),
            ));
        }
        Ok(())
    }

    /// The resolved configuration, as a typed value.
    pub fn config_as<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Result<T> {
        serde_json::from_str(&self.config).map_err(|e| {
            Error::format(
                path,
                format!("its configuration does not fit this loft's {} command: {e}", self.kind),
            )
        })
    }
}
