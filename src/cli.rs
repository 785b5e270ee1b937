//! The command-line interface: clap definitions and their translation into configurations.

use crate::backend::Device;
use crate::checkpoint::{Criterion, Kind, Method};
use crate::data::{self, Augment, DatasetKind};
use crate::engine::{Ending, RunControl};
use crate::model::{ArchSpec, Graph, Stem};
use crate::progress::Style;
use crate::schedule::{self, Schedule};
use crate::train::TrainConfig;
use crate::{Error, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// The paper's pre-training learning rate (constant; its released script).
pub const PAPER_LR: f64 = 0.1;

/// loft: LoFT filter-wise pre-training and lottery tickets for residual networks.
#[derive(Parser, Debug)]
#[command(name = "loft", version, about, long_about = None)]
pub struct Cli {
    /// Worker threads (0 = all cores).
    #[arg(long, global = true, default_value_t = 0)]
    pub threads: usize,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a network densely (ordinary SGD) and evaluate it every epoch.
    Train(Box<TrainArgs>),
    /// Print the layer table and the shared / partitioned parameter counts of an architecture.
    Info(InfoArgs),
    /// Measure SGEMM, per-layer convolution and training-step speed (Markdown on stdout).
    Bench(BenchArgs),
    /// Pre-train with LoFT (or the dense baseline) across the ranks of an MPI job.
    Pretrain(Box<PretrainArgs>),
    /// Communication volumes: the paper's accounting, what loft moves, data-parallel, GPipe.
    Comm(CommArgs),
    /// Check a checkpoint and print its metadata, layout and per-tensor norms.
    Inspect(InspectArgs),
    /// Filter distance between two checkpoints of one network (D_idx and D_w, per block).
    Distance(DistanceArgs),
    /// Prune a pre-trained checkpoint into a ticket (narrow network, or masked full network).
    Prune(PruneArgs),
    /// Fine-tune a ticket (data-parallel over the ranks under mpirun); best and final accuracy.
    Finetune(Box<FinetuneArgs>),
    /// The main job: dense and LoFT pre-training (S = ranks), tickets at every ratio,
    /// fine-tuning, and a report with tables and plots.
    Run(Box<RunArgs>),
    /// Compile every CUDA kernel with NVRTC (no GPU needed) and print registers, shared
    /// memory and spills per kernel and architecture.
    Kernels(KernelsArgs),
    /// Evaluate a checkpoint or ticket: loss, top-1 / top-5 and per-class accuracy, confusion
    /// matrix (sharded over the ranks under mpirun).
    Evaluate(EvaluateArgs),
    /// Theorem 1 shown: LoFT against full-batch GD on a one-hidden-layer CNN as the width
    /// grows (table, slope with its confidence interval, plots).
    Theory(TheoryArgs),
    /// Write a checkpoint or ticket as safetensors under PyTorch state_dict names, with the
    /// architecture in the metadata (docs/pytorch.md builds the network from it).
    Export(ExportArgs),
}

/// `loft theory`.
#[derive(Args, Debug)]
pub struct TheoryArgs {
    /// Widths m = 2^LO .. 2^HI.
    #[arg(long, default_value = "8..14")]
    pub widths: String,
    /// Seeds per width.
    #[arg(long, default_value_t = 3)]
    pub seeds: u64,
    /// Numbers of LoFT workers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub workers: Vec<usize>,
    /// Local GD steps per LoFT round.
    #[arg(long, default_value_t = 4)]
    pub local_steps: usize,
    /// Full-batch GD steps T.
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Step size (stable here up to about 0.03; the LoFT workers take lr / S).
    #[arg(long, default_value_t = 0.01)]
    pub lr: f32,
    /// Fashion-MNIST training images used.
    #[arg(long, default_value_t = 64)]
    pub samples: usize,
    /// Fashion-MNIST directory.
    #[arg(long, default_value = "/usr/share/datasets/fashion-mnist")]
    pub data_dir: PathBuf,
    /// Output directory.
    #[arg(long, default_value = "runs/theory")]
    pub out: PathBuf,
    /// Progress on stderr.
    #[arg(long, value_enum, default_value_t = crate::progress::Style::Lines)]
    pub progress: crate::progress::Style,
}

impl TheoryArgs {
    /// The resolved sweep.
    pub fn config(&self) -> Result<crate::theory::TheoryConfig> {
        let bad = || Error::config(format!("--widths {}: expected LO..HI, e.g. 8..14", self.widths));
        let (lo, hi) = self.widths.split_once("..").ok_or_else(bad)?;
        let (lo, hi) = (
            lo.trim().parse().map_err(|_| bad())?,
            hi.trim().parse().map_err(|_| bad())?,
        );
        Ok(crate::theory::TheoryConfig {
            log2_widths: (lo, hi),
            seeds: self.seeds,
            workers: self.workers.clone(),
            local_steps: self.local_steps,
            steps: self.steps,
            lr: self.lr,
            samples: self.samples,
            data_dir: self.data_dir.clone(),
            out: self.out.clone(),
        })
    }
}

/// `loft evaluate`.
#[derive(Args, Debug)]
pub struct EvaluateArgs {
    /// The checkpoint or ticket (.h5).
    pub file: PathBuf,
    /// Which half of the data set.
    #[arg(long, value_enum, default_value_t = crate::evaluate::Split::Test)]
    pub split: crate::evaluate::Split,
    /// Directory of the data files [default: where the checkpoint's run read them].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Samples per batch.
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the confusion matrix into this PNG file.
    #[arg(long)]
    pub confusion: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// `loft export`.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The checkpoint or ticket (.h5).
    pub file: PathBuf,
    /// The safetensors file to write.
    #[arg(long, default_value = "model.safetensors")]
    pub out: PathBuf,
}

/// `loft kernels`.
#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// GPU architectures to compile for, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
    pub arch: Vec<String>,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
}

/// `loft run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    /// Pre-training rounds (both methods see rounds x local steps x batch x S samples).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// SGD steps per round on every worker.
    #[arg(long, default_value_t = 16)]
    pub local_steps: usize,
    /// Mini-batch size per worker in pre-training (the paper's), and the global batch of
    /// fine-tuning (split evenly over the ranks, so every rank count fine-tunes alike).
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Pre-training learning rate (the paper's recipe: 0.1, constant).
    #[arg(long, default_value_t = PAPER_LR)]
    pub lr: f64,
    /// Pre-training learning-rate schedule (the paper's: constant; the ticket is read from a
    /// model still moving).
    #[arg(long, value_enum, default_value_t = schedule::Name::Constant)]
    pub schedule: schedule::Name,
    /// Rounds of linear warmup of the pre-training rate (fractions allowed).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_rounds: f64,
    /// Pruning ratios of the tickets, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.3,0.5,0.8")]
    pub ratios: Vec<f64>,
    /// A pre-training checkpoint every N rounds: the points of the distance curves
    /// [default: rounds / 10].
    #[arg(long)]
    pub record_every: Option<usize>,
    /// Pruning ratio of the filter distances.
    #[arg(long, default_value_t = 0.5)]
    pub distance_ratio: f64,
    /// Fine-tuning epochs (lr /10 after 1/3, 2/3 and 8/9 of them).
    #[arg(long, default_value_t = 90)]
    pub finetune_epochs: usize,
    /// Fine-tuning learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub finetune_lr: f64,
    /// Which filters the tickets keep: the largest conv1 row norms (the paper), or the
    /// smallest (what the released code does).
    #[arg(long, value_enum, default_value_t = Criterion::Largest)]
    pub criterion: Criterion,
    /// Leave the first block of every stage unpruned (the released code); by default every
    /// block without a projection is pruned (the paper).
    #[arg(long)]
    pub keep_first_blocks: bool,
    /// Do not fine-tune the control tickets: at each ratio a random ticket of the same
    /// per-block sizes from the dense model, which tells a ticket from any subnetwork.
    #[arg(long)]
    pub no_random_control: bool,
    /// Seeds: the whole job once per seed (in <out>/seed-N when more than one), then a
    /// report over the seeds (mean, std and every value).
    #[arg(long, visible_alias = "seed", value_delimiter = ',', default_value = "1")]
    pub seeds: Vec<u64>,
    /// Job directory (one run directory per phase, the report, the plots).
    #[arg(long, default_value = "runs/loft-run")]
    pub out: PathBuf,
    /// Progress output (rank 0 only).
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    pub progress: Style,
    #[command(flatten)]
    pub device: DeviceArg,
}

impl RunArgs {
    /// The resolved main job.
    pub fn job(&self) -> Result<crate::experiment::MainJob> {
        let (dataset, data_dir) = self.data.resolve()?;
        let arch = self.model.spec_for(&dataset)?;
        let seed0 = *self
            .seeds
            .first()
            .ok_or_else(|| Error::config("--seeds needs at least one seed"))?;
        let val_size = match self.data.val_size {
            Some(n) => n,
            None => crate::experiment::default_val_size(data::load(&dataset, &data_dir)?.train.len()),
        };
        let pretrain = crate::loft::PretrainConfig {
            method: crate::loft::Method::Loft,
            arch: arch.clone(),
            data_dir: data_dir.clone(),
            augment: dataset.default_augment(),
            dataset: dataset.clone(),
            train_subset: self.data.train_subset,
            test_subset: self.data.test_subset,
            val_size,
            rounds: self.rounds,
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: Schedule::kind_of(self.schedule, &[], 0.1)?,
            warmup_rounds: self.warmup_rounds,
            reset_momentum: false,
            keep_momentum: false,
            seed: seed0,
            eval_every: self.record_every.unwrap_or((self.rounds / 10).max(1)),
            simulate: 0,
            verify: false,
            bn_recalibrate: 50,
            out: self.out.clone(),
            progress: self.progress,
            distance_every: self.record_every.unwrap_or((self.rounds / 10).max(1)),
            distance_ratio: self.distance_ratio,
            early_stop: None,
            device: self.device.device,
        };
        let e = self.finetune_epochs;
        let milestones = crate::schedule::paper_milestones(e);
        let finetune = TrainConfig {
            arch,
            dataset: dataset.clone(),
            data_dir,
            train_subset: self.data.train_subset,
            test_subset: self.data.test_subset,
            val_size,
            epochs: e,
            batch_size: self.batch_size,
            lr: self.finetune_lr,
            momentum: 0.9,
            weight_decay: 5e-4,
            schedule: crate::schedule::Kind::Step { milestones, gamma: 0.1 },
            warmup_epochs: 0.0,
            augment: dataset.default_augment(),
            seed: seed0,
            out: self.out.clone(),
            progress: self.progress,
            ticket: None,
            device: self.device.device,
        };
        let job = crate::experiment::MainJob {
            pretrain,
            finetune,
            ratios: self.ratios.clone(),
            seeds: self.seeds.clone(),
            random_control: !self.no_random_control,
            criterion: self.criterion,
            keep_first_blocks: self.keep_first_blocks,
            record_every: self.record_every.unwrap_or((self.rounds / 10).max(1)),
            out: self.out.clone(),
            progress: self.progress,
        };
        job.validate()?;
        Ok(job)
    }
}

/// `loft prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// The pre-trained checkpoint (from loft train or loft pretrain).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Pruning ratio p in [0, 1): every prunable block keeps floor((1-p) wC) inner filters.
    #[arg(long)]
    pub ratio: f64,
    /// Which filters to keep: the largest conv1 row norms, or (ablations) the smallest or a
    /// random subset.
    #[arg(long, value_enum, default_value_t = Criterion::Largest)]
    pub criterion: Criterion,
    /// Keep the full shapes and hold the pruned filters at zero with a mask.
    #[arg(long)]
    pub masked: bool,
    /// Leave the first block of every stage unpruned (the released code); by default every
    /// block without a projection is pruned (the paper).
    #[arg(long)]
    pub keep_first_blocks: bool,
    /// Seed of --criterion random.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The ticket file to write.
    #[arg(long, default_value = "runs/ticket.h5")]
    pub out: PathBuf,
}

/// `loft finetune`.
#[derive(Args, Debug)]
pub struct FinetuneArgs {
    /// The ticket (from loft prune).
    #[arg(long)]
    pub ticket: Option<PathBuf>,
    /// Epochs.
    #[arg(long, default_value_t = 90)]
    pub epochs: usize,
    /// Epochs after which the rate is multiplied by --gamma [default: 30, 60 and 80 of 90,
    /// scaled to --epochs].
    #[arg(long, value_delimiter = ',')]
    pub milestones: Option<Vec<usize>>,
    /// Factor of the step schedule.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// The global batch, split evenly over the ranks (the same recipe on any rank count).
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Directory of the data files [default: the pre-training run's].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Train on the first N training samples only [default: the pre-training run's].
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// Evaluate on the first N test samples only [default: the pre-training run's].
    #[arg(long)]
    pub test_subset: Option<usize>,
    /// Validation images held out of the training set [default: the pre-training run's].
    #[arg(long, value_name = "N")]
    pub val_size: Option<usize>,
    /// Seed of the data order and augmentation.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run directory.
    #[arg(long, default_value = "runs/finetune")]
    pub out: PathBuf,
    /// Progress output.
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    pub progress: Style,
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

/// `loft distance`.
#[derive(Args, Debug)]
pub struct DistanceArgs {
    /// Checkpoint A.
    pub a: PathBuf,
    /// Checkpoint B (the reference: its kept filters define the rows compared).
    pub b: PathBuf,
    /// Pruning ratio p in [0, 1): each prunable block keeps floor((1-p) wC) filters.
    #[arg(long, default_value_t = 0.5)]
    pub ratio: f64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `loft inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The checkpoint file (.h5).
    pub file: PathBuf,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `loft pretrain`.
#[derive(Args, Debug)]
pub struct PretrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    /// loft (filter-wise partitioned rounds) or dense (full model; data-parallel over ranks).
    #[arg(long, value_enum, default_value_t = Method::Loft)]
    pub method: Method,
    /// Rounds (each: local steps, then re-assembly).
    #[arg(long, default_value_t = 50)]
    pub rounds: usize,
    /// SGD steps per round on every worker.
    #[arg(long, default_value_t = 16)]
    pub local_steps: usize,
    /// Rounds of linear warmup.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub warmup_rounds: f64,
    /// Dense only: zero the momentum every --local-steps steps, like LoFT's fresh optimizer.
    #[arg(long)]
    pub reset_momentum: bool,
    /// LoFT only: keep each filter's momentum across rounds instead of a fresh optimizer
    /// (the momentum travels with its filter at sync).
    #[arg(long)]
    pub keep_momentum: bool,
    /// Evaluate the assembled model every N rounds (and after the last).
    #[arg(long, default_value_t = 10)]
    pub eval_every: usize,
    /// Simulate N LoFT workers one after another in this process (no MPI needed).
    #[arg(long, default_value_t = 0)]
    pub simulate_workers: usize,
    /// After every sync, check that all ranks hold bit-identical parameters (costs one hash).
    #[arg(long)]
    pub verify: bool,
    /// Re-estimate BN running statistics with N training batches before each evaluation
    /// (evaluation only) [default: 50 for loft, 0 for dense].
    #[arg(long)]
    pub bn_recalibrate: Option<usize>,
    /// Record the filter distance to the previous recorded point every N rounds (0: never).
    #[arg(long, default_value_t = 1)]
    pub distance_every: usize,
    /// Pruning ratio p of the recorded filter distances.
    #[arg(long, default_value_t = 0.5)]
    pub distance_ratio: f64,
    /// End pre-training once the last 4 recorded index distances are all <= EPS (in the
    /// style of Early-Bird's rule, whose threshold is 0.1; the LoFT paper gives none).
    #[arg(long, value_name = "EPS")]
    pub early_stop: Option<f64>,
    /// Seed of every random stream.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run directory.
    #[arg(long, default_value = "runs/pretrain")]
    pub out: PathBuf,
    /// Progress output (rank 0 only).
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    pub progress: Style,
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

/// Flags of checkpointing and resuming.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Continue a run exactly: a checkpoint file, a checkpoints/ directory or a run directory
    /// (its newest valid checkpoint). The configuration comes from the checkpoint; flags given
    /// with --resume must agree with it, except --out, --data-dir, --progress, --verify,
    /// --simulate-workers and --device.
    #[arg(long, value_name = "PATH")]
    pub resume: Option<PathBuf>,
    /// Write a checkpoint every N epochs (train) or rounds (pretrain), and always at the end
    /// and on SIGTERM / SIGUSR1 / SIGINT; 0: only those [default: 1 epoch, 10 rounds].
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Keep the newest K checkpoints in <out>/checkpoints.
    #[arg(long, value_name = "K", default_value_t = 3)]
    pub keep: usize,
}

impl CheckpointArgs {
    /// The run control for a run writing into `out`; checkpoints every `default_every` unless
    /// --checkpoint-every says otherwise. Installs the stop-signal handlers.
    pub fn control(&self, out: &std::path::Path, default_every: usize) -> Result<RunControl> {
        let mut ctl = RunControl::new(out, self.checkpoint_every.unwrap_or(default_every), self.keep);
        ctl.saver.validate()?;
        ctl.stop = crate::stop::StopFlag::install()?;
        Ok(ctl)
    }

    /// The checkpoint to resume from, if --resume was given.
    pub fn found(&self) -> Result<Option<crate::checkpoint::Found>> {
        self.resume.as_deref().map(crate::checkpoint::find).transpose()
    }
}

/// `loft comm`.
#[derive(Args, Debug)]
pub struct CommArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    pub in_channels: usize,
    /// Input height and width [default: 32, or 224 with --stem imagenet].
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Workers S.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// LoFT rounds R.
    #[arg(long, default_value_t = 250)]
    pub rounds: usize,
    /// Local steps per round (samples = rounds x local steps x batch x S).
    #[arg(long, default_value_t = 16)]
    pub local_steps: usize,
    /// Samples seen by GPipe and data-parallel training [default: rounds x local steps x
    /// batch x S, the samples of the LoFT run].
    #[arg(long)]
    pub samples: Option<u64>,
    /// Batch size per worker.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// GPipe cuts, comma-separated: after a stage (1, 2, 3) or after a block (s1.b0, the
    /// block's output) [default: an even split of the 4 stages].
    #[arg(long, value_delimiter = ',')]
    pub cuts: Option<Vec<String>>,
    /// Print the paper's LoFT figures (PreResNet/ResNet-34x2 CIFAR, PreResNet-18x2 ImageNet).
    #[arg(long)]
    pub paper: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl CommArgs {
    /// The question `loft comm` answers.
    pub fn query(&self) -> Result<crate::comm::report::Query> {
        let stem = self.model.stem_for(None);
        let default_size = if stem == Stem::Imagenet { 224 } else { 32 };
        Ok(crate::comm::report::Query {
            spec: self.model.spec(self.in_channels, 10, stem)?,
            input_size: self.input_size.unwrap_or(default_size),
            workers: self.workers,
            rounds: self.rounds,
            local_steps: self.local_steps,
            batch_size: self.batch_size,
            samples: self.samples,
            cuts: self
                .cuts
                .as_ref()
                .map(|v| v.iter().map(|c| c.parse()).collect::<Result<Vec<_>>>())
                .transpose()?,
            paper: self.paper,
            json: self.json,
        })
    }
}

/// Flags that define the network.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Architecture: preresnet18, preresnet34, resnet18, resnet34.
    #[arg(long, default_value = "preresnet18")]
    pub arch: String,
    /// Planes of the first stage (stages use 1x, 2x, 4x, 8x).
    #[arg(long, default_value_t = 64)]
    pub base_width: usize,
    /// Inner width factor w of the residual blocks (C -> wC -> C).
    #[arg(long, default_value_t = 2)]
    pub inner_width: usize,
    /// Input stem: cifar (3x3 conv) or imagenet (7x7 stride-2 conv + max pool) [default:
    /// imagenet with --dataset imagenet, else cifar].
    #[arg(long, value_enum)]
    pub stem: Option<Stem>,
    /// Number of classes [default: the data set's].
    #[arg(long)]
    pub classes: Option<usize>,
    /// Stages (1-4) whose blocks LoFT partitions, comma-separated.
    #[arg(long, default_value = "2,3,4", value_delimiter = ',')]
    pub partitioned_stages: Vec<usize>,
}

impl ModelArgs {
    /// The stem asked for, else the data set's.
    pub fn stem_for(&self, dataset: Option<&DatasetKind>) -> Stem {
        self.stem.unwrap_or(match dataset {
            Some(DatasetKind::Imagenet) => Stem::Imagenet,
            _ => Stem::Cifar,
        })
    }

    /// The architecture for `dataset`'s inputs and classes (`--classes` and `--stem`
    /// override them).
    pub fn spec_for(&self, dataset: &DatasetKind) -> Result<ArchSpec> {
        let (c, _, _, classes) = dataset.shape();
        self.spec(c, classes, self.stem_for(Some(dataset)))
    }

    /// The architecture for inputs with `in_channels` channels and `default_classes` classes.
    pub fn spec(&self, in_channels: usize, default_classes: usize, default_stem: Stem) -> Result<ArchSpec> {
        let mut s = ArchSpec::named(&self.arch)?;
        s.base_width = self.base_width;
        s.inner_width = self.inner_width;
        s.stem = self.stem.unwrap_or(default_stem);
        s.in_channels = in_channels;
        s.classes = self.classes.unwrap_or(default_classes);
        s.partitioned_stages = self.partitioned_stages.clone();
        s.validate()?;
        Ok(s)
    }
}

/// Flags that choose the data.
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Data set.
    #[arg(long, value_enum, default_value_t = data::Name::FashionMnist)]
    pub dataset: data::Name,
    /// Directory of the data files [default: /usr/share/datasets/fashion-mnist;
    /// data/cifar-10-batches-bin or data/cifar-10-batches-py; data/cifar-100-binary or
    /// data/cifar-100-python].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Train on the first N training samples only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub train_subset: usize,
    /// Evaluate on the first N test samples only (0 = all).
    #[arg(long, default_value_t = 0)]
    pub test_subset: usize,
    /// Hold N training images out for validation, evenly spaced over the training set and
    /// before --train-subset (never trained on; the epoch with the best validation accuracy
    /// is reported) [default: for run 5000, or a tenth of a smaller training set; 0 for
    /// train and pretrain].
    #[arg(long, value_name = "N")]
    pub val_size: Option<usize>,
}

impl DataArgs {
    /// The data set and the directory its files are read from.
    pub fn resolve(&self) -> Result<(DatasetKind, PathBuf)> {
        let kind = DatasetKind::of(self.dataset);
        let dir = self.data_dir.clone().unwrap_or_else(|| kind.default_dir());
        Ok((kind, dir))
    }
}

/// Flags of the SGD optimizer.
#[derive(Args, Debug, Clone)]
pub struct OptimArgs {
    /// Mini-batch size: per worker for pretrain (the paper's); the global batch for train,
    /// split evenly over the ranks.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate [default: 0.1 for pretrain (the paper's recipe), 0.05 for train].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub momentum: f64,
    /// Weight decay (L2, added to the gradient as PyTorch does).
    #[arg(long, default_value_t = 5e-4, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Learning-rate schedule [default: constant for pretrain (the paper's recipe), cosine
    /// for train].
    #[arg(long, value_enum)]
    pub schedule: Option<schedule::Name>,
}

/// `loft train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    /// Training epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Epochs at which the step schedule multiplies the rate by --gamma.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub milestones: Vec<String>,
    /// Factor of the step schedule.
    #[arg(long, default_value_t = 0.1)]
    pub gamma: f64,
    /// Epochs of linear warmup from 0 to --lr (fractions allowed).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub warmup_epochs: f64,
    /// Zero padding of the random crop [default: 2 for fashion-mnist, 4 for cifar, 0 for synthetic].
    #[arg(long)]
    pub crop_pad: Option<usize>,
    /// Random horizontal flips: true or false [default: true, false for synthetic].
    #[arg(long)]
    pub flip: Option<bool>,
    /// Seed of every random stream (init, data order, augmentation).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run directory (config.json, metrics.jsonl, summary.json).
    #[arg(long, default_value = "runs/train")]
    pub out: PathBuf,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Progress output: a bar on a terminal, lines otherwise (auto), bar, lines, none.
    #[arg(long, value_enum, default_value_t = Style::Auto)]
    pub progress: Style,
    #[command(flatten)]
    pub checkpoint: CheckpointArgs,
}

/// `loft info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Take input channels, size and classes from this data set instead of --in-channels and
    /// --input-size.
    #[arg(long, value_enum)]
    pub dataset: Option<data::Name>,
    /// Input channels.
    #[arg(long, default_value_t = 3)]
    pub in_channels: usize,
    /// Input height and width [default: 32, or 224 with --stem imagenet].
    #[arg(long)]
    pub input_size: Option<usize>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `loft bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Batch size of the convolution and training-step benchmarks.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Skip the per-layer convolution and element-wise tables.
    #[arg(long)]
    pub quick: bool,
    /// Architecture of the per-layer convolution table (CIFAR input, inner width 2).
    #[arg(long, default_value = "preresnet18")]
    pub arch: String,
    /// Base width of the per-layer convolution table's network (stages use 1x, 2x, 4x, 8x).
    #[arg(long, default_value_t = 64)]
    pub base_width: usize,
    /// Only measure the ImageNet loader (decode, random resized crop, flip, normalise) on the
    /// training images of this folder (DIR/train/<class>/*.JPEG), in images per second.
    #[arg(long)]
    pub loader: Option<PathBuf>,
    /// Also write the convolution table as JSON (shapes and seconds per pass) to this file,
    /// for scripts/bench_cudnn.py to time the same shapes.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Internal: print one training-step row for this base width (run as a child process),
    /// and its per-op profile unless `--quick`.
    #[arg(long, hide = true)]
    pub step_only: Option<usize>,
    #[command(flatten)]
    pub device: DeviceArg,
}

/// The `--device` flag, shared by every command that computes.
#[derive(Args, Debug, Clone, Copy)]
pub struct DeviceArg {
    /// Compute device: auto (a GPU when the NVIDIA driver sees one, else the CPU), cpu, cuda
    /// (the rank's local GPU), cuda:N, or cuda-emu (the CUDA kernels emulated on the host; a
    /// slow testing device).
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    s.parse().map_err(|e: Error| e.to_string())
}

impl TrainArgs {
    /// The resolved training configuration.
    pub fn config(&self) -> Result<TrainConfig> {
        let (dataset, data_dir) = self.data.resolve()?;
        let arch = self.model.spec_for(&dataset)?;
        let milestones = self
            .milestones
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| {
                m.trim()
                    .parse::<usize>()
                    .map_err(|_| Error::config(format!("--milestones: '{m}' is not an epoch number")))
            })
            .collect::<Result<Vec<_>>>()?;
        let schedule = Schedule::kind_of(
            self.optim.schedule.unwrap_or(schedule::Name::Cosine),
            &milestones,
            self.gamma,
        )?;
        let default_aug = dataset.default_augment();
        let augment = Augment {
            crop_pad: self.crop_pad.unwrap_or(default_aug.crop_pad),
            flip: self.flip.unwrap_or(default_aug.flip),
        };
        let cfg = TrainConfig {
            arch,
            dataset,
            data_dir,
            train_subset: self.data.train_subset,
            test_subset: self.data.test_subset,
            val_size: self.data.val_size.unwrap_or(0),
            epochs: self.epochs,
            batch_size: self.optim.batch_size,
            lr: self.optim.lr.unwrap_or(0.05),
            momentum: self.optim.momentum,
            weight_decay: self.optim.weight_decay,
            schedule,
            warmup_epochs: self.warmup_epochs,
            augment,
            seed: self.seed,
            out: self.out.clone(),
            progress: self.progress,
            ticket: None,
            device: self.device.device,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// What fine-tuning takes from the configuration of the run a ticket came from (a training or
/// pre-training configuration), or of the fine-tuning run being resumed.
#[derive(serde::Deserialize)]
struct SourceConfig {
    arch: ArchSpec,
    dataset: DatasetKind,
    data_dir: PathBuf,
    train_subset: usize,
    test_subset: usize,
    #[serde(default)]
    val_size: usize,
    augment: Augment,
    #[serde(default)]
    ticket: Option<PathBuf>,
}

impl FinetuneArgs {
    /// The fine-tuning configuration: data and network from the ticket's source run (or, when
    /// only --resume is given, from the checkpoint being resumed), optimizer from the flags.
    pub fn config(&self, found: Option<&crate::checkpoint::Found>) -> Result<TrainConfig> {
        let (source, path) = match (&self.ticket, found) {
            (Some(t), _) => (crate::checkpoint::Checkpoint::read(t)?, t.clone()),
            (None, Some(f)) => (f.checkpoint.clone(), f.path.clone()),
            (None, None) => {
                return Err(Error::config(
                    "loft finetune needs --ticket FILE (from loft prune) or --resume PATH",
                ))
            }
        };
        let base: SourceConfig = serde_json::from_str(&source.config).map_err(|e| {
            Error::format(
                &path,
                format!("its configuration does not describe a network and its data: {e}"),
            )
        })?;
        let e = self.epochs;
        let milestones = self
            .milestones
            .clone()
            .unwrap_or_else(|| crate::schedule::paper_milestones(e));
        let cfg = TrainConfig {
            arch: base.arch,
            dataset: base.dataset,
            data_dir: self.data_dir.clone().unwrap_or(base.data_dir),
            train_subset: self.train_subset.unwrap_or(base.train_subset),
            test_subset: self.test_subset.unwrap_or(base.test_subset),
            val_size: self.val_size.unwrap_or(base.val_size),
            epochs: e,
            batch_size: self.batch_size,
            lr: self.lr,
            momentum: self.momentum,
            weight_decay: self.weight_decay,
            schedule: crate::schedule::Kind::Step {
                milestones,
                gamma: self.gamma,
            },
            warmup_epochs: 0.0,
            augment: base.augment,
            seed: self.seed,
            out: self.out.clone(),
            progress: self.progress,
            ticket: match (&self.ticket, found) {
                (Some(t), _) => Some(t.clone()),
                (None, _) => base.ticket,
            },
            device: self.device.device,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl InfoArgs {
    /// The graph to describe.
    pub fn graph(&self) -> Result<Graph> {
        let kind = self.dataset.map(DatasetKind::of);
        let stem = self.model.stem_for(kind.as_ref());
        let default_size = if stem == Stem::Imagenet { 224 } else { 32 };
        let (c, h, w, classes) = match &self.dataset {
            Some(d) => DatasetKind::of(*d).shape(),
            None => {
                let s = self.input_size.unwrap_or(default_size);
                (self.in_channels, s, s, 10)
            }
        };
        let (h, w) = match self.input_size {
            Some(s) => (s, s),
            None => (h, w),
        };
        let spec = self.model.spec(c, classes, stem)?;
        Graph::build(&spec, h, w, None)
    }
}

impl PretrainArgs {
    /// The resolved configuration.
    pub fn config(&self) -> Result<crate::loft::PretrainConfig> {
        let method = self.method;
        let (dataset, data_dir) = self.data.resolve()?;
        let arch = self.model.spec_for(&dataset)?;
        let schedule = Schedule::kind_of(self.optim.schedule.unwrap_or(schedule::Name::Constant), &[], 0.1)?;
        let cfg = crate::loft::PretrainConfig {
            method,
            arch,
            data_dir,
            augment: dataset.default_augment(),
            dataset,
            train_subset: self.data.train_subset,
            test_subset: self.data.test_subset,
            val_size: self.data.val_size.unwrap_or(0),
            rounds: self.rounds,
            local_steps: self.local_steps,
            batch_size: self.optim.batch_size,
            lr: self.optim.lr.unwrap_or(PAPER_LR),
            momentum: self.optim.momentum,
            weight_decay: self.optim.weight_decay,
            schedule,
            warmup_rounds: self.warmup_rounds,
            reset_momentum: self.reset_momentum,
            keep_momentum: self.keep_momentum,
            seed: self.seed,
            eval_every: self.eval_every,
            simulate: self.simulate_workers,
            verify: self.verify,
            bn_recalibrate: self
                .bn_recalibrate
                .unwrap_or(if method == Method::Loft { 50 } else { 0 }),
            out: self.out.clone(),
            progress: self.progress,
            distance_every: self.distance_every,
            distance_ratio: self.distance_ratio,
            early_stop: self.early_stop,
            device: self.device.device,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The configuration and run control of a training command: from the flags, or, with
/// --resume, from the checkpoint (checked against the flags given).
fn resolved<C: serde::Serialize + serde::de::DeserializeOwned>(
    kind: Kind,
    cfg: C,
    out: impl Fn(&C) -> PathBuf,
    ck: &CheckpointArgs,
    default_every: usize,
    m: Option<&clap::ArgMatches>,
) -> Result<(C, RunControl)> {
    let found = ck.found()?;
    if let Some(f) = &found {
        f.expect_kind(kind)?;
    }
    let cfg = match (&found, m) {
        (Some(f), Some(m)) => crate::resume::config(&cfg, f, m)?,
        (Some(f), None) => f.checkpoint.config_as(&f.path)?,
        (None, _) => cfg,
    };
    let mut ctl = ck.control(&out(&cfg), default_every)?;
    ctl.resume = found;
    Ok((cfg, ctl))
}

/// Exit status for a run's ending: 0, or [`crate::checkpoint::EXIT_STOPPED`] when a signal
/// stopped it after writing a checkpoint.
pub fn exit_code(e: &Ending) -> i32 {
    match e {
        Ending::Completed(_) => 0,
        Ending::Stopped(_) => crate::checkpoint::EXIT_STOPPED,
    }
}

/// Run `job` on every rank of the job and let rank 0 `print` how it ended; the exit status
/// follows its `ending`.
fn on_every_rank<S>(
    job: impl FnOnce(&mut dyn crate::comm::Comm) -> Result<S>,
    ending: impl Fn(&S) -> &Ending,
    print: impl Fn(&S),
) -> Result<i32> {
    let mut code = 0;
    crate::comm::run_with_comm(|comm| {
        let rank = comm.rank();
        let s = job(comm)?;
        code = exit_code(ending(&s));
        if rank == 0 {
            print(&s);
        }
        Ok(())
    })?;
    Ok(code)
}

/// Run `loft train` or `loft finetune` on every rank of the job and print how it ended.
fn report_training(kind: Kind, cfg: &TrainConfig, ctl: RunControl) -> Result<i32> {
    on_every_rank(
        |comm| crate::on_device!(cfg.device, be => crate::train::run(cfg, ctl, comm, be)),
        |s| &s.ending,
        |s| match &s.ending {
            Ending::Completed(_) => println!(
                "final test accuracy {:.2}% (best {:.2}%) in {:.1}s; run directory {}",
                s.final_test_acc,
                s.best_test_acc,
                s.wall_s,
                s.out.display()
            ),
            Ending::Stopped(p) => println!("stopped; resume with: loft {kind} --resume {}", p.display()),
        },
    )
}

/// Run `loft pretrain` on every rank of the job and print how it ended.
fn report_pretraining(cfg: &crate::loft::PretrainConfig, ctl: RunControl) -> Result<i32> {
    on_every_rank(
        |comm| crate::on_device!(cfg.device, be => crate::loft::run(cfg, ctl, comm, be)),
        |s| &s.ending,
        |s| match &s.ending {
            Ending::Completed(_) => println!(
                "final test accuracy {:.2}% in {:.1}s (compute {:.1}s, sync {:.1}s); run directory {}",
                s.final_test_acc,
                s.wall_s,
                s.compute_s,
                s.sync_s,
                cfg.out.display()
            ),
            Ending::Stopped(p) => println!("stopped; resume with: loft pretrain --resume {}", p.display()),
        },
    )
}

/// Run `loft run` on every rank of the job and print how it ended.
fn report_main_job(job: &crate::experiment::MainJob) -> Result<i32> {
    let stop = crate::stop::StopFlag::install()?;
    on_every_rank(
        |comm| crate::on_device!(job.pretrain.device, be => crate::experiment::run(job, &stop, comm, be)),
        |e| e,
        |e| match e {
            Ending::Completed(p) => println!("loft run: done; report {}", p.display()),
            Ending::Stopped(_) => {
                println!("loft run: stopped with a checkpoint; run the same command again to continue")
            }
        },
    )
}

/// Run the parsed command line; `matches` (when given) tells which flags were typed, for
/// checking them against a checkpoint. Returns the process exit status.
pub fn run(cli: Cli, matches: Option<&clap::ArgMatches>) -> Result<i32> {
    if cli.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cli.threads)
            .build_global()
            .map_err(|e| Error::config(format!("--threads {}: {e}", cli.threads)))?;
    }
    let sub = |name: &str| matches.and_then(|m| m.subcommand_matches(name));
    match cli.command {
        Command::Train(a) => {
            let (cfg, ctl) = resolved(
                Kind::Train,
                a.config()?,
                |c| c.out.clone(),
                &a.checkpoint,
                1,
                sub("train"),
            )?;
            cfg.validate()?;
            report_training(Kind::Train, &cfg, ctl)
        }
        Command::Finetune(a) => {
            let found = a.checkpoint.found()?;
            let cfg = a.config(found.as_ref())?;
            let (cfg, ctl) = resolved(
                Kind::Finetune,
                cfg,
                |c| c.out.clone(),
                &a.checkpoint,
                1,
                sub("finetune"),
            )?;
            cfg.validate()?;
            report_training(Kind::Finetune, &cfg, ctl)
        }
        Command::Run(a) => report_main_job(&a.job()?),
        Command::Prune(a) => {
            let how = crate::ticket::prune::Pruning {
                ratio: a.ratio,
                criterion: a.criterion,
                masked: a.masked,
                seed: a.seed,
                keep_first_blocks: a.keep_first_blocks,
            };
            crate::ticket::prune::run(&a.checkpoint, &how, &a.out).map(|()| 0)
        }
        Command::Info(a) => {
            let g = a.graph()?;
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&crate::info::json(&g)).expect("json")
                );
            } else {
                print!("{}", crate::info::table(&g));
            }
            Ok(0)
        }
        Command::Pretrain(a) => {
            let (cfg, ctl) = resolved(
                Kind::Pretrain,
                a.config()?,
                |c| c.out.clone(),
                &a.checkpoint,
                10,
                sub("pretrain"),
            )?;
            cfg.validate()?;
            report_pretraining(&cfg, ctl)
        }
        Command::Comm(a) => crate::comm::report::run(&a.query()?).map(|()| 0),
        Command::Evaluate(a) => {
            let req = crate::evaluate::Request {
                checkpoint: a.file.clone(),
                split: a.split,
                data_dir: a.data_dir.clone(),
                batch: a.batch_size,
            };
            let mut result = None;
            crate::comm::run_with_comm(|comm| {
                let e = crate::on_device!(a.device.device, be => crate::evaluate::run(&req, comm, be))?;
                if comm.rank() == 0 {
                    result = Some(e);
                }
                Ok(())
            })?;
            if let Some(e) = result {
                if let Some(png) = &a.confusion {
                    crate::evaluate::confusion_png(&e, png)?;
                }
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&e).expect("json"));
                } else {
                    print!("{}", crate::evaluate::table(&e));
                }
            }
            Ok(0)
        }
        Command::Theory(a) => {
            let cfg = a.config()?;
            let r = crate::theory::run(&cfg, a.progress != crate::progress::Style::None)?;
            print!("{}", crate::theory::markdown(&r));
            println!(
                "\nwritten: {}/theory.{{md,json,png}}, theory-loss.png",
                cfg.out.display()
            );
            Ok(0)
        }
        Command::Export(a) => {
            crate::export::run(&a.file, &a.out)?;
            println!("exported {} -> {}", a.file.display(), a.out.display());
            Ok(0)
        }
        Command::Kernels(a) => {
            for arch in &a.arch {
                let digits = arch.strip_prefix("sm_").unwrap_or("");
                if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) {
                    return Err(Error::config(format!(
                        "--arch {arch}: expected sm_XY, e.g. sm_80 or sm_90"
                    )));
                }
            }
            let archs: Vec<&str> = a.arch.iter().map(String::as_str).collect();
            let rows = crate::backend::cuda::table::collect(&archs)?;
            if a.json {
                let v: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|k| {
                        serde_json::json!({"kernel": k.name, "arch": k.arch, "registers": k.registers,
                            "shared_bytes": k.shared_bytes, "stack_bytes": k.stack_bytes,
                            "spill_store_bytes": k.spill_store_bytes, "spill_load_bytes": k.spill_load_bytes,
                            "flop_per_byte": crate::backend::cuda::table::intensity(&k.name)})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            } else {
                print!("{}", crate::backend::cuda::table::markdown(&rows));
            }
            Ok(0)
        }
        Command::Inspect(a) => crate::inspect::run(&a.file, a.json).map(|()| 0),
        Command::Distance(a) => crate::ticket::run_distance(&a.a, &a.b, a.ratio, a.json).map(|()| 0),
        Command::Bench(a) => {
            if a.batch == 0 {
                return Err(Error::config("--batch must be at least 1"));
            }
            let opts = crate::bench::BenchOptions {
                batch: a.batch,
                quick: a.quick,
                device: a.device.device,
                arch: a.arch.clone(),
                base_width: a.base_width,
                json: a.json.clone(),
            };
            if let Some(dir) = &a.loader {
                return crate::bench::loader(dir, a.batch).map(|()| 0);
            }
            crate::on_device!(a.device.device, be => match a.step_only {
                Some(base) => crate::bench::step_row(be, base, a.batch, !a.quick),
                None => crate::bench::run(be, &opts),
            })
            .map(|()| 0)
        }
    }
}

/// A clap error about a flag's value as one line (`None` for other errors, which clap prints
/// with its usage): the flag, what is wrong, and the accepted values.
pub fn one_line_value_error(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |k| match e.get(k) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => Some(v.join(", ")),
        _ => None,
    };
    let flag = text(ContextKind::InvalidArg)?;
    let flag = flag.split_whitespace().next().unwrap_or(&flag).to_string();
    match e.kind() {
        ErrorKind::InvalidValue => {
            let value = text(ContextKind::InvalidValue).unwrap_or_default();
            let noun = match flag.as_str() {
                "--dataset" => "data set",
                "--progress" => "progress mode",
                other => other.trim_start_matches('-'),
            };
            let valid = text(ContextKind::ValidValue).unwrap_or_default();
            Some(format!("{flag}: unknown {noun} '{value}' (expected one of: {valid})"))
        }
        ErrorKind::ValueValidation => {
            let cause = std::error::Error::source(e)
                .map(|c| c.to_string())
                .unwrap_or_else(|| e.kind().to_string());
            Some(format!("{flag}: {cause}"))
        }
        _ => None,
    }
}
