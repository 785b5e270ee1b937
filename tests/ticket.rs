//! Tickets end to end: pruning into a narrow or a masked network, fine-tuning (and its exact
//! resume), and the No-Prune reference.

mod common;

use common::{ok, one_line_error};
use loft::checkpoint::Checkpoint;
use loft::ticket::prune;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn loft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft"))
        .args(args)
        .output()
        .expect("run loft")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-ticket-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn newest(dir: &Path) -> (PathBuf, Checkpoint) {
    let files = loft::checkpoint::list(&dir.join("checkpoints")).unwrap();
    let p = files.last().expect("a checkpoint").1.clone();
    let c = Checkpoint::read(&p).unwrap();
    (p, c)
}

/// A small LoFT pre-training run on synthetic data; returns its final checkpoint.
fn pretrained(dir: &Path) -> PathBuf {
    let d = dir.to_str().unwrap();
    ok(&loft(&[
        "--threads",
        "1",
        "pretrain",
        "--dataset",
        "synthetic",
        "--base-width",
        "4",
        "--rounds",
        "4",
        "--local-steps",
        "3",
        "--batch-size",
        "8",
        "--train-subset",
        "96",
        "--test-subset",
        "32",
        "--simulate-workers",
        "2",
        "--seed",
        "3",
        "--progress",
        "none",
        "--out",
        d,
    ]));
    newest(dir).0
}

fn finetune(ticket: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut a = vec![
        "--threads",
        "1",
        "finetune",
        "--ticket",
        ticket.to_str().unwrap(),
        "--batch-size",
        "8",
        "--lr",
        "0.02",
        "--progress",
        "none",
        "--out",
        out.to_str().unwrap(),
    ];
    if !extra.contains(&"--epochs") {
        a.extend_from_slice(&["--epochs", "2"]);
    }
    a.extend_from_slice(extra);
    loft(&a)
}

#[test]
fn masked_and_narrow_fine_tuning_give_the_same_parameters() {
    let dir = tmp("masked");
    let pre = pretrained(&dir.join("pre"));
    let (narrow, masked) = (dir.join("narrow.h5"), dir.join("masked.h5"));
    let p = pre.to_str().unwrap();
    ok(&loft(&[
        "prune",
        "--checkpoint",
        p,
        "--ratio",
        "0.5",
        "--out",
        narrow.to_str().unwrap(),
    ]));
    ok(&loft(&[
        "prune",
        "--checkpoint",
        p,
        "--ratio",
        "0.5",
        "--masked",
        "--out",
        masked.to_str().unwrap(),
    ]));
    let (n, m) = (Checkpoint::read(&narrow).unwrap(), Checkpoint::read(&masked).unwrap());
    let info = n.ticket.clone().unwrap();
    assert_eq!(info.kept, m.ticket.as_ref().unwrap().kept);
    assert!(info.kept.iter().zip(&info.widths).all(|(k, &w)| k.len() == w / 2));
    assert!(n.params.len() < m.params.len());
    // 16 steps: the two networks sum in different orders, and over long runs with batches of
    // 8 the BN layers amplify those rounding differences chaotically
    ok(&finetune(&narrow, &dir.join("ft-narrow"), &["--train-subset", "64"]));
    ok(&finetune(&masked, &dir.join("ft-masked"), &["--train-subset", "64"]));
    let (_, fn_) = newest(&dir.join("ft-narrow"));
    let (_, fm) = newest(&dir.join("ft-masked"));
    // the masked network's kept part, in the narrow layout
    let src = Checkpoint::read(&pre).unwrap();
    let (arch, h, w) = prune::arch_of(&src, &pre).unwrap();
    let (full_all, pruned_all, _, idx) = prune::ticket_graphs(&arch, h, w, &info).unwrap();
    let part = prune::keep_partition(&idx, &info);
    let mut kept = vec![0.0f32; pruned_all.params.total];
    loft::model::slices::extract(&full_all.params, &pruned_all.params, &part, 0, &fm.params, &mut kept);
    let mask = prune::mask(&full_all.params, &idx, &info);
    assert!(
        fm.params.iter().zip(&mask).all(|(v, m)| *m == 1.0 || *v == 0.0),
        "pruned values moved"
    );
    let scale = fn_.params.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
    let worst = kept
        .iter()
        .zip(&fn_.params)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "masked and narrow differ by {worst} (scale {scale})"
    );
    assert!(fn_.params != n.params, "fine-tuning did not change the ticket");
}

#[test]
fn fine_tuning_resumes_bit_identical_and_p0_is_the_full_network() {
    let dir = tmp("resume");
    let pre = pretrained(&dir.join("pre"));
    let t = dir.join("t.h5");
    ok(&loft(&[
        "prune",
        "--checkpoint",
        pre.to_str().unwrap(),
        "--ratio",
        "0.3",
        "--out",
        t.to_str().unwrap(),
    ]));
    let full = dir.join("ft-full");
    ok(&finetune(&t, &full, &["--epochs", "3", "--checkpoint-every", "1"]));
    let files = loft::checkpoint::list(&full.join("checkpoints")).unwrap();
    assert_eq!(files.len(), 3);
    let resumed = dir.join("ft-resumed");
    let o = loft(&[
        "--threads",
        "1",
        "finetune",
        "--resume",
        files[0].1.to_str().unwrap(),
        "--out",
        resumed.to_str().unwrap(),
        "--progress",
        "none",
    ]);
    ok(&o);
    let (_, a) = newest(&full);
    let (_, b) = newest(&resumed);
    assert!(a.params == b.params && a.stats == b.stats && a.momentum == b.momentum);
    let strip = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut()
                    .unwrap()
                    .retain(|k, _| !k.ends_with("_s") && !k.ends_with("_per_s"));
                v
            })
            .collect()
    };
    assert_eq!(strip(&full), strip(&resumed));
    // a different learning rate on resume is refused
    let o = loft(&[
        "finetune",
        "--resume",
        files[0].1.to_str().unwrap(),
        "--lr",
        "0.5",
        "--out",
        tmp("x").to_str().unwrap(),
    ]);
    one_line_error(&o, "--lr");
    // p = 0 keeps every filter: the No-Prune reference is the pre-trained network itself
    let t0 = dir.join("t0.h5");
    ok(&loft(&[
        "prune",
        "--checkpoint",
        pre.to_str().unwrap(),
        "--ratio",
        "0",
        "--out",
        t0.to_str().unwrap(),
    ]));
    let (c0, src) = (Checkpoint::read(&t0).unwrap(), Checkpoint::read(&pre).unwrap());
    assert_eq!(c0.params, src.params);
    assert_eq!(c0.param_layout, src.param_layout);
}

#[test]
fn keep_first_blocks_leaves_the_first_block_of_every_stage_whole() {
    let dir = tmp("first-blocks");
    let pre = pretrained(&dir.join("pre"));
    let p = pre.to_str().unwrap();
    let ticket = |out: &Path, extra: &[&str]| -> loft::checkpoint::TicketInfo {
        let mut a = vec![
            "prune",
            "--checkpoint",
            p,
            "--ratio",
            "0.5",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend(extra);
        ok(&loft(&a));
        Checkpoint::read(out).unwrap().ticket.unwrap()
    };
    let paper = ticket(&dir.join("paper.h5"), &[]);
    let release = ticket(&dir.join("release.h5"), &["--keep-first-blocks"]);
    assert_eq!(paper.blocks, release.blocks);
    // the prunable blocks: every block without a projection, s1.b0 the only first block
    assert!(paper.blocks.iter().any(|b| b == "s1.b0"));
    for (i, b) in paper.blocks.iter().enumerate() {
        let w = paper.widths[i];
        assert_eq!(paper.kept[i].len(), w / 2, "{b}");
        if b.ends_with(".b0") {
            assert_eq!(release.kept[i], (0..w).collect::<Vec<_>>(), "{b}");
        } else {
            assert_eq!(release.kept[i], paper.kept[i], "{b}");
        }
    }
}

#[test]
fn bad_pruning_and_fine_tuning_input_gives_one_line_errors() {
    let dir = tmp("bad");
    let pre = pretrained(&dir.join("pre"));
    let p = pre.to_str().unwrap();
    let t = dir.join("t.h5");
    one_line_error(
        &loft(&[
            "prune",
            "--checkpoint",
            p,
            "--ratio",
            "1.2",
            "--out",
            t.to_str().unwrap(),
        ]),
        "--ratio",
    );
    one_line_error(
        &loft(&["prune", "--checkpoint", p, "--ratio", "0.5", "--criterion", "median"]),
        "criterion",
    );
    one_line_error(
        &loft(&["prune", "--checkpoint", "/no/such.h5", "--ratio", "0.5"]),
        "/no/such.h5",
    );
    ok(&loft(&[
        "prune",
        "--checkpoint",
        p,
        "--ratio",
        "0.5",
        "--out",
        t.to_str().unwrap(),
    ]));
    one_line_error(
        &loft(&["prune", "--checkpoint", t.to_str().unwrap(), "--ratio", "0.5"]),
        "already a ticket",
    );
    one_line_error(&finetune(&pre, &dir.join("ft"), &[]), "not a ticket");
    one_line_error(
        &loft(&["finetune", "--out", dir.join("ft2").to_str().unwrap()]),
        "--ticket",
    );
}

#[test]
fn the_main_job_refuses_a_directory_of_another_job_and_bad_ratios() {
    let out = tmp("job");
    let o = out.to_str().unwrap();
    let args = [
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
        "48",
        "--test-subset",
        "16",
        "--finetune-epochs",
        "1",
        "--record-every",
        "1",
        "--ratios",
        "0.5",
        "--progress",
        "none",
        "--out",
        o,
    ];
    ok(&loft(&args));
    // the same command again: every phase is done, the report is rewritten
    ok(&loft(&args));
    // other settings in the same directory would mix two jobs in one report
    let mut other = args.to_vec();
    other.extend(["--lr", "0.05"]);
    one_line_error(&loft(&other), "other settings");
    one_line_error(&loft(&["run", "--ratios", "1.5", "--out", o]), "--ratios");
    one_line_error(&loft(&["run", "--record-every", "0", "--out", o]), "--record-every");
}
