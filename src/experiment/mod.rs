//! `loft run`, the main job: dense and LoFT pre-training on the same budget, the ticket of
//! each at every pruning ratio, fine-tuning of every ticket and of the No-Prune reference,
//! then a report (see [`crate::report`]).
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
use crate::ticket::{prune, Criterion};
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

/// Name of a ticket: `noprune`, or `dense-p50` / `loft-p50`.
pub fn ticket_name(m: Option<Method>, ratio: f64) -> String {
    match m {
        None => "noprune".into(),
        Some(Method::Dense) => format!("dense-p{:02}", (ratio * 100.0).round() as u32),
        Some(Method::Loft) => format!("loft-p{:02}", (ratio * 100.0).round() as u32),
    }
}

/// The tickets of the job in report order: No-Prune, then dense and LoFT at every ratio.
pub fn tickets(ratios: &[f64]) -> Vec<(Option<Method>, f64)> {
    let mut v = vec![(None, 0.0)];
    for m in [Method::Dense, Method::Loft] {
        v.extend(ratios.iter().map(|&r| (Some(m), r)));
    }
    v
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
fn header(comm: &mut dyn Comm, progress: Style, i: usize, n: usize, what: &str) {
    *comm.ledger_mut() = Default::default();
    if comm.rank() == 0 && progress != Style::None {
        eprintln!("\n== loft run: phase {i}/{n}: {what} ==");
    }
}

/// Run the main job on this rank. Returns the report directory, or the ending of the phase a
/// signal stopped.
pub fn run<B: Backend>(job: &MainJob, stop: &StopFlag, comm: &mut dyn Comm, be: Arc<B>) -> Result<Ending> {
    job.validate()?;
    let lead = comm.rank() == 0;
    if lead {
        crate::rundir::prepare(&job.out)?;
    }
    let all = tickets(&job.ratios);
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
            header(comm, job.progress, phase, phases, &format!("{m:?} pre-training (done)"));
            continue;
        }
        header(comm, job.progress, phase, phases, &format!("{m:?} pre-training"));
        let ctl = control(&dir, job.record_every, usize::MAX, stop)?;
        same_settings(&ctl, &cfg)?;
        let s = crate::loft::run(&cfg, ctl, comm, be.clone())?;
        if let Ending::Stopped(_) = s.ending {
            return Ok(s.ending);
        }
    }
    // 3: the tickets (rank 0 writes them; the others wait)
    phase += 1;
    header(comm, job.progress, phase, phases, "pruning");
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
    for &(m, r) in &all {
        phase += 1;
        let name = ticket_name(m, r);
        let dir = job.out.join("finetune").join(&name);
        let mut cfg = job.finetune.clone();
        cfg.ticket = Some(tdir.join(format!("{name}.h5")));
        cfg.out = dir.clone();
        cfg.progress = job.progress;
        if dir.join("summary.json").exists() {
            finished_with_same_settings(&dir, &cfg)?;
            header(comm, job.progress, phase, phases, &format!("fine-tuning {name} (done)"));
            continue;
        }
        header(comm, job.progress, phase, phases, &format!("fine-tuning {name}"));
        let ctl = control(&dir, 1, 1, stop)?;
        same_settings(&ctl, &cfg)?;
        let s = crate::train::run(&cfg, ctl, comm, be.clone())?;
        if let Ending::Stopped(_) = s.ending {
            return Ok(s.ending);
        }
    }
    phase += 1;
    header(comm, job.progress, phase, phases, "report");
    if lead {
        report::write(job, comm.size())?;
    }
    Ok(Ending::Completed(job.out.join("report.md")))
}

/// Prune the final pre-trained models into every ticket (skipping tickets already written).
fn make_tickets(job: &MainJob, tdir: &Path, all: &[(Option<Method>, f64)]) -> Result<()> {
    std::fs::create_dir_all(tdir).map_err(|e| Error::io(tdir, e))?;
    for &(m, r) in all {
        let path = tdir.join(format!("{}.h5", ticket_name(m, r)));
        if path.exists() && checkpoint::Checkpoint::read(&path).is_ok() {
            continue;
        }
        let src_dir = pretrain_dir(&job.out, m.unwrap_or(Method::Dense));
        let (_, src) = checkpoint::list(&src_dir.join("checkpoints"))?
            .pop()
            .ok_or_else(|| Error::format(&src_dir, "holds no checkpoint"))?;
        let c = checkpoint::Checkpoint::read(&src)?;
        let t = prune::prune(&c, &src, r, Criterion::Largest, false, job.pretrain.seed)?;
        t.write(&path)?;
    }
    Ok(())
}
