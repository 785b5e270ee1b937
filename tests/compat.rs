//! Checkpoints written by an earlier release resume on that release's trajectory.
//!
//! `tests/fixtures/v0.1.0/` holds two mid-run checkpoints written by loft 0.1.0 (before the
//! device-generic engine) and, in `expected.json`, what that release wrote when it continued
//! them to the end: the FNV-1a hashes of the final parameters, BN statistics and momentum,
//! and the metric log without its timings. The runs: LoFT pre-training with 2 simulated
//! workers and `--keep-momentum` (4 rounds, the fixture is after round 2), and dense training
//! (2 epochs, the fixture is after epoch 1), both on synthetic data with PreResNet-18 at base
//! width 2.
//!
//! Up to 0.1.0's convolutions this build reproduced those bits. Its CPU convolutions now run
//! 3x3 stride-1 layers with Winograd F(2x2, 3x3) and batch norm sums in lanes, which round
//! differently, so the check is: resuming a 0.1.0 checkpoint gives the log 0.1.0 wrote row by
//! row (the same rounds, steps and learning rates exactly; losses, accuracies and distances
//! within rounding: 1e-3 relative, one sample), and resuming it twice gives the same bits
//! (parameters, statistics, momentum and log).

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

/// The final (parameters, statistics, momentum) hashes and the metric log of resuming
/// fixture `file` with `loft <command>` in a fresh run directory.
fn resume(command: &str, file: &str, key: &str, attempt: usize) -> ([String; 3], Vec<serde_json::Value>) {
    let dir = std::env::temp_dir().join(format!("loft-compat-{}-{key}-{attempt}", std::process::id()));
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
    let files = loft::checkpoint::list(&dir.join("checkpoints")).unwrap();
    let last = loft::checkpoint::Checkpoint::read(&files.last().expect("a final checkpoint").1).unwrap();
    let hashes = [fnv(&last.params), fnv(&last.stats), fnv(&last.momentum)];
    let log = metrics_without_timings(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    (hashes, log)
}

/// Whether two metric values agree: equal, or numbers within rounding (accuracies in percent
/// of a 32-sample batch: one sample; everything else 1e-3 relative).
fn same_value(name: &str, a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if name.ends_with("_acc") => (x - y).abs() <= 100.0 / 32.0 + 1e-9,
        (Some(x), Some(y)) if matches!(name, "round" | "epoch" | "step" | "lr") => x == y,
        (Some(x), Some(y)) => (x - y).abs() <= 1e-3 * x.abs().max(y.abs()).max(1e-3),
        _ => a == b,
    }
}

/// Resume fixture `file` twice: the same bits both times, and 0.1.0's log within rounding.
fn resumes_on_the_same_trajectory(command: &str, file: &str, key: &str) {
    let (hashes, log) = resume(command, file, key, 1);
    let again = resume(command, file, key, 2);
    assert_eq!(
        (&hashes, &log),
        (&again.0, &again.1),
        "resuming twice gave different results"
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let want = expected[key]["metrics"].as_array().expect("metrics");
    assert_eq!(log.len(), want.len(), "rows of the metric log");
    for (row, (got, want)) in log.iter().zip(want).enumerate() {
        let (g, w) = (got.as_object().unwrap(), want.as_object().unwrap());
        assert_eq!(
            g.keys().collect::<Vec<_>>(),
            w.keys().collect::<Vec<_>>(),
            "row {row}: fields"
        );
        for (name, wv) in w {
            assert!(
                same_value(name, &g[name], wv),
                "row {row}: {name} is {} where 0.1.0 wrote {wv}",
                g[name]
            );
        }
    }
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
fn loft_pretraining_checkpoint_of_0_1_0_resumes_on_its_trajectory() {
    resumes_on_the_same_trajectory("pretrain", "pretrain-loft-s2-round2.h5", "pretrain");
}

#[test]
fn dense_training_checkpoint_of_0_1_0_resumes_on_its_trajectory() {
    resumes_on_the_same_trajectory("train", "train-epoch1.h5", "train");
}
