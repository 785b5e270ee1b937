//! `loft evaluate` and `loft export` on real checkpoints and tickets: evaluation gives the
//! numbers the training log printed (one process and two ranks), and the exported file, read
//! with the `safetensors` Python package, holds every tensor of the checkpoint under its name
//! and shape with its exact values, `num_batches_tracked` included, and the architecture.

mod common;

use common::{have_mpirun, mpirun_loft, ok, one_line_error};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn loft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().unwrap()
}

fn json_out(o: &Output) -> serde_json::Value {
    ok(o);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

/// A short dense run on synthetic data; its last checkpoint and the test loss and accuracy
/// its log printed for it.
fn trained(dir: &Path) -> (PathBuf, f64, f64) {
    let out = dir.join("run");
    ok(&loft(&[
        "--threads",
        "1",
        "train",
        "--dataset",
        "synthetic",
        "--base-width",
        "4",
        "--epochs",
        "2",
        "--train-subset",
        "256",
        "--test-subset",
        "100",
        "--val-size",
        "60",
        "--batch-size",
        "32",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ]));
    let files = loft::checkpoint::list(&out.join("checkpoints")).unwrap();
    let last = files.last().unwrap().1.clone();
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    (
        last,
        rec["test_loss"].as_f64().unwrap(),
        rec["test_acc"].as_f64().unwrap(),
    )
}

#[test]
fn evaluate_prints_what_the_training_log_printed() {
    let dir = tmp("evaluate");
    let (ckpt, loss, acc) = trained(&dir);
    let png = dir.join("confusion.png");
    let e = json_out(&loft(&[
        "evaluate",
        ckpt.to_str().unwrap(),
        "--json",
        "--confusion",
        png.to_str().unwrap(),
    ]));
    assert_eq!(e["samples"], 100);
    assert!(
        (e["loss"].as_f64().unwrap() - loss).abs() < 1e-5 * loss,
        "{} vs log {loss}",
        e["loss"]
    );
    assert_eq!(e["top1"].as_f64().unwrap(), acc);
    let top5 = e["top5"].as_f64().unwrap();
    assert!(top5 >= acc && top5 <= 100.0);
    // per-class counts and the confusion matrix agree with the totals
    let conf: Vec<Vec<u64>> = serde_json::from_value(e["confusion"].clone()).unwrap();
    let total: u64 = conf.iter().flatten().sum();
    let diag: u64 = (0..conf.len()).map(|i| conf[i][i]).sum();
    assert_eq!(total, 100);
    assert!((100.0 * diag as f64 / 100.0 - acc).abs() < 1e-9);
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    // a table by default; a wrong file is one line
    let t = loft(&["evaluate", ckpt.to_str().unwrap()]);
    ok(&t);
    assert!(String::from_utf8_lossy(&t.stdout).contains("top-5"));
    one_line_error(&loft(&["evaluate", "/nonexistent.h5"]), "/nonexistent.h5");
    one_line_error(
        &loft(&["evaluate", ckpt.to_str().unwrap(), "--batch-size", "0"]),
        "--batch-size",
    );
    one_line_error(
        &loft(&["evaluate", ckpt.to_str().unwrap(), "--split", "dev"]),
        "test, train, val",
    );
    // the validation images the run held out: the accuracy its log printed for them
    let log = std::fs::read_to_string(dir.join("run/metrics.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(log.lines().last().unwrap()).unwrap();
    let v = json_out(&loft(&["evaluate", ckpt.to_str().unwrap(), "--split", "val", "--json"]));
    assert_eq!(v["samples"], 60);
    assert_eq!(v["top1"], rec["val_acc"]);
    assert!((v["loss"].as_f64().unwrap() - rec["val_loss"].as_f64().unwrap()).abs() < 1e-5);
}

#[test]
fn evaluate_on_two_ranks_sums_the_shards() {
    if !have_mpirun() {
        return;
    }
    let dir = tmp("evaluate-mpi");
    let (ckpt, _, acc) = trained(&dir);
    let o = mpirun_loft(2, &["evaluate", ckpt.to_str().unwrap(), "--json"]);
    let e = json_out(&o);
    assert_eq!(e["samples"], 100);
    assert_eq!(e["top1"].as_f64().unwrap(), acc);
}

/// Debian's python3 with the safetensors package `make deps` puts in .deps/python.
fn python() -> Option<Command> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/.deps/python");
    let mut c = Command::new("/usr/bin/python3");
    c.env("PYTHONPATH", dir);
    let works = Command::new("/usr/bin/python3")
        .env("PYTHONPATH", dir)
        .args(["-c", "import safetensors.numpy, numpy, h5py"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        Some(c)
    } else if std::env::var_os("LOFT_REQUIRE_DATA").is_some() {
        panic!("python3 with safetensors, numpy and h5py is required (make deps installs them)")
    } else {
        eprintln!("note: safetensors for python3 not installed; skipping (make deps)");
        None
    }
}

/// Every tensor of the checkpoint, by `loft inspect --json` (names, shapes, offsets) and the
/// flat buffers read with h5py, against the exported file read with safetensors.
const CHECK: &str = r#"
import json, sys
import h5py, numpy as np
from safetensors import safe_open
ckpt, exported, inspect = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
flat = {}
with h5py.File(ckpt, "r") as h:
    flat["params"] = np.asarray(h["params"][...], dtype=np.float32)
    flat["stats"] = np.asarray(h["stats"][...], dtype=np.float32)
with safe_open(exported, "np") as f:
    names = set(f.keys())
    meta = f.metadata()
    want = set()
    for table in ("params", "stats"):
        for e in inspect[table]:
            want.add(e["name"])
            t = f.get_tensor(e["name"])
            assert t.dtype == np.float32, e["name"]
            assert list(t.shape) == e["shape"], (e["name"], t.shape, e["shape"])
            ref = flat[table][e["offset"]:e["offset"] + e["len"]].reshape(e["shape"])
            assert np.array_equal(t, ref), e["name"]
            if e["name"].endswith(".running_mean"):
                bn = e["name"][: -len(".running_mean")]
                n = f.get_tensor(bn + ".num_batches_tracked")
                assert n.dtype == np.int64 and n.shape == () and int(n) == inspect["state"]["step"], bn
                want.add(bn + ".num_batches_tracked")
    assert names == want, sorted(names ^ want)
blocks = json.loads(meta["blocks"])
arch = inspect["config"]["arch"]
assert meta["format"] == "loft-resnet" and int(meta["classes"]) == arch["classes"]
assert meta["family"] == "preact" and int(meta["depth"]) == arch["depth"] and meta["stem"] == "cifar"
for b in blocks:
    w = next(e for e in inspect["params"] if e["name"] == b["name"] + ".conv1.weight")["shape"]
    assert w[0] == b["inner"] and w[1] == b["c_in"], b
print(json.dumps({"tensors": len(names), "inner": [b["inner"] for b in blocks]}))
"#;

fn check_export(py: &mut Command, dir: &Path, ckpt: &Path, name: &str) -> serde_json::Value {
    let out = dir.join(format!("{name}.safetensors"));
    ok(&loft(&[
        "export",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]));
    let inspect = dir.join(format!("{name}.inspect.json"));
    let o = loft(&["inspect", ckpt.to_str().unwrap(), "--json"]);
    ok(&o);
    std::fs::write(&inspect, &o.stdout).unwrap();
    let r = py
        .args([
            "-c",
            CHECK,
            ckpt.to_str().unwrap(),
            out.to_str().unwrap(),
            inspect.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    json_out(&r)
}

#[test]
fn exported_files_hold_every_tensor_with_its_name_shape_and_value() {
    let dir = tmp("export");
    let (ckpt, _, _) = trained(&dir);
    let Some(_) = python() else { return };
    let full = check_export(&mut python().unwrap(), &dir, &ckpt, "full");
    // a narrow ticket: half the inner filters of every prunable block
    let ticket = dir.join("ticket.h5");
    ok(&loft(&[
        "prune",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--ratio",
        "0.5",
        "--out",
        ticket.to_str().unwrap(),
    ]));
    let narrow = check_export(&mut python().unwrap(), &dir, &ticket, "ticket");
    assert_eq!(full["tensors"], narrow["tensors"]);
    let (wide, thin): (Vec<u64>, Vec<u64>) = (
        serde_json::from_value(full["inner"].clone()).unwrap(),
        serde_json::from_value(narrow["inner"].clone()).unwrap(),
    );
    assert!(thin.iter().zip(&wide).all(|(t, w)| t <= w) && thin.iter().sum::<u64>() < wide.iter().sum::<u64>());
    // the ticket evaluates too (its own narrow network)
    let e = json_out(&loft(&["evaluate", ticket.to_str().unwrap(), "--json"]));
    assert_eq!(e["kind"], "ticket");
    one_line_error(&loft(&["export", "/nonexistent.h5"]), "/nonexistent.h5");
}
