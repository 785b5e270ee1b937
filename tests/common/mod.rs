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
