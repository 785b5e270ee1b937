//! Helpers shared by the integration tests: exit-status checks, metric logs without timings,
//! and batch-norm inputs at the fused ReLU's kink.
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

/// Inputs of a batch norm with `n` images of `c` channels of `hw` pixels whose fused ReLU
/// gates sit at the kink: channel c is its exact (dyadic) mean (c - 7.5) / 8 plus offsets d
/// and -d on a grid of eighths, some 0, so that with beta 0 the inputs at the mean have
/// pre-activations of a few units in the last place, whose signs any other rounding of the
/// scale and shift (or of the product and sum) would change.
pub fn inputs_at_the_kink(rng: &mut loft::rng::Rng, n: usize, c: usize, hw: usize) -> Vec<f32> {
    let mut x = vec![0.0f32; n * c * hw];
    for ch in 0..c {
        let m = (ch as f64 - 7.5) / 8.0;
        let half = n * hw / 2;
        let d: Vec<f64> = (0..half).map(|_| (rng.uniform() * 9.0).floor() / 8.0 - 0.5).collect();
        for i in 0..n * hw {
            let v = if i < half {
                d[i]
            } else if i < 2 * half {
                -d[i - half]
            } else {
                0.0
            };
            x[((i % n) * c + ch) * hw + i / n] = (m + v) as f32;
        }
    }
    x
}
