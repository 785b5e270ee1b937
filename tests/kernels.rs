//! Every CUDA kernel, run on the emulated device through the CUDA backend's launch code,
//! against the CPU backend on awkward shapes; and on a real GPU too when there is one
//! (`LOFT_REQUIRE_GPU=1`, as `make test-gpu` sets, turns a missing GPU into a failure).
//!
//! Tolerances: element-wise ops, pooling and the run copy are the same f32 expressions in the
//! same order, so under emulation they must agree bit for bit (on a GPU within 1e-6, though
//! the kernels keep products and sums unfused, so it should agree bit for bit too). Convolutions and the linear layer sum in a
//! different order than the CPU's GEMM: max |emu - cpu| <= 1e-5 * sqrt(K) * max(1, max |cpu|)
//! (K the reduction length). Batch norm and the loss reduce in f64 like the CPU, in a tree
//! instead of a row: 2e-6 relative.

mod common;

use loft::backend::cpu::CpuBackend;
use loft::backend::cuda::emulated::EmulatedDriver;
use loft::backend::cuda::gpu::{self, GpuDriver};
use loft::backend::cuda::CudaBackend;
use loft::backend::{Backend, Run};
use loft::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use loft::rng::Rng;

fn cpu() -> CpuBackend<f32> {
    CpuBackend::new()
}

fn emu() -> CudaBackend<EmulatedDriver> {
    CudaBackend::new(EmulatedDriver::new())
}

/// The real GPU, when this machine has one (required with LOFT_REQUIRE_GPU).
fn real_gpu() -> Option<CudaBackend<GpuDriver>> {
    match gpu::probe() {
        Ok(_) => Some(CudaBackend::new(GpuDriver::new(None).unwrap())),
        Err(e) if std::env::var_os("LOFT_REQUIRE_GPU").is_some() => panic!("LOFT_REQUIRE_GPU is set: {e}"),
        Err(_) => None,
    }
}

/// Run a generic check on the emulated device (exact) and on a GPU if there is one.
macro_rules! on_every_device {
    ($check:ident) => {{
        $check(&emu(), true);
        if let Some(g) = real_gpu() {
            $check(&g, false);
        }
    }};
}

/// Bit-identical where `exact`, else within 1e-6 (relative to the largest value).
fn assert_same(what: &str, cpu: &[f32], dev: &[f32], exact: bool) {
    if exact {
        assert_bits(what, cpu, dev)
    } else {
        assert_close(what, cpu, dev, 1e-6)
    }
}

fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

/// A device buffer holding `host`.
fn put<B: Backend>(be: &B, host: &[f32]) -> B::Buf {
    let mut b = be.alloc(host.len()).unwrap();
    be.upload(host, &mut b).unwrap();
    b
}

fn get<B: Backend>(be: &B, b: &B::Buf) -> Vec<f32> {
    be.sync().unwrap();
    be.download(b).unwrap()
}

/// max |a - b| <= tol * max(1, max |a|); prints the worst element on failure.
fn assert_close(what: &str, cpu: &[f32], emu: &[f32], tol: f64) {
    assert_eq!(cpu.len(), emu.len(), "{what}: lengths");
    let scale = cpu.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (a, b)) in cpu.iter().zip(emu).enumerate() {
        let d = (*a as f64 - *b as f64).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: element {at}: cpu {} emulated {} (|diff| {worst:e} > {:e})",
        cpu[at],
        emu[at],
        tol * scale
    );
}

fn assert_bits(what: &str, cpu: &[f32], emu: &[f32]) {
    assert_eq!(cpu.len(), emu.len(), "{what}: lengths");
    for (i, (a, b)) in cpu.iter().zip(emu).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: element {i}: cpu {a} emulated {b}");
    }
}

/// The three passes of a convolution: y, dx accumulated onto `dx0`, dx written over `dx0`,
/// dw overwritten and dw accumulated onto `dw0`.
fn conv_passes<B: Backend>(
    be: &B,
    s: &Conv2d,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx0: &[f32],
    dw0: &[f32],
) -> [Vec<f32>; 5] {
    let (xb, wb, dyb) = (put(be, x), put(be, w), put(be, dy));
    let mut y = be.alloc(s.y_len()).unwrap();
    be.conv2d_forward(
        s,
        be.view(&xb, 0, s.x_len()),
        be.view(&wb, 0, s.w_len()),
        be.view_mut(&mut y, 0, s.y_len()),
    );
    let mut dx = put(be, dx0);
    be.conv2d_backward_data(
        s,
        be.view(&dyb, 0, s.y_len()),
        be.view(&wb, 0, s.w_len()),
        be.view_mut(&mut dx, 0, s.x_len()),
        true,
    );
    let mut dx_only = put(be, dx0);
    be.conv2d_backward_data(
        s,
        be.view(&dyb, 0, s.y_len()),
        be.view(&wb, 0, s.w_len()),
        be.view_mut(&mut dx_only, 0, s.x_len()),
        false,
    );
    let mut dw = be.alloc(s.w_len()).unwrap();
    be.conv2d_backward_filter(
        s,
        be.view(&xb, 0, s.x_len()),
        be.view(&dyb, 0, s.y_len()),
        be.view_mut(&mut dw, 0, s.w_len()),
        false,
    );
    let mut dwa = put(be, dw0);
    be.conv2d_backward_filter(
        s,
        be.view(&xb, 0, s.x_len()),
        be.view(&dyb, 0, s.y_len()),
        be.view_mut(&mut dwa, 0, s.w_len()),
        true,
    );
    [
        get(be, &y),
        get(be, &dx),
        get(be, &dx_only),
        get(be, &dw),
        get(be, &dwa),
    ]
}

#[allow(clippy::too_many_arguments)]
fn conv(n: usize, c_in: usize, h: usize, w: usize, c_out: usize, k: usize, stride: usize, pad: usize) -> Conv2d {
    Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad,
    }
}

#[test]
fn convolutions_match_the_cpu_on_awkward_shapes() {
    on_every_device!(check_convolutions);
}

fn check_convolutions<B: Backend>(e: &B, _exact: bool) {
    let shapes = [
        conv(1, 3, 7, 9, 5, 3, 1, 1),      // batch 1, odd sizes, 3 channels (a stem)
        conv(2, 3, 11, 9, 6, 7, 2, 3),     // 7x7 stride 2 (the ImageNet stem)
        conv(3, 5, 9, 7, 70, 1, 2, 0),     // 1x1 stride 2 projection, 70 filters (two tiles)
        conv(2, 17, 6, 6, 9, 3, 2, 1),     // 3x3 stride 2, channels off every tile size
        conv(2, 33, 4, 4, 65, 3, 1, 1),    // 4x4 maps, M one past a tile
        conv(2, 6, 5, 5, 4, 1, 1, 0),      // 1x1 stride 1
        conv(5, 8, 13, 13, 3, 3, 1, 1),    // N over several tiles, odd
        conv(1, 1024, 4, 4, 512, 3, 1, 1), // widest layer of PreResNet-34x2 (CIFAR), batch 1
    ];
    let c = cpu();
    for (i, s) in shapes.iter().enumerate() {
        let mut rng = Rng::new(100 + i as u64);
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let dy = rand_vec(&mut rng, s.y_len());
        let dx0 = rand_vec(&mut rng, s.x_len());
        let dw0 = rand_vec(&mut rng, s.w_len());
        let want = conv_passes(&c, s, &x, &w, &dy, &dx0, &dw0);
        let got = conv_passes(e, s, &x, &w, &dy, &dx0, &dw0);
        let ks = [
            s.k(),
            s.c_out * s.kh * s.kw,
            s.c_out * s.kh * s.kw,
            s.n * s.h_out() * s.w_out(),
            s.n * s.h_out() * s.w_out(),
        ];
        for (j, name) in [
            "forward",
            "backward data (accumulated)",
            "backward data (written over)",
            "backward filter",
            "backward filter (accumulated)",
        ]
        .iter()
        .enumerate()
        {
            let tol = 1e-5 * (ks[j] as f64).sqrt();
            assert_close(&format!("conv {s:?} {name}"), &want[j], &got[j], tol);
        }
    }
}

/// Every batch-norm op on one input: training forward, evaluation forward and backward.
/// `ranks`: synchronized, with a sum over that many ranks holding this same batch (None: not
/// synchronized).
#[allow(clippy::too_many_arguments)]
fn norm_all<B: Backend>(
    be: &B,
    s: &BatchNorm,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    dy: &[f32],
    dx0: &[f32],
    ranks: Option<f64>,
) -> Vec<Vec<f32>> {
    let k = ranks.unwrap_or(1.0);
    let (mut sum_fwd, mut sum_bwd) = (
        move |v: &mut [f64]| v.iter_mut().for_each(|x| *x *= k),
        move |v: &mut [f64]| v.iter_mut().for_each(|x| *x *= k),
    );
    let (xb, gb, bb, dyb) = (put(be, x), put(be, gamma), put(be, beta), put(be, dy));
    let mut rm = put(be, &vec![0.1; s.c]);
    let mut rv = put(be, &vec![0.9; s.c]);
    let mut y = be.alloc(s.len()).unwrap();
    let (mut sm, mut si) = (be.alloc(s.c).unwrap(), be.alloc(s.c).unwrap());
    be.batchnorm_forward_train(
        s,
        be.view(&xb, 0, s.len()),
        be.view(&gb, 0, s.c),
        be.view(&bb, 0, s.c),
        be.view_mut(&mut rm, 0, s.c),
        be.view_mut(&mut rv, 0, s.c),
        be.view_mut(&mut y, 0, s.len()),
        be.view_mut(&mut sm, 0, s.c),
        be.view_mut(&mut si, 0, s.c),
        ranks.map(|_| &mut sum_fwd as &mut dyn FnMut(&mut [f64])),
    );
    let mut ye = be.alloc(s.len()).unwrap();
    be.batchnorm_forward_eval(
        s,
        be.view(&xb, 0, s.len()),
        be.view(&gb, 0, s.c),
        be.view(&bb, 0, s.c),
        be.view(&rm, 0, s.c),
        be.view(&rv, 0, s.c),
        be.view_mut(&mut ye, 0, s.len()),
    );
    let mut dx = put(be, dx0);
    let (mut dg, mut db) = (be.alloc(s.c).unwrap(), be.alloc(s.c).unwrap());
    be.batchnorm_backward(
        s,
        be.view(&xb, 0, s.len()),
        be.view(&y, 0, s.len()),
        be.view(&dyb, 0, s.len()),
        be.view(&gb, 0, s.c),
        be.view(&bb, 0, s.c),
        be.view(&sm, 0, s.c),
        be.view(&si, 0, s.c),
        be.view_mut(&mut dx, 0, s.len()),
        be.view_mut(&mut dg, 0, s.c),
        be.view_mut(&mut db, 0, s.c),
        true,
        ranks.map(|_| &mut sum_bwd as &mut dyn FnMut(&mut [f64])),
    );
    [&y, &rm, &rv, &sm, &si, &ye, &dx, &dg, &db]
        .iter()
        .map(|b| get(be, b))
        .collect()
}

#[test]
fn batch_norm_matches_the_cpu() {
    on_every_device!(check_batch_norm);
}

fn check_batch_norm<B: Backend>(e: &B, _exact: bool) {
    let c = cpu();
    // the last two cut each channel into slices (launch::norm_slices): 41 + 23 images of 100
    // pixels (two images per pass of a block), 14 + 2 images of 300 pixels
    let shapes = [
        (1, 3, 1),
        (2, 5, 7),
        (3, 70, 9),
        (4, 2, 300),
        (64, 3, 100),
        (16, 2, 300),
    ];
    for &(n, ch, hw) in &shapes[4..] {
        assert!(
            loft::backend::cuda::launch::norm_slices(n, ch, hw).0 > 1,
            "{n} x {ch} x {hw}: one slice"
        );
    }
    // plain batch norm, and with the fused ReLU
    for (i, (n, ch, hw, relu)) in shapes
        .iter()
        .flat_map(|&(n, c, hw)| [(n, c, hw, false), (n, c, hw, true)])
        .enumerate()
    {
        let s = BatchNorm {
            n,
            c: ch,
            hw,
            eps: 1e-5,
            momentum: 0.1,
            relu,
        };
        let mut rng = Rng::new(200 + i as u64);
        let x: Vec<f32> = rand_vec(&mut rng, s.len()).iter().map(|v| 3.0 * v + 0.5).collect();
        let gamma = rand_vec(&mut rng, ch);
        let beta = rand_vec(&mut rng, ch);
        let dy = rand_vec(&mut rng, s.len());
        let dx0 = rand_vec(&mut rng, s.len());
        // alone; synchronized over one rank (the same numbers); synchronized over two ranks
        // holding the same batch (the same numbers but the running variance, whose unbiased
        // estimate sees twice the samples): on the device as on the CPU
        for ranks in [None, Some(1.0), Some(2.0)] {
            let want = norm_all(&c, &s, &x, &gamma, &beta, &dy, &dx0, ranks.filter(|&r| r > 1.0));
            let got = norm_all(e, &s, &x, &gamma, &beta, &dy, &dx0, ranks);
            compare_norm(&format!("batch norm {s:?} over {ranks:?} ranks"), &want, &got);
        }
        let (alone, two) = (
            norm_all(&c, &s, &x, &gamma, &beta, &dy, &dx0, None),
            norm_all(&c, &s, &x, &gamma, &beta, &dy, &dx0, Some(2.0)),
        );
        for j in (0..9).filter(|&j| j != 2 && j != 5) {
            assert_close(
                &format!("batch norm {s:?}: two ranks against one, output {j}"),
                &alone[j],
                &two[j],
                2e-6,
            );
        }
    }
}

/// The nine outputs of [`norm_all`], named.
fn compare_norm(what: &str, want: &[Vec<f32>], got: &[Vec<f32>]) {
    {
        for (j, name) in [
            "y",
            "running mean",
            "running var",
            "saved mean",
            "saved 1/std",
            "eval y",
            "dx",
            "dgamma",
            "dbeta",
        ]
        .iter()
        .enumerate()
        {
            assert_close(&format!("{what} {name}"), &want[j], &got[j], 2e-6);
        }
    }
}

fn pools<B: Backend>(be: &B, s: &Pool2d, x: &[f32], dy: &[f32], dx0: &[f32]) -> Vec<Vec<f32>> {
    let (ho, wo) = (s.h_out(), s.w_out());
    let (xl, yl) = (s.n * s.c * s.h * s.w, s.n * s.c * ho * wo);
    let (xb, dyb) = (put(be, x), put(be, dy));
    let mut y = be.alloc(yl).unwrap();
    be.maxpool_forward(s, be.view(&xb, 0, xl), be.view_mut(&mut y, 0, yl));
    let mut dx = put(be, dx0);
    be.maxpool_backward(
        s,
        be.view(&xb, 0, xl),
        be.view(&y, 0, yl),
        be.view(&dyb, 0, yl),
        be.view_mut(&mut dx, 0, xl),
        true,
    );
    let mut dx2 = be.alloc(xl).unwrap();
    be.maxpool_backward(
        s,
        be.view(&xb, 0, xl),
        be.view(&y, 0, yl),
        be.view(&dyb, 0, yl),
        be.view_mut(&mut dx2, 0, xl),
        false,
    );
    let hw = s.h * s.w;
    let mut a = be.alloc(s.n * s.c).unwrap();
    be.avgpool_forward(s.n, s.c, hw, be.view(&xb, 0, xl), be.view_mut(&mut a, 0, s.n * s.c));
    let mut da = put(be, dx0);
    be.avgpool_backward(
        s.n,
        s.c,
        hw,
        be.view(&dyb, 0, s.n * s.c),
        be.view_mut(&mut da, 0, xl),
        true,
    );
    [&y, &dx, &dx2, &a, &da].iter().map(|b| get(be, b)).collect()
}

#[test]
fn pooling_matches_the_cpu_bit_for_bit() {
    on_every_device!(check_pooling);
}

fn check_pooling<B: Backend>(e: &B, exact: bool) {
    let c = cpu();
    let shapes = [
        Pool2d {
            n: 2,
            c: 3,
            h: 9,
            w: 7,
            k: 3,
            stride: 2,
            pad: 1,
        },
        Pool2d {
            n: 1,
            c: 2,
            h: 4,
            w: 4,
            k: 2,
            stride: 2,
            pad: 0,
        },
        Pool2d {
            n: 2,
            c: 5,
            h: 8,
            w: 11,
            k: 3,
            stride: 1,
            pad: 1,
        },
    ];
    for (i, s) in shapes.iter().enumerate() {
        let mut rng = Rng::new(300 + i as u64);
        let mut x = rand_vec(&mut rng, s.n * s.c * s.h * s.w);
        x[3] = x[4]; // a tie: the first maximum wins on both
        let dy = rand_vec(&mut rng, s.n * s.c * s.h * s.w);
        let dx0 = rand_vec(&mut rng, s.n * s.c * s.h * s.w);
        let want = pools(&c, s, &x, &dy, &dx0);
        let got = pools(e, s, &x, &dy, &dx0);
        for (j, name) in ["max y", "max dx (accumulated)", "max dx", "avg y", "avg dx"]
            .iter()
            .enumerate()
        {
            assert_same(&format!("pool {s:?} {name}"), &want[j], &got[j], exact);
        }
    }
}

#[allow(clippy::type_complexity)]
fn elementwise_all<B: Backend>(be: &B, a: &[f32], b: &[f32], mask: &[f32], runs: &[Run]) -> Vec<Vec<f32>> {
    let n = a.len();
    let (ab, bb, mb) = (put(be, a), put(be, b), put(be, mask));
    let mut out = Vec::new();
    let mut x = be.alloc(n).unwrap();
    be.fill(be.view_mut(&mut x, 0, n), 0.375);
    out.push(get(be, &x));
    let mut y = put(be, b);
    be.copy(be.view(&ab, 0, n), be.view_mut(&mut y, 1, n - 1), true);
    out.push(get(be, &y));
    be.scale(be.view_mut(&mut y, 0, n), -0.7);
    be.axpy(1.3, be.view(&ab, 0, n), be.view_mut(&mut y, 0, n));
    out.push(get(be, &y));
    let mut r = be.alloc(n).unwrap();
    be.relu_forward(be.view(&ab, 0, n), be.view_mut(&mut r, 0, n));
    out.push(get(be, &r));
    let mut dr = put(be, b);
    be.relu_backward(be.view(&r, 0, n), be.view(&bb, 0, n), be.view_mut(&mut dr, 0, n), true);
    out.push(get(be, &dr));
    let mut s = be.alloc(n).unwrap();
    be.add_forward(be.view(&ab, 0, n), be.view(&bb, 0, n), be.view_mut(&mut s, 0, n));
    out.push(get(be, &s));
    be.apply_mask(be.view_mut(&mut s, 0, n), be.view(&mb, 0, n));
    out.push(get(be, &s));
    let (mut p, mut g, mut m) = (put(be, a), put(be, b), put(be, mask));
    let hp = Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    for _ in 0..3 {
        be.sgd_step(
            &hp,
            be.view_mut(&mut p, 0, n),
            be.view_mut(&mut g, 0, n),
            be.view_mut(&mut m, 0, n),
        );
    }
    out.extend([get(be, &p), get(be, &g), get(be, &m)]);
    let table = be.prepare_runs(runs).unwrap();
    let mut d = be.alloc(n).unwrap();
    be.copy_runs(&table, be.view(&ab, 0, n), be.view_mut(&mut d, 0, n));
    out.push(get(be, &d));
    out
}

#[test]
fn elementwise_sgd_mask_and_run_copies_match_the_cpu_bit_for_bit() {
    on_every_device!(check_elementwise);
}

fn check_elementwise<B: Backend>(e: &B, exact: bool) {
    let c = cpu();
    // sizes around the grid: one element, a block and one, three elements per thread of the
    // largest grid and five more (all four of a pass's elements in use)
    for (i, n) in [1usize, 257, 5000, 3 * 256 * 4096 + 5].into_iter().enumerate() {
        let mut rng = Rng::new(400 + i as u64);
        let a = rand_vec(&mut rng, n);
        let b = rand_vec(&mut rng, n);
        let mask: Vec<f32> = (0..n).map(|j| (j % 3 != 1) as u32 as f32).collect();
        // runs: every other stretch of 7 elements, mapped backwards
        let runs: Vec<Run> = (0..n / 14)
            .map(|r| Run {
                src: 14 * r,
                dst: n - 7 * (r + 1),
                len: 7,
            })
            .collect();
        let want = elementwise_all(&c, &a, &b, &mask, &runs);
        let got = elementwise_all(e, &a, &b, &mask, &runs);
        let names = [
            "fill",
            "copy (accumulated)",
            "scale, axpy",
            "relu",
            "relu backward",
            "add",
            "mask",
            "sgd params",
            "sgd grads",
            "sgd momentum",
            "run copy",
        ];
        for (j, name) in names.iter().enumerate() {
            assert_same(&format!("{name} (n = {n})"), &want[j], &got[j], exact);
        }
    }
}

fn linear_and_loss<B: Backend>(
    be: &B,
    s: &Linear,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    labels: &[f32],
    dx0: &[f32],
) -> Vec<Vec<f32>> {
    let (xb, wb, bb, lb) = (put(be, x), put(be, w), put(be, bias), put(be, labels));
    let (xl, wl, yl) = (s.n * s.d_in, s.d_out * s.d_in, s.n * s.d_out);
    let mut y = be.alloc(yl).unwrap();
    be.linear_forward(
        s,
        be.view(&xb, 0, xl),
        be.view(&wb, 0, wl),
        be.view(&bb, 0, s.d_out),
        be.view_mut(&mut y, 0, yl),
    );
    let mut dl = be.alloc(yl).unwrap();
    let mut stats = be.alloc(2).unwrap();
    be.softmax_xent(
        s.n,
        s.d_out,
        be.view(&y, 0, yl),
        be.view(&lb, 0, s.n),
        Some(be.view_mut(&mut dl, 0, yl)),
        be.view_mut(&mut stats, 0, 2),
    );
    let mut stats_only = be.alloc(2).unwrap();
    be.softmax_xent(
        s.n,
        s.d_out,
        be.view(&y, 0, yl),
        be.view(&lb, 0, s.n),
        None,
        be.view_mut(&mut stats_only, 0, 2),
    );
    let mut dx = put(be, dx0);
    let (mut dw, mut db) = (be.alloc(wl).unwrap(), be.alloc(s.d_out).unwrap());
    be.linear_backward(
        s,
        be.view(&xb, 0, xl),
        be.view(&wb, 0, wl),
        be.view(&dl, 0, yl),
        Some(be.view_mut(&mut dx, 0, xl)),
        be.view_mut(&mut dw, 0, wl),
        be.view_mut(&mut db, 0, s.d_out),
        true,
    );
    [&y, &dl, &stats, &stats_only, &dx, &dw, &db]
        .iter()
        .map(|b| get(be, b))
        .collect()
}

#[test]
fn linear_layer_and_loss_match_the_cpu() {
    on_every_device!(check_linear_and_loss);
}

fn check_linear_and_loss<B: Backend>(e: &B, _exact: bool) {
    let c = cpu();
    for (i, (n, d_in, d_out)) in [(1, 5, 3), (7, 64, 10), (300, 130, 100)].into_iter().enumerate() {
        let s = Linear { n, d_in, d_out };
        let mut rng = Rng::new(500 + i as u64);
        let x = rand_vec(&mut rng, n * d_in);
        let w = rand_vec(&mut rng, d_out * d_in);
        let bias = rand_vec(&mut rng, d_out);
        let labels: Vec<f32> = (0..n).map(|j| ((j * 7 + i) % d_out) as f32).collect();
        let dx0 = rand_vec(&mut rng, n * d_in);
        let want = linear_and_loss(&c, &s, &x, &w, &bias, &labels, &dx0);
        let got = linear_and_loss(e, &s, &x, &w, &bias, &labels, &dx0);
        let tol = 1e-5 * ((d_in.max(n)) as f64).sqrt();
        for (j, name) in [
            "y",
            "dlogits",
            "loss, correct",
            "loss, correct (no gradient)",
            "dx",
            "dw",
            "db",
        ]
        .iter()
        .enumerate()
        {
            assert_close(&format!("linear {s:?} {name}"), &want[j], &got[j], tol);
        }
    }
}

#[test]
fn the_element_wise_benchmark_runs_every_op_on_the_emulated_device() {
    // one batch-norm image of 128 x 32 x 32 floats, each op timed once after its warm-up
    let (rows, len) = loft::bench::elementwise_rates(&emu(), 128 * 1024, 0.0).unwrap();
    assert_eq!(len, 128 * 1024);
    assert_eq!(rows.len(), 12);
    assert!(rows.iter().all(|r| r.seconds > 0.0 && r.seconds.is_finite()));
}

/// The device's batch norm + ReLU backward recomputes the ReLU's gate from x with the
/// forward's scale and shift: bit for bit the backward without ReLU of dy masked by the
/// device forward's own output (`y > 0`), on inputs whose pre-activations sit a few units in
/// the last place from 0 (another rounding of the product and sum would flip their signs).
#[test]
fn fused_relu_backward_masks_where_the_device_forward_output_is_positive() {
    on_every_device!(check_fused_relu_gate);
}

fn check_fused_relu_gate<B: Backend>(e: &B, _exact: bool) {
    let mut rng = Rng::new(12);
    let s = BatchNorm {
        n: 6,
        c: 16,
        hw: 37,
        eps: 1e-5,
        momentum: 0.1,
        relu: true,
    };
    let x = common::inputs_at_the_kink(&mut rng, s.n, s.c, s.hw);
    let dy = rand_vec(&mut rng, s.len());
    let gamma: Vec<f32> = (0..s.c).map(|i| 0.5 + i as f32 * 0.3).collect();
    let beta = vec![0.0f32; s.c];
    for ranks in [None, Some(1.0)] {
        let fused = norm_all(e, &s, &x, &gamma, &beta, &dy, &vec![0.0; s.len()], ranks);
        let y = &fused[0];
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!(zeros > s.len() / 5 && zeros < s.len() * 4 / 5, "{zeros} outputs at 0");
        let masked: Vec<f32> = dy.iter().zip(y).map(|(&g, &o)| if o > 0.0 { g } else { 0.0 }).collect();
        let plain = norm_all(
            e,
            &BatchNorm { relu: false, ..s },
            &x,
            &gamma,
            &beta,
            &masked,
            &vec![0.0; s.len()],
            ranks,
        );
        for (j, name) in [(6, "dx"), (7, "dgamma"), (8, "dbeta")] {
            assert_bits(&format!("{name} over {ranks:?} ranks"), &plain[j], &fused[j]);
        }
    }
}
