//! Checkpoints end to end on one process: exact resume of training and of LoFT pre-training,
//! graceful stops on signals, and every fault a user can meet (missing, truncated, corrupted
//! or newer files, another architecture, `kill -9` during a write, a full disk), plus reading
//! a checkpoint from h5py.

mod common;

use common::{metrics_without_timings, ok, one_line_error};
use loft::checkpoint::Checkpoint;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn loft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_loft"))
}

fn run(args: &[String]) -> Output {
    loft().args(args).output().expect("run loft")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// A small training run on synthetic data: 3 epochs of 12 batches.
fn train_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = s(&[
        "--threads",
        "1",
        "train",
        "--dataset",
        "synthetic",
        "--base-width",
        "3",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--train-subset",
        "96",
        "--test-subset",
        "32",
        "--lr",
        "0.05",
        "--seed",
        "5",
        "--progress",
        "none",
        "--out",
    ]);
    v.push(out.display().to_string());
    v.extend(s(extra));
    v
}

/// A small LoFT run with one worker on synthetic data: 4 rounds of 2 steps.
fn pretrain_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = s(&[
        "--threads",
        "1",
        "pretrain",
        "--dataset",
        "synthetic",
        "--base-width",
        "3",
        "--rounds",
        "4",
        "--local-steps",
        "2",
        "--batch-size",
        "8",
        "--train-subset",
        "96",
        "--test-subset",
        "32",
        "--eval-every",
        "2",
        "--seed",
        "7",
        "--progress",
        "none",
        "--out",
    ]);
    v.push(out.display().to_string());
    v.extend(s(extra));
    v
}

/// `args` with the value of `flag` replaced.
fn with(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|x| x == flag).expect("flag present");
    args[i + 1] = value.to_string();
    args
}

fn resume(path: &Path, out: &Path, command: &str) -> Vec<String> {
    s(&[
        "--threads",
        "1",
        command,
        "--resume",
        path.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--progress",
        "none",
    ])
}

fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    loft::checkpoint::list(&dir.join("checkpoints"))
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

fn newest(dir: &Path) -> Checkpoint {
    Checkpoint::read(checkpoints(dir).last().expect("a checkpoint")).expect("readable")
}

/// Two runs ended in the same state: parameters, statistics and momentum bit for bit, and
/// the same metric log apart from timings.
fn same_run(a: &Path, b: &Path) {
    let (ca, cb) = (newest(a), newest(b));
    assert!(ca.state.done && cb.state.done);
    assert!(ca.params == cb.params, "parameters differ");
    assert!(ca.stats == cb.stats, "BN statistics differ");
    assert!(ca.momentum == cb.momentum, "momentum differs");
    assert_eq!(metrics_without_timings(a), metrics_without_timings(b));
}

#[test]
fn training_resumed_from_any_epoch_ends_bit_identical() {
    let full = tmp("train-full");
    ok(&run(&train_args(&full, &["--checkpoint-every", "1"])));
    let files = checkpoints(&full);
    assert_eq!(files.len(), 3, "{files:?}");
    for (i, f) in files[..2].iter().enumerate() {
        let b = tmp(&format!("train-resumed-{i}"));
        ok(&run(&resume(f, &b, "train")));
        same_run(&full, &b);
    }
}

#[test]
fn loft_with_one_worker_resumes_bit_identical() {
    let full = tmp("loft1-full");
    ok(&run(&pretrain_args(
        &full,
        &["--checkpoint-every", "1", "--keep", "10"],
    )));
    let files = checkpoints(&full);
    // round 0 (the initialisation) and rounds 1 to 4
    assert_eq!(files.len(), 5);
    let b = tmp("loft1-resumed");
    ok(&run(&resume(&files[2], &b, "pretrain")));
    same_run(&full, &b);
    assert_eq!(
        std::fs::read(full.join("params.f32")).unwrap(),
        std::fs::read(b.join("params.f32")).unwrap()
    );
}

/// Start `args`, wait until its metric log has `lines` lines, send `signal`, wait for it.
fn signal_after(args: &[String], out: &Path, lines: usize, signal: &str) -> Output {
    let child = loft()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn loft");
    let start = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < lines
    {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    child.wait_with_output().unwrap()
}

#[test]
fn sigterm_stops_training_with_a_checkpoint_and_resume_continues_exactly() {
    // long epochs, so the signal lands inside one: 6 epochs of 48 batches
    let args = |out: &Path| {
        let a = train_args(out, &["--checkpoint-every", "0"]);
        with(with(a, "--train-subset", "384"), "--epochs", "6")
    };
    let stopped = tmp("sigterm");
    let o = signal_after(&args(&stopped), &stopped, 1, "TERM");
    assert_eq!(
        o.status.code(),
        Some(loft::checkpoint::EXIT_STOPPED),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("--resume"), "{out}");
    let c = newest(&stopped);
    assert!(!c.state.done);
    assert!(!stopped.join("summary.json").exists());
    // resume in place (the run directory), then compare with an uninterrupted run
    ok(&run(&s(&[
        "--threads",
        "1",
        "train",
        "--resume",
        stopped.to_str().unwrap(),
        "--progress",
        "none",
    ])));
    let full = tmp("sigterm-full");
    ok(&run(&args(&full)));
    same_run(&stopped, &full);
}

#[test]
fn sigusr1_stops_loft_pretraining_after_the_round_in_progress() {
    let args = |out: &Path| with(pretrain_args(out, &["--checkpoint-every", "0"]), "--rounds", "60");
    let stopped = tmp("sigusr1");
    let o = signal_after(&args(&stopped), &stopped, 2, "USR1");
    assert_eq!(o.status.code(), Some(loft::checkpoint::EXIT_STOPPED));
    let c = newest(&stopped);
    assert!(c.state.round >= 2 && c.state.round < 60, "round {}", c.state.round);
    assert_eq!(c.state.step, c.state.round * 2);
    ok(&run(&s(&[
        "--threads",
        "1",
        "pretrain",
        "--resume",
        stopped.to_str().unwrap(),
        "--progress",
        "none",
    ])));
    let full = tmp("sigusr1-full");
    ok(&run(&args(&full)));
    same_run(&stopped, &full);
}

#[test]
fn bad_checkpoints_give_one_line_errors() {
    let dir = tmp("bad");
    ok(&run(&with(train_args(&dir, &[]), "--epochs", "1")));
    let good = checkpoints(&dir).pop().unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let inspect = |p: &Path| loft().args(["inspect", p.to_str().unwrap()]).output().unwrap();
    ok(&inspect(&good));

    one_line_error(&inspect(&dir.join("missing.h5")), "missing.h5");
    let t = dir.join("truncated.h5");
    std::fs::write(&t, &bytes[..bytes.len() / 2]).unwrap();
    one_line_error(&inspect(&t), "truncated");
    let e = dir.join("empty.h5");
    std::fs::write(&e, b"").unwrap();
    one_line_error(&inspect(&e), "not a loft checkpoint");
    // flipped bytes anywhere: header, HDF5 metadata, parameters, the end
    for at in [3, 100, 600, 2000, bytes.len() / 3, bytes.len() / 2, bytes.len() - 10] {
        let mut b = bytes.clone();
        b[at] ^= 0x5a;
        let c = dir.join(format!("flipped-{at}.h5"));
        std::fs::write(&c, &b).unwrap();
        let o = inspect(&c);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("corrupted") || err.contains("damaged") || err.contains("not a loft checkpoint"),
            "byte {at}: {err}"
        );
        one_line_error(&o, &c.display().to_string());
    }
    // a newer format
    let mut b = bytes.clone();
    b[16] = b'2';
    let n = dir.join("newer.h5");
    std::fs::write(&n, &b).unwrap();
    one_line_error(&inspect(&n), "newer than this loft reads");
    // a different architecture or data set on resume
    let o = run(&[resume(&good, &tmp("bad-arch"), "train"), s(&["--base-width", "4"])].concat());
    one_line_error(&o, "--base-width");
    let o = run(&[
        resume(&good, &tmp("bad-data"), "train"),
        s(&["--dataset", "fashion-mnist"]),
    ]
    .concat());
    one_line_error(&o, "--dataset");
    // a training checkpoint given to pretrain
    let o = run(&resume(&good, &tmp("bad-kind"), "pretrain"));
    one_line_error(&o, "train checkpoint");
    // a directory without checkpoints
    let o = run(&resume(&tmp("no-such-run"), &tmp("bad-none"), "train"));
    one_line_error(&o, "no-such-run");
}

#[test]
fn kill_9_during_a_checkpoint_write_leaves_the_previous_one_usable() {
    let dir = tmp("kill9");
    let mut child = loft()
        .args(train_args(&dir, &["--checkpoint-every", "1"]))
        .env("LOFT_INJECT_CHECKPOINT_STALL", "2")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "loft ended before stalling");
        if line.contains("stalling") {
            break;
        }
    }
    child.kill().unwrap(); // SIGKILL, while the second checkpoint is half done
    child.wait().unwrap();
    let files = checkpoints(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let tmps: Vec<_> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert_eq!(
        tmps.len(),
        1,
        "the interrupted write should have left its temporary file"
    );
    assert_eq!(Checkpoint::read(&files[0]).unwrap().state.epoch, 1);
    // resuming the directory takes the complete checkpoint and ends as an uninterrupted run
    ok(&run(&s(&[
        "--threads",
        "1",
        "train",
        "--resume",
        dir.to_str().unwrap(),
        "--progress",
        "none",
    ])));
    let full = tmp("kill9-full");
    ok(&run(&train_args(&full, &[])));
    same_run(&dir, &full);
}

/// Mount a tmpfs of `kib` KiB at `at` (needs root); false where mounting is not allowed.
fn mount_tmpfs(at: &Path, kib: u64) -> bool {
    std::fs::create_dir_all(at).unwrap();
    Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={kib}k"),
            "tmpfs",
            at.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn a_full_disk_is_reported_and_the_previous_checkpoint_survives() {
    let src = tmp("full-src");
    ok(&run(&train_args(&src, &["--checkpoint-every", "1"])));
    let first = checkpoints(&src)[0].clone();
    let size = std::fs::metadata(&first).unwrap().len();
    // a run directory holding the first checkpoint, on a disk with room for half another
    let mnt = tmp("full-mnt");
    let run_dir = mnt.join("run");
    let mounted = mount_tmpfs(&mnt, (size + size / 2) / 1024 + 64);
    std::fs::create_dir_all(run_dir.join("checkpoints")).unwrap();
    std::fs::copy(&first, run_dir.join("checkpoints").join(first.file_name().unwrap())).unwrap();
    let mut cmd = if mounted {
        let mut c = loft();
        c.args(resume(&run_dir, &run_dir, "train"));
        c
    } else {
        // no mount allowed: a file-size limit makes the write fail the same way
        eprintln!("note: tmpfs not mountable here; limiting the file size instead");
        let mut c = Command::new("sh");
        let args = resume(&run_dir, &run_dir, "train").join(" ");
        c.args([
            "-c",
            &format!(
                "ulimit -f {}; trap '' XFSZ; exec {} {args}",
                size / 2048,
                env!("CARGO_BIN_EXE_loft")
            ),
        ]);
        c
    };
    let o = cmd.output().unwrap();
    // the previous checkpoint is intact and no temporary file is left behind
    let names: Vec<String> = std::fs::read_dir(run_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let files = checkpoints(&run_dir);
    let intact = files.len() == 1 && Checkpoint::read(&files[0]).is_ok();
    if mounted {
        let _ = Command::new("umount").arg("-l").arg(&mnt).status();
    }
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("full disk: {err}");
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("checkpoint"), "{err}");
    assert!(intact, "previous checkpoint damaged: {names:?}");
    assert_eq!(names.len(), 1, "{names:?}");
    // an unwritable checkpoint directory fails before any training
    let blocked = tmp("full-blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    std::fs::write(blocked.join("checkpoints"), b"in the way").unwrap();
    let o = run(&train_args(&blocked, &[]));
    one_line_error(&o, "checkpoints");
}

#[test]
fn checkpoints_rotate_and_inspect_reports_norms() {
    let dir = tmp("rotate");
    ok(&run(&train_args(&dir, &["--checkpoint-every", "1", "--keep", "2"])));
    let files = checkpoints(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    let o = loft()
        .args(["inspect", files[1].to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    ok(&o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = Checkpoint::read(&files[1]).unwrap();
    let e = c.param_layout.find("stem.conv.weight").unwrap();
    let row = &j["params"].as_array().unwrap()[0];
    assert_eq!(row["name"], "stem.conv.weight");
    let want = loft::inspect::norm(&c.params[e.offset..e.offset + e.len]);
    assert_eq!(row["norm"].as_f64().unwrap(), want);
    assert!(want > 0.0);
    let text = loft().args(["inspect", files[1].to_str().unwrap()]).output().unwrap();
    ok(&text);
    assert!(String::from_utf8_lossy(&text.stdout).contains("stem.conv.weight"));
}

/// A Python with h5py: Debian's (python3-h5py), or the first python3 on PATH.
fn python_with_h5py() -> Option<String> {
    for py in ["/usr/bin/python3", "python3"] {
        let ok = Command::new(py)
            .args(["-c", "import h5py, numpy"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(py.to_string());
        }
    }
    if std::env::var_os("LOFT_REQUIRE_DATA").is_some() {
        panic!("h5py is required (apt-get install python3-h5py; make test installs it)");
    }
    eprintln!("note: h5py not found; skipping");
    None
}

/// The reader of `docs/checkpoint-format.md`, checking every checksum too.
const H5PY_READER: &str = r#"
import sys, zlib, json
import h5py, numpy as np
path, name = sys.argv[1], sys.argv[2]
with open(path, "rb") as f:
    head, body = f.read(512), f.read()
tag, version, crc, size = head.split(b"\n")[0].decode().split()
assert tag == "LOFT-CHECKPOINT" and version == "1"
assert int(size.split("=")[1]) == len(body) and int(crc.split("=")[1], 16) == zlib.crc32(body)
f = h5py.File(path, "r")
assert f.attrs["format"] == "loft-checkpoint" and f.attrs["format_version"] == 1
checked = []
def check(key, obj):
    if not isinstance(obj, h5py.Dataset):
        return
    if h5py.check_string_dtype(obj.dtype):
        items = [obj.asstr()[()]] if obj.shape == () else list(obj.asstr()[()])
        data = b"".join(s.encode() + b"\0" for s in items)
    else:
        data = np.ascontiguousarray(obj[()]).astype(obj.dtype.newbyteorder("<")).tobytes()
    assert zlib.crc32(data) == obj.attrs["crc32"], key
    checked.append(key)
f.visititems(check)
lay = f["layout/params"]
i = list(lay["name"].asstr()[()]).index(name)
off, n, nd = int(lay["offset"][i]), int(lay["len"][i]), int(lay["ndim"][i])
shape = tuple(int(d) for d in lay["shape"][i][:nd])
w = f["params"][off:off + n].reshape(shape)
state = json.loads(f["state"][()])
print(json.dumps({"shape": shape, "norm": float(np.linalg.norm(w.astype(np.float64))),
                  "checked": len(checked), "step": state["step"], "config_lr": json.loads(f["config"][()])["lr"]}))
"#;

#[test]
fn h5py_reads_a_checkpoint_and_agrees_with_loft_inspect() {
    let Some(py) = python_with_h5py() else { return };
    let dir = tmp("h5py");
    ok(&run(&pretrain_args(&dir, &["--simulate-workers", "2"])));
    let file = checkpoints(&dir).pop().unwrap();
    let name = "s3.b1.conv1.weight";
    let o = Command::new(&py)
        .args(["-c", H5PY_READER, file.to_str().unwrap(), name])
        .output()
        .unwrap();
    ok(&o);
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ins = loft()
        .args(["inspect", file.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    ok(&ins);
    let j: serde_json::Value = serde_json::from_slice(&ins.stdout).unwrap();
    let row = j["params"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap();
    assert_eq!(got["shape"], row["shape"]);
    let (a, b) = (got["norm"].as_f64().unwrap(), row["norm"].as_f64().unwrap());
    assert!((a - b).abs() <= 1e-12 * b, "h5py {a} vs loft {b}");
    assert!(got["checked"].as_u64().unwrap() >= 20);
    assert_eq!(got["step"], 8);
    // the paper's pre-training rate, the default
    assert_eq!(got["config_lr"], 0.1);
}

#[test]
fn filter_distance_between_checkpoints() {
    let dir = tmp("distance");
    ok(&run(&pretrain_args(&dir, &["--checkpoint-every", "1", "--keep", "10"])));
    let files = checkpoints(&dir);
    let dist = |a: &Path, b: &Path| {
        let o = loft()
            .args([
                "distance",
                a.to_str().unwrap(),
                b.to_str().unwrap(),
                "--ratio",
                "0.5",
                "--json",
            ])
            .output()
            .unwrap();
        ok(&o);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let same = dist(&files[3], &files[3]);
    assert_eq!(
        (same["index"].as_f64(), same["weight"].as_f64()),
        (Some(0.0), Some(0.0))
    );
    let d = dist(&files[0], &files[3]);
    let w = d["weight"].as_f64().unwrap();
    assert!(w > 0.0 && w < 2.0, "{d}");
    assert_eq!(d["blocks"].as_array().unwrap().len(), 5); // preresnet18: 5 blocks without projection
                                                          // another network is refused
    let other = tmp("distance-other");
    ok(&run(&with(pretrain_args(&other, &[]), "--base-width", "4")));
    let o = loft()
        .args([
            "distance",
            files[3].to_str().unwrap(),
            checkpoints(&other)[0].to_str().unwrap(),
        ])
        .output()
        .unwrap();
    one_line_error(&o, "different network");
    let o = loft()
        .args([
            "distance",
            files[3].to_str().unwrap(),
            files[3].to_str().unwrap(),
            "--ratio",
            "1.5",
        ])
        .output()
        .unwrap();
    one_line_error(&o, "--ratio");
}

#[test]
fn pretraining_records_distances_and_stops_early() {
    let dir = tmp("early");
    let a = with(
        pretrain_args(&dir, &["--early-stop", "0.1", "--distance-ratio", "0.3"]),
        "--rounds",
        "40",
    );
    ok(&run(&a));
    let m = metrics_without_timings(&dir);
    assert!(m.len() < 40, "no early stop: {} rounds", m.len());
    // round 1 is compared with the initialisation (round 0)
    assert!(m[0]["distance_idx"].as_f64().unwrap() >= 0.0, "{}", m[0]);
    let last4: Vec<f64> = m[m.len() - 4..]
        .iter()
        .map(|r| r["distance_idx"].as_f64().unwrap())
        .collect();
    assert!(last4.iter().all(|&d| d <= 0.1), "{last4:?}");
    assert!(m.iter().skip(1).all(|r| r["distance_w"].as_f64().unwrap() >= 0.0));
    let c = newest(&dir);
    assert!(c.state.done && (c.state.round as usize) == m.len());
    assert!(
        m.last().unwrap()["test_acc"].is_number(),
        "the early-stopped model is evaluated"
    );
    let bad = run(&with(
        pretrain_args(&tmp("early-bad"), &["--early-stop", "0.1", "--distance-every", "0"]),
        "--rounds",
        "2",
    ));
    one_line_error(&bad, "--early-stop");
}
