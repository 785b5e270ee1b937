//! The run directory every computing command writes: `config.json` (the resolved
//! configuration), `metrics.jsonl` (one JSON object per epoch or round), `summary.json` (how
//! the run ended), `ledger.json` (pre-training), and `checkpoints/`.
//!
//! Files are written atomically (a temporary file in the same directory, fsynced, renamed), so
//! a crash never leaves a half-written one. Only rank 0 writes; the other ranks hold a
//! [`RunDir`] that writes nothing, so the training code calls it the same way on every rank.

use crate::{Error, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: a temporary file in the same directory, then rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Write `path` atomically with `fill` writing the contents (buffered): a temporary file in
/// the same directory, fsynced, then renamed.
pub fn write_atomic_with(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(f);
    fill(&mut w).and_then(|()| w.flush()).map_err(|e| Error::io(&tmp, e))?;
    let f = w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write a value as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    write_atomic(path, serde_json::to_string_pretty(value).expect("json").as_bytes())
}

/// Read a JSON file into a typed value; errors name the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid: {e}")))
}

/// Read a JSON-lines file into typed records; errors name the file.
pub fn read_lines<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| Error::format(path, format!("not valid JSON lines: {e}"))))
        .collect()
}

/// Create a directory and check that it is writable, so a bad path fails before any work.
pub fn prepare(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").map_err(|e| Error::io(dir, e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// `config.json`: the command's configuration and what the run resolved around it.
#[derive(Serialize)]
pub struct ConfigFile<'a, C: Serialize, X: Serialize> {
    pub config: &'a C,
    /// `train`, `finetune` or `pretrain`.
    pub kind: &'a str,
    /// The backend the run computes on.
    pub device: String,
    pub ranks: usize,
    pub threads: usize,
    /// Command-specific facts (parameter counts, samples, communication sizes, ...).
    #[serde(flatten)]
    pub extra: X,
    pub resumed_from: Option<&'a Path>,
    pub version: &'static str,
}

/// The run directory of one command on one rank.
pub struct RunDir {
    path: PathBuf,
    /// `metrics.jsonl`, open for appending (rank 0 only).
    log: Option<std::fs::File>,
    /// Everything in `metrics.jsonl` so far (it goes into checkpoints).
    log_text: String,
}

impl RunDir {
    /// Open the run directory at `path`: on rank 0 (`lead`), create it and start
    /// `metrics.jsonl` with `log_text` (the log so far, when resuming).
    pub fn open(path: &Path, lead: bool, log_text: String) -> Result<Self> {
        let mut log = None;
        if lead {
            prepare(path)?;
            let file = path.join("metrics.jsonl");
            let mut f = std::fs::File::create(&file).map_err(|e| Error::io(&file, e))?;
            f.write_all(log_text.as_bytes()).map_err(|e| Error::io(&file, e))?;
            log = Some(f);
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            log,
            log_text,
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this rank writes the files.
    pub fn writes(&self) -> bool {
        self.log.is_some()
    }

    /// The metric log so far.
    pub fn log_text(&self) -> &str {
        &self.log_text
    }

    /// Append one record to `metrics.jsonl` (and to the copy kept for checkpoints).
    pub fn log(&mut self, record: &impl Serialize) -> Result<()> {
        let line = serde_json::to_string(record).expect("json") + "\n";
        if let Some(f) = self.log.as_mut() {
            let file = self.path.join("metrics.jsonl");
            f.write_all(line.as_bytes()).map_err(|e| Error::io(&file, e))?;
            f.flush().map_err(|e| Error::io(&file, e))?;
        }
        self.log_text.push_str(&line);
        Ok(())
    }

    /// Write `name` (e.g. `config.json`) as JSON on rank 0.
    pub fn write(&self, name: &str, value: &impl Serialize) -> Result<()> {
        if self.writes() {
            write_json(&self.path.join(name), value)?;
        }
        Ok(())
    }

    /// Write `parts` one after another as little-endian f32 to `name` on rank 0 (streamed:
    /// no copy of the values is made).
    pub fn write_f32s(&self, name: &str, parts: &[&[f32]]) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        write_atomic_with(&self.path.join(name), |w| {
            for v in parts.iter().flat_map(|p| p.iter()) {
                w.write_all(&v.to_le_bytes())?;
            }
            Ok(())
        })
    }
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_lead_rank_writes_and_the_log_keeps_its_text() {
        let dir = std::env::temp_dir().join(format!("loft-rundir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut lead = RunDir::open(&dir, true, "{\"a\":1}\n".into()).unwrap();
        lead.log(&serde_json::json!({"b": 2})).unwrap();
        lead.write("summary.json", &serde_json::json!({"ok": true})).unwrap();
        assert_eq!(lead.log_text(), "{\"a\":1}\n{\"b\":2}\n");
        assert_eq!(
            std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(),
            lead.log_text()
        );
        let v: serde_json::Value = read_json(&dir.join("summary.json")).unwrap();
        assert_eq!(v["ok"], true);
        let other = tempdir_sibling(&dir);
        let mut follower = RunDir::open(&other, false, String::new()).unwrap();
        follower.log(&serde_json::json!({"c": 3})).unwrap();
        follower.write("summary.json", &1).unwrap();
        assert!(!other.exists(), "a follower rank created files");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir_sibling(dir: &Path) -> PathBuf {
        dir.with_extension("follower")
    }
}
