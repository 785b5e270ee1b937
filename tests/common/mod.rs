//! Helpers shared by the integration tests: exit-status checks and metric logs without timings.
#![allow(dead_code)]

use std::path::Path;
use std::process::Output;

/// The command succeeded; otherwise fail with its status and output.
pub fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A failed command: exit status 1, one line on stderr containing `needle`, no panic.
pub fn one_line_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
}

/// The records of `dir/metrics.jsonl` without their timing fields (names ending in `_s`).
pub fn metrics_without_timings(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json line");
            v.as_object_mut().expect("object").retain(|k, _| !k.ends_with("_s"));
            v
        })
        .collect()
}

/// Whether `mpirun` is on this machine. Without it an MPI test returns early with a note,
/// unless LOFT_REQUIRE_DATA is set (as `make test` does), which makes it a failure.
pub fn have_mpirun() -> bool {
    let present = std::process::Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        assert!(
            std::env::var_os("LOFT_REQUIRE_DATA").is_none(),
            "mpirun is required (apt-get install openmpi-bin; make test installs it)"
        );
        eprintln!("note: mpirun not found; skipping (make test installs it)");
    }
    present
}

/// `mpirun -np <np> --oversubscribe loft <args>`, as root if need be.
pub fn mpirun_loft<S: AsRef<std::ffi::OsStr>>(np: usize, args: &[S]) -> Output {
    std::process::Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .arg(env!("CARGO_BIN_EXE_loft"))
        .args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .output()
        .expect("run mpirun")
}
