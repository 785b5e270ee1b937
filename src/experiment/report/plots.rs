//! PNG plots of the report: accuracy over training, filter-distance curves, communication.
//! Text needs a TrueType font; DejaVu Sans (Debian's fonts-dejavu-core) is loaded at run time.

use super::Report;
use crate::{Error, Result};
use plotters::prelude::*;
use std::path::Path;

/// Fonts tried, in order.
const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Register a font for plotters once per process.
fn font() -> Result<()> {
    use std::sync::OnceLock;
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = FONTS
            .iter()
            .find(|p| Path::new(p).exists())
            .ok_or("no DejaVu Sans font (apt-get install fonts-dejavu-core)")?;
        let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps the font for the life of the process
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path}: not a usable font"))
    })
    .clone()
    .map_err(Error::Backend)
}

fn err(e: impl std::fmt::Display) -> Error {
    Error::Backend(format!("plot: {e}"))
}

fn points(v: &[(usize, f64)]) -> Vec<(f64, f64)> {
    v.iter().map(|&(x, y)| (x as f64, y)).collect()
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A line chart of named series into one drawing area.
fn lines(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    let (x0, x1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x0, x1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (x0, x1.max(x0 + 1.0))
    };
    let pad = ((y1 - y0) * 0.05).max(0.01);
    let (y0, y1) = if all.is_empty() {
        (0.0, 1.0)
    } else {
        (y0 - pad, y1 + pad)
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)
}

/// Draw `accuracy.png`, `distance.png` and `communication.png` into `dir`.
pub fn draw(r: &Report, dir: &Path) -> Result<()> {
    font()?;
    let s = r.workers;
    // accuracy: pre-training (per round) and fine-tuning (per epoch)
    let path = dir.join("accuracy.png");
    let root = BitMapBackend::new(&path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(620);
    let pre = &r.pretraining;
    lines(
        &left,
        "Pre-training: test accuracy",
        "round",
        "test accuracy %",
        &[
            ("dense".into(), points(&pre.dense.test_acc)),
            (format!("LoFT-{s}"), points(&pre.loft.test_acc)),
        ],
    )?;
    let fine: Vec<(String, Vec<(f64, f64)>)> = r
        .tickets
        .iter()
        .map(|t| (t.ticket.clone(), points(&t.test_acc)))
        .collect();
    lines(
        &right,
        "Fine-tuning the tickets: test accuracy",
        "epoch",
        "test accuracy %",
        &fine,
    )?;
    root.present().map_err(err)?;

    // filter distance of every recorded checkpoint to the final model
    let path = dir.join("distance.png");
    let root = BitMapBackend::new(&path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(550);
    let curve = |m: &super::PretrainRow, k: usize| -> Vec<(f64, f64)> {
        m.distance_to_final
            .iter()
            .map(|p| (p.0 as f64, if k == 1 { p.1 } else { p.2 }))
            .collect()
    };
    for (area, k, what) in [(&left, 1, "index distance D_idx"), (&right, 2, "weight distance D_w")] {
        let between: Vec<(f64, f64)> = pre
            .loft_to_dense
            .iter()
            .map(|p| (p.0 as f64, if k == 1 { p.1 } else { p.2 }))
            .collect();
        lines(
            area,
            &format!("{what}: to the final model, and LoFT to dense"),
            "round",
            what,
            &[
                ("dense to its final".into(), curve(&pre.dense, k)),
                (format!("LoFT-{s} to its final"), curve(&pre.loft, k)),
                (format!("LoFT-{s} to dense, same round"), between),
            ],
        )?;
    }
    root.present().map_err(err)?;

    // communication bars
    let c = &r.communication_bytes;
    let bars: Vec<(String, f64)> = [
        (format!("LoFT-{s} (loft)"), "loft_measured"),
        (format!("LoFT-{s} (paper)"), "loft_paper_accounting"),
        ("GPipe-2".to_string(), "gpipe2"),
        ("GPipe-4".to_string(), "gpipe4"),
        (format!("data-parallel-{s}"), "data_parallel"),
    ]
    .into_iter()
    .map(|(n, k)| (n, c.get(k) as f64 / 1e9))
    .collect();
    let path = dir.join("communication.png");
    let root = BitMapBackend::new(&path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9) * 1.15;
    let mut chart = ChartBuilder::on(&root)
        .caption("Communication of pre-training (GB)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..bars.len() as f64, 0f64..top)
        .map_err(err)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("GB")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, b.1)],
                COLORS[i % COLORS.len()].filled(),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.3}", b.1),
                (i as f64 + 0.3, b.1 + top * 0.02),
                ("sans-serif", 13),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)
}

/// The class of the cell whose centre is at `v` (rows counted from the top when `flip`), or
/// nothing between centres; classes are thinned out to about 20 labels.
fn centre(v: f64, k: usize, flip: bool) -> String {
    let i = v.floor();
    if (v - i - 0.5).abs() > 0.26 || i < 0.0 || i as usize >= k {
        return String::new();
    }
    let class = if flip { k - 1 - i as usize } else { i as usize };
    if class.is_multiple_of(k.div_ceil(20)) {
        class.to_string()
    } else {
        String::new()
    }
}

/// A confusion matrix as a heat map: rows the true class, columns the predicted one, each
/// cell shaded by its share of the row (the diagonal is per-class accuracy).
pub fn confusion(matrix: &[Vec<u64>], title: &str, path: &Path) -> Result<()> {
    font()?;
    let k = matrix.len().max(1);
    let side = (40 + 24 * k).clamp(420, 1600) as u32;
    let root = BitMapBackend::new(path, (side + 80, side + 60)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Confusion matrix, {title}"), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(48)
        .build_cartesian_2d(0f64..k as f64, 0f64..k as f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("predicted class")
        .y_desc("true class")
        // a tick at every half cell; the cell centres carry the class
        .x_labels(2 * k + 1)
        .y_labels(2 * k + 1)
        .x_label_formatter(&|v| centre(*v, k, false))
        .y_label_formatter(&|v| centre(*v, k, true))
        .draw()
        .map_err(err)?;
    let cells = matrix.iter().enumerate().flat_map(|(t, row)| {
        let total = row.iter().sum::<u64>().max(1) as f64;
        row.iter().enumerate().map(move |(p, &n)| {
            let share = n as f64 / total;
            let shade = (255.0 * (1.0 - share)) as u8;
            // row t drawn from the top
            let y0 = (k - 1 - t) as f64;
            Rectangle::new(
                [(p as f64, y0), (p as f64 + 1.0, y0 + 1.0)],
                RGBColor(shade, shade, 255).filled(),
            )
        })
    });
    chart.draw_series(cells).map_err(err)?;
    root.present()
        .map_err(|e| Error::Backend(format!("{}: {e}", path.display())))
}

/// `theory.png`: the weight distance and the prediction gap against the width (log-log, one
/// series per S, every seed a point, the per-width mean a line); `theory-loss.png`: the loss
/// of GD and LoFT over the rounds at the largest width (first seed).
pub fn theory(r: &crate::theory::TheoryReport, dir: &Path) -> Result<()> {
    font()?;
    let path = dir.join("theory.png");
    let root = BitMapBackend::new(&path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (left, right) = root.split_horizontally(550);
    type Measure = fn(&crate::theory::Trajectory) -> f64;
    let pick: [(&str, Measure); 2] = [
        ("||W_T - W_T^GD||_F^2", |t| t.weight_distance),
        ("prediction gap, summed", |t| t.prediction_gap),
    ];
    for (area, (what, f)) in [&left, &right].into_iter().zip(pick) {
        let series: Vec<(String, Vec<(f64, f64)>)> = r
            .config
            .workers
            .iter()
            .map(|&s| {
                let mut pts: Vec<(f64, f64)> = r
                    .runs
                    .iter()
                    .filter(|t| t.workers == s)
                    .map(|t| ((t.width as f64).log2(), f(t).max(1e-300).log10()))
                    .collect();
                pts.sort_by(|a, b| a.partial_cmp(b).unwrap());
                // mean over the seeds of each width
                let mut sums: Vec<(f64, f64, f64)> = Vec::new();
                for p in pts {
                    match sums.last_mut() {
                        Some(m) if m.0 == p.0 => {
                            m.1 += p.1;
                            m.2 += 1.0;
                        }
                        _ => sums.push((p.0, p.1, 1.0)),
                    }
                }
                (
                    format!("LoFT-{s}"),
                    sums.into_iter().map(|(x, y, n)| (x, y / n)).collect(),
                )
            })
            .collect();
        lines(area, &format!("{what} (log10) vs width"), "log2 m", "log10", &series)?;
    }
    root.present().map_err(err)?;

    let path = dir.join("theory-loss.png");
    let root = BitMapBackend::new(&path, (700, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let top = r.runs.iter().map(|t| t.width).max().unwrap_or(0);
    let mut series = Vec::new();
    for (i, t) in r.runs.iter().filter(|t| t.width == top && t.seed == 1).enumerate() {
        let curve = |v: &[f64]| {
            v.iter()
                .enumerate()
                .map(|(k, &l)| ((k + 1) as f64, l))
                .collect::<Vec<_>>()
        };
        if i == 0 {
            series.push(("GD".to_string(), curve(&t.loss_gd)));
        }
        series.push((format!("LoFT-{}", t.workers), curve(&t.loss_loft)));
    }
    lines(&root, &format!("training loss, m = {top}"), "round", "loss", &series)?;
    root.present().map_err(err)
}
