//! `loft bench`: the machine's SGEMM rate, per-layer convolution GFLOP/s and full training
//! steps, printed as Markdown tables (progress on stderr).

use crate::backend::cpu::gemm::{matmul, matmul_into_block, Mat, SendPtr};
use crate::backend::{Backend, Device};
use crate::model::{ArchSpec, Graph, Model, Op};
use crate::ops::{Conv2d, Sgd};
use crate::rng::Rng;
use crate::Result;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// Median-of-runs timer: runs `f` until `min_s` seconds and at least `min_reps` runs have
/// passed (after one warm-up run) and returns the median seconds per run.
fn time_it(min_reps: usize, min_s: f64, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_reps || start.elapsed().as_secs_f64() < min_s {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
        if times.len() >= 1000 {
            break;
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).expect("finite time"));
    times[times.len() / 2]
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.uniform() * 2.0 - 1.0) as f32).collect()
}

/// SGEMM GFLOP/s of an (n, n) x (n, n) product with `threads` threads: the better of gemm's
/// own threading and an explicit split of the output columns among rayon tasks.
pub fn sgemm_gflops(n: usize, threads: usize) -> f64 {
    let a = random(n * n, 1);
    let b = random(n * n, 2);
    let mut c = vec![0f32; n * n];
    let t_gemm = time_it(5, 1.0, || {
        matmul(&mut c, n, Mat::rm(&a, n, n), Mat::rm(&b, n, n), false, threads)
    });
    let t_split = if threads > 1 {
        let cols = n.div_ceil(threads);
        let dst = SendPtr(c.as_mut_ptr());
        time_it(5, 1.0, || {
            (0..threads).into_par_iter().for_each(|t| {
                let (j0, j1) = (t * cols, ((t + 1) * cols).min(n));
                let bm = Mat {
                    data: &b[j0..],
                    rows: n,
                    cols: j1 - j0,
                    rs: n,
                    cs: 1,
                };
                // SAFETY: task t writes only columns j0..j1 of the (n, n) output c, which is
                // alive and not otherwise accessed during the loop.
                unsafe { matmul_into_block(dst.add(j0), n, Mat::rm(&a, n, n), bm, false) };
            })
        })
    } else {
        f64::INFINITY
    };
    2.0 * (n * n * n) as f64 / t_gemm.min(t_split) / 1e9
}

pub use crate::rundir::peak_rss_bytes;

/// Distinct convolutions of a graph at batch n, with how many times each occurs.
pub fn distinct_convs(g: &Graph, n: usize) -> Vec<(Conv2d, usize, String)> {
    let mut out: Vec<(Conv2d, usize, String)> = Vec::new();
    for op in &g.ops {
        if let Op::Conv { geom, w, .. } = op {
            let s = geom.with_n(n);
            match out.iter_mut().find(|(c, _, _)| *c == s) {
                Some(e) => e.1 += 1,
                None => out.push((s, 1, g.params.entries[*w].name.clone())),
            }
        }
    }
    out
}

/// Timing of one convolution: seconds for forward, backward-data, backward-filter.
pub fn time_conv<B: Backend>(be: &B, s: &Conv2d) -> Result<(f64, f64, f64)> {
    let upload = |v: Vec<f32>| -> Result<B::Buf> {
        let mut b = be.alloc(v.len())?;
        be.upload(&v, &mut b)?;
        Ok(b)
    };
    let (x, w, dy) = (
        upload(random(s.x_len(), 3))?,
        upload(random(s.w_len(), 4))?,
        upload(random(s.y_len(), 5))?,
    );
    let (mut y, mut dx, mut dw) = (be.alloc(s.y_len())?, be.alloc(s.x_len())?, be.alloc(s.w_len())?);
    let v = |b| be.view(b, 0, be.buf_len(b));
    let timed = |f: &mut dyn FnMut()| -> Result<f64> {
        let t = time_it(5, 1.0, || {
            f();
            let _ = be.sync();
        });
        be.sync()?;
        Ok(t)
    };
    let f = timed(&mut || be.conv2d_forward(s, v(&x), v(&w), be.view_mut(&mut y, 0, s.y_len())))?;
    let bd = timed(&mut || be.conv2d_backward_data(s, v(&dy), v(&w), be.view_mut(&mut dx, 0, s.x_len()), false))?;
    let bf = timed(&mut || be.conv2d_backward_filter(s, v(&x), v(&dy), be.view_mut(&mut dw, 0, s.w_len()), false))?;
    Ok((f, bd, bf))
}

/// Floats per buffer of the element-wise table: 128 MiB, past the last-level caches of the
/// CPUs and GPUs loft runs on (an H200's L2 is 60 MB).
pub const ELEMENTWISE_LEN: usize = 32 << 20;

/// One row of the element-wise table: the op, the bytes per element it must move (every
/// input read once, every output written once) and its median seconds per call.
pub struct ElementwiseRate {
    pub op: &'static str,
    pub bytes_per_element: f64,
    pub seconds: f64,
}

/// The element-wise and batch-norm ops over `len` floats (rounded down to whole batch-norm
/// images, at least one), each timed for at least `min_s` seconds: the rows of the table, copy
/// first, and the floats per buffer. Batch norm runs as the models use it (ReLU fused) on
/// (len / (128 * 1024), 128, 32 x 32).
pub fn elementwise_rates<B: Backend>(be: &B, len: usize, min_s: f64) -> Result<(Vec<ElementwiseRate>, usize)> {
    let c = 128;
    let hw = 1024;
    let n = (len / (c * hw)).max(1);
    let len = n * c * hw;
    let upload = |seed| -> Result<B::Buf> {
        let mut b = be.alloc(len)?;
        be.upload(&random(len, seed), &mut b)?;
        Ok(b)
    };
    let (x, mut y, mut z, mut m) = (upload(7)?, upload(8)?, upload(9)?, upload(10)?);
    let mask: Vec<f32> = (0..len).map(|i| (i % 3 != 0) as u8 as f32).collect();
    let mut mb = be.alloc(len)?;
    be.upload(&mask, &mut mb)?;
    let ch = |seed| -> Result<B::Buf> {
        let mut b = be.alloc(c)?;
        be.upload(
            &random(c, seed).iter().map(|v| 1.0 + 0.1 * v).collect::<Vec<f32>>(),
            &mut b,
        )?;
        Ok(b)
    };
    let (gamma, beta, mut rm, mut rv, mut sm, mut si, mut dg, mut db) =
        (ch(11)?, ch(12)?, ch(13)?, ch(14)?, ch(15)?, ch(16)?, ch(17)?, ch(18)?);
    let bn = crate::ops::BatchNorm {
        n,
        c,
        hw,
        eps: 1e-5,
        momentum: 0.1,
        relu: true,
    };
    let hp = Sgd {
        lr: 1e-6,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    let timed = |what: &str, f: &mut dyn FnMut()| -> Result<f64> {
        eprintln!("{what} ...");
        let t = time_it(5, min_s, || {
            f();
            let _ = be.sync();
        });
        be.sync()?;
        Ok(t)
    };
    // (op, bytes per element it must move, seconds)
    let mut rows: Vec<(&'static str, f64, f64)> = Vec::new();
    rows.push((
        "copy",
        8.0,
        timed("copy", &mut || be.copy(whole(be, &x), whole_mut(be, &mut y), false))?,
    ));
    rows.push(("fill", 4.0, timed("fill", &mut || be.fill(whole_mut(be, &mut y), 0.5))?));
    rows.push((
        "scale",
        8.0,
        timed("scale", &mut || be.scale(whole_mut(be, &mut y), 1.0))?,
    ));
    rows.push((
        "axpy",
        12.0,
        timed("axpy", &mut || be.axpy(1e-6, whole(be, &x), whole_mut(be, &mut y)))?,
    ));
    rows.push((
        "ReLU forward",
        8.0,
        timed("relu", &mut || be.relu_forward(whole(be, &x), whole_mut(be, &mut y)))?,
    ));
    rows.push((
        "ReLU backward",
        12.0,
        timed("relu backward", &mut || {
            be.relu_backward(whole(be, &x), whole(be, &z), whole_mut(be, &mut y), false)
        })?,
    ));
    rows.push((
        "add",
        12.0,
        timed("add", &mut || {
            be.add_forward(whole(be, &x), whole(be, &z), whole_mut(be, &mut y))
        })?,
    ));
    rows.push((
        "mask",
        12.0,
        timed("mask", &mut || be.apply_mask(whole_mut(be, &mut y), whole(be, &mb)))?,
    ));
    rows.push((
        "SGD (momentum, weight decay)",
        24.0,
        timed("sgd", &mut || {
            be.sgd_step(&hp, whole_mut(be, &mut y), whole_mut(be, &mut z), whole_mut(be, &mut m))
        })?,
    ));
    rows.push((
        "batch norm + ReLU, training forward",
        8.0,
        timed("batch norm forward", &mut || {
            be.batchnorm_forward_train(
                &bn,
                whole(be, &x),
                whole(be, &gamma),
                whole(be, &beta),
                whole_mut(be, &mut rm),
                whole_mut(be, &mut rv),
                whole_mut(be, &mut y),
                whole_mut(be, &mut sm),
                whole_mut(be, &mut si),
                None,
            )
        })?,
    ));
    rows.push((
        "batch norm + ReLU, evaluation",
        8.0,
        timed("batch norm eval", &mut || {
            be.batchnorm_forward_eval(
                &bn,
                whole(be, &x),
                whole(be, &gamma),
                whole(be, &beta),
                whole(be, &rm),
                whole(be, &rv),
                whole_mut(be, &mut z),
            )
        })?,
    ));
    rows.push((
        "batch norm + ReLU, backward",
        12.0,
        timed("batch norm backward", &mut || {
            be.batchnorm_backward(
                &bn,
                whole(be, &x),
                whole(be, &y),
                whole(be, &z),
                whole(be, &gamma),
                whole(be, &beta),
                whole(be, &sm),
                whole(be, &si),
                whole_mut(be, &mut m),
                whole_mut(be, &mut dg),
                whole_mut(be, &mut db),
                false,
                None,
            )
        })?,
    ));
    let rows = rows
        .into_iter()
        .map(|(op, bytes_per_element, seconds)| ElementwiseRate {
            op,
            bytes_per_element,
            seconds,
        })
        .collect();
    Ok((rows, len))
}

/// Print the element-wise table (see [`elementwise_rates`]) for `len` floats per buffer.
pub fn elementwise_table<B: Backend>(be: &B, len: usize) -> Result<()> {
    let (rows, len) = elementwise_rates(be, len, 0.5)?;
    let gbs = |r: &ElementwiseRate| r.bytes_per_element * len as f64 / r.seconds / 1e9;
    let copy = gbs(&rows[0]);
    println!(
        "### Element-wise kernels, {len} floats per buffer ({} MiB)\n",
        (len * 4) >> 20
    );
    println!(
        "GB/s of the bytes each op must move (every input read once, every output written once); `% copy` \
         against the copy's rate in this run. Batch norm on ({}, 128, 32 x 32): its reductions read x again \
         (forward: twice more; backward: x and dy once more), which the rate does not count.\n",
        len / (128 * 1024)
    );
    println!("| op | bytes / element | ms | GB/s | % copy |\n|---|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.1} | {:.0}% |",
            r.op,
            r.bytes_per_element,
            r.seconds * 1e3,
            gbs(r),
            100.0 * gbs(r) / copy
        );
    }
    println!();
    Ok(())
}

/// All of buffer `b` as a view, and as a mutable view.
fn whole<'a, B: Backend>(be: &B, b: &'a B::Buf) -> B::View<'a> {
    be.view(b, 0, be.buf_len(b))
}
fn whole_mut<'a, B: Backend>(be: &B, b: &'a mut B::Buf) -> B::ViewMut<'a> {
    let n = be.buf_len(b);
    be.view_mut(b, 0, n)
}

/// A fresh model of `spec` at batch n on h x w inputs holding one random batch, and the SGD
/// settings of the step benchmarks.
fn step_model<B: Backend>(be: Arc<B>, spec: &ArchSpec, n: usize, h: usize, w: usize) -> Result<(Model<B>, Sgd)> {
    let g = Graph::build(spec, h, w, None)?;
    let mut m = Model::new(be, g, n)?;
    m.init(1)?;
    let x = random(n * spec.in_channels * h * w, 6);
    let y: Vec<u32> = (0..n).map(|i| (i % spec.classes) as u32).collect();
    m.set_batch(n, &x, &y)?;
    let hp = Sgd {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    Ok((m, hp))
}

/// Seconds per training step of `spec` at batch n on (c, h, w) inputs, and model bytes.
pub fn time_train_step<B: Backend>(
    be: Arc<B>,
    spec: &ArchSpec,
    n: usize,
    h: usize,
    w: usize,
    steps: usize,
) -> Result<(f64, usize)> {
    let (mut m, hp) = step_model(be.clone(), spec, n, h, w)?;
    let mut err = None;
    let t = time_it(steps, 0.0, || {
        if let Err(e) = m.train_step(n, &hp).and_then(|_| m.be.sync()) {
            err = Some(e);
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    Ok((t, m.device_bytes() + be.workspace_bytes()))
}

/// Options of `loft bench`.
pub struct BenchOptions {
    pub batch: usize,
    /// The device (passed on to the child processes of the step rows).
    pub device: Device,
    /// Skip the per-layer table (quick runs).
    pub quick: bool,
    /// Architecture of the per-layer table.
    pub arch: String,
    /// Base width of the per-layer table's network.
    pub base_width: usize,
    /// Where to write the per-layer table as JSON, if anywhere.
    pub json: Option<std::path::PathBuf>,
}

/// Run every benchmark and print the Markdown tables.
pub fn run<B: Backend>(be: Arc<B>, opts: &BenchOptions) -> Result<()> {
    let threads = rayon::current_num_threads();
    eprintln!("loft bench: {threads} threads");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "### Machine\n\n{cpu}, {threads} threads (rayon), f32; backend {}.\n",
        be.name()
    );
    // the CPU's SGEMM rate is the convolutions' yardstick on the CPU; a GPU's is cuDNN on the
    // same shapes (scripts/bench_cudnn.py reads --json)
    let on_cpu = be.name().starts_with("cpu");
    let mut gt = f64::NAN;
    if on_cpu {
        eprintln!("sgemm 1024^3 ...");
        let g1 = sgemm_gflops(1024, 1);
        gt = sgemm_gflops(1024, threads);
        let kernel = if crate::backend::cpu::sgemm::available() {
            "loft's AVX-512 kernel"
        } else {
            "gemm crate"
        };
        println!("### SGEMM ({kernel}, 1024 x 1024 x 1024)\n");
        println!("| threads | GFLOP/s |\n|---:|---:|");
        println!("| 1 | {g1:.1} |\n| {threads} | {gt:.1} |\n");
    }

    let n = opts.batch;
    if !opts.quick {
        let mut spec = ArchSpec::named(&opts.arch)?;
        spec.base_width = opts.base_width;
        let g = Graph::build(&spec, 32, 32, None)?;
        println!(
            "### Convolutions of CIFAR {} (base {}, inner width 2), batch {n}\n",
            opts.arch, opts.base_width
        );
        if on_cpu {
            println!(
                "GFLOP/s of each pass; `% sgemm` is the slowest pass against the {threads}-thread SGEMM rate ({gt:.1}).\n"
            );
        } else {
            println!("GFLOP/s of each pass (`--json` and scripts/bench_cudnn.py time the same shapes in cuDNN).\n");
        }
        println!("| layer (first of its shape) | count | c_in -> c_out | k / stride | in HxW | forward | backward data | backward filter | % sgemm |");
        println!("|---|---:|---|---|---|---:|---:|---:|---:|");
        let mut rows = Vec::new();
        for (s, count, name) in distinct_convs(&g, n) {
            eprintln!("conv {name} ...");
            let (f, bd, bf) = time_conv(&*be, &s)?;
            rows.push(serde_json::json!({"layer": name, "count": count, "conv": s,
                "seconds": {"forward": f, "backward_data": bd, "backward_filter": bf}}));
            let fl = s.flops() / 1e9;
            let (gf, gd, gw) = (fl / f, fl / bd, fl / bf);
            let worst = gf.min(gd).min(gw);
            let share = if on_cpu {
                format!("{:.0}%", 100.0 * worst / gt)
            } else {
                "-".to_string()
            };
            println!(
                "| {name} | {count} | {} -> {} | {}x{} / {} | {}x{} | {gf:.1} | {gd:.1} | {gw:.1} | {share} |",
                s.c_in, s.c_out, s.kh, s.kw, s.stride, s.h, s.w,
            );
        }
        println!();
        if let Some(path) = &opts.json {
            let doc = serde_json::json!({"backend": be.name(), "arch": opts.arch, "batch": n, "convs": rows});
            crate::rundir::write_json(path, &doc)?;
        }
        elementwise_table(&*be, ELEMENTWISE_LEN)?;
    }
    println!("### Full training step (forward, loss, backward, SGD), batch {n}, 32x32x3 input\n");
    println!("| model | params | GFLOP/step | step (s) | images/s | GFLOP/s | model + scratch memory | peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut profiles = String::new();
    for base in [64, 16, 8] {
        eprintln!("train step base width {base} ...");
        let exe = std::env::current_exe().map_err(|e| crate::Error::io("current exe", e))?;
        let out = std::process::Command::new(exe)
            .args(["bench", "--step-only", &base.to_string(), "--batch", &n.to_string()])
            .args(["--device", &opts.device.to_string()])
            .output()
            .map_err(|e| crate::Error::io("bench child", e))?;
        if !out.status.success() {
            return Err(crate::Error::Backend(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // the child's first line is the table row, the rest its profile
        let (row, profile) = text.split_once('\n').unwrap_or((&text, ""));
        println!("{row}");
        profiles.push_str(profile);
    }
    print!("{profiles}");
    Ok(())
}

/// One table row for a training step of PreResNet-18 at `base` width (run in a child process
/// so that its peak RSS is its own), then its per-op profile when `profile`.
pub fn step_row<B: Backend>(be: Arc<B>, base: usize, n: usize, profile: bool) -> Result<()> {
    let mut spec = ArchSpec::named("preresnet18")?;
    spec.base_width = base;
    let g = Graph::build(&spec, 32, 32, None)?;
    let flops = 3.0 * g.flops_per_sample() * n as f64 / 1e9;
    let params = g.params.total;
    let (t, bytes) = time_train_step(be.clone(), &spec, n, 32, 32, 5)?;
    let rss = peak_rss_bytes()
        .map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64))
        .unwrap_or_else(|| "n/a".into());
    println!(
        "| PreResNet-18 base {base} | {:.2} M | {flops:.1} | {t:.3} | {:.0} | {:.1} | {:.2} GiB | {rss} |",
        params as f64 / 1e6,
        n as f64 / t,
        flops / t,
        bytes as f64 / (1u64 << 30) as f64
    );
    if !profile {
        return Ok(());
    }
    let (times, total) = profile_train_step(be, &spec, n, 32, 32, 3)?;
    println!("\n### Where the step's time goes: PreResNet-18 base {base}, batch {n}\n");
    println!(
        "Each op timed alone (a sync before and after), per step: {total:.3} s in all. Convolutions by shape \
         (k x k / stride, channels, input size; every layer of that shape together).\n"
    );
    let mut kinds: std::collections::BTreeMap<&str, f64> = Default::default();
    for (what, secs) in &times.seconds {
        let kind = what.split(' ').next().unwrap_or(what);
        *kinds.entry(kind).or_default() += secs;
    }
    let mut kinds: Vec<(&str, f64)> = kinds.into_iter().collect();
    kinds.sort_by(|a, b| b.1.total_cmp(&a.1));
    let by_kind: Vec<String> = kinds
        .iter()
        .map(|(k, v)| format!("{k} {:.0}%", 100.0 * v / total))
        .collect();
    println!("By kind: {}.\n", by_kind.join(", "));
    println!("| op | ms / step | share |\n|---|---:|---:|");
    let mut rows: Vec<(&String, &f64)> = times.seconds.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
    for (what, &secs) in rows {
        println!("| {what} | {:.2} | {:.1}% |", 1e3 * secs, 100.0 * secs / total);
    }
    println!();
    Ok(())
}

/// Per-op seconds of one training step of `spec` at batch n (averaged over `steps` steps after
/// one warm-up step), and their sum.
pub fn profile_train_step<B: Backend>(
    be: Arc<B>,
    spec: &ArchSpec,
    n: usize,
    h: usize,
    w: usize,
    steps: usize,
) -> Result<(crate::model::OpTimes, f64)> {
    let (mut m, hp) = step_model(be, spec, n, h, w)?;
    m.train_step(n, &hp)?;
    m.op_times = Some(Default::default());
    for _ in 0..steps.max(1) {
        m.train_step(n, &hp)?;
    }
    m.be.sync()?;
    let mut times = m.op_times.take().unwrap_or_default();
    for v in times.seconds.values_mut() {
        *v /= steps.max(1) as f64;
    }
    let total = times.seconds.values().sum();
    Ok((times, total))
}

/// Images per second of the ImageNet training loader alone (decode, random resized crop,
/// flip, normalise) over one epoch of `dir`'s training images in batches of `batch`, on the
/// current thread pool; prints one Markdown row.
pub fn loader(dir: &std::path::Path, batch: usize) -> Result<()> {
    use crate::data::{self, DatasetKind, Loader};
    let split = data::load(&DatasetKind::Imagenet, dir)?;
    let (mean, std) = split.train.channel_stats();
    let l = Loader::new(
        &split.train,
        batch,
        mean,
        std,
        DatasetKind::Imagenet.default_augment(),
        true,
        false,
        1,
        0,
    );
    let (mut x, mut y) = (vec![0f32; batch * split.train.image_len()], vec![0u32; batch]);
    let order = l.order(0);
    // warm the file cache, then time a whole epoch
    for (path, _) in split.train.folder.as_ref().expect("an image folder").files.iter() {
        let _ = std::fs::read(path);
    }
    let t = std::time::Instant::now();
    let mut images = 0;
    for b in 0..l.batches_per_epoch() {
        images += l.fill(&order, 0, b, &mut x, &mut y)?;
    }
    let s = t.elapsed().as_secs_f64();
    let threads = rayon::current_num_threads();
    println!("| loader threads | images | seconds | images/s | images/s per thread |\n|---:|---:|---:|---:|---:|");
    println!(
        "| {threads} | {images} | {s:.2} | {:.1} | {:.1} |",
        images as f64 / s,
        images as f64 / s / threads as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    #[test]
    fn the_profile_names_every_pass_of_every_op() {
        let mut spec = ArchSpec::named("preresnet18").unwrap();
        spec.base_width = 2;
        let be = Arc::new(CpuBackend::<f32>::new());
        let (times, total) = profile_train_step(be, &spec, 2, 8, 8, 1).unwrap();
        let has = |what: &str| times.seconds.contains_key(what);
        for what in [
            // the stem's batch norm alone, the others with their ReLU fused
            "batchnorm forward",
            "batchnorm backward",
            "batchnorm+relu forward",
            "batchnorm+relu backward",
            "add forward",
            "add backward",
            "avgpool forward",
            "linear backward",
            "loss (softmax cross-entropy)",
            "sgd",
            // the stem (3 -> 2 channels at 8x8): no data gradient for the input
            "conv 3x3/1 3->2 8x8 forward",
            "conv 3x3/1 3->2 8x8 backward filter",
            "conv 3x3/1 2->4 8x8 backward data",
        ] {
            assert!(has(what), "{what} missing from {:?}", times.seconds.keys());
        }
        assert!(!has("conv 3x3/1 3->2 8x8 backward data"));
        // PreAct networks have no ReLU op left: every one is fused into its batch norm
        assert!(!has("relu forward") && !has("relu backward"));
        let sum: f64 = times.seconds.values().sum();
        assert!(total > 0.0 && (sum - total).abs() < 1e-12);
    }

    #[test]
    fn the_elementwise_table_times_every_op_on_whole_batch_norm_images() {
        let be = CpuBackend::<f32>::new();
        // 1.5 images of 128 x 32 x 32 floats: rounded down to one
        let (rows, len) = elementwise_rates(&be, 3 * 64 * 1024, 0.0).unwrap();
        assert_eq!(len, 128 * 1024);
        assert_eq!(rows[0].op, "copy");
        assert_eq!(rows.len(), 12);
        for r in &rows {
            assert!(r.seconds > 0.0 && r.seconds.is_finite(), "{}: {} s", r.op, r.seconds);
            assert!(r.bytes_per_element >= 4.0, "{}", r.op);
        }
    }
}
