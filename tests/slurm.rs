//! `scripts/loft.sbatch` through a real one-node Slurm on localhost: a plain 2-task job, and a
//! job whose time limit is shorter than the run, which checkpoints, resubmits itself, resumes
//! and ends with the parameters of an uninterrupted run.

use std::process::Command;
use std::sync::Mutex;

/// Serializes the tests: each starts its own Slurm on the same ports.
static SLURM: Mutex<()> = Mutex::new(());

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Root, Slurm and mpirun are here (make test installs them); false (skip) otherwise, unless
/// LOFT_REQUIRE_DATA demands them.
fn ready() -> bool {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let ready = root
        && ["munged", "slurmctld", "slurmd", "sbatch", "mpirun"]
            .iter()
            .all(|b| have(b));
    if !ready {
        assert!(
            std::env::var_os("LOFT_REQUIRE_DATA").is_none(),
            "make test needs root, Slurm (slurmctld slurmd slurm-client munge) and mpirun for this test"
        );
        eprintln!("note: not root or Slurm/MPI missing; skipping the Slurm test (make test installs them)");
    }
    ready
}

#[test]
fn sbatch_runs_loft_on_two_tasks() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    let run_dir = std::env::temp_dir().join(format!("loft-slurm-run-{}", std::process::id()));
    let job_out = std::env::temp_dir().join(format!("loft-slurm-job-{}.out", std::process::id()));
    let o = Command::new(format!("{repo}/scripts/slurm_local.sh"))
        .args(["sbatch", "--wait", "-n", "2", "--output"])
        .arg(&job_out)
        .arg(format!("{repo}/scripts/loft.sbatch"))
        .current_dir(repo)
        .env("LOFT", env!("CARGO_BIN_EXE_loft"))
        .env("LOFT_LAUNCHER", "mpirun")
        .env("RUN_DIR", &run_dir)
        .env(
            "LOFT_ARGS",
            "--dataset synthetic --base-width 3 --rounds 2 --local-steps 2 --batch-size 8 --train-subset 64 --test-subset 32",
        )
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run slurm_local.sh");
    let job_log = std::fs::read_to_string(&job_out).unwrap_or_default();
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}\njob log: {job_log}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let ledger: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("ledger.json")).expect("ledger.json")).expect("json");
    assert_eq!(ledger["ranks"], 2, "{job_log}");
    assert_eq!(
        ledger["per_rank_sync_bytes_sent"],
        ledger["per_rank_sync_bytes_closed_form"]
    );
}

fn metrics_without_timings(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().retain(|k, _| !k.ends_with("_s"));
            v
        })
        .collect()
}

#[test]
fn a_job_past_its_time_limit_resubmits_itself_and_ends_like_an_uninterrupted_run() {
    let _one = SLURM.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let repo = env!("CARGO_MANIFEST_DIR");
    let base = std::env::temp_dir().join(format!("loft-slurm-limit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let run_dir = base.join("run");
    // about 85 s of work on two cores; the time limit is one minute
    let args = "--dataset synthetic --base-width 3 --rounds 5000 --local-steps 2 --batch-size 8 \
                --train-subset 64 --test-subset 32 --eval-every 100 --checkpoint-every 100";
    let submit_and_wait = format!(
        "sbatch --parsable -n 2 --output={}/job-%j.out {repo}/scripts/loft.sbatch || exit 1; \
         for i in $(seq 1 900); do q=$(squeue -h) && [ -z \"$q\" ] && exit 0; sleep 1; done; exit 1",
        base.display()
    );
    let o = Command::new(format!("{repo}/scripts/slurm_local.sh"))
        .args(["bash", "-c", &submit_and_wait])
        .current_dir(repo)
        .env("SBATCH_TIMELIMIT", "1")
        .env("SBATCH_SIGNAL", "B:USR1@45")
        .env("LOFT_REQUEUE", "resubmit")
        .env("LOFT", env!("CARGO_BIN_EXE_loft"))
        .env("LOFT_LAUNCHER", "mpirun")
        .env("RUN_DIR", &run_dir)
        .env("LOFT_ARGS", args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .expect("run slurm_local.sh");
    let mut logs = String::new();
    let mut jobs = 0;
    for e in std::fs::read_dir(&base).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".out") {
            jobs += 1;
            logs += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    assert!(
        o.status.success() && run_dir.join("summary.json").exists(),
        "stdout: {}\nstderr: {}\njob logs: {logs}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(jobs >= 2, "the run should have needed more than one job: {logs}");
    assert!(logs.contains("checkpoint written; submitting the job again"), "{logs}");
    assert!(logs.contains("resuming from"), "{logs}");
    // the same run without Slurm and without interruption
    let reference = base.join("reference");
    let mut c = Command::new("mpirun");
    c.args(["-np", "2", "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_loft"))
        .args(["--threads", "1", "pretrain"])
        .args(args.split_whitespace())
        .args(["--progress", "none", "--out"])
        .arg(&reference)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let r = c.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        std::fs::read(run_dir.join("params.f32")).unwrap(),
        std::fs::read(reference.join("params.f32")).unwrap(),
        "the resumed run ended with other parameters"
    );
    assert_eq!(metrics_without_timings(&run_dir), metrics_without_timings(&reference));
}
