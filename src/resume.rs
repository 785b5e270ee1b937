//! `--resume`: the configuration of a resumed run comes from its checkpoint, and any flag
//! given on the command line must agree with it (except the few that may change).
//!
//! A flag that was not given keeps its default, which may differ from the checkpoint's value;
//! the checkpoint's value wins. A flag that was given and differs is an error, so resuming
//! with another architecture, data set or seed is refused with a message naming the flag.

use crate::checkpoint::Found;
use crate::{Error, Result};
use clap::parser::ValueSource;
use clap::ArgMatches;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The settings a resumed run may change, with the flag that changes each: the one list
/// (`loft run` uses it too, to tell whether a finished phase ran with the settings planned).
pub const MAY_CHANGE: [(&str, &str); 6] = [
    ("data_dir", "data_dir"),
    // S simulated workers and S ranks compute the same bits
    ("simulate", "simulate_workers"),
    ("verify", "verify"),
    ("progress", "progress"),
    ("out", "out"),
    // checkpoints are device-independent
    ("device", "device"),
];

/// The flags (clap ids) that determine a configuration path.
fn flags_of(path: &str) -> Vec<&str> {
    let first = path.split('.').next().unwrap_or(path);
    match path {
        "arch.family" | "arch.depth" => vec!["arch"],
        "arch.in_channels" => vec!["dataset"],
        p if p.starts_with("arch.") => vec![&p[5..]],
        p if p.starts_with("schedule") => vec!["schedule", "milestones", "gamma"],
        p if p.starts_with("augment") => vec!["crop_pad", "flip"],
        p if p.starts_with("dataset") => vec!["dataset"],
        "simulate" => vec!["simulate_workers"],
        "bn_recalibrate" => vec!["bn_recalibrate", "method"],
        _ => vec![first],
    }
}

/// Leaves of a JSON object as (dotted path, value); arrays and enums count as leaves.
fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(m) if !prefix.is_empty() || !m.is_empty() => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if matches!(x, Value::Object(_)) && !matches!(p.as_str(), "dataset" | "schedule") {
                    leaves(x, &p, out);
                } else {
                    out.push((p, x.clone()));
                }
            }
        }
        _ => out.push((prefix.to_string(), v.clone())),
    }
}

fn given(m: &ArgMatches, id: &str) -> bool {
    m.try_get_raw(id).is_ok() && m.value_source(id) == Some(ValueSource::CommandLine)
}

/// The configuration to resume with: the checkpoint's, after checking that every flag given
/// on the command line agrees with it. `cli` is the configuration the flags alone give.
pub fn config<C: Serialize + DeserializeOwned>(cli: &C, found: &Found, m: &ArgMatches) -> Result<C> {
    let path = &found.path;
    let mut saved: Value = serde_json::from_str(&found.checkpoint.config)
        .map_err(|e| Error::format(path, format!("its configuration is not valid JSON: {e}")))?;
    let wanted = serde_json::to_value(cli).expect("config serializes");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    leaves(&saved, "", &mut a);
    leaves(&wanted, "", &mut b);
    for (p, want) in &b {
        let have = a.iter().find(|(q, _)| q == p).map(|(_, v)| v);
        if have == Some(want) || MAY_CHANGE.iter().any(|(k, _)| p == k) {
            continue;
        }
        if let Some(flag) = flags_of(p).into_iter().find(|f| given(m, f)) {
            let have = have.map(|v| v.to_string()).unwrap_or_else(|| "nothing".into());
            return Err(Error::format(
                path,
                format!(
                    "the checkpoint's {p} is {have}, but --{} asks for {want}; drop the flag to continue that run, or start a new run",
                    flag.replace('_', "-")
                ),
            ));
        }
    }
    for (key, flag) in MAY_CHANGE {
        let explicit = given(m, flag) || key == "progress";
        if explicit && !wanted[key].is_null() {
            saved[key] = wanted[key].clone();
        } else if key == "out" {
            saved[key] = Value::String(found.run_dir.to_string_lossy().into_owned());
        }
    }
    serde_json::from_value(saved)
        .map_err(|e| Error::format(path, format!("its configuration does not fit this command: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_flatten_nested_objects_but_not_enums() {
        let v = serde_json::json!({"arch": {"depth": 18, "stem": "Cifar"}, "schedule": {"Step": {"gamma": 0.1}}, "lr": 0.1});
        let mut out = Vec::new();
        leaves(&v, "", &mut out);
        let mut paths: Vec<&str> = out.iter().map(|(p, _)| p.as_str()).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["arch.depth", "arch.stem", "lr", "schedule"]);
        assert_eq!(flags_of("arch.base_width"), ["base_width"]);
        assert_eq!(flags_of("arch.depth"), ["arch"]);
        assert_eq!(flags_of("schedule"), ["schedule", "milestones", "gamma"]);
        assert_eq!(flags_of("batch_size"), ["batch_size"]);
    }
}
