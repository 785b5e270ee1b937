//! Every CPU op against a direct reference or finite differences in f64.

mod common;

use loft::backend::cpu::winograd::Tile;
use loft::backend::cpu::{conv, CpuBackend};
use loft::backend::{Backend, SumOverRanks};
use loft::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use loft::rng::Rng;

type B = CpuBackend<f64>;

fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Check `analytic` (the gradient of f at x) against central differences at up to 40
/// coordinates of x.
fn check_grad(name: &str, x: &[f64], analytic: &[f64], mut f: impl FnMut(&[f64]) -> f64) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let h = 1e-5;
    let step = (x.len() / 40).max(1);
    let mut xp = x.to_vec();
    for i in (0..x.len()).step_by(step) {
        xp[i] = x[i] + h;
        let fp = f(&xp);
        xp[i] = x[i] - h;
        let fm = f(&xp);
        xp[i] = x[i];
        let num = (fp - fm) / (2.0 * h);
        let err = (num - analytic[i]).abs();
        assert!(
            err <= 1e-6 * (1.0 + num.abs().max(analytic[i].abs())),
            "{name}: d/dx[{i}] analytic {} numeric {num}",
            analytic[i]
        );
    }
}

fn conv_shapes() -> Vec<Conv2d> {
    let c = |n, c_in, h, w, c_out, k, stride, pad| Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: k,
        kw: k,
        stride,
        pad,
    };
    vec![
        c(2, 3, 7, 9, 4, 3, 1, 1),
        c(2, 3, 7, 8, 5, 3, 2, 1),
        c(3, 4, 6, 6, 2, 1, 2, 0),
        c(2, 2, 11, 9, 3, 7, 2, 3),
        c(2, 5, 5, 5, 3, 1, 1, 0),
        c(1, 1, 4, 4, 2, 3, 1, 1),
        // fewer output than input channels, stride 1, "same": the data gradient runs as a
        // forward convolution with flipped filters
        c(2, 6, 7, 9, 4, 3, 1, 1),
        c(2, 4, 9, 8, 3, 7, 1, 3),
    ]
}

#[test]
fn conv_forward_matches_direct_convolution_f32_with_chunks() {
    // n * h_out * w_out > 4096 forces several chunks with a short last one.
    let shapes = [
        Conv2d {
            n: 20,
            c_in: 3,
            h: 16,
            w: 16,
            c_out: 5,
            kh: 3,
            kw: 3,
            stride: 1,
            pad: 1,
        },
        Conv2d {
            n: 70,
            c_in: 2,
            h: 9,
            w: 8,
            c_out: 3,
            kh: 3,
            kw: 3,
            stride: 2,
            pad: 1,
        },
        Conv2d {
            n: 5,
            c_in: 3,
            h: 40,
            w: 40,
            c_out: 4,
            kh: 1,
            kw: 1,
            stride: 1,
            pad: 0,
        },
    ];
    let be = CpuBackend::<f32>::new();
    let mut rng = Rng::new(1);
    for s in shapes.iter().chain(conv_shapes().iter()) {
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let want = conv::reference_forward(s, &x, &w);
        let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let wf: Vec<f32> = w.iter().map(|&v| v as f32).collect();
        let mut y = vec![0f32; s.y_len()];
        be.conv2d_forward(s, &xf, &wf, &mut y);
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * (1.0 + b.abs()),
                "{s:?} y[{i}] {a} vs {b}"
            );
        }
    }
}

#[test]
fn conv_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = Rng::new(2);
    for s in conv_shapes() {
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let g = rand_vec(&mut rng, s.y_len());
        let mut dx = vec![0.0; s.x_len()];
        let mut dw = vec![0.0; s.w_len()];
        be.conv2d_backward_data(&s, &g, &w, &mut dx, false);
        be.conv2d_backward_filter(&s, &x, &g, &mut dw, false);
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; s.y_len()];
            be.conv2d_forward(&s, x, w, &mut y);
            dot(&y, &g)
        };
        check_grad(&format!("conv dx {s:?}"), &x, &dx, |xp| loss(xp, &w));
        check_grad(&format!("conv dw {s:?}"), &w, &dw, |wp| loss(&x, wp));
        // accumulate adds to what is there
        let mut dx2 = vec![1.0; s.x_len()];
        be.conv2d_backward_data(&s, &g, &w, &mut dx2, true);
        let mut dw2 = vec![1.0; s.w_len()];
        be.conv2d_backward_filter(&s, &x, &g, &mut dw2, true);
        for (a, b) in dx2.iter().zip(&dx).chain(dw2.iter().zip(&dw)) {
            assert!((a - 1.0 - b).abs() < 1e-12);
        }
    }
}

#[test]
fn conv_results_do_not_depend_on_thread_count() {
    let s = Conv2d {
        n: 33,
        c_in: 8,
        h: 12,
        w: 12,
        c_out: 16,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    same_bits_for_thread_counts(&s, 3, None, &[1, 3]);
}

/// Forward, data and filter gradients of `s` on random f32 data (from `seed`) give the same
/// bits on every thread count of `threads`: through the backend (`algo` None: the algorithm
/// of the shape) or with `algo` forced.
fn same_bits_for_thread_counts(s: &Conv2d, seed: u64, algo: Option<conv::Algo>, threads: &[usize]) {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = rand_vec(&mut rng, s.x_len()).iter().map(|&v| v as f32).collect();
    let w: Vec<f32> = rand_vec(&mut rng, s.w_len()).iter().map(|&v| v as f32).collect();
    let g: Vec<f32> = rand_vec(&mut rng, s.y_len()).iter().map(|&v| v as f32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let mut y = vec![0f32; s.y_len()];
            let mut dx = vec![0f32; s.x_len()];
            let mut dw = vec![0f32; s.w_len()];
            match algo {
                None => {
                    let be = CpuBackend::<f32>::new();
                    be.conv2d_forward(s, &x, &w, &mut y);
                    be.conv2d_backward_data(s, &g, &w, &mut dx, false);
                    be.conv2d_backward_filter(s, &x, &g, &mut dw, false);
                }
                Some(algo) => {
                    let scratch = loft::backend::cpu::scratch::ScratchPool::<f32>::new();
                    conv::forward_with(algo, s, &x, &w, &mut y, &scratch);
                    conv::backward_data_with(algo, s, &g, &w, &mut dx, false, &scratch);
                    conv::backward_filter_with(algo, s, &x, &g, &mut dw, false, &scratch);
                }
            }
            (y, dx, dw)
        })
    };
    let first = run(threads[0]);
    for &t in &threads[1..] {
        assert_eq!(first, run(t), "{algo:?} {s:?}: {} threads against {t}", threads[0]);
    }
}

#[test]
fn batchnorm_gradients_match_finite_differences() {
    let be = B::new();
    // plain, and with the fused ReLU (the gradient of max(bn(x), 0))
    for relu in [false, true] {
        let mut rng = Rng::new(4);
        let s = BatchNorm {
            n: 3,
            c: 4,
            hw: 5,
            eps: 1e-5,
            momentum: 0.1,
            relu,
        };
        let x = rand_vec(&mut rng, s.len());
        let gamma: Vec<f64> = (0..s.c).map(|i| 0.5 + i as f64 * 0.3).collect();
        let beta = rand_vec(&mut rng, s.c);
        let g = rand_vec(&mut rng, s.len());
        let fwd = |x: &[f64], gamma: &[f64], beta: &[f64]| {
            let (mut rm, mut rv) = (vec![0.0; s.c], vec![1.0; s.c]);
            let (mut sm, mut si) = (vec![0.0; s.c], vec![0.0; s.c]);
            let mut y = vec![0.0; s.len()];
            be.batchnorm_forward_train(&s, x, gamma, beta, &mut rm, &mut rv, &mut y, &mut sm, &mut si, None);
            (dot(&y, &g), sm, si, y)
        };
        let (_, sm, si, y) = fwd(&x, &gamma, &beta);
        if relu {
            assert!(y.iter().all(|&v| v >= 0.0) && y.iter().filter(|&&v| v == 0.0).count() > s.len() / 5);
        }
        let (mut dx, mut dg, mut db) = (vec![0.0; s.len()], vec![0.0; s.c], vec![0.0; s.c]);
        be.batchnorm_backward(
            &s, &x, &y, &g, &gamma, &beta, &sm, &si, &mut dx, &mut dg, &mut db, false, None,
        );
        check_grad(&format!("bn dx (relu {relu})"), &x, &dx, |xp| fwd(xp, &gamma, &beta).0);
        check_grad(&format!("bn dgamma (relu {relu})"), &gamma, &dg, |gp| {
            fwd(&x, gp, &beta).0
        });
        check_grad(&format!("bn dbeta (relu {relu})"), &beta, &db, |bp| {
            fwd(&x, &gamma, bp).0
        });
    }
}

/// Ranks simulated by threads: `sum` adds every rank's values in place, like an allreduce.
struct Exchange {
    barrier: std::sync::Barrier,
    slots: std::sync::Mutex<Vec<Vec<f64>>>,
}

impl Exchange {
    fn new(ranks: usize) -> Self {
        Exchange {
            barrier: std::sync::Barrier::new(ranks),
            slots: std::sync::Mutex::new(vec![Vec::new(); ranks]),
        }
    }

    fn sum(&self, rank: usize, v: &mut [f64]) {
        self.slots.lock().unwrap()[rank] = v.to_vec();
        self.barrier.wait();
        let slots = self.slots.lock().unwrap().clone();
        for (i, x) in v.iter_mut().enumerate() {
            *x = slots.iter().map(|s| s[i]).sum();
        }
        // nobody overwrites a slot before every rank has read them all
        self.barrier.wait();
    }
}

/// The CPU backward of the fused batch norm + ReLU recomputes the ReLU's mask from x, gamma,
/// beta and the saved statistics: in f32 it must equal, bit for bit, the backward without
/// ReLU of dy masked by the forward's own output (`y > 0`), with and without `sync`.
#[test]
fn fused_relu_backward_masks_exactly_where_the_forward_output_is_positive() {
    let be = CpuBackend::<f32>::new();
    let mut rng = Rng::new(11);
    for synced in [false, true] {
        let s = BatchNorm {
            n: 6,
            c: 16,
            hw: 37,
            eps: 1e-5,
            momentum: 0.1,
            relu: true,
        };
        let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let x = common::inputs_at_the_kink(&mut rng, s.n, s.c, s.hw);
        let dy = f32s(rand_vec(&mut rng, s.len()));
        let gamma = f32s((0..s.c).map(|i| 0.5 + i as f64 * 0.3).collect());
        let beta = vec![0.0f32; s.c];
        let (mut rm, mut rv) = (vec![0.0f32; s.c], vec![1.0f32; s.c]);
        let (mut sm, mut si, mut y) = (vec![0.0f32; s.c], vec![0.0f32; s.c], vec![0.0f32; s.len()]);
        // one rank: the synchronized path with sums that stay as they are
        let mut one_rank = |_: &mut [f64]| {};
        let f = synced.then_some(&mut one_rank as &mut dyn FnMut(&mut [f64]));
        be.batchnorm_forward_train(&s, &x, &gamma, &beta, &mut rm, &mut rv, &mut y, &mut sm, &mut si, f);
        let zeros = y.iter().filter(|&&v| v == 0.0).count();
        assert!(
            zeros > s.len() / 5 && zeros < s.len() * 4 / 5,
            "{zeros} of {} outputs at 0",
            s.len()
        );
        let backward = |s: &BatchNorm, dy: &[f32]| {
            let (mut dx, mut dg, mut db) = (vec![0.0f32; s.len()], vec![0.0f32; s.c], vec![0.0f32; s.c]);
            let mut one_rank = |_: &mut [f64]| {};
            let f = synced.then_some(&mut one_rank as &mut dyn FnMut(&mut [f64]));
            be.batchnorm_backward(
                s, &x, &y, dy, &gamma, &beta, &sm, &si, &mut dx, &mut dg, &mut db, false, f,
            );
            [dx, dg, db]
        };
        let fused = backward(&s, &dy);
        let masked: Vec<f32> = dy
            .iter()
            .zip(&y)
            .map(|(&g, &o)| if o > 0.0 { g } else { 0.0 })
            .collect();
        let plain = backward(&BatchNorm { relu: false, ..s }, &masked);
        for (name, (a, b)) in ["dx", "dgamma", "dbeta"].iter().zip(fused.iter().zip(&plain)) {
            let same = a.iter().zip(b).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{name} (sync {synced}): the recomputed mask differs from y > 0");
        }
    }
}

#[test]
fn synchronized_batchnorm_over_shards_equals_batchnorm_over_the_whole_batch() {
    for relu in [false, true] {
        synchronized_batchnorm_case(relu);
    }
}

fn synchronized_batchnorm_case(relu: bool) {
    let mut rng = Rng::new(9);
    let (ranks, per_rank) = (3, 2);
    let whole = BatchNorm {
        n: ranks * per_rank,
        c: 4,
        hw: 5,
        eps: 1e-5,
        momentum: 0.1,
        relu,
    };
    let shard = BatchNorm { n: per_rank, ..whole };
    let x: Vec<f64> = rand_vec(&mut rng, whole.len()).iter().map(|v| 2.0 * v + 0.3).collect();
    let g = rand_vec(&mut rng, whole.len());
    let gamma: Vec<f64> = (0..whole.c).map(|i| 0.5 + i as f64 * 0.3).collect();
    let beta = rand_vec(&mut rng, whole.c);
    // the whole batch on one backend: y, running mean and variance, dx, dgamma, dbeta
    let run = |s: &BatchNorm, x: &[f64], g: &[f64], mut sync: SumOverRanks<'_>| {
        let be = B::new();
        let (mut rm, mut rv) = (vec![0.2; s.c], vec![0.8; s.c]);
        let (mut sm, mut si, mut y) = (vec![0.0; s.c], vec![0.0; s.c], vec![0.0; s.len()]);
        let f = sync.as_mut().map(|f| &mut **f as &mut dyn FnMut(&mut [f64]));
        be.batchnorm_forward_train(s, x, &gamma, &beta, &mut rm, &mut rv, &mut y, &mut sm, &mut si, f);
        let (mut dx, mut dg, mut db) = (vec![0.0; s.len()], vec![0.0; s.c], vec![0.0; s.c]);
        let f = sync.as_mut().map(|f| &mut **f as &mut dyn FnMut(&mut [f64]));
        be.batchnorm_backward(
            s, x, &y, g, &gamma, &beta, &sm, &si, &mut dx, &mut dg, &mut db, false, f,
        );
        [y, rm, rv, dx, dg, db]
    };
    let want = run(&whole, &x, &g, None);
    // each rank its shard, as threads exchanging their sums
    let ex = Exchange::new(ranks);
    let got: Vec<[Vec<f64>; 6]> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let (ex, len) = (&ex, shard.len());
                let (x, g) = (&x[r * len..(r + 1) * len], &g[r * len..(r + 1) * len]);
                sc.spawn(move || run(&shard, x, g, Some(&mut |v: &mut [f64]| ex.sum(r, v))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let close = |what: &str, a: &[f64], b: &[f64]| {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() < 1e-12 * (1.0 + p.abs()), "{what}[{i}]: {p} vs {q}");
        }
    };
    let len = shard.len();
    for (r, o) in got.iter().enumerate() {
        close("y", &want[0][r * len..(r + 1) * len], &o[0]);
        close("running mean", &want[1], &o[1]);
        close("running var", &want[2], &o[2]);
        close("dx", &want[3][r * len..(r + 1) * len], &o[3]);
    }
    // dgamma and dbeta: each rank's own sums, which add up to the whole batch's
    for (k, name) in [(4, "dgamma"), (5, "dbeta")] {
        let total: Vec<f64> = (0..whole.c).map(|c| got.iter().map(|o| o[k][c]).sum()).collect();
        close(name, &want[k], &total);
    }
}

#[test]
fn batchnorm_running_statistics_follow_pytorch() {
    let be = B::new();
    // one channel, values 1..=4: mean 2.5, biased var 1.25, unbiased 5/3
    let s = BatchNorm {
        n: 2,
        c: 1,
        hw: 2,
        eps: 1e-5,
        momentum: 0.1,
        relu: false,
    };
    let x = [1.0, 2.0, 3.0, 4.0];
    let (mut rm, mut rv) = (vec![0.0], vec![1.0]);
    let (mut sm, mut si, mut y) = (vec![0.0], vec![0.0], vec![0.0; 4]);
    be.batchnorm_forward_train(&s, &x, &[1.0], &[0.0], &mut rm, &mut rv, &mut y, &mut sm, &mut si, None);
    // the momentum is an f32 0.1
    let m = 0.1f32 as f64;
    assert!((rm[0] - m * 2.5).abs() < 1e-12);
    assert!((rv[0] - ((1.0 - m) + m * 5.0 / 3.0)).abs() < 1e-12);
    assert!((y[0] - (1.0 - 2.5) / (1.25f64 + 1e-5).sqrt()).abs() < 1e-12);
    // evaluation uses the running statistics
    let mut ye = vec![0.0; 4];
    be.batchnorm_forward_eval(&s, &x, &[2.0], &[1.0], &rm, &rv, &mut ye);
    let eps = 1e-5f32 as f64;
    assert!((ye[3] - (2.0 * (4.0 - rm[0]) / (rv[0] + eps).sqrt() + 1.0)).abs() < 1e-12);
}

#[test]
fn relu_add_and_pool_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = Rng::new(5);
    // relu (inputs kept away from the kink)
    let x: Vec<f64> = rand_vec(&mut rng, 30)
        .iter()
        .map(|v| if v.abs() < 0.05 { 0.3 } else { *v })
        .collect();
    let g = rand_vec(&mut rng, 30);
    let mut y = vec![0.0; 30];
    be.relu_forward(&x, &mut y);
    let mut dx = vec![0.0; 30];
    be.relu_backward(&y, &g, &mut dx, false);
    check_grad("relu", &x, &dx, |xp| {
        let mut y = vec![0.0; 30];
        be.relu_forward(xp, &mut y);
        dot(&y, &g)
    });
    // max pool 3x3 stride 2 pad 1 (random values have no ties)
    let p = Pool2d {
        n: 2,
        c: 3,
        h: 7,
        w: 6,
        k: 3,
        stride: 2,
        pad: 1,
    };
    let xlen = p.n * p.c * p.h * p.w;
    let ylen = p.n * p.c * p.h_out() * p.w_out();
    let x = rand_vec(&mut rng, xlen);
    let g = rand_vec(&mut rng, ylen);
    let mut y = vec![0.0; ylen];
    be.maxpool_forward(&p, &x, &mut y);
    let mut dx = vec![0.0; xlen];
    be.maxpool_backward(&p, &x, &y, &g, &mut dx, false);
    check_grad("maxpool", &x, &dx, |xp| {
        let mut y = vec![0.0; ylen];
        be.maxpool_forward(&p, xp, &mut y);
        dot(&y, &g)
    });
    // global average pool
    let (n, c, hw) = (2, 3, 5);
    let x = rand_vec(&mut rng, n * c * hw);
    let g = rand_vec(&mut rng, n * c);
    let mut dx = vec![0.0; n * c * hw];
    be.avgpool_backward(n, c, hw, &g, &mut dx, false);
    check_grad("avgpool", &x, &dx, |xp| {
        let mut y = vec![0.0; n * c];
        be.avgpool_forward(n, c, hw, xp, &mut y);
        dot(&y, &g)
    });
    // add
    let a = rand_vec(&mut rng, 8);
    let b = rand_vec(&mut rng, 8);
    let mut y = vec![0.0; 8];
    be.add_forward(&a, &b, &mut y);
    assert!(y
        .iter()
        .zip(a.iter().zip(&b))
        .all(|(y, (a, b))| (y - a - b).abs() < 1e-15));
}

#[test]
fn linear_and_loss_gradients_match_finite_differences() {
    let be = B::new();
    let mut rng = Rng::new(6);
    let s = Linear {
        n: 4,
        d_in: 5,
        d_out: 3,
    };
    let x = rand_vec(&mut rng, s.n * s.d_in);
    let w = rand_vec(&mut rng, s.d_out * s.d_in);
    let b = rand_vec(&mut rng, s.d_out);
    let labels = [0.0, 2.0, 1.0, 2.0];
    // loss = mean cross-entropy of linear(x)
    let loss = |x: &[f64], w: &[f64], b: &[f64]| {
        let mut y = vec![0.0; s.n * s.d_out];
        be.linear_forward(&s, x, w, b, &mut y);
        let mut st = vec![0.0; 2];
        be.softmax_xent(s.n, s.d_out, &y, &labels, None, &mut st);
        st[0] / s.n as f64
    };
    let mut y = vec![0.0; s.n * s.d_out];
    be.linear_forward(&s, &x, &w, &b, &mut y);
    let mut dy = vec![0.0; s.n * s.d_out];
    let mut st = vec![0.0; 2];
    be.softmax_xent(s.n, s.d_out, &y, &labels, Some(&mut dy), &mut st);
    let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; b.len()]);
    be.linear_backward(&s, &x, &w, &dy, Some(&mut dx), &mut dw, &mut db, false);
    check_grad("linear dx", &x, &dx, |p| loss(p, &w, &b));
    check_grad("linear dw", &w, &dw, |p| loss(&x, p, &b));
    check_grad("linear db", &b, &db, |p| loss(&x, &w, p));
    // correct count against a hand argmax
    let correct = (0..s.n)
        .filter(|&i| {
            let row = &y[i * 3..i * 3 + 3];
            let best = (0..3).fold(0, |bi, j| if row[j] > row[bi] { j } else { bi });
            best as f64 == labels[i]
        })
        .count();
    assert_eq!(st[1] as usize, correct);
}

#[test]
fn sgd_follows_pytorch_semantics() {
    let be = B::new();
    // values exact in f32 so the arithmetic below is exact
    let hp = Sgd {
        lr: 0.5,
        momentum: 0.75,
        weight_decay: 0.25,
    };
    let mut p = vec![2.0];
    let mut m = vec![0.0];
    // step 1: d = g + wd p = 1 + 0.5 = 1.5; buf = 1.5; p = 2 - 0.75 = 1.25
    let mut g = vec![1.0];
    be.sgd_step(&hp, &mut p, &mut g, &mut m);
    assert_eq!((p[0], m[0]), (1.25, 1.5));
    // step 2: d = 1 + 0.3125 = 1.3125; buf = 0.75 * 1.5 + 1.3125 = 2.4375; p = 1.25 - 1.21875
    let mut g = vec![1.0];
    be.sgd_step(&hp, &mut p, &mut g, &mut m);
    assert_eq!((p[0], m[0]), (1.25 - 0.5 * 2.4375, 2.4375));
}

/// 3x3 stride-1 pad-1 shapes for Winograd: odd and even sides, one tile, batches that split
/// into several groups and filter-gradient chunks (with a short last one).
fn winograd_shapes() -> Vec<Conv2d> {
    let c = |n, c_in, h, w, c_out| Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    vec![
        c(2, 3, 7, 9, 4),
        c(3, 5, 6, 6, 2),
        c(1, 1, 1, 1, 1),
        c(2, 2, 2, 3, 3),
        c(19, 4, 8, 8, 6),
        c(70, 2, 16, 15, 3),
    ]
}

type Pool64 = loft::backend::cpu::scratch::ScratchPool<f64>;

#[test]
fn winograd_matches_direct_convolution_in_f64_all_three_passes() {
    for tile in TILES {
        winograd_case_f64(tile);
    }
}

const TILES: [Tile; 2] = [Tile::F2, Tile::F4];

fn winograd_case_f64(tile: Tile) {
    use conv::Algo::Im2col;
    let winograd = conv::Algo::Winograd(tile);
    let pool = Pool64::new();
    let mut rng = Rng::new(11);
    for s in winograd_shapes() {
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let g = rand_vec(&mut rng, s.y_len());
        let want = conv::reference_forward(&s, &x, &w);
        let mut y = vec![f64::NAN; s.y_len()];
        conv::forward_with(winograd, &s, &x, &w, &mut y, &pool);
        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() < 1e-12 * (1.0 + b.abs()),
                "{tile:?} {s:?} y[{i}] {a} vs {b}"
            );
        }
        // the gradients against im2col's (checked by finite differences above), with and
        // without accumulation
        for acc in [false, true] {
            let run = |algo| {
                let mut dx = vec![if acc { 0.5 } else { f64::NAN }; s.x_len()];
                let mut dw = vec![if acc { -0.25 } else { f64::NAN }; s.w_len()];
                conv::backward_data_with(algo, &s, &g, &w, &mut dx, acc, &pool);
                conv::backward_filter_with(algo, &s, &x, &g, &mut dw, acc, &pool);
                (dx, dw)
            };
            let (dx, dw) = run(winograd);
            let (rx, rw) = run(Im2col);
            for (a, b) in dx.iter().zip(&rx).chain(dw.iter().zip(&rw)) {
                assert!(
                    (a - b).abs() < 1e-11 * (1.0 + b.abs()),
                    "{tile:?} {s:?} gradient {a} vs {b} (acc {acc})"
                );
            }
        }
    }
}

#[test]
fn winograd_gradients_match_finite_differences() {
    let pool = Pool64::new();
    let mut rng = Rng::new(12);
    let cases = TILES
        .iter()
        .flat_map(|&t| winograd_shapes().into_iter().take(4).map(move |s| (t, s)));
    for (tile, s) in cases {
        let winograd = conv::Algo::Winograd(tile);
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let g = rand_vec(&mut rng, s.y_len());
        let mut dx = vec![0.0; s.x_len()];
        let mut dw = vec![0.0; s.w_len()];
        conv::backward_data_with(winograd, &s, &g, &w, &mut dx, false, &pool);
        conv::backward_filter_with(winograd, &s, &x, &g, &mut dw, false, &pool);
        let loss = |x: &[f64], w: &[f64]| {
            let mut y = vec![0.0; s.y_len()];
            conv::forward_with(winograd, &s, x, w, &mut y, &pool);
            dot(&y, &g)
        };
        check_grad(&format!("winograd {tile:?} dx {s:?}"), &x, &dx, |xp| loss(xp, &w));
        check_grad(&format!("winograd {tile:?} dw {s:?}"), &w, &dw, |wp| loss(&x, wp));
    }
}

/// The f32 error bounds: every output of every pass is within `bound * Σ|terms|` of the
/// exact (f64 direct) value, where Σ|terms| is the sum of the absolute products that make up
/// that output. im2col and F(2x2, 3x3): 1e-6 (about 8 units of f32 rounding); F(4x4, 3x3),
/// whose transforms have entries up to 8 and 1/24: 1e-5.
const WINOGRAD_F32_BOUND: f64 = 1e-6;
const WINOGRAD_F4_F32_BOUND: f64 = 1e-5;

#[test]
fn winograd_f32_error_is_within_the_stated_bound() {
    use conv::Algo::{Im2col, Winograd};
    let pool = loft::backend::cpu::scratch::ScratchPool::<f32>::new();
    let s = Conv2d {
        n: 4,
        c_in: 64,
        h: 8,
        w: 8,
        c_out: 32,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    let mut rng = Rng::new(13);
    let x = rand_vec(&mut rng, s.x_len());
    let w = rand_vec(&mut rng, s.w_len());
    let g = rand_vec(&mut rng, s.y_len());
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<f64>>();
    let (xf, wf, gf) = (f(&x), f(&w), f(&g));
    // exact values and magnitude sums, in f64 (forward, data gradient, filter gradient)
    let be = B::new();
    let exact = |x: &[f64], w: &[f64], g: &[f64]| {
        let y = conv::reference_forward(&s, x, w);
        let mut dx = vec![0.0; s.x_len()];
        let mut dw = vec![0.0; s.w_len()];
        be.conv2d_backward_data(&s, g, w, &mut dx, false);
        be.conv2d_backward_filter(&s, x, g, &mut dw, false);
        [y, dx, dw]
    };
    let want = exact(&x, &w, &g);
    let mag = exact(&abs(&x), &abs(&w), &abs(&g));
    for algo in [Winograd(Tile::F2), Winograd(Tile::F4), Im2col] {
        let bound = if algo == Winograd(Tile::F4) {
            WINOGRAD_F4_F32_BOUND
        } else {
            WINOGRAD_F32_BOUND
        };
        let mut y = vec![0f32; s.y_len()];
        let mut dx = vec![0f32; s.x_len()];
        let mut dw = vec![0f32; s.w_len()];
        conv::forward_with(algo, &s, &xf, &wf, &mut y, &pool);
        conv::backward_data_with(algo, &s, &gf, &wf, &mut dx, false, &pool);
        conv::backward_filter_with(algo, &s, &xf, &gf, &mut dw, false, &pool);
        for (pass, got) in [y, dx, dw].iter().enumerate() {
            let worst = got
                .iter()
                .zip(&want[pass])
                .zip(&mag[pass])
                .map(|((&a, b), m)| (a as f64 - b).abs() / m.max(1e-30))
                .fold(0.0, f64::max);
            eprintln!("{algo:?} pass {pass}: worst error {worst:.2e} of the magnitude sum");
            assert!(
                worst <= bound,
                "{algo:?} pass {pass}: error {worst:e} of the magnitude sum"
            );
        }
    }
}

#[test]
fn winograd_results_do_not_depend_on_thread_count() {
    for tile in TILES {
        winograd_threads_case(tile);
    }
}

fn winograd_threads_case(tile: Tile) {
    let s = Conv2d {
        n: 37,
        c_in: 6,
        h: 9,
        w: 10,
        c_out: 5,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    same_bits_for_thread_counts(&s, 14, Some(conv::Algo::Winograd(tile)), &[1, 2, 3]);
}

/// The direct convolution's f32 bound, as im2col's: every output within `1e-6 Σ|terms|` of
/// the exact value.
const DIRECT_F32_BOUND: f64 = 1e-6;

/// A 3x3 pad-1 convolution of the given stride.
fn conv3x3(n: usize, c_in: usize, h: usize, w: usize, c_out: usize, stride: usize) -> Conv2d {
    Conv2d {
        n,
        c_in,
        h,
        w,
        c_out,
        kh: 3,
        kw: 3,
        stride,
        pad: 1,
    }
}

/// The largest error of `got` (less `offset`, a value it was accumulated onto) against the
/// exact `want`, relative to the magnitude sums `mag` (plus the offset).
fn worst_error(got: &[f32], want: &[f64], mag: &[f64], offset: f64) -> f64 {
    got.iter()
        .zip(want)
        .zip(mag)
        .map(|((&a, b), m)| (a as f64 - offset - b).abs() / (m + offset).max(1e-30))
        .fold(0.0, f64::max)
}

/// The direct convolution (f32, AVX-512) against the f64 gradients of the backend (im2col
/// and Winograd, checked by finite differences above) on every pass, with and without
/// accumulation, on shapes that hit its edges: batch 1, 1x1 and odd maps, channel counts off
/// its 8-row and 6-column tiles, a last register tile past the map, a 4x4 map, a wide layer.
#[test]
fn direct_convolution_matches_the_f64_gradients_within_the_f32_bound() {
    let c = |n, c_in, h, w, c_out| conv3x3(n, c_in, h, w, c_out, 1);
    let shapes = [
        c(1, 1, 1, 1, 1),
        c(2, 3, 7, 9, 4),
        c(3, 5, 6, 6, 13),
        c(1, 16, 32, 32, 32),
        c(9, 32, 16, 16, 16),
        c(2, 17, 5, 31, 9),
        c(4, 256, 4, 4, 128),
        c(11, 8, 8, 8, 16),
    ];
    if !loft::backend::cpu::direct::applies(&shapes[0]) {
        eprintln!("no AVX-512F here: the direct convolution does not run on this CPU");
        return;
    }
    let be = B::new();
    let pool = loft::backend::cpu::scratch::ScratchPool::<f32>::new();
    let mut rng = Rng::new(21);
    for s in shapes {
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let g = rand_vec(&mut rng, s.y_len());
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<f64>>();
        let exact = |x: &[f64], w: &[f64], g: &[f64]| {
            let y = conv::reference_forward(&s, x, w);
            let mut dx = vec![0.0; s.x_len()];
            let mut dw = vec![0.0; s.w_len()];
            be.conv2d_backward_data(&s, g, w, &mut dx, false);
            be.conv2d_backward_filter(&s, x, g, &mut dw, false);
            [y, dx, dw]
        };
        let want = exact(&x, &w, &g);
        let mag = exact(&abs(&x), &abs(&w), &abs(&g));
        for acc in [false, true] {
            // accumulation adds onto 0.5 (exact in f32)
            let start = if acc { 0.5f32 } else { f32::NAN };
            let mut y = vec![f32::NAN; s.y_len()];
            let mut dx = vec![start; s.x_len()];
            let mut dw = vec![start; s.w_len()];
            conv::forward_with(conv::Algo::Direct, &s, &f(&x), &f(&w), &mut y, &pool);
            conv::backward_data_with(conv::Algo::Direct, &s, &f(&g), &f(&w), &mut dx, acc, &pool);
            conv::backward_filter_with(conv::Algo::Direct, &s, &f(&x), &f(&g), &mut dw, acc, &pool);
            for (pass, got) in [y, dx, dw].iter().enumerate() {
                let offset = if acc && pass > 0 { 0.5 } else { 0.0 };
                let worst = worst_error(got, &want[pass], &mag[pass], offset);
                assert!(
                    worst <= DIRECT_F32_BOUND,
                    "{s:?} pass {pass} (accumulate {acc}): error {worst:e} of the magnitude sum"
                );
            }
        }
    }
}

#[test]
fn direct_convolution_results_do_not_depend_on_thread_count() {
    let s = Conv2d {
        n: 37,
        c_in: 6,
        h: 9,
        w: 10,
        c_out: 5,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    if loft::backend::cpu::direct::applies(&s) {
        same_bits_for_thread_counts(&s, 15, Some(conv::Algo::Direct), &[1, 2, 3]);
    } else {
        eprintln!("no AVX-512F here: the direct convolution does not run on this CPU");
    }
}

/// The direct passes of 3x3 stride-2 layers (forward and filter gradient on the input split
/// into phase planes, data gradient one phase of dx at a time) against the f64 reference and
/// the f64 backend's gradients within the f32 bound, with and without accumulation, on even
/// maps from 2x2 up, channel counts off the tiles, batch 1; and through the backend
/// bit-identical for any thread count.
#[test]
fn direct_stride_2_matches_the_reference_within_the_f32_bound() {
    let c = |n, c_in, h, w, c_out| conv3x3(n, c_in, h, w, c_out, 2);
    let shapes = [
        c(1, 3, 2, 2, 5),
        c(2, 5, 6, 10, 13),
        c(3, 16, 32, 32, 64),
        c(2, 7, 4, 4, 9),
        c(5, 32, 16, 16, 128),
    ];
    if !loft::backend::cpu::direct::applies(&shapes[0]) {
        eprintln!("no AVX-512F here: the direct convolution does not run on this CPU");
        return;
    }
    let pool = loft::backend::cpu::scratch::ScratchPool::<f32>::new();
    let mut rng = Rng::new(22);
    for s in shapes {
        let x = rand_vec(&mut rng, s.x_len());
        let w = rand_vec(&mut rng, s.w_len());
        let want = conv::reference_forward(&s, &x, &w);
        let abs = |v: &[f64]| v.iter().map(|a| a.abs()).collect::<Vec<f64>>();
        let mag = conv::reference_forward(&s, &abs(&x), &abs(&w));
        let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let mut y = vec![f32::NAN; s.y_len()];
        conv::forward_with(conv::Algo::Direct, &s, &f(&x), &f(&w), &mut y, &pool);
        let worst = worst_error(&y, &want, &mag, 0.0);
        assert!(worst <= DIRECT_F32_BOUND, "{s:?}: error {worst:e} of the magnitude sum");
        // both gradients against the f64 backend's (im2col, finite-difference checked),
        // overwriting and accumulating onto 0.5 (exact in f32)
        let g = rand_vec(&mut rng, s.y_len());
        let be = B::new();
        let check = |what: &str, want: &[f64], mag: &[f64], run: &dyn Fn(&mut [f32], bool)| {
            for acc in [false, true] {
                let mut got = vec![if acc { 0.5f32 } else { f32::NAN }; want.len()];
                run(&mut got, acc);
                let worst = worst_error(&got, want, mag, if acc { 0.5 } else { 0.0 });
                assert!(
                    worst <= DIRECT_F32_BOUND,
                    "{s:?} {what} (accumulate {acc}): error {worst:e} of the magnitude sum"
                );
            }
        };
        let (mut want, mut mag) = (vec![0.0; s.w_len()], vec![0.0; s.w_len()]);
        be.conv2d_backward_filter(&s, &x, &g, &mut want, false);
        be.conv2d_backward_filter(&s, &abs(&x), &abs(&g), &mut mag, false);
        check("filter gradient", &want, &mag, &|dw, acc| {
            conv::backward_filter_with(conv::Algo::Direct, &s, &f(&x), &f(&g), dw, acc, &pool)
        });
        let (mut want, mut mag) = (vec![0.0; s.x_len()], vec![0.0; s.x_len()]);
        be.conv2d_backward_data(&s, &g, &w, &mut want, false);
        be.conv2d_backward_data(&s, &abs(&g), &abs(&w), &mut mag, false);
        check("data gradient", &want, &mag, &|dx, acc| {
            conv::backward_data_with(conv::Algo::Direct, &s, &f(&g), &f(&w), dx, acc, &pool)
        });
    }
    same_bits_for_thread_counts(&c(37, 6, 10, 8, 5), 16, None, &[1, 2, 3]);
    same_bits_for_thread_counts(&c(9, 16, 16, 16, 40), 17, Some(conv::Algo::Direct), &[1, 2, 3]);
}
