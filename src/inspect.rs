//! `loft inspect`: what a checkpoint holds (metadata, layout and per-tensor norms), as text
//! or JSON. Reading it runs every check of [`Checkpoint::read`], so a file that inspects
//! cleanly can be resumed.

use crate::checkpoint::Checkpoint;
use crate::model::{Layout, Role};
use crate::Result;
use serde_json::{json, Value};
use std::path::Path;

/// L2 norm of `v`, accumulated in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt()
}

fn role_text(r: &Role) -> String {
    match r {
        Role::Shared => "shared".into(),
        Role::Partitioned { block, axis } => format!("partitioned b{block} ax{axis}"),
    }
}

fn shape_text(s: &[usize]) -> String {
    s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")
}

/// Per-tensor rows of one buffer (and optionally its momentum).
fn tensors(l: &Layout, values: &[f32], momentum: Option<&[f32]>) -> Vec<Value> {
    l.entries
        .iter()
        .map(|e| {
            let r = e.offset..e.offset + e.len;
            let mut row = json!({
                "name": e.name, "shape": e.shape, "offset": e.offset, "len": e.len,
                "role": role_text(&e.role), "norm": norm(&values[r.clone()]),
            });
            if let Some(m) = momentum {
                row["momentum_norm"] = json!(norm(&m[r]));
            }
            row
        })
        .collect()
}

/// Everything `loft inspect --json` prints.
pub fn json(path: &Path, c: &Checkpoint) -> Value {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let config: Value = serde_json::from_str(&c.config).unwrap_or(Value::Null);
    json!({
        "path": path,
        "bytes": bytes,
        "format": crate::checkpoint::FORMAT_NAME,
        "checksums": "ok",
        "kind": c.kind,
        "method": c.method,
        "state": c.state,
        "seed": c.seed,
        "data_position": c.data_position,
        "partition": c.partition.as_ref().map(|p| json!({
            "round": p.round, "blocks": p.blocks,
            "per_rank_filters": p.owned.iter().map(|o| o.iter().map(|b| b.len()).collect::<Vec<_>>()).collect::<Vec<_>>(),
        })),
        "ledgers": c.ledgers.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
        "config": config,
        "params_total": c.param_layout.total,
        "stats_total": c.stat_layout.total,
        "params_norm": norm(&c.params),
        "params": tensors(&c.param_layout, &c.params, Some(&c.momentum)),
        "stats": tensors(&c.stat_layout, &c.stats, None),
    })
}

/// The human-readable report.
pub fn text(path: &Path, c: &Checkpoint) -> String {
    use std::fmt::Write;
    let j = json(path, c);
    let s = &c.state;
    let cfg = &j["config"];
    let mut o = String::new();
    let _ = writeln!(
        o,
        "checkpoint  {} ({:.1} MB)",
        path.display(),
        j["bytes"].as_u64().unwrap_or(0) as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "format      {} v{}, every dataset checksum verified",
        crate::checkpoint::FORMAT_NAME,
        crate::checkpoint::FORMAT_VERSION
    );
    let _ = writeln!(o, "run         loft {} ({}), {} worker(s)", c.kind, c.method, s.workers);
    let _ = writeln!(
        o,
        "position    {} round(s), {} epoch(s) + {} batch(es), {} step(s){}",
        s.round,
        s.epoch,
        s.batch,
        s.step,
        if s.done { ", finished" } else { "" }
    );
    let arch = &cfg["arch"];
    let _ = writeln!(
        o,
        "model       {}{} base {} inner x{}, {} classes; {} parameters, {} BN statistics",
        if arch["family"] == "PreAct" {
            "preresnet"
        } else {
            "resnet"
        },
        arch["depth"],
        arch["base_width"],
        arch["inner_width"],
        arch["classes"],
        c.param_layout.total,
        c.stat_layout.total
    );
    let _ = writeln!(
        o,
        "training    batch {} lr {} seed {}",
        cfg["batch_size"], cfg["lr"], c.seed
    );
    let _ = writeln!(o, "accuracy    last {:.2}%, best {:.2}%", s.last_acc, s.best_acc);
    let _ = writeln!(
        o,
        "data        {} train / {} test samples; stream positions {:?}",
        s.data.train_samples, s.data.test_samples, c.data_position
    );
    if let Some(p) = &c.partition {
        let _ = writeln!(
            o,
            "partition   round {}, blocks {:?}, filters per rank {}",
            p.round + 1,
            p.blocks,
            j["partition"]["per_rank_filters"]
        );
    }
    for (r, l) in c.ledgers.iter().enumerate() {
        let t = l.total();
        if t.calls > 0 {
            let _ = writeln!(
                o,
                "ledger      rank {r}: {} collectives, {} bytes sent, {} received",
                t.calls, t.bytes_sent, t.bytes_received
            );
        }
    }
    let _ = writeln!(
        o,
        "\n{:<28} {:>14} {:<18} {:>10} {:>12} {:>12}",
        "parameter", "shape", "role", "offset", "norm", "momentum"
    );
    for row in j["params"].as_array().into_iter().flatten() {
        let shape: Vec<usize> = serde_json::from_value(row["shape"].clone()).unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<28} {:>14} {:<18} {:>10} {:>12.5} {:>12.5}",
            row["name"].as_str().unwrap_or(""),
            shape_text(&shape),
            row["role"].as_str().unwrap_or(""),
            row["offset"].as_u64().unwrap_or(0),
            row["norm"].as_f64().unwrap_or(0.0),
            row["momentum_norm"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        o,
        "\n{:<28} {:>14} {:<18} {:>10} {:>12}",
        "BN statistic", "shape", "role", "offset", "norm"
    );
    for row in j["stats"].as_array().into_iter().flatten() {
        let shape: Vec<usize> = serde_json::from_value(row["shape"].clone()).unwrap_or_default();
        let _ = writeln!(
            o,
            "{:<28} {:>14} {:<18} {:>10} {:>12.5}",
            row["name"].as_str().unwrap_or(""),
            shape_text(&shape),
            row["role"].as_str().unwrap_or(""),
            row["offset"].as_u64().unwrap_or(0),
            row["norm"].as_f64().unwrap_or(0.0)
        );
    }
    o
}

/// `loft inspect FILE [--json]`.
pub fn run(path: &Path, as_json: bool) -> Result<()> {
    let c = Checkpoint::read(path)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json(path, &c)).expect("json"));
    } else {
        print!("{}", text(path, &c));
    }
    Ok(())
}
