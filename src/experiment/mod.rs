//! `loft run`, the main job: dense and LoFT pre-training on the same budget, the ticket of
//! each at every pruning ratio, a random control ticket at every ratio, fine-tuning of every
//! ticket and of the No-Prune reference, then a report (see [`report`]). With several seeds
//! the whole job runs once per seed (`<out>/seed-N`) and a report over the seeds follows.
//!
//! Each phase writes its own run directory under `--out`. A phase whose `summary.json`
//! exists is complete and skipped, and a phase with checkpoints resumes from them, so running
//! the same command again continues an interrupted job. A stop signal ends the job after the
//! current phase's checkpoint with status 75.

pub mod report;

use crate::backend::Backend;
use crate::checkpoint::{self, Saver};
use crate::comm::{Comm, Purpose};
use crate::engine::{Ending, RunControl};
use crate::loft::{Method, PretrainConfig};
use crate::progress::Style;
use crate::stop::StopFlag;
use crate::ticket::{prune, prune::Pruning, Criterion};
use crate::train::TrainConfig;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything `loft run` does, resolved.
#[derive(Clone, Debug)]
pub struct MainJob {
    /// Pre-training template (method and run directory are set per phase).
    pub pretrain: PretrainConfig,
    /// Fine-tuning template (ticket and run directory are set per phase).
    pub finetune: TrainConfig,
    /// Pruning ratios of the tickets, e.g. 0.3, 0.5, 0.8.
    pub ratios: Vec<f64>,
    /// The seeds: the whole job once per seed.
    pub seeds: Vec<u64>,
    /// Fine-tune a random ticket of the dense model at every ratio (the control).
    pub random_control: bool,
    /// Which filters the dense and LoFT tickets keep.
    pub criterion: Criterion,
    /// Leave the first block of every stage unpruned (the released code).
    pub keep_first_blocks: bool,
    /// A pre-training checkpoint every N rounds: the points of the distance curves.
    pub record_every: usize,
    pub out: PathBuf,
    pub progress: Style,
}

/// Directory of a phase.
pub fn pretrain_dir(out: &Path, m: Method) -> PathBuf {
    out.join(match m {
        Method::Dense => "pretrain-dense",
        Method::Loft => "pretrain-loft",
    })
}

/// Where a ticket comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The whole dense model (p = 0): the No-Prune reference.
    NoPrune,
    /// The dense (GPipe-equivalent) model's ticket.
    Dense,
    /// The LoFT model's ticket.
    Loft,
    /// The control: random filters of the dense model, as many per block as the others keep.
    Random,
}

/// One ticket of the job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ticket {
    pub source: Source,
    pub ratio: f64,
}

impl Ticket {
    /// `noprune`, or `dense-p50` / `loft-p50` / `random-p50`.
    pub fn name(&self) -> String {
        let p = (self.ratio * 100.0).round() as u32;
        match self.source {
            Source::NoPrune => "noprune".into(),
            Source::Dense => format!("dense-p{p:02}"),
            Source::Loft => format!("loft-p{p:02}"),
            Source::Random => format!("random-p{p:02}"),
        }
    }

    /// The pre-training it is pruned from.
    pub fn pretraining(&self) -> Method {
        match self.source {
            Source::Loft => Method::Loft,
            _ => Method::Dense,
        }
    }

    /// How the job prunes it.
    pub fn pruning(&self, job: &MainJob) -> Pruning {
        Pruning {
            ratio: self.ratio,
            criterion: match self.source {
                Source::Random => Criterion::Random,
                _ => job.criterion,
            },
            masked: false,
            seed: job.pretrain.seed,
            keep_first_blocks: job.keep_first_blocks,
        }
    }
}

/// The tickets of the job in report order: No-Prune, then dense, LoFT and (with the control)
/// random at every ratio.
pub fn tickets(ratios: &[f64], random_control: bool) -> Vec<Ticket> {
    let mut v = vec![Ticket {
        source: Source::NoPrune,
        ratio: 0.0,
    }];
    let mut sources = vec![Source::Dense, Source::Loft];
    if random_control {
        sources.push(Source::Random);
    }
    for source in sources {
        v.extend(ratios.iter().map(|&ratio| Ticket { source, ratio }));
    }
    v
}

/// The default validation split of `loft run`: 5,000 images held out of the training set, or
/// a tenth of a training set smaller than 50,000 images.
pub fn default_val_size(train_images: usize) -> usize {
    5000.min(train_images / 10)
}

impl MainJob {
    /// Check the settings before any work.
    pub fn validate(&self) -> Result<()> {
        if self.ratios.is_empty() {
            return Err(Error::config("--ratios needs at least one pruning ratio"));
        }
        for &r in &self.ratios {
            if !(r > 0.0 && r < 1.0) {
                return Err(Error::config(format!("--ratios: {r} is not in (0, 1)")));
            }
        }
        if self.record_every == 0 {
            return Err(Error::config("--record-every must be at least 1"));
        }
        if self.seeds.is_empty() {
            return Err(Error::config("--seeds needs at least one seed"));
        }
        let mut seen = self.seeds.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.seeds.len() {
            return Err(Error::config("--seeds lists a seed twice"));
        }
        self.pretrain.validate()?;
        self.finetune.validate()
    }
}

/// A phase's control: checkpoints in its directory, resumed when it has some.
fn control(dir: &Path, every: usize, keep: usize, stop: &StopFlag) -> Result<RunControl> {
    let saver = Saver {
        dir: dir.join("checkpoints"),
        every,
        keep,
    };
    let resume = if checkpoint::list(&saver.dir)?.is_empty() {
        None
    } else {
        Some(checkpoint::find(dir)?)
    };
    Ok(RunControl {
        saver,
        resume,
        stop: stop.clone(),
    })
}

/// Check that a phase being resumed was started with the same settings.
fn same_settings(ctl: &RunControl, planned: &impl serde::Serialize) -> Result<()> {
    let Some(f) = &ctl.resume else { return Ok(()) };
    let saved: serde_json::Value = serde_json::from_str(&f.checkpoint.config).unwrap_or_default();
    compare_settings(&f.path, saved, planned)
}

/// Check that a finished phase (its `config.json`) ran with the settings planned now.
fn finished_with_same_settings(dir: &Path, planned: &impl serde::Serialize) -> Result<()> {
    /// The part of `config.json` compared.
    #[derive(serde::Deserialize)]
    struct Saved {
        config: serde_json::Value,
    }
    let path = dir.join("config.json");
    let saved: Saved = crate::rundir::read_json(&path)?;
    compare_settings(&path, saved.config, planned)
}

fn compare_settings(path: &Path, mut saved: serde_json::Value, planned: &impl serde::Serialize) -> Result<()> {
    let mut want = serde_json::to_value(planned).expect("config serializes");
    for v in [&mut saved, &mut want] {
        if let Some(o) = v.as_object_mut() {
            for (k, _) in crate::resume::MAY_CHANGE {
                o.remove(k);
            }
        }
    }
    if saved != want {
        return Err(Error::format(
            path,
            "belongs to a job with other settings; give loft run another --out, or the same flags as before",
        ));
    }
    Ok(())
}

/// Print a phase header on rank 0, and start the phase with an empty ledger (each phase's
/// run directory accounts for its own bytes).
fn header(comm: &mut dyn Comm, progress: Style, at: (&str, usize, usize), what: &str) {
    *comm.ledger_mut() = Default::default();
    let (label, i, n) = at;
    if comm.rank() == 0 && progress != Style::None {
        eprintln!("\n== loft run: {label}phase {i}/{n}: {what} ==");
    }
}

impl MainJob {
    /// The job of one seed, writing into `out`.
    pub fn for_seed(&self, seed: u64, out: PathBuf) -> MainJob {
        let mut j = self.clone();
        j.seeds = vec![seed];
        j.pretrain.seed = seed;
        j.finetune.seed = seed;
        j.pretrain.out = out.clone();
        j.finetune.out = out.clone();
        j.out = out;
        j
    }

    /// The directory of one seed's job.
    pub fn seed_dir(&self, seed: u64) -> PathBuf {
        self.out.join(format!("seed-{seed}"))
    }
}

/// Run the main job on this rank: once, or once per seed followed by the report over the
/// seeds. Returns the report, or the ending of the phase a signal stopped.
pub fn run<B: Backend>(job: &MainJob, stop: &StopFlag, comm: &mut dyn Comm, be: Arc<B>) -> Result<Ending> {
    job.validate()?;
    if let [seed] = job.seeds[..] {
        return run_one(&job.for_seed(seed, job.out.clone()), stop, comm, be, "");
    }
    if comm.rank() == 0 {
        crate::rundir::prepare(&job.out)?;
    }
    let n = job.seeds.len();
    for (i, &seed) in job.seeds.iter().enumerate() {
        let label = format!("seed {seed} ({}/{n}), ", i + 1);
        let one = job.for_seed(seed, job.seed_dir(seed));
        if let Ending::Stopped(p) = run_one(&one, stop, comm, be.clone(), &label)? {
            return Ok(Ending::Stopped(p));
        }
    }
    if comm.rank() == 0 {
        report::write_seeds(job)?;
    }
    Ok(Ending::Completed(job.out.join("report.md")))
}

/// The job of one seed (`job.seeds` holds just it); `label` prefixes the phase headers.
fn run_one<B: Backend>(job: &MainJob, stop: &StopFlag, comm: &mut dyn Comm, be: Arc<B>, label: &str) -> Result<Ending> {
    let lead = comm.rank() == 0;
    if lead {
        crate::rundir::prepare(&job.out)?;
    }
    let all = tickets(&job.ratios, job.random_control);
    let phases = 2 + 1 + all.len() + 1;
    let mut phase = 0;
    // 1-2: pre-training, dense then LoFT, on the same budget
    for m in [Method::Dense, Method::Loft] {
        phase += 1;
        let dir = pretrain_dir(&job.out, m);
        let mut cfg = job.pretrain.clone();
        cfg.method = m;
        cfg.out = dir.clone();
        cfg.progress = job.progress;
        if m == Method::Dense {
            cfg.bn_recalibrate = 0;
            cfg.keep_momentum = false;
        }
        if dir.join("summary.json").exists() {
            finished_with_same_settings(&dir, &cfg)?;
            header(
                comm,
                job.progress,
                (label, phase, phases),
                &format!("{m:?} pre-training (done)"),
            );
            continue;
        }
        header(
            comm,
            job.progress,
            (label, phase, phases),
            &format!("{m:?} pre-training"),
        );
        let ctl = control(&dir, job.record_every, usize::MAX, stop)?;
        same_settings(&ctl, &cfg)?;
        let s = crate::loft::run(&cfg, ctl, comm, be.clone())?;
        if let Ending::Stopped(_) = s.ending {
            return Ok(s.ending);
        }
    }
    // 3: the tickets (rank 0 writes them; the others wait)
    phase += 1;
    header(comm, job.progress, (label, phase, phases), "pruning");
    let tdir = job.out.join("tickets");
    let mut result = Ok(());
    if lead {
        result = make_tickets(job, &tdir, &all);
    }
    let ok = comm.allgather_u64(Purpose::Control, result.is_ok() as u64);
    result?;
    if ok.contains(&0) {
        return Err(Error::config("rank 0 could not write the tickets"));
    }
    // 4..: fine-tuning of every ticket
    for t in &all {
        phase += 1;
        let name = t.name();
        let dir = job.out.join("finetune").join(&name);
        let mut cfg = job.finetune.clone();
        cfg.ticket = Some(tdir.join(format!("{name}.h5")));
        cfg.out = dir.clone();
        cfg.progress = job.progress;
        if dir.join("summary.json").exists() {
            finished_with_same_settings(&dir, &cfg)?;
            header(
                comm,
                job.progress,
                (label, phase, phases),
                &format!("fine-tuning {name} (done)"),
            );
            continue;
        }
        header(
            comm,
            job.progress,
            (label, phase, phases),
            &format!("fine-tuning {name}"),
        );
        let ctl = control(&dir, 1, 1, stop)?;
        same_settings(&ctl, &cfg)?;
        let s = crate::train::run(&cfg, ctl, comm, be.clone())?;
        if let Ending::Stopped(_) = s.ending {
            return Ok(s.ending);
        }
    }
    phase += 1;
    header(comm, job.progress, (label, phase, phases), "report");
    if lead {
        report::write(job, comm.size())?;
    }
    Ok(Ending::Completed(job.out.join("report.md")))
}

/// Prune the final pre-trained models into every ticket (skipping tickets already written).
fn make_tickets(job: &MainJob, tdir: &Path, all: &[Ticket]) -> Result<()> {
    std::fs::create_dir_all(tdir).map_err(|e| Error::io(tdir, e))?;
    for t in all {
        let path = tdir.join(format!("{}.h5", t.name()));
        if path.exists() && checkpoint::Checkpoint::read(&path).is_ok() {
            continue;
        }
        let src_dir = pretrain_dir(&job.out, t.pretraining());
        let (_, src) = checkpoint::list(&src_dir.join("checkpoints"))?
            .pop()
            .ok_or_else(|| Error::format(&src_dir, "holds no checkpoint"))?;
        let c = checkpoint::Checkpoint::read(&src)?;
        prune::prune(&c, &src, &t.pruning(job))?.write(&path)?;
    }
    Ok(())
}
