//! The one training engine, generic over the backend: every method (dense, data-parallel,
//! LoFT's local rounds, fine-tuning) trains through [`Trainer::step`], evaluates through
//! [`Evaluation`], and checkpoints through [`checkpoint_of`] / [`restore`].
//!
//! What the engine refuses to do: touch parameter, gradient or statistics buffers on the host.
//! Between steps the only host transfers are the documented ones (see [`crate::backend`]):
//! the batch and its labels going in, two loss numbers coming out, collective payloads
//! ([`allreduce_mean`]), and checkpoints.
//!
//! The two drivers on top of it differ only in their outer loop: `train` runs epochs of one
//! model (replicated over ranks), `loft` runs rounds of narrow sub-networks and re-assembles.

mod eval;
mod stream;

pub use eval::Evaluation;
pub use stream::Stream;

use crate::backend::Backend;
use crate::checkpoint::{CheckpointOf, DataIdentity, Found, Kind, Method, Reference, Saver, State, TicketInfo};
use crate::comm::{Comm, Purpose};
use crate::data::{self, DatasetKind};
use crate::model::partition::Partition;
use crate::model::{ArchSpec, Model};
use crate::ops::Sgd;
use crate::stop::StopFlag;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Instant;

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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Ending {
    /// Every epoch or round ran; the final checkpoint.
    Completed(PathBuf),
    /// A signal stopped it; the checkpoint to resume from.
    Stopped(PathBuf),
}

/// Average `len` elements of a device buffer over the ranks of `comm`: the sum in rank order
/// (through the host: [`Backend::with_host_mut`]), then a scale by 1/S on the device.
pub fn allreduce_mean<B: Backend>(
    be: &B,
    comm: &mut dyn Comm,
    purpose: Purpose,
    buf: &mut B::Buf,
    len: usize,
) -> Result<()> {
    be.with_host_mut(buf, 0, len, |h| comm.allreduce_sum(purpose, h))?;
    be.scale(be.view_mut(buf, 0, len), 1.0 / comm.size() as f32);
    Ok(())
}

/// What one optimizer step saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    /// Sum of the per-sample losses, correct predictions and samples of the batch.
    pub loss: f64,
    pub correct: usize,
    pub samples: usize,
    /// Seconds spent in collectives (data-parallel averaging).
    pub comm_s: f64,
}

/// A model being trained with SGD on a data stream: the model with its optimizer state, the
/// stream and its position, the masks of a masked ticket, and, for data-parallel replicas,
/// the averaging that keeps them identical.
pub struct Trainer<'d, B: Backend> {
    pub model: Model<B>,
    pub stream: Stream<'d>,
    /// Masks of the parameters and the BN statistics (masked tickets).
    masks: Option<(B::Buf, B::Buf)>,
    /// Average gradients over the ranks of the communicator every step.
    replicated: bool,
    /// Also average the BN running statistics every step (else the caller does it).
    stats_every_step: bool,
    /// Batch norm over the global batch (synchronized batch norm) when data-parallel.
    sync_bn: bool,
}

impl<'d, B: Backend> Trainer<'d, B> {
    /// A trainer of `model` on `stream`, alone.
    pub fn new(model: Model<B>, stream: Stream<'d>) -> Self {
        Trainer {
            model,
            stream,
            masks: None,
            replicated: false,
            stats_every_step: false,
            sync_bn: false,
        }
    }

    /// Make this trainer one data-parallel replica: gradients are averaged over the ranks of
    /// the communicator every step, and with `stats_every_step` the BN running statistics too
    /// (they are linear in the batch statistics, so the replicas stay identical).
    pub fn data_parallel(mut self, stats_every_step: bool) -> Self {
        self.replicated = true;
        self.stats_every_step = stats_every_step;
        self
    }

    /// With data parallelism, normalise with the statistics of the global batch: every batch
    /// norm adds its per-channel sums over the ranks (three small allreduces per layer and
    /// step), so the step does not depend on how the batch is split over the ranks.
    pub fn synchronized_batchnorm(mut self) -> Self {
        self.sync_bn = true;
        self
    }

    /// Hold the values where the masks are 0 at zero after every step (masked tickets):
    /// parameters and momentum with `params`, BN statistics with `stats`.
    pub fn with_masks(mut self, params: &[f32], stats: &[f32]) -> Result<Self> {
        let be = self.model.be.clone();
        let mut p = be.alloc(params.len())?;
        let mut s = be.alloc(stats.len())?;
        be.upload(params, &mut p)?;
        be.upload(stats, &mut s)?;
        self.masks = Some((p, s));
        Ok(self)
    }

    /// Zero what the masks prune (parameters, momentum, statistics).
    pub fn apply_masks(&mut self) {
        let Some((mp, ms)) = &self.masks else { return };
        let m = &mut self.model;
        let be = &*m.be;
        let (np, ns) = (m.graph.params.total, m.graph.stats.total);
        be.apply_mask(be.view_mut(&mut m.params, 0, np), be.view(mp, 0, np));
        be.apply_mask(be.view_mut(&mut m.momentum, 0, np), be.view(mp, 0, np));
        be.apply_mask(be.view_mut(&mut m.stats, 0, ns), be.view(ms, 0, ns));
    }

    /// One SGD step on the next batch of the stream: forward, loss, backward, (averaging
    /// over replicas), update, (masks). Ends at the backend's checked point, so a device
    /// failure is an error here.
    pub fn step(&mut self, hp: &Sgd, comm: &mut dyn Comm) -> Result<StepStats> {
        let n = self.stream.next_into(&mut self.model)?;
        let m = &mut self.model;
        if self.replicated && self.sync_bn && comm.size() > 1 {
            // batch norm over the global batch: its sums go through an allreduce
            let mut sum = |v: &mut [f64]| comm.allreduce_sum_f64(Purpose::Gradients, v);
            m.forward_synced(n, true, Some(&mut sum));
            m.compute_loss(n, true);
            m.backward_synced(n, Some(&mut sum));
        } else {
            m.forward(n, true);
            m.compute_loss(n, true);
            m.backward(n);
        }
        let mut comm_s = 0.0;
        if self.replicated && comm.size() > 1 {
            let t = Instant::now();
            let be = m.be.clone();
            allreduce_mean(&*be, comm, Purpose::Gradients, &mut m.grads, m.graph.params.total)?;
            comm_s += t.elapsed().as_secs_f64();
        }
        m.sgd_step(hp);
        if self.replicated && self.stats_every_step && comm.size() > 1 {
            let t = Instant::now();
            let be = m.be.clone();
            allreduce_mean(&*be, comm, Purpose::Gradients, &mut m.stats, m.graph.stats.total)?;
            comm_s += t.elapsed().as_secs_f64();
        }
        self.apply_masks();
        let (loss, correct) = self.model.read_loss()?;
        self.model.be.sync()?;
        Ok(StepStats {
            loss,
            correct,
            samples: n,
            comm_s,
        })
    }
}

/// What a checkpoint records besides the model's buffers.
pub struct Record<'a> {
    pub kind: Kind,
    pub method: Method,
    /// The configuration as JSON.
    pub config: &'a str,
    pub state: State,
    pub seed: u64,
    pub partition: Option<Partition>,
    pub metrics_log: &'a str,
    pub ticket: Option<TicketInfo>,
    /// Pre-training: the filter distance's reference.
    pub reference: Option<Reference<'a>>,
}

/// The checkpoint of `model` (parameters, statistics and its momentum; zeros when the model
/// holds none), read from the device ([`Backend::read_host`]: borrowed on the CPU).
pub fn checkpoint_of<'m, B: Backend>(model: &'m Model<B>, r: Record<'m>) -> Result<CheckpointOf<'m>> {
    let be = &*model.be;
    let (np, ns) = (model.graph.params.total, model.graph.stats.total);
    let momentum = if be.buf_len(&model.momentum) == np {
        be.read_host(&model.momentum, 0, np)?
    } else {
        Cow::Owned(vec![0.0; np])
    };
    Ok(CheckpointOf {
        kind: r.kind,
        method: r.method,
        config: r.config.to_string(),
        state: r.state,
        seed: r.seed,
        params: be.read_host(&model.params, 0, np)?.into(),
        param_layout: model.graph.params.clone(),
        stats: be.read_host(&model.stats, 0, ns)?.into(),
        stat_layout: model.graph.stats.clone(),
        momentum: momentum.into(),
        data_position: Vec::new(),
        partition: r.partition,
        ledgers: Vec::new(),
        metrics_log: r.metrics_log.to_string(),
        ticket: r.ticket,
        reference: r.reference,
    })
}

/// Load a checkpoint's parameters, statistics and (when the model holds momentum) momentum
/// into `model`.
pub fn restore<B: Backend>(model: &mut Model<B>, c: &CheckpointOf<'_>) -> Result<()> {
    let held = model.be.buf_len(&model.momentum) > 0;
    model.load(&c.params, &c.stats, held.then_some(&c.momentum[..]))
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

/// What a run reads and where it writes: its run directory, network and data.
pub struct Inputs<'a> {
    pub out: &'a Path,
    pub arch: &'a ArchSpec,
    pub dataset: &'a DatasetKind,
    pub data_dir: &'a Path,
    /// Only the first N training / test samples (0 = all).
    pub train_subset: usize,
    pub test_subset: usize,
    /// Validation images held out of the training set before the subset (0 = none).
    pub val_size: usize,
}

/// The start of every run on a rank: on rank 0 (`lead`), create the run directory and the
/// checkpoint directory (so a bad path fails before any work); then, on every rank, load
/// the data and check that the network fits it. Returns the data and its identity.
pub fn start(ctl: &RunControl, lead: bool, inputs: Inputs<'_>) -> Result<(data::Split, DataIdentity)> {
    ctl.saver.validate()?;
    if lead {
        crate::rundir::prepare(inputs.out)?;
        ctl.saver.prepare()?;
    }
    let split = load_data(&inputs)?;
    let identity = DataIdentity::of(&split);
    Ok((split, identity))
}

/// Load the data set of `inputs` (the validation images held out, optionally only the first
/// samples of the rest) and check that the network fits it.
pub fn load_data(inputs: &Inputs<'_>) -> Result<data::Split> {
    let (arch, dataset) = (inputs.arch, inputs.dataset);
    let split =
        data::load(dataset, inputs.data_dir)?.carve(inputs.val_size, inputs.train_subset, inputs.test_subset)?;
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

/// An error for a loss that is no longer finite.
pub fn diverged(loss: f64, where_: &str, hint: &str) -> Error {
    Error::config(format!("training diverged {where_} (loss {loss}); {hint}"))
}
