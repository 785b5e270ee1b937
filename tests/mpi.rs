//! LoFT over real MPI: `mpirun` with 2 and 4 ranks (oversubscribed), checking the invariants
//! of the algorithm against single-process runs and the closed-form byte counts.

mod common;

use common::{metrics_without_timings, ok};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn mpirun() -> Option<&'static str> {
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        Some("mpirun")
    } else if std::env::var_os("LOFT_REQUIRE_DATA").is_some() {
        panic!("mpirun is required (apt-get install openmpi-bin; make test installs it)");
    } else {
        eprintln!("note: mpirun not found; skipping (make test installs it)");
        None
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-mpi-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Common arguments of a small, fast pre-training run on synthetic data.
fn small(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--threads",
        "1",
        "pretrain",
        "--dataset",
        "synthetic",
        "--arch",
        "preresnet18",
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
        "--seed",
        "11",
        "--progress",
        "none",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(out.to_str().unwrap().to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run_mpi(np: usize, args: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_loft"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mpirun")
}

fn run_single(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft"))
        .args(args)
        .output()
        .expect("run loft")
}

fn params(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("params.f32")).expect("params.f32")
}

fn ledger(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("ledger.json")).expect("ledger.json")).expect("json")
}

#[test]
fn mpi_runs_match_single_process_simulation_bit_for_bit_and_count_every_byte() {
    let Some(_) = mpirun() else { return };
    for np in [2usize, 4] {
        let mpi_dir = tmp(&format!("mpi{np}"));
        let o = run_mpi(np, &small(&mpi_dir, &["--verify"]), &[]);
        ok(&o);
        let sim_dir = tmp(&format!("sim{np}"));
        ok(&run_single(&small(&sim_dir, &["--simulate-workers", &np.to_string()])));
        assert_eq!(
            params(&mpi_dir),
            params(&sim_dir),
            "S = {np}: MPI and simulated parameters differ"
        );
        // the ledger equals the closed form on every rank, to the byte
        let l = ledger(&mpi_dir);
        let sent = l["per_rank_sync_bytes_sent"].as_array().unwrap();
        let recv = l["per_rank_sync_bytes_received"].as_array().unwrap();
        let closed = l["per_rank_sync_bytes_closed_form"].as_array().unwrap();
        assert_eq!(sent.len(), np);
        assert_eq!(sent, closed, "S = {np}: ledger {sent:?} vs closed form {closed:?}");
        let total_sent: u64 = sent.iter().map(|v| v.as_u64().unwrap()).sum();
        let total_recv: u64 = recv.iter().map(|v| v.as_u64().unwrap()).sum();
        assert_eq!(total_sent, total_recv);
        assert_eq!(total_sent, l["closed_form"]["loft_total_bytes"].as_u64().unwrap());
        assert!(total_sent > 0);
    }
}

#[test]
fn uneven_shares_work_and_match_the_simulation() {
    let Some(_) = mpirun() else { return };
    // inner width 3 x base 3: blocks of 18, 36 and 72 inner filters over 4 ranks
    let extra = ["--inner-width", "3", "--verify"];
    let mpi_dir = tmp("uneven-mpi");
    ok(&run_mpi(4, &small(&mpi_dir, &extra), &[]));
    let sim_dir = tmp("uneven-sim");
    ok(&run_single(&small(
        &sim_dir,
        &["--inner-width", "3", "--simulate-workers", "4"],
    )));
    assert_eq!(params(&mpi_dir), params(&sim_dir));
    let l = ledger(&mpi_dir);
    assert_eq!(l["per_rank_sync_bytes_sent"], l["per_rank_sync_bytes_closed_form"]);
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(mpi_dir.join("config.json")).unwrap()).unwrap();
    let counts: Vec<u64> = cfg["sync_elements"]["allgather_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        counts.iter().any(|&c| c != counts[0]),
        "shares should be uneven: {counts:?}"
    );
}

#[test]
fn collectives_in_small_windows_give_the_same_bits_and_bytes() {
    let Some(_) = mpirun() else { return };
    // a window of 1000 elements: the shared values, every rank's slices and the gradients
    // cross in many windows, cutting runs
    let window = [("LOFT_COMM_WINDOW", "1000")];
    let calls = |l: &serde_json::Value, kind: &str| {
        l["rank0_ledger"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["purpose"] == "sync" && e["kind"] == kind)
            .map(|e| e["calls"].as_u64().unwrap())
            .unwrap()
    };
    let extra = ["--inner-width", "3", "--keep-momentum", "--verify"];
    let windowed = tmp("windowed-mpi");
    ok(&run_mpi(3, &small(&windowed, &extra), &window));
    let whole = tmp("windowed-whole");
    ok(&run_mpi(3, &small(&whole, &extra), &[]));
    assert_eq!(params(&windowed), params(&whole));
    let (l, w) = (ledger(&windowed), ledger(&whole));
    assert_eq!(l["per_rank_sync_bytes_sent"], l["per_rank_sync_bytes_closed_form"]);
    assert_eq!(l["per_rank_sync_bytes_sent"], w["per_rank_sync_bytes_sent"]);
    assert!(calls(&l, "allgather") > 3 * calls(&w, "allgather"));
    assert!(calls(&l, "allreduce") > 3 * calls(&w, "allreduce"));
    // data-parallel dense: the gradient allreduce in windows, the same bits
    let dp = ["--method", "dense", "--verify"];
    let (a, b) = (tmp("windowed-dp"), tmp("windowed-dp-whole"));
    ok(&run_mpi(2, &small(&a, &dp), &window));
    ok(&run_mpi(2, &small(&b, &dp), &[]));
    assert_eq!(params(&a), params(&b));
}

#[test]
fn kept_momentum_travels_with_its_filters() {
    let Some(_) = mpirun() else { return };
    let mpi_dir = tmp("keep-mpi");
    ok(&run_mpi(2, &small(&mpi_dir, &["--keep-momentum", "--verify"]), &[]));
    let sim_dir = tmp("keep-sim");
    ok(&run_single(&small(
        &sim_dir,
        &["--keep-momentum", "--simulate-workers", "2"],
    )));
    assert_eq!(params(&mpi_dir), params(&sim_dir));
    let l = ledger(&mpi_dir);
    assert_eq!(l["per_rank_sync_bytes_sent"], l["per_rank_sync_bytes_closed_form"]);
    // kept momentum changes the result against a fresh optimizer every round
    let fresh = tmp("keep-fresh");
    ok(&run_single(&small(&fresh, &["--simulate-workers", "2"])));
    assert_ne!(params(&fresh), params(&sim_dir));
    // with one worker, kept momentum is plain dense training
    let one = tmp("keep-one");
    ok(&run_single(&small(&one, &["--keep-momentum"])));
    let dense = tmp("keep-dense");
    ok(&run_single(&small(&dense, &["--method", "dense"])));
    assert_eq!(params(&one), params(&dense));
}

#[test]
fn loft_with_one_worker_equals_dense_training_with_momentum_reset() {
    let Some(_) = mpirun() else { return };
    let loft = tmp("s1-loft");
    ok(&run_single(&small(&loft, &["--method", "loft"])));
    let dense = tmp("s1-dense");
    ok(&run_single(&small(&dense, &["--method", "dense", "--reset-momentum"])));
    assert_eq!(params(&loft), params(&dense));
    // and under mpirun with one rank
    let one = tmp("s1-mpi");
    ok(&run_mpi(1, &small(&one, &["--method", "loft"]), &[]));
    assert_eq!(params(&one), params(&loft));
}

#[test]
fn data_parallel_dense_keeps_ranks_identical() {
    let Some(_) = mpirun() else { return };
    let d = tmp("dp");
    ok(&run_mpi(2, &small(&d, &["--method", "dense", "--verify"]), &[]));
    let l = ledger(&d);
    assert!(l["rank0_ledger"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["purpose"] == "gradients"));
}

#[test]
fn a_failing_rank_ends_the_whole_job_with_its_message() {
    let Some(_) = mpirun() else { return };
    for mode in ["error", "panic"] {
        let d = tmp(&format!("fail-{mode}"));
        let spec = if mode == "panic" { "1:1:panic" } else { "1:1" };
        let start = Instant::now();
        let o = run_mpi(2, &small(&d, &[]), &[("LOFT_INJECT_FAILURE", spec)]);
        assert!(start.elapsed() < Duration::from_secs(60), "job hung");
        assert!(!o.status.success(), "job succeeded despite the failure");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("rank 1"), "{err}");
        assert!(err.contains("injected"), "{err}");
    }
}

fn newest_checkpoint(dir: &Path) -> loft::checkpoint::Checkpoint {
    let files = loft::checkpoint::list(&dir.join("checkpoints")).unwrap();
    loft::checkpoint::Checkpoint::read(&files.last().expect("a checkpoint").1).unwrap()
}

/// Two runs ended identically: parameters, statistics, momentum, metric log, sync ledger.
fn same_end(a: &Path, b: &Path) {
    let (ca, cb) = (newest_checkpoint(a), newest_checkpoint(b));
    assert!(ca.state.done && cb.state.done);
    assert!(ca.params == cb.params && ca.stats == cb.stats && ca.momentum == cb.momentum);
    assert_eq!(params(a), params(b));
    assert_eq!(metrics_without_timings(a), metrics_without_timings(b));
    let (la, lb) = (ledger(a), ledger(b));
    assert_eq!(la["per_rank_sync_bytes_sent"], lb["per_rank_sync_bytes_sent"]);
    assert_eq!(la["per_rank_sync_bytes_received"], lb["per_rank_sync_bytes_received"]);
    if newest_checkpoint(a).method == "loft" {
        assert_eq!(lb["per_rank_sync_bytes_sent"], lb["per_rank_sync_bytes_closed_form"]);
    }
}

fn resume_args(from: &Path, out: &Path) -> Vec<String> {
    [
        "--threads",
        "1",
        "pretrain",
        "--resume",
        from.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--progress",
        "none",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn mpi_runs_resume_bit_identical_from_a_checkpoint() {
    let Some(_) = mpirun() else { return };
    let mut two_ranks = None;
    for (np, method) in [(2usize, "loft"), (4, "loft"), (2, "dense")] {
        let full = tmp(&format!("resume-full-{np}-{method}"));
        let extra = ["--method", method, "--checkpoint-every", "1", "--keep", "5"];
        ok(&run_mpi(np, &small(&full, &extra), &[]));
        let mut files = loft::checkpoint::list(&full.join("checkpoints")).unwrap();
        // round 0 (the initialisation) and rounds 1, 2, 3
        assert_eq!(files.len(), 4);
        let init = loft::checkpoint::Checkpoint::read(&files.remove(0).1).unwrap();
        assert_eq!((init.state.round, init.data_position.clone()), (0, vec![0; np]));
        let c = loft::checkpoint::Checkpoint::read(&files[0].1).unwrap();
        assert_eq!(c.ledgers.len(), np);
        assert_eq!(c.data_position, vec![2; np]);
        assert_eq!(c.partition.is_some(), method == "loft");
        // resume after round 1 on the same number of ranks
        let resumed = tmp(&format!("resume-part-{np}-{method}"));
        ok(&run_mpi(np, &resume_args(&files[0].1, &resumed), &[]));
        same_end(&full, &resumed);
        if (np, method) == (2, "loft") {
            // and from the initialisation
            let from_init = tmp("resume-init");
            let first = loft::checkpoint::list(&full.join("checkpoints")).unwrap()[0].1.clone();
            ok(&run_mpi(np, &resume_args(&first, &from_init), &[]));
            same_end(&full, &from_init);
        }
        // a different number of ranks is refused with the reason
        let o = run_mpi(np + 1, &resume_args(&files[0].1, &tmp("resume-wrong")), &[]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&format!("written by a run of {np} worker(s)")), "{err}");
        if (np, method) == (2, "loft") {
            two_ranks = Some((full, files[0].1.clone()));
        }
    }
    // S ranks and S simulated workers compute the same bits, so either continues the other
    let (full, first) = two_ranks.unwrap();
    let sim = tmp("resume-sim");
    let mut a = resume_args(&first, &sim);
    a.extend(["--simulate-workers".to_string(), "2".to_string()]);
    ok(&run_single(&a));
    let (cf, cs) = (newest_checkpoint(&full), newest_checkpoint(&sim));
    assert!(cf.params == cs.params);
}

#[test]
fn sigusr1_to_mpirun_stops_every_rank_at_the_same_round() {
    let Some(_) = mpirun() else { return };
    let args = |out: &Path| {
        let mut a = small(out, &["--checkpoint-every", "0"]);
        let i = a.iter().position(|x| x == "--rounds").unwrap();
        a[i + 1] = "80".into();
        a
    };
    let stopped = tmp("usr1");
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_loft"))
        .args(args(&stopped))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    let start = Instant::now();
    while std::fs::read_to_string(stopped.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 2
    {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(loft::checkpoint::EXIT_STOPPED),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let c = newest_checkpoint(&stopped);
    assert!(!c.state.done && c.state.round >= 2 && c.state.round < 80);
    let mut resume = resume_args(&stopped, &stopped);
    resume.truncate(5); // resume in place
    resume.extend(["--progress".to_string(), "none".to_string()]);
    ok(&run_mpi(2, &resume, &[]));
    let full = tmp("usr1-full");
    ok(&run_mpi(2, &args(&full), &[]));
    same_end(&stopped, &full);
}

#[test]
fn data_parallel_fine_tuning_runs_on_two_ranks_and_resumes_exactly() {
    let Some(_) = mpirun() else { return };
    let pre = tmp("dp-ft-pre");
    ok(&run_single(&small(&pre, &["--simulate-workers", "2"])));
    let ticket = pre.join("ticket.h5");
    let last = loft::checkpoint::list(&pre.join("checkpoints"))
        .unwrap()
        .pop()
        .unwrap()
        .1;
    ok(&run_single(
        &[
            "prune",
            "--checkpoint",
            last.to_str().unwrap(),
            "--ratio",
            "0.5",
            "--out",
            ticket.to_str().unwrap(),
        ]
        .map(String::from),
    ));
    let ft = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "--threads",
            "1",
            "finetune",
            "--ticket",
            ticket.to_str().unwrap(),
            "--epochs",
            "3",
        ]
        .iter()
        .chain(
            [
                "--batch-size",
                "8",
                "--lr",
                "0.02",
                "--progress",
                "none",
                "--checkpoint-every",
                "1",
            ]
            .iter(),
        )
        .map(|s| s.to_string())
        .collect();
        a.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let full = tmp("dp-ft-full");
    ok(&run_mpi(2, &ft(&full, &[]), &[]));
    let files = loft::checkpoint::list(&full.join("checkpoints")).unwrap();
    let c = loft::checkpoint::Checkpoint::read(&files.last().unwrap().1).unwrap();
    assert_eq!(c.ledgers.len(), 2);
    assert!(c
        .ledgers
        .iter()
        .all(|l| l.purpose_total(loft::comm::Purpose::Gradients).bytes_sent > 0));
    assert_eq!(c.state.workers, 2);
    let resumed = tmp("dp-ft-resumed");
    ok(&run_mpi(
        2,
        &resume_args(&files[0].1, &resumed)
            .iter()
            .map(|s| s.replace("pretrain", "finetune"))
            .collect::<Vec<_>>(),
        &[],
    ));
    let b = newest_checkpoint(&resumed);
    assert!(c.params == b.params && c.stats == b.stats && c.momentum == b.momentum);
    assert_eq!(metrics_without_timings(&full), metrics_without_timings(&resumed));
}

#[test]
fn the_main_job_runs_on_two_ranks_and_writes_its_report() {
    let Some(_) = mpirun() else { return };
    let out = tmp("main-job");
    let args: Vec<String> = [
        "--threads",
        "1",
        "run",
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
        "--finetune-epochs",
        "2",
        "--record-every",
        "2",
        "--ratios",
        "0.5,0.8",
        "--val-size",
        "32",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run_mpi(2, &args, &[]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("report.md"));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["workers"], 2);
    let t = r["tickets"].as_array().unwrap();
    let names: Vec<&str> = t.iter().map(|t| t["ticket"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "noprune",
            "dense-p50",
            "dense-p80",
            "loft-p50",
            "loft-p80",
            "random-p50",
            "random-p80"
        ]
    );
    for t in t {
        let (best, fin) = (
            t["best_test_acc"].as_f64().unwrap(),
            t["final_test_acc"].as_f64().unwrap(),
        );
        assert!(best >= fin, "{t}");
        // the epoch chosen on the validation images, and its test accuracy (never above the best)
        let epoch = t["chosen_epoch"].as_u64().unwrap();
        assert!((1..=2).contains(&epoch), "{t}");
        let chosen = t["chosen_test_acc"].as_f64().unwrap();
        let at_epoch = t["test_acc"][epoch as usize - 1][1].as_f64().unwrap();
        assert_eq!(chosen, at_epoch, "{t}");
        assert_eq!(
            t["control"].as_bool().unwrap(),
            t["ticket"].as_str().unwrap().starts_with("random")
        );
    }
    assert_eq!(r["val_size"], 32);
    assert_eq!(r["recipe"]["lr"], 0.1);
    assert_eq!(r["recipe"]["schedule"], "constant");
    // narrower tickets have fewer parameters; the controls are exactly as large as the tickets
    assert!(t[1]["params"].as_u64() > t[2]["params"].as_u64());
    assert_eq!(t[5]["params"], t[1]["params"]);
    assert_eq!(t[6]["params"], t[2]["params"]);
    let c = &r["communication_bytes"];
    assert_eq!(c["loft_measured"], c["loft_closed_form"]);
    assert!(c["loft_measured"].as_u64().unwrap() > 0);
    assert!(c["gpipe4"].as_u64() > c["gpipe2"].as_u64());
    let curve = r["pretraining"]["loft"]["distance_to_final"].as_array().unwrap();
    // rounds 0 (the initialisation), 2 and 4
    assert_eq!(
        curve.iter().map(|p| p[0].as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 2, 4]
    );
    assert_eq!(curve[2][1], 0.0); // the final model to itself
    assert!(curve[0][2].as_f64().unwrap() > 0.0); // training moved the filters
                                                  // the LoFT model against the dense one at the same rounds: the same model at round 0
                                                  // (one seed, one initialisation), different models after
    let between = r["pretraining"]["loft_to_dense"].as_array().unwrap();
    assert_eq!(
        between.iter().map(|p| p[0].as_u64().unwrap()).collect::<Vec<_>>(),
        [0, 2, 4]
    );
    assert_eq!((between[0][1].as_f64(), between[0][2].as_f64()), (Some(0.0), Some(0.0)));
    assert!(between[1..].iter().all(|p| p[2].as_f64().unwrap() > 0.0), "{between:?}");
    // the overlap of the LoFT and dense tickets, beside a random pair's (ratios 0.5 and 0.8)
    let ov = r["ticket_overlap"].as_array().unwrap();
    assert_eq!(ov.len(), 2);
    for (o, p) in ov.iter().zip([0.5, 0.8]) {
        let (share, random) = (o["overlap"].as_f64().unwrap(), o["random_expected"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&share), "{o}");
        // two random tickets keeping a share k/w of every block share about k/w of the filters
        assert!((random - (1.0 - p)).abs() < 0.15, "{o}");
    }
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| noprune |") && md.contains("GPipe-4") && md.contains("LoFT-2"));
    assert!(md.contains("LoFT ∩ dense"));
    assert!(md.contains("random control") && md.contains("| random-p80 |"), "{md}");
    assert!(md.contains("best accuracy on 32 validation images"), "{md}");
    assert!(
        md.contains("lr 0.1 (constant)") && md.contains("in 8 optimizer steps"),
        "{md}"
    );
    for png in ["accuracy.png", "distance.png", "communication.png"] {
        let b = std::fs::read(out.join(png)).unwrap();
        assert!(b.starts_with(b"\x89PNG"), "{png}");
    }
    // running it again finds every phase done and only rewrites the report
    let again = run_mpi(2, &args, &[]);
    ok(&again);
    let r2: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(r2["tickets"], r["tickets"]);
}

/// `loft train` arguments on synthetic data with a global batch of 32: 3 steps per epoch.
/// (A setting where training is not chaotic: with smaller batches or larger rates, a ReLU
/// that flips on a rounding difference after a few steps can move the loss by 1e-4.)
fn train_args(out: &Path) -> Vec<String> {
    [
        "--threads",
        "1",
        "train",
        "--dataset",
        "synthetic",
        "--base-width",
        "4",
        "--train-subset",
        "96",
        "--test-subset",
        "40",
        "--val-size",
        "40",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--lr",
        "0.01",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn train_uses_one_global_batch_on_any_rank_count() {
    let Some(_) = mpirun() else { return };
    let runs: Vec<(usize, PathBuf)> = [1, 2, 4]
        .iter()
        .map(|&np| (np, tmp(&format!("global-batch-{np}"))))
        .collect();
    for (np, out) in &runs {
        ok(&run_mpi(*np, &train_args(out), &[]));
    }
    let config = |d: &Path| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap()
    };
    let column = |d: &Path, key: &str| -> Vec<f64> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let one = &runs[0].1;
    for (np, d) in &runs {
        // the same steps of the same global batch: 96 images / 32 = 3 steps, 32 / np per rank
        let c = config(d);
        assert_eq!(c["steps_per_epoch"], 3);
        assert_eq!(c["batch_per_rank"].as_u64(), Some(32 / *np as u64));
        assert_eq!(
            (c["val_samples"].as_u64(), c["train_samples"].as_u64()),
            (Some(40), Some(96))
        );
        let ck = newest_checkpoint(d);
        assert_eq!((ck.state.step, ck.state.workers), (6, *np));
        // the same samples at the same rate with batch norm over the global batch: the same
        // training, up to the order of the sums (gradients and BN statistics are summed over
        // the ranks instead of within one batch)
        for key in ["train_loss", "test_loss", "val_loss"] {
            let (a, b) = (column(one, key), column(d, key));
            assert_eq!(b.len(), 2);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5 * x.abs(), "{key}: 1 rank {a:?}, {np} ranks {b:?}");
            }
        }
    }
    // every byte of the data-parallel steps (gradients, BN running statistics, synchronized
    // batch norm) equals the closed form
    let mut spec = loft::model::ArchSpec::named("preresnet18").unwrap();
    spec.base_width = 4;
    let g = loft::model::Graph::build(&spec, 32, 32, None).unwrap();
    for (np, d) in &runs {
        let ck = newest_checkpoint(d);
        let sent: u64 = ck
            .ledgers
            .iter()
            .map(|l| l.purpose_total(loft::comm::Purpose::Gradients).bytes_sent)
            .sum();
        let step = loft::comm::accounting::data_parallel_train_step_bytes(&g, *np as u64);
        assert_eq!(sent, 6 * step, "{np} ranks");
        assert_eq!(step == 0, *np == 1);
    }
    // a global batch that does not split over the ranks is refused in one line
    let mut bad = train_args(&tmp("global-batch-3"));
    let at = bad.iter().position(|a| a == "--batch-size").unwrap();
    bad[at + 1] = "30".into();
    let o = run_mpi(4, &bad, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("--batch-size 30 (the global batch) does not split evenly over 4 ranks"));
}

#[test]
fn the_main_job_over_several_seeds_reports_mean_std_and_every_seed() {
    let Some(_) = mpirun() else { return };
    let out = tmp("main-job-seeds");
    let args: Vec<String> = [
        "--threads",
        "1",
        "run",
        "--dataset",
        "synthetic",
        "--base-width",
        "3",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--batch-size",
        "8",
        "--train-subset",
        "64",
        "--test-subset",
        "32",
        "--val-size",
        "16",
        "--finetune-epochs",
        "1",
        "--ratios",
        "0.5",
        "--seeds",
        "3,5",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    ok(&run_mpi(2, &args, &[]));
    let json = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let r = json(out.join("report.json"));
    assert_eq!(r["seeds"], serde_json::json!([3, 5]));
    let (a, b) = (
        json(out.join("seed-3/report.json")),
        json(out.join("seed-5/report.json")),
    );
    assert_eq!((a["seed"].as_u64(), b["seed"].as_u64()), (Some(3), Some(5)));
    for (i, t) in r["tickets"].as_array().unwrap().iter().enumerate() {
        let v: Vec<f64> = [&a, &b]
            .iter()
            .map(|s| s["tickets"][i]["chosen_test_acc"].as_f64().unwrap())
            .collect();
        let h = &t["headline"];
        assert_eq!(h["values"], serde_json::json!(v), "{t}");
        let mean = (v[0] + v[1]) / 2.0;
        assert!((h["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{t}");
        let std = ((v[0] - mean).powi(2) + (v[1] - mean).powi(2)).sqrt();
        assert!((h["std"].as_f64().unwrap() - std).abs() < 1e-9, "{t}");
    }
    // different seeds: different initialisations, so different pre-trained models
    let trained = |s: &serde_json::Value| {
        (
            s["pretraining"]["dense"]["distance_to_final"].clone(),
            s["tickets"].clone(),
        )
    };
    assert_ne!(trained(&a), trained(&b));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("2 seeds") && md.contains("Seeds 3, 5") && md.contains(" ± "),
        "{md}"
    );
}
