//! End to end on the emulated CUDA device (`--device cuda-emu`): dense training and a 2-rank
//! LoFT pre-training run through the CUDA backend's kernels and launch code, and track the
//! CPU runs: every logged loss within 0.5% (the kernels sum in another order than the CPU,
//! and training amplifies the last bits; the ops themselves agree to 1e-5, tests/kernels.rs).
//! The LoFT ledger is the closed form, to the byte, as on the CPU.

mod common;

use common::{have_mpirun, mpirun_loft, ok};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-cuda-emu-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn loft(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().unwrap()
}

fn args(list: &[&str], out: &Path, device: &str) -> Vec<String> {
    let mut v: Vec<String> = list.iter().map(|s| s.to_string()).collect();
    v.extend([
        "--device".into(),
        device.into(),
        "--out".into(),
        out.to_str().unwrap().into(),
    ]);
    v
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Every loss logged in `metrics.jsonl` of the two runs agrees within `rel`.
fn losses_track(cpu: &Path, emu: &Path, rel: f64) {
    let read = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (read(cpu), read(emu));
    assert_eq!(a.len(), b.len(), "records");
    let mut compared = 0;
    for (ra, rb) in a.iter().zip(&b) {
        for key in ["train_loss", "test_loss"] {
            if let (Some(x), Some(y)) = (ra[key].as_f64(), rb[key].as_f64()) {
                assert!(
                    (x - y).abs() <= rel * x.abs(),
                    "{key}: cpu {x} emulated {y}\ncpu {ra}\nemu {rb}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 2, "no losses compared");
}

#[test]
fn dense_training_on_the_emulated_device_tracks_the_cpu() {
    let list = [
        "--threads",
        "1",
        "train",
        "--dataset",
        "synthetic",
        "--base-width",
        "3",
        "--epochs",
        "2",
        "--train-subset",
        "32",
        "--test-subset",
        "16",
        "--batch-size",
        "16",
        "--seed",
        "5",
        "--progress",
        "none",
    ];
    let (cpu, emu) = (tmp("train-cpu"), tmp("train-emu"));
    ok(&loft(&args(&list, &cpu, "cpu")));
    ok(&loft(&args(&list, &emu, "cuda-emu")));
    losses_track(&cpu, &emu, 5e-3);
    let s = json(&emu.join("summary.json"));
    assert_eq!(s["device"], "cuda-emu");
    assert!(
        s["backend"].as_str().unwrap().starts_with("cuda-emu"),
        "{}",
        s["backend"]
    );
}

#[test]
fn loft_on_two_ranks_on_the_emulated_device_tracks_the_cpu_and_counts_every_byte() {
    let list = [
        "--threads",
        "1",
        "pretrain",
        "--dataset",
        "synthetic",
        "--base-width",
        "3",
        "--rounds",
        "3",
        "--local-steps",
        "2",
        "--batch-size",
        "8",
        "--train-subset",
        "96",
        "--test-subset",
        "32",
        "--eval-every",
        "3",
        "--lr",
        "0.05",
        "--schedule",
        "cosine",
        "--seed",
        "11",
        "--progress",
        "none",
    ];
    let (cpu, emu) = (tmp("loft-cpu"), tmp("loft-emu"));
    if !have_mpirun() {
        return;
    }
    ok(&mpirun_loft(2, &args(&list, &cpu, "cpu")));
    ok(&mpirun_loft(2, &args(&list, &emu, "cuda-emu")));
    losses_track(&cpu, &emu, 5e-3);
    let (lc, le) = (json(&cpu.join("ledger.json")), json(&emu.join("ledger.json")));
    assert_eq!(le["per_rank_sync_bytes_sent"], le["per_rank_sync_bytes_closed_form"]);
    assert_eq!(le["per_rank_sync_bytes_sent"], lc["per_rank_sync_bytes_sent"]);
    assert_eq!(le["per_rank_sync_bytes_received"], lc["per_rank_sync_bytes_received"]);
}
