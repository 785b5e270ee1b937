//! Where checkpoints live: listing and finding them for `--resume`, writing one from a job of
//! several ranks, and the saver that rotates them.

use super::file::ledgers_from_table;
use super::{ledger_table, Checkpoint, CheckpointOf};
use crate::comm::{Comm, Purpose};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// Checkpoint files in `dir` (complete ones only: temporary files are hidden), oldest first.
pub fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.strip_suffix(".h5"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// A checkpoint found for `--resume`, with the run directory it belongs to.
pub struct Found {
    pub checkpoint: Checkpoint,
    pub path: PathBuf,
    /// The run directory: the parent of `checkpoints/`, or the file's own directory.
    pub run_dir: PathBuf,
}

impl Found {
    /// Check that the checkpoint was written by a run of `kind`, so that it is resumed by the
    /// command that wrote it.
    pub fn expect_kind(&self, kind: super::Kind) -> Result<()> {
        if self.checkpoint.kind != kind {
            return Err(Error::format(
                &self.path,
                format!("is a {0} checkpoint; resume it with loft {0}", self.checkpoint.kind),
            ));
        }
        Ok(())
    }
}

/// Resolve `--resume PATH`: a checkpoint file, a `checkpoints/` directory or a run directory.
/// For a directory the newest checkpoint is taken; one that fails its checks is reported and
/// the next older one is tried.
pub fn find(path: &Path) -> Result<Found> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    let run_dir_of = |file: &Path| {
        let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
        if dir.file_name().and_then(|n| n.to_str()) == Some("checkpoints") {
            dir.parent().unwrap_or(Path::new(".")).to_path_buf()
        } else {
            dir
        }
    };
    if !meta.is_dir() {
        let checkpoint = Checkpoint::read(path)?;
        return Ok(Found {
            checkpoint,
            path: path.to_path_buf(),
            run_dir: run_dir_of(path),
        });
    }
    let dir = if path.join("checkpoints").is_dir() {
        path.join("checkpoints")
    } else {
        path.to_path_buf()
    };
    let files = list(&dir)?;
    if files.is_empty() {
        return Err(Error::format(path, "holds no checkpoint (step-*.h5)"));
    }
    let mut last_err = None;
    for (_, file) in files.iter().rev() {
        match Checkpoint::read(file) {
            Ok(checkpoint) => {
                return Ok(Found {
                    run_dir: run_dir_of(file),
                    checkpoint,
                    path: file.clone(),
                })
            }
            Err(e) => {
                eprintln!("loft: warning: skipping {e}");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.expect("at least one file"))
}

/// Restore this rank's ledger (entry `index` of the checkpoint's ledgers). Checkpoint
/// bookkeeping (`Control`) keeps counting what this process did.
pub fn restore_ledger(comm: &mut dyn Comm, c: &CheckpointOf<'_>, index: usize) {
    let mut restored = c.ledgers.get(index).cloned().unwrap_or_default();
    restored.entries.retain(|(p, _), _| *p != Purpose::Control);
    for (k, v) in comm
        .ledger()
        .entries
        .iter()
        .filter(|((p, _), _)| *p == Purpose::Control)
    {
        restored.entries.insert(*k, *v);
    }
    *comm.ledger_mut() = restored;
}

/// Write a checkpoint of replicated state from a job of one or more ranks: every rank sends
/// its ledger and its data-stream positions (`positions`, the same count on every rank),
/// rank 0 builds the checkpoint with `make` and writes it, and no rank returns before the
/// file is complete. With `all_local` every worker lives in this process and nothing is
/// gathered. Returns the checkpoint's path (the same on every rank).
pub fn save_across_ranks<'a>(
    saver: &Saver,
    comm: &mut dyn Comm,
    make: impl FnOnce() -> Result<CheckpointOf<'a>>,
    positions: &[u64],
    all_local: bool,
    step: u64,
) -> Result<PathBuf> {
    let (ledgers, positions) = if all_local {
        (vec![comm.ledger().clone()], positions.to_vec())
    } else {
        let table = ledger_table(std::slice::from_ref(comm.ledger()));
        let all = comm.allgather_u64s(Purpose::Control, &table);
        let pos = comm.allgather_u64s(Purpose::Control, positions);
        (ledgers_from_table(&all), pos)
    };
    let mut result = Ok(saver.dir.join(Checkpoint::file_name(step)));
    if comm.rank() == 0 {
        result = make().and_then(|mut c| {
            c.ledgers = ledgers;
            c.data_position = positions;
            saver.save(&c)
        });
    }
    let ok = comm.allgather_u64(Purpose::Control, result.is_ok() as u64);
    let path = result?;
    if ok.contains(&0) {
        return Err(Error::config("rank 0 could not write the checkpoint"));
    }
    Ok(path)
}

/// When and where a run writes checkpoints.
#[derive(Clone, Debug)]
pub struct Saver {
    /// The `checkpoints/` directory.
    pub dir: PathBuf,
    /// Every N rounds (pre-training) or epochs (training); 0: only at the end and on a signal.
    pub every: usize,
    /// Checkpoints kept; older ones are deleted after a new one is complete.
    pub keep: usize,
}

impl Saver {
    /// Check the settings.
    pub fn validate(&self) -> Result<()> {
        if self.keep == 0 {
            return Err(Error::config("--keep must be at least 1"));
        }
        Ok(())
    }

    /// Create the checkpoint directory and check that files can be written in it, so a bad
    /// path fails before any training.
    pub fn prepare(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let probe = self.dir.join(".write-test");
        std::fs::write(&probe, b"").map_err(|e| Error::io(&self.dir, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// Whether a checkpoint is due after `done` rounds or epochs.
    pub fn due(&self, done: usize) -> bool {
        self.every > 0 && done.is_multiple_of(self.every)
    }

    /// Write `c` (named after its step), then delete all but the newest `keep` checkpoints.
    pub fn save(&self, c: &CheckpointOf<'_>) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let path = self.dir.join(Checkpoint::file_name(c.state.step));
        c.write(&path)?;
        let files = list(&self.dir)?;
        if files.len() > self.keep {
            for (_, old) in &files[..files.len() - self.keep] {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(path)
    }
}
