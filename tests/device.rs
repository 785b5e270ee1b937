//! `--device` from the command line: recorded in config.json and summary.json, free to change
//! on resume (checkpoints are device-independent), and a one-line error when it is unknown or
//! not available in this build.

mod common;

use common::{metrics_without_timings, ok, one_line_error};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn loft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-device-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn train(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "--threads",
        "1",
        "train",
        "--dataset",
        "synthetic",
        "--base-width",
        "2",
        "--train-subset",
        "64",
        "--test-subset",
        "16",
        "--batch-size",
        "16",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    loft(&args)
}

#[test]
fn the_device_is_recorded_and_may_change_on_resume() {
    let out = tmp("recorded");
    ok(&train(&out, &["--epochs", "2", "--device", "cpu"]));
    let cfg = json(&out.join("config.json"));
    assert_eq!(cfg["config"]["device"], "cpu");
    assert!(cfg["device"].as_str().unwrap().starts_with("cpu"), "{}", cfg["device"]);
    let s = json(&out.join("summary.json"));
    assert_eq!(s["device"], "cpu");
    assert!(s["backend"].as_str().unwrap().starts_with("cpu"));

    // resume its first checkpoint with another device choice: the same end as the whole run
    let files = loft::checkpoint::list(&out.join("checkpoints")).unwrap();
    let resumed = tmp("resumed");
    let o = loft(&[
        "--threads",
        "1",
        "train",
        "--resume",
        files[0].1.to_str().unwrap(),
        "--device",
        "auto",
        "--progress",
        "none",
        "--out",
        resumed.to_str().unwrap(),
    ]);
    ok(&o);
    assert_eq!(json(&resumed.join("config.json"))["config"]["device"], "auto");
    assert_eq!(metrics_without_timings(&resumed), metrics_without_timings(&out));
}

#[test]
fn unknown_and_unavailable_devices_are_one_line_errors() {
    let out = tmp("bad");
    one_line_error(&train(&out, &["--device", "gpu"]), "unknown device 'gpu'");
    one_line_error(&train(&out, &["--device", "cuda:x"]), "unknown device");
    one_line_error(&train(&out, &["--device", "cuda:1"]), "CUDA");
    one_line_error(&loft(&["bench", "--device", "cuda", "--quick"]), "CUDA");
    one_line_error(
        &loft(&[
            "pretrain",
            "--dataset",
            "synthetic",
            "--device",
            "cuda",
            "--progress",
            "none",
        ]),
        "CUDA",
    );
    // other choices list what they accept
    one_line_error(&loft(&["train", "--progress", "loud"]), "bar, lines, none");
    one_line_error(&train(&out, &["--stem", "vgg"]), "cifar, imagenet");
}
