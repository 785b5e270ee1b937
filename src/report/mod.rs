//! The report of `loft run`: a Markdown table shaped like the paper's (accuracy of every
//! ticket, communication of LoFT against GPipe and data-parallel training), the same as JSON,
//! and PNG plots. Everything is read back from the phases' run directories.

pub mod plots;

use crate::checkpoint::{self, Checkpoint};
use crate::comm::accounting::{self as acc, ModelCounts};
use crate::experiment::{pretrain_dir, ticket_name, tickets, MainJob};
use crate::loft::Method;
use crate::model::Graph;
use crate::train::write_atomic;
use crate::{Error, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::path::Path;

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

fn read_lines(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .map(|l| serde_json::from_str(l).map_err(|e| Error::format(path, format!("not valid JSON lines: {e}"))))
        .collect()
}

/// One point of a distance curve: (round, D_idx, D_w) of a recorded checkpoint to the final model.
pub type DistancePoint = (u64, f64, f64);

/// Distance of every recorded checkpoint of a pre-training run to its final model.
pub fn distance_curve(dir: &Path, ratio: f64) -> Result<Vec<DistancePoint>> {
    let files = checkpoint::list(&dir.join("checkpoints"))?;
    let (_, last) = files.last().ok_or_else(|| Error::format(dir, "holds no checkpoint"))?;
    let fin = Checkpoint::read(last)?;
    files
        .iter()
        .map(|(_, p)| {
            let c = Checkpoint::read(p)?;
            let d = crate::ticket::distance(&fin.param_layout, &c.params, &fin.params, ratio)?;
            Ok((c.state.round, d.index, d.weight))
        })
        .collect()
}

/// Collect everything the report shows, as JSON.
pub fn collect(job: &MainJob, ranks: usize) -> Result<Value> {
    let p = &job.pretrain;
    let s = if p.simulate > 0 { p.simulate } else { ranks };
    let (_, h, w, _) = p.dataset.shape();
    let g = Graph::build(&p.arch, h, w, None)?;
    let counts = ModelCounts::of(&g);
    let (su, rounds) = (s as u64, p.rounds as u64);
    let mut pre = serde_json::Map::new();
    for m in [Method::Dense, Method::Loft] {
        let dir = pretrain_dir(&job.out, m);
        let summary = read_json(&dir.join("summary.json"))?;
        let ledger = read_json(&dir.join("ledger.json"))?;
        let metrics = read_lines(&dir.join("metrics.jsonl"))?;
        let curve = distance_curve(&dir, p.distance_ratio)?;
        let sent: u64 = ledger["per_rank_sync_bytes_sent"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0);
        let rounds_done = metrics.len() as u64;
        pre.insert(
            format!("{m:?}").to_lowercase(),
            json!({
                "final_test_acc": summary["final_test_acc"], "wall_s": summary["wall_s"],
                "compute_s": summary["compute_s"], "sync_s": summary["sync_s"],
                "rounds": rounds_done,
                "sync_bytes_sent_all_ranks": sent,
                "test_acc": metrics.iter().filter(|r| r["test_acc"].is_number())
                    .map(|r| json!([r["round"], r["test_acc"]])).collect::<Vec<_>>(),
                "distance_to_final": curve.iter().map(|&(r, i, w)| json!([r, i, w])).collect::<Vec<_>>(),
            }),
        );
    }
    let mut fine = Vec::new();
    for (m, r) in tickets(&job.ratios) {
        let name = ticket_name(m, r);
        let dir = job.out.join("finetune").join(&name);
        let summary = read_json(&dir.join("summary.json"))?;
        let metrics = read_lines(&dir.join("metrics.jsonl"))?;
        let t = Checkpoint::read(&job.out.join("tickets").join(format!("{name}.h5")))?;
        fine.push(json!({
            "ticket": name,
            "pretraining": m.map(|m| format!("{m:?}").to_lowercase()).unwrap_or_else(|| "dense".into()),
            "ratio": r,
            "params": t.params.len(),
            "best_test_acc": summary["best_test_acc"],
            "final_test_acc": summary["final_test_acc"],
            "wall_s": summary["wall_s"],
            "test_acc": metrics.iter().map(|e| json!([e["epoch"], e["test_acc"]])).collect::<Vec<_>>(),
        }));
    }
    let samples = rounds * p.local_steps as u64 * p.batch_size as u64 * su;
    let paper = acc::paper_bytes(&counts, su, rounds);
    let loft_closed = rounds * acc::loft_round_bytes(&g, su, p.keep_momentum);
    let gpipe = |k: usize| acc::gpipe_bytes(&g, &acc::default_cuts(k), samples);
    let dp = rounds * p.local_steps as u64 * acc::data_parallel_step_bytes(&g, su);
    let loft_measured = pre["loft"]["sync_bytes_sent_all_ranks"].as_u64().unwrap_or(0);
    let gpipe_s = gpipe(s.max(2));
    Ok(json!({
        "arch": p.arch.name(), "base_width": p.arch.base_width, "inner_width": p.arch.inner_width,
        "dataset": p.dataset.name(), "workers": s, "rounds": p.rounds, "local_steps": p.local_steps,
        "batch_per_worker": p.batch_size, "samples": samples, "seed": p.seed,
        "finetune": { "epochs": job.finetune.epochs, "lr": job.finetune.lr, "batch": job.finetune.batch_size },
        "params": { "shared": counts.shared, "partitioned": counts.partitioned },
        "pretraining": pre,
        "tickets": fine,
        "communication_bytes": {
            "loft_measured": loft_measured, "loft_closed_form": loft_closed, "loft_paper_accounting": paper,
            "gpipe2": gpipe(2), "gpipe4": gpipe(4), "data_parallel": dp,
            "improvement_gpipe_over_loft_paper": if paper > 0 { gpipe_s as f64 / paper as f64 } else { 0.0 },
            "improvement_gpipe_over_loft_measured": if loft_measured > 0 { gpipe_s as f64 / loft_measured as f64 } else { 0.0 },
        },
    }))
}

fn gb(v: &Value) -> String {
    format!("{:.4}", v.as_u64().unwrap_or(0) as f64 / 1e9)
}

fn pct(v: &Value) -> String {
    v.as_f64().map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into())
}

/// The Markdown report.
pub fn markdown(r: &Value) -> String {
    let mut o = String::new();
    let s = r["workers"].as_u64().unwrap_or(1);
    let _ = writeln!(
        o,
        "# loft run: {} (base {}, inner x{}) on {}, S = {s}\n",
        r["arch"].as_str().unwrap_or(""),
        r["base_width"],
        r["inner_width"],
        r["dataset"].as_str().unwrap_or("")
    );
    let _ =
        writeln!(
        o,
        "Pre-training, for both methods: {} rounds x {} local steps x batch {} per worker x {s} workers = {} samples. \
         Fine-tuning: {} epochs, lr {}, batch {} per rank. Seed {}. GPipe computes the same gradients as dense \
         training, so the dense tickets stand for GPipe's.\n",
        r["rounds"], r["local_steps"], r["batch_per_worker"], r["samples"],
        r["finetune"]["epochs"], r["finetune"]["lr"], r["finetune"]["batch"], r["seed"]
    );
    let tickets = r["tickets"].as_array().cloned().unwrap_or_default();
    let by = |pre: &str| -> Vec<&Value> {
        tickets
            .iter()
            .filter(|t| t["pretraining"] == pre && t["ratio"].as_f64().unwrap_or(0.0) > 0.0)
            .collect()
    };
    let ratios: Vec<String> = by("dense")
        .iter()
        .map(|t| format!("{:.0}%", t["ratio"].as_f64().unwrap_or(0.0) * 100.0))
        .collect();
    let best = |v: Vec<&Value>| {
        v.iter()
            .map(|t| pct(&t["best_test_acc"]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let c = &r["communication_bytes"];
    let _ = writeln!(
        o,
        "## The paper's table, at this scale (top-1 %, best over fine-tuning; communication in GB)\n"
    );
    let _ = writeln!(
        o,
        "| setting | No-Prune | Dense / GPipe ({r}) | LoFT-{s} ({r}) | comm GPipe-2 / LoFT-{s} / GPipe-4 / data-parallel-{s} | improvement GPipe-{g} / LoFT-{s} |",
        r = ratios.join(", "),
        g = s.max(2)
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    let _ = writeln!(
        o,
        "| {} base {}, {} | {} | {} | {} | {} / {} / {} / {} | {:.2}x |\n",
        r["arch"].as_str().unwrap_or(""),
        r["base_width"],
        r["dataset"].as_str().unwrap_or(""),
        pct(&tickets
            .first()
            .map(|t| t["best_test_acc"].clone())
            .unwrap_or(Value::Null)),
        best(by("dense")),
        best(by("loft")),
        gb(&c["gpipe2"]),
        gb(&c["loft_paper_accounting"]),
        gb(&c["gpipe4"]),
        gb(&c["data_parallel"]),
        c["improvement_gpipe_over_loft_paper"].as_f64().unwrap_or(0.0)
    );
    let _ = writeln!(o, "## Every ticket\n");
    let _ = writeln!(
        o,
        "| ticket | pre-training | pruning ratio | parameters | best test % | final test % | fine-tuning s |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    for t in &tickets {
        let _ = writeln!(
            o,
            "| {} | {} | {:.0}% | {} | {} | {} | {:.0} |",
            t["ticket"].as_str().unwrap_or(""),
            t["pretraining"].as_str().unwrap_or(""),
            t["ratio"].as_f64().unwrap_or(0.0) * 100.0,
            t["params"],
            pct(&t["best_test_acc"]),
            pct(&t["final_test_acc"]),
            t["wall_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(o, "\n## Communication (GB = 1e9 bytes)\n");
    let _ = writeln!(o, "| what | GB | how it is counted |");
    let _ = writeln!(o, "|---|---|---|");
    for (k, label, how) in [
        (
            "loft_measured",
            format!("LoFT-{s}, moved by loft"),
            "the ledger: bytes sent by all ranks (allreduce of shared + allgather of slices)",
        ),
        (
            "loft_closed_form",
            format!("LoFT-{s}, closed form"),
            "the same, from the formulas (equal to the ledger)",
        ),
        (
            "loft_paper_accounting",
            format!("LoFT-{s}, the paper's accounting"),
            "R x 4 x 2 x (S x shared + partitioned)",
        ),
        (
            "gpipe2",
            "GPipe-2".into(),
            "activations and their gradients at the cut after stage 2, every sample",
        ),
        ("gpipe4", "GPipe-4".into(), "the same at cuts after stages 1, 2 and 3"),
        (
            "data_parallel",
            format!("data-parallel dense, S = {s}"),
            "gradient allreduce every step",
        ),
    ] {
        let _ = writeln!(o, "| {label} | {} | {how} |", gb(&c[k]));
    }
    let _ = writeln!(o, "\n## Pre-training\n");
    let _ = writeln!(o, "| method | rounds | final test % | wall s | compute s | sync s |");
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for m in ["dense", "loft"] {
        let p = &r["pretraining"][m];
        let _ = writeln!(
            o,
            "| {m} | {} | {} | {:.0} | {:.0} | {:.1} |",
            p["rounds"],
            pct(&p["final_test_acc"]),
            p["wall_s"].as_f64().unwrap_or(0.0),
            p["compute_s"].as_f64().unwrap_or(0.0),
            p["sync_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        o,
        "\n## Filter distance of each recorded checkpoint to the final model\n"
    );
    let _ = writeln!(o, "| round | dense D_idx | dense D_w | LoFT D_idx | LoFT D_w |");
    let _ = writeln!(o, "|---|---|---|---|---|");
    let (d, l) = (
        r["pretraining"]["dense"]["distance_to_final"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        r["pretraining"]["loft"]["distance_to_final"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    for i in 0..d.len().max(l.len()) {
        let cell = |v: &Vec<Value>, k: usize| {
            v.get(i)
                .map(|p| format!("{:.4}", p[k].as_f64().unwrap_or(0.0)))
                .unwrap_or_else(|| "-".into())
        };
        let round = d.get(i).or(l.get(i)).map(|p| p[0].to_string()).unwrap_or_default();
        let _ = writeln!(
            o,
            "| {round} | {} | {} | {} | {} |",
            cell(&d, 1),
            cell(&d, 2),
            cell(&l, 1),
            cell(&l, 2)
        );
    }
    let _ = writeln!(
        o,
        "\n![accuracy](accuracy.png)\n\n![filter distance](distance.png)\n\n![communication](communication.png)"
    );
    o
}

/// Write `report.md`, `report.json` and the plots into the job's directory.
pub fn write(job: &MainJob, ranks: usize) -> Result<()> {
    let r = collect(job, ranks)?;
    write_atomic(
        &job.out.join("report.json"),
        serde_json::to_string_pretty(&r).expect("json").as_bytes(),
    )?;
    write_atomic(&job.out.join("report.md"), markdown(&r).as_bytes())?;
    if let Err(e) = plots::draw(&r, &job.out) {
        eprintln!("loft: warning: plots not drawn: {e}");
    }
    Ok(())
}
