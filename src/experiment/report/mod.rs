//! The report of `loft run`: a Markdown table shaped like the paper's (accuracy of every
//! ticket, communication of LoFT against GPipe and data-parallel training), the same as JSON,
//! and PNG plots. Everything is read back from the phases' run directories. With several
//! seeds, [`write_seeds`] adds the report over the seeds (mean, standard deviation and every
//! seed's value).

pub mod plots;

use super::{pretrain_dir, tickets, MainJob, Source};
use crate::checkpoint::{self, Checkpoint};
use crate::comm::accounting::{self as acc, ModelCounts};
use crate::loft::{LedgerReport, Method, PretrainSummary, RoundRecord};
use crate::model::Graph;
use crate::rundir::{read_json, read_lines, write_atomic, write_json};
use crate::train::{EpochRecord, TrainSummary};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

/// Everything the report shows (`report.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub arch: String,
    pub base_width: usize,
    pub inner_width: usize,
    pub dataset: String,
    pub workers: usize,
    pub rounds: usize,
    pub local_steps: usize,
    pub batch_per_worker: usize,
    pub samples: u64,
    pub seed: u64,
    /// The pre-training recipe.
    #[serde(default)]
    pub recipe: Recipe,
    /// Validation images held out of the training set (0: none; the headline is then the
    /// final epoch's test accuracy).
    #[serde(default)]
    pub val_size: usize,
    pub finetune: FinetuneSettings,
    pub params: Params,
    pub pretraining: Pretrainings,
    pub tickets: Vec<TicketRow>,
    pub communication_bytes: Communication,
    /// How many filters the final LoFT and dense models keep in common, per ratio.
    #[serde(default)]
    pub ticket_overlap: Vec<TicketOverlap>,
}

/// The overlap of the LoFT and dense tickets at one pruning ratio:
/// `sum_l |T_l(LoFT) ∩ T_l(dense)| / sum_l |T_l(dense)|`, beside what two tickets of the same
/// sizes drawn at random would share on average (`sum_l k_l^2 / w_l / sum_l k_l`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TicketOverlap {
    pub ratio: f64,
    pub overlap: f64,
    pub random_expected: f64,
}

/// The overlap of the final LoFT and dense models' tickets at every ratio.
fn ticket_overlap(job: &MainJob) -> Result<Vec<TicketOverlap>> {
    let last = |m: Method| -> Result<Checkpoint> {
        let dir = pretrain_dir(&job.out, m);
        let (_, path) = checkpoint::list(&dir.join("checkpoints"))?
            .pop()
            .ok_or_else(|| Error::format(&dir, "holds no checkpoint"))?;
        Checkpoint::read(&path)
    };
    let (dense, loft) = (last(Method::Dense)?, last(Method::Loft)?);
    let blocks = crate::ticket::prunable_blocks(&dense.param_layout);
    Ok(job
        .ratios
        .iter()
        .map(|&ratio| {
            let kd = crate::ticket::kept(&blocks, &dense.params, ratio, job.criterion, 0);
            let kl = crate::ticket::kept(&blocks, &loft.params, ratio, job.criterion, 0);
            let (mut common, mut kept, mut random) = (0usize, 0usize, 0f64);
            for ((d, l), b) in kd.iter().zip(&kl).zip(&blocks) {
                common += l.iter().filter(|j| d.binary_search(j).is_ok()).count();
                kept += d.len();
                random += (d.len() * l.len()) as f64 / b.conv1.shape[0] as f64;
            }
            let k = kept.max(1) as f64;
            TicketOverlap {
                ratio,
                overlap: common as f64 / k,
                random_expected: random / k,
            }
        })
        .collect())
}

/// The pre-training recipe, for both methods.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Recipe {
    pub lr: f64,
    /// constant, cosine or step.
    pub schedule: String,
    pub warmup_rounds: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Which filters the tickets keep (largest, smallest), and whether the first block of
    /// every stage stays whole.
    pub criterion: String,
    pub keep_first_blocks: bool,
}

/// The fine-tuning recipe.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneSettings {
    pub epochs: usize,
    pub lr: f64,
    /// The global batch (split over the ranks).
    pub batch: usize,
}

/// Shared and partitioned parameters of the full model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Params {
    pub shared: u64,
    pub partitioned: u64,
}

/// Both pre-training runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Pretrainings {
    pub dense: PretrainRow,
    pub loft: PretrainRow,
    /// D_idx and D_w of the LoFT model to the dense model at every round both recorded (same
    /// seed, same initialisation, same samples): (round, D_idx, D_w).
    #[serde(default)]
    pub loft_to_dense: Vec<DistancePoint>,
}

/// One pre-training run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainRow {
    pub final_test_acc: f64,
    pub wall_s: f64,
    pub compute_s: f64,
    pub sync_s: f64,
    pub rounds: u64,
    pub sync_bytes_sent_all_ranks: u64,
    /// (round, test accuracy %) of every evaluation.
    pub test_acc: Vec<(usize, f64)>,
    /// (round, D_idx, D_w) of every recorded checkpoint to the final model.
    pub distance_to_final: Vec<DistancePoint>,
}

/// One fine-tuned ticket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TicketRow {
    pub ticket: String,
    /// The pre-training it was pruned from: dense or loft.
    pub pretraining: String,
    /// A random control ticket (random filters of the dense model, the same sizes).
    #[serde(default)]
    pub control: bool,
    pub ratio: f64,
    pub params: usize,
    /// The best test accuracy over fine-tuning (chosen on the test set: the released code's
    /// figure, optimistic).
    pub best_test_acc: f64,
    pub final_test_acc: f64,
    /// The test accuracy of the epoch with the best validation accuracy, and that epoch.
    #[serde(default)]
    pub chosen_test_acc: Option<f64>,
    #[serde(default)]
    pub chosen_epoch: Option<usize>,
    pub wall_s: f64,
    /// (epoch, test accuracy %).
    pub test_acc: Vec<(usize, f64)>,
}

impl TicketRow {
    /// The headline accuracy: chosen on validation, else the final epoch's.
    pub fn headline(&self) -> f64 {
        self.chosen_test_acc.unwrap_or(self.final_test_acc)
    }

    /// Which kind of ticket: "noprune", "dense", "loft" or "random".
    pub fn group(&self) -> &str {
        if self.ratio == 0.0 {
            "noprune"
        } else if self.control {
            "random"
        } else {
            &self.pretraining
        }
    }
}

/// Communication of pre-training, in bytes, by accounting.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Communication {
    pub loft_measured: u64,
    pub loft_closed_form: u64,
    pub loft_paper_accounting: u64,
    pub gpipe2: u64,
    pub gpipe4: u64,
    pub data_parallel: u64,
    pub improvement_gpipe_over_loft_paper: f64,
    pub improvement_gpipe_over_loft_measured: f64,
}

impl Communication {
    /// The figure of one accounting, by its JSON name.
    pub fn get(&self, key: &str) -> u64 {
        match key {
            "loft_measured" => self.loft_measured,
            "loft_closed_form" => self.loft_closed_form,
            "loft_paper_accounting" => self.loft_paper_accounting,
            "gpipe2" => self.gpipe2,
            "gpipe4" => self.gpipe4,
            "data_parallel" => self.data_parallel,
            _ => 0,
        }
    }
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

/// The distance of the LoFT model to the dense model at every round both runs recorded.
fn loft_to_dense(dense: &Path, loft: &Path, ratio: f64) -> Result<Vec<DistancePoint>> {
    let (d, l) = (
        checkpoint::list(&dense.join("checkpoints"))?,
        checkpoint::list(&loft.join("checkpoints"))?,
    );
    let mut out = Vec::new();
    for (_, lp) in &l {
        let lc = Checkpoint::read(lp)?;
        for (_, dp) in &d {
            let dc = Checkpoint::read(dp)?;
            if dc.state.round == lc.state.round {
                let x = crate::ticket::distance(&dc.param_layout, &lc.params, &dc.params, ratio)?;
                out.push((lc.state.round, x.index, x.weight));
            }
        }
    }
    Ok(out)
}

/// The report of one pre-training run directory.
fn pretrain_row(dir: &Path, ratio: f64) -> Result<PretrainRow> {
    let summary: PretrainSummary = read_json(&dir.join("summary.json"))?;
    let ledger: LedgerReport = read_json(&dir.join("ledger.json"))?;
    let metrics: Vec<RoundRecord> = read_lines(&dir.join("metrics.jsonl"))?;
    Ok(PretrainRow {
        final_test_acc: summary.final_test_acc,
        wall_s: summary.wall_s,
        compute_s: summary.compute_s,
        sync_s: summary.sync_s,
        rounds: metrics.len() as u64,
        sync_bytes_sent_all_ranks: ledger.per_rank_sync_bytes_sent.iter().sum(),
        test_acc: metrics.iter().filter_map(|r| Some((r.round, r.test_acc?))).collect(),
        distance_to_final: distance_curve(dir, ratio)?,
    })
}

/// Collect everything the report shows from the phases' run directories.
pub fn collect(job: &MainJob, ranks: usize) -> Result<Report> {
    let p = &job.pretrain;
    let s = if p.simulate > 0 { p.simulate } else { ranks };
    let (_, h, w, _) = p.dataset.shape();
    let g = Graph::build(&p.arch, h, w, None)?;
    let counts = ModelCounts::of(&g);
    let (su, rounds) = (s as u64, p.rounds as u64);
    let (dense_dir, loft_dir) = (
        pretrain_dir(&job.out, Method::Dense),
        pretrain_dir(&job.out, Method::Loft),
    );
    let pretraining = Pretrainings {
        dense: pretrain_row(&dense_dir, p.distance_ratio)?,
        loft: pretrain_row(&loft_dir, p.distance_ratio)?,
        loft_to_dense: loft_to_dense(&dense_dir, &loft_dir, p.distance_ratio)?,
    };
    let mut rows = Vec::new();
    for t in tickets(&job.ratios, job.random_control) {
        let name = t.name();
        let dir = job.out.join("finetune").join(&name);
        let summary: TrainSummary = read_json(&dir.join("summary.json"))?;
        let metrics: Vec<EpochRecord> = read_lines(&dir.join("metrics.jsonl"))?;
        let file = Checkpoint::read(&job.out.join("tickets").join(format!("{name}.h5")))?;
        rows.push(TicketRow {
            pretraining: t.pretraining().name().into(),
            control: t.source == Source::Random,
            ticket: name,
            ratio: t.ratio,
            params: file.params.len(),
            best_test_acc: summary.best_test_acc,
            final_test_acc: summary.final_test_acc,
            chosen_test_acc: summary.chosen.as_ref().map(|c| c.test_acc),
            chosen_epoch: summary.chosen.as_ref().map(|c| c.epoch),
            wall_s: summary.wall_s,
            test_acc: metrics.iter().map(|e| (e.epoch, e.test_acc)).collect(),
        });
    }
    let samples = rounds * p.local_steps as u64 * p.batch_size as u64 * su;
    let paper = acc::paper_bytes(&counts, su, rounds);
    let gpipe = |k: usize| acc::gpipe_bytes(&g, &acc::default_cuts(k), samples);
    let loft_measured = pretraining.loft.sync_bytes_sent_all_ranks;
    let gpipe_s = gpipe(s.max(2));
    let ratio = |a: u64, b: u64| if b > 0 { a as f64 / b as f64 } else { 0.0 };
    Ok(Report {
        arch: p.arch.name(),
        base_width: p.arch.base_width,
        inner_width: p.arch.inner_width,
        dataset: p.dataset.name().into(),
        workers: s,
        rounds: p.rounds,
        local_steps: p.local_steps,
        batch_per_worker: p.batch_size,
        samples,
        seed: p.seed,
        recipe: Recipe {
            lr: p.lr,
            schedule: match p.schedule {
                crate::schedule::Kind::Constant => "constant".into(),
                crate::schedule::Kind::Cosine => "cosine".into(),
                crate::schedule::Kind::Step { .. } => "step".into(),
            },
            warmup_rounds: p.warmup_rounds,
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            criterion: job.criterion.name().into(),
            keep_first_blocks: job.keep_first_blocks,
        },
        val_size: p.val_size,
        finetune: FinetuneSettings {
            epochs: job.finetune.epochs,
            lr: job.finetune.lr,
            batch: job.finetune.batch_size,
        },
        params: Params {
            shared: counts.shared,
            partitioned: counts.partitioned,
        },
        pretraining,
        tickets: rows,
        communication_bytes: Communication {
            loft_measured,
            loft_closed_form: rounds * acc::loft_round_bytes(&g, su, p.keep_momentum),
            loft_paper_accounting: paper,
            gpipe2: gpipe(2),
            gpipe4: gpipe(4),
            data_parallel: rounds * p.local_steps as u64 * acc::data_parallel_step_bytes(&g, su),
            improvement_gpipe_over_loft_paper: ratio(gpipe_s, paper),
            improvement_gpipe_over_loft_measured: ratio(gpipe_s, loft_measured),
        },
        ticket_overlap: ticket_overlap(job)?,
    })
}

fn gb(bytes: u64) -> String {
    format!("{:.4}", bytes as f64 / 1e9)
}

/// How the headline accuracy is chosen, in words.
fn selection(val_size: usize) -> String {
    if val_size > 0 {
        format!("test accuracy at the fine-tuning epoch with the best accuracy on {val_size} validation images held out of the training set")
    } else {
        "test accuracy of the final fine-tuning epoch (no validation images held out)".into()
    }
}

/// The paragraph on what both methods did: recipe, budget, selection.
fn settings(o: &mut String, r: &Report, seeds: &str) {
    let s = r.workers;
    let rc = &r.recipe;
    let steps = r.rounds * r.local_steps;
    let _ = writeln!(
        o,
        "Pre-training recipe, both methods: SGD lr {} ({}{}), momentum {}, weight decay {}. \
         Budget: both methods see {} samples in {steps} optimizer steps: LoFT-{s} runs {} rounds x {} local steps with \
         batch {} on each of its {s} workers (each on its sub-network); dense training takes the same {steps} steps \
         data-parallel over the {s} ranks with a global batch of {} ({} per rank). \
         Fine-tuning: {} epochs, lr {} divided by 10 after 1/3, 2/3 and 8/9 of them, global batch {} split over the \
         ranks. Tickets keep the {} conv1 row norms of every block without a projection{}. {seeds} \
         GPipe computes the same gradients as dense training, so the dense tickets stand for GPipe's.\n",
        rc.lr,
        rc.schedule,
        if rc.warmup_rounds > 0.0 {
            format!(", linear warmup over {} rounds", rc.warmup_rounds)
        } else {
            String::new()
        },
        rc.momentum,
        rc.weight_decay,
        r.samples,
        r.rounds,
        r.local_steps,
        r.batch_per_worker,
        r.batch_per_worker * s,
        r.batch_per_worker,
        r.finetune.epochs,
        r.finetune.lr,
        r.finetune.batch,
        if rc.criterion.is_empty() {
            "largest"
        } else {
            &rc.criterion
        },
        if rc.keep_first_blocks {
            " except the first of each stage (the released code)"
        } else {
            ""
        },
    );
    let _ = writeln!(
        o,
        "Accuracies are the {}; the final epoch's and the best over fine-tuning (selected on the test set, the \
         released code's figure) are in the table of every ticket.\n",
        selection(r.val_size)
    );
}

/// The Markdown report.
pub fn markdown(r: &Report) -> String {
    let mut o = String::new();
    let s = r.workers;
    let _ = writeln!(
        o,
        "# loft run: {} (base {}, inner x{}) on {}, S = {s}\n",
        r.arch, r.base_width, r.inner_width, r.dataset
    );
    settings(&mut o, r, &format!("One seed ({}).", r.seed));
    let by = |group: &str| -> Vec<&TicketRow> { r.tickets.iter().filter(|t| t.group() == group).collect() };
    let ratios: Vec<String> = by("dense").iter().map(|t| format!("{:.0}%", t.ratio * 100.0)).collect();
    let cells = |v: Vec<&TicketRow>| {
        if v.is_empty() {
            return "-".to_string();
        }
        v.iter()
            .map(|t| format!("{:.2}", t.headline()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let c = &r.communication_bytes;
    let _ = writeln!(
        o,
        "## The paper's table, at this scale (top-1 %; communication in GB)\n"
    );
    let _ = writeln!(
        o,
        "| setting | No-Prune | Dense / GPipe ({r}) | LoFT-{s} ({r}) | random control ({r}) | comm GPipe-2 / LoFT-{s} / GPipe-4 / data-parallel-{s} | improvement GPipe-{g} / LoFT-{s} |",
        r = ratios.join(", "),
        g = s.max(2)
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    let _ = writeln!(
        o,
        "| {} base {}, {} | {} | {} | {} | {} | {} / {} / {} / {} | {:.2}x |\n",
        r.arch,
        r.base_width,
        r.dataset,
        cells(by("noprune")),
        cells(by("dense")),
        cells(by("loft")),
        cells(by("random")),
        gb(c.gpipe2),
        gb(c.loft_paper_accounting),
        gb(c.gpipe4),
        gb(c.data_parallel),
        c.improvement_gpipe_over_loft_paper
    );
    tickets_table(&mut o, r);
    communication_table(&mut o, r);
    pretraining_tables(&mut o, r);
    let _ = writeln!(
        o,
        "\n![accuracy](accuracy.png)\n\n![filter distance](distance.png)\n\n![communication](communication.png)"
    );
    o
}

/// Every ticket's row.
fn tickets_table(o: &mut String, r: &Report) {
    let _ = writeln!(o, "## Every ticket\n");
    let _ = writeln!(
        o,
        "| ticket | pre-training | pruning ratio | parameters | test % (epoch chosen on validation) | final test % | best test % (released code's figure) | fine-tuning s |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
    for t in &r.tickets {
        let chosen = match (t.chosen_test_acc, t.chosen_epoch) {
            (Some(a), Some(e)) => format!("{a:.2} (epoch {e})"),
            _ => "-".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {:.0}% | {} | {chosen} | {:.2} | {:.2} | {:.0} |",
            t.ticket,
            if t.control {
                "dense, random filters"
            } else {
                &t.pretraining
            },
            t.ratio * 100.0,
            t.params,
            t.final_test_acc,
            t.best_test_acc,
            t.wall_s
        );
    }
}

/// Communication by accounting.
fn communication_table(o: &mut String, r: &Report) {
    let s = r.workers;
    let c = &r.communication_bytes;
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
        let _ = writeln!(o, "| {label} | {} | {how} |", gb(c.get(k)));
    }
}

/// Pre-training runs and their distance curves.
fn pretraining_tables(o: &mut String, r: &Report) {
    let _ = writeln!(o, "\n## Pre-training\n");
    let _ = writeln!(o, "| method | rounds | final test % | wall s | compute s | sync s |");
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for (m, p) in [("dense", &r.pretraining.dense), ("loft", &r.pretraining.loft)] {
        let _ = writeln!(
            o,
            "| {m} | {} | {:.2} | {:.0} | {:.0} | {:.1} |",
            p.rounds, p.final_test_acc, p.wall_s, p.compute_s, p.sync_s
        );
    }
    if !r.ticket_overlap.is_empty() {
        let _ = writeln!(o, "\n## Do LoFT and dense training find the same ticket?\n");
        let _ = writeln!(
            o,
            "Share of the dense ticket's filters the LoFT ticket keeps too, beside the share two \
             random tickets of the same sizes would have in common on average.\n"
        );
        let _ = writeln!(o, "| pruning ratio | LoFT ∩ dense | random tickets |\n|---:|---:|---:|");
        for t in &r.ticket_overlap {
            let _ = writeln!(
                o,
                "| {:.0}% | {:.3} | {:.3} |",
                100.0 * t.ratio,
                t.overlap,
                t.random_expected
            );
        }
    }
    let _ = writeln!(
        o,
        "\n## Filter distance of each recorded checkpoint to the final model\n"
    );
    let _ = writeln!(
        o,
        "The last two columns compare the two runs with each other at the same round (the LoFT model \
         against the dense one, same initialisation and samples).\n"
    );
    let _ = writeln!(
        o,
        "| round | dense D_idx | dense D_w | LoFT D_idx | LoFT D_w | LoFT-dense D_idx | LoFT-dense D_w |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|---|");
    let between = &r.pretraining.loft_to_dense;
    let (d, l) = (
        &r.pretraining.dense.distance_to_final,
        &r.pretraining.loft.distance_to_final,
    );
    for i in 0..d.len().max(l.len()) {
        let cell = |v: &[DistancePoint], k: usize| {
            v.get(i)
                .map(|p| format!("{:.4}", if k == 1 { p.1 } else { p.2 }))
                .unwrap_or_else(|| "-".into())
        };
        let round = d.get(i).or(l.get(i)).map(|p| p.0.to_string()).unwrap_or_default();
        let at = |k: usize| {
            let r: Option<u64> = round.parse().ok();
            between
                .iter()
                .find(|p| Some(p.0) == r)
                .map(|p| format!("{:.4}", if k == 1 { p.1 } else { p.2 }))
                .unwrap_or_else(|| "-".into())
        };
        let _ = writeln!(
            o,
            "| {round} | {} | {} | {} | {} | {} | {} |",
            cell(d, 1),
            cell(d, 2),
            cell(l, 1),
            cell(l, 2),
            at(1),
            at(2)
        );
    }
}

/// Write `report.md`, `report.json` and the plots into the job's directory.
pub fn write(job: &MainJob, ranks: usize) -> Result<()> {
    let r = collect(job, ranks)?;
    write_json(&job.out.join("report.json"), &r)?;
    write_atomic(&job.out.join("report.md"), markdown(&r).as_bytes())?;
    if let Err(e) = plots::draw(&r, &job.out) {
        eprintln!("loft: warning: plots not drawn: {e}");
    }
    Ok(())
}

/// A quantity over the seeds: mean, sample standard deviation (0 for one seed) and every
/// seed's value, in the order of `--seeds`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct OverSeeds {
    pub mean: f64,
    pub std: f64,
    pub values: Vec<f64>,
}

impl OverSeeds {
    /// The statistics of `values`.
    pub fn of(values: Vec<f64>) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        OverSeeds {
            mean,
            std: var.sqrt(),
            values,
        }
    }

    /// `mean ± std`.
    fn cell(&self) -> String {
        format!("{:.2} ± {:.2}", self.mean, self.std)
    }
}

/// One ticket over the seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TicketOverSeeds {
    pub ticket: String,
    /// noprune, dense, loft or random.
    pub group: String,
    pub ratio: f64,
    /// The headline (chosen on validation, else final), the final and the best test accuracy.
    pub headline: OverSeeds,
    pub final_test_acc: OverSeeds,
    pub best_test_acc: OverSeeds,
}

/// The report over the seeds (`report.json` of a multi-seed job).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedsReport {
    pub seeds: Vec<u64>,
    pub tickets: Vec<TicketOverSeeds>,
    /// LoFT ∩ dense ticket overlap per ratio, beside the random expectation.
    pub ticket_overlap: Vec<(f64, OverSeeds, f64)>,
    /// Every seed's own report.
    pub per_seed: Vec<Report>,
}

/// Gather the seeds' reports into one.
pub fn over_seeds(seeds: &[u64], per_seed: Vec<Report>) -> Result<SeedsReport> {
    let first = per_seed
        .first()
        .ok_or_else(|| Error::config("a report over seeds needs at least one seed"))?;
    let mut tickets = Vec::new();
    for (i, t) in first.tickets.iter().enumerate() {
        let rows: Vec<&TicketRow> = per_seed
            .iter()
            .map(|r| {
                r.tickets
                    .get(i)
                    .filter(|u| u.ticket == t.ticket)
                    .ok_or_else(|| Error::config(format!("seed {} has no ticket {}", r.seed, t.ticket)))
            })
            .collect::<Result<_>>()?;
        let over = |f: &dyn Fn(&TicketRow) -> f64| OverSeeds::of(rows.iter().map(|r| f(r)).collect());
        tickets.push(TicketOverSeeds {
            ticket: t.ticket.clone(),
            group: t.group().into(),
            ratio: t.ratio,
            headline: over(&|r| r.headline()),
            final_test_acc: over(&|r| r.final_test_acc),
            best_test_acc: over(&|r| r.best_test_acc),
        });
    }
    let ticket_overlap = first
        .ticket_overlap
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let v = per_seed
                .iter()
                .map(|r| r.ticket_overlap.get(i).map_or(f64::NAN, |x| x.overlap))
                .collect();
            (o.ratio, OverSeeds::of(v), o.random_expected)
        })
        .collect();
    Ok(SeedsReport {
        seeds: seeds.to_vec(),
        tickets,
        ticket_overlap,
        per_seed,
    })
}

/// The Markdown report over the seeds.
pub fn markdown_seeds(r: &SeedsReport) -> String {
    let mut o = String::new();
    let Some(first) = r.per_seed.first() else { return o };
    let s = first.workers;
    let seeds: Vec<String> = r.seeds.iter().map(|x| x.to_string()).collect();
    let _ = writeln!(
        o,
        "# loft run: {} (base {}, inner x{}) on {}, S = {s}, {} seeds\n",
        first.arch,
        first.base_width,
        first.inner_width,
        first.dataset,
        r.seeds.len()
    );
    settings(
        &mut o,
        first,
        &format!(
            "Seeds {} (each runs the whole job: initialisation, data order, partitions; its report is in seed-N/). \
             Cells give the mean ± the standard deviation over the seeds.",
            seeds.join(", ")
        ),
    );
    let by = |group: &str| -> Vec<&TicketOverSeeds> { r.tickets.iter().filter(|t| t.group == group).collect() };
    let ratios: Vec<String> = by("dense").iter().map(|t| format!("{:.0}%", t.ratio * 100.0)).collect();
    let cells = |v: Vec<&TicketOverSeeds>| {
        if v.is_empty() {
            return "-".to_string();
        }
        v.iter().map(|t| t.headline.cell()).collect::<Vec<_>>().join(", ")
    };
    let _ = writeln!(o, "## The paper's table, at this scale (top-1 %)\n");
    let _ = writeln!(
        o,
        "| setting | No-Prune | Dense / GPipe ({r}) | LoFT-{s} ({r}) | random control ({r}) |",
        r = ratios.join(", ")
    );
    let _ = writeln!(o, "|---|---|---|---|---|");
    let _ = writeln!(
        o,
        "| {} base {}, {} | {} | {} | {} | {} |\n",
        first.arch,
        first.base_width,
        first.dataset,
        cells(by("noprune")),
        cells(by("dense")),
        cells(by("loft")),
        cells(by("random"))
    );
    let _ = writeln!(o, "## Every ticket, every seed\n");
    let _ = writeln!(
        o,
        "| ticket | test % (chosen) | per seed | final test % | best test % (released code's figure) |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|");
    for t in &r.tickets {
        let each: Vec<String> = t.headline.values.iter().map(|v| format!("{v:.2}")).collect();
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} |",
            t.ticket,
            t.headline.cell(),
            each.join(", "),
            t.final_test_acc.cell(),
            t.best_test_acc.cell()
        );
    }
    if !r.ticket_overlap.is_empty() {
        let _ = writeln!(o, "\n## Do LoFT and dense training find the same ticket?\n");
        let _ = writeln!(
            o,
            "| pruning ratio | LoFT ∩ dense | per seed | random tickets |\n|---:|---:|---|---:|"
        );
        for (ratio, v, random) in &r.ticket_overlap {
            let each: Vec<String> = v.values.iter().map(|x| format!("{x:.3}")).collect();
            let _ = writeln!(
                o,
                "| {:.0}% | {:.3} ± {:.3} | {} | {:.3} |",
                100.0 * ratio,
                v.mean,
                v.std,
                each.join(", "),
                random
            );
        }
    }
    let c = &first.communication_bytes;
    let _ = writeln!(
        o,
        "\n## Communication (GB; the same for every seed)\n\n| LoFT-{s} (paper's accounting) | LoFT-{s} (moved) | GPipe-2 | GPipe-4 | data-parallel-{s} |\n|---|---|---|---|---|\n| {} | {} | {} | {} | {} |",
        gb(c.loft_paper_accounting),
        gb(c.loft_measured),
        gb(c.gpipe2),
        gb(c.gpipe4),
        gb(c.data_parallel)
    );
    o
}

/// Write the report over the seeds (`report.md`, `report.json`) into the job's directory,
/// from each seed's `report.json`.
pub fn write_seeds(job: &MainJob) -> Result<()> {
    let per_seed = job
        .seeds
        .iter()
        .map(|&s| read_json(&job.seed_dir(s).join("report.json")))
        .collect::<Result<Vec<Report>>>()?;
    let r = over_seeds(&job.seeds, per_seed)?;
    write_json(&job.out.join("report.json"), &r)?;
    write_atomic(&job.out.join("report.md"), markdown_seeds(&r).as_bytes())
}
