//! Checkpoints written by an earlier release resume bit-identically.
//!
//! `tests/fixtures/v0.1.0/` holds two mid-run checkpoints written by loft 0.1.0 (before the
//! device-generic engine) and, in `expected.json`, what that release wrote when it continued
//! them to the end: the FNV-1a hashes of the final parameters, BN statistics and momentum,
//! and the metric log without its timings. Resuming them with this build must give the same
//! bits. The runs: LoFT pre-training with 2 simulated workers and `--keep-momentum` (4 rounds,
//! the fixture is after round 2), and dense training (2 epochs, the fixture is after epoch 1),
//! both on synthetic data with PreResNet-18 at base width 2.

mod common;

use common::{metrics_without_timings, ok};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v0.1.0")
}

/// FNV-1a over the bits of the values (the hash `expected.json` records).
fn fnv(values: &[f32]) -> String {
    let h = values.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
        (h ^ v.to_bits() as u64).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{h:016x}")
}

/// Resume fixture `file` with `loft <command>` in a fresh run directory and compare the final
/// state with what the earlier release wrote.
fn resumes_bit_identically(command: &str, file: &str, key: &str) {
    let dir = std::env::temp_dir().join(format!("loft-compat-{}-{key}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
    std::fs::copy(fixtures().join(file), dir.join("checkpoints").join(file_name_of(file))).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_loft"))
        .args(["--threads", "1", command, "--resume"])
        .arg(&dir)
        .args(["--progress", "none"])
        .output()
        .unwrap();
    ok(&o);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let want = &expected[key];
    let files = loft::checkpoint::list(&dir.join("checkpoints")).unwrap();
    let last = loft::checkpoint::Checkpoint::read(&files.last().expect("a final checkpoint").1).unwrap();
    assert_eq!(fnv(&last.params), want["params"].as_str().unwrap(), "parameters differ");
    assert_eq!(
        fnv(&last.stats),
        want["stats"].as_str().unwrap(),
        "BN statistics differ"
    );
    assert_eq!(
        fnv(&last.momentum),
        want["momentum"].as_str().unwrap(),
        "momentum differs"
    );
    let log = metrics_without_timings(&dir);
    assert_eq!(serde_json::Value::Array(log), want["metrics"], "metric logs differ");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The step-numbered name a checkpoint file has in a run directory.
fn file_name_of(fixture: &str) -> &'static str {
    match fixture {
        "pretrain-loft-s2-round2.h5" => "step-000000004.h5",
        "train-epoch1.h5" => "step-000000008.h5",
        other => panic!("unknown fixture {other}"),
    }
}

#[test]
fn loft_pretraining_checkpoint_of_0_1_0_resumes_bit_identically() {
    resumes_bit_identically("pretrain", "pretrain-loft-s2-round2.h5", "pretrain");
}

#[test]
fn dense_training_checkpoint_of_0_1_0_resumes_bit_identically() {
    resumes_bit_identically("train", "train-epoch1.h5", "train");
}
