//! Whole networks: gradient checks in f64 and determinism of training steps.

use loft::backend::cpu::CpuBackend;
use loft::backend::Backend;
use loft::model::{ArchSpec, Graph, Model, Stem};
use loft::ops::Sgd;
use loft::rng::Rng;
use std::sync::Arc;

fn tiny(arch: &str, stem: Stem) -> (ArchSpec, usize) {
    let mut s = ArchSpec::named(arch).unwrap();
    s.base_width = 2;
    s.inner_width = 2;
    s.classes = 3;
    s.in_channels = 2;
    s.stem = stem;
    let hw = if stem == Stem::Imagenet { 32 } else { 8 };
    (s, hw)
}

fn batch(rng: &mut Rng, n: usize, len: usize, classes: usize) -> (Vec<f32>, Vec<u32>) {
    let x = (0..n * len).map(|_| rng.normal() as f32).collect();
    let y = (0..n).map(|_| rng.below(classes as u64) as u32).collect();
    (x, y)
}

/// Mean loss of a training-mode forward with the given parameters.
fn loss_at(m: &mut Model<CpuBackend<f64>>, n: usize, p: &[f64]) -> f64 {
    let be = m.be.clone();
    be.upload_f64(p, &mut m.params).unwrap();
    m.forward(n, true);
    m.loss(n, false).unwrap().0 / n as f64
}

fn gradcheck(arch: &str, stem: Stem) {
    let (spec, hw) = tiny(arch, stem);
    let graph = Graph::build(&spec, hw, hw, None).unwrap();
    let n = 3;
    let be = Arc::new(CpuBackend::<f64>::new());
    let mut m = Model::new(be.clone(), graph, n).unwrap();
    m.init(8).unwrap();
    let mut rng = Rng::new(9);
    let (x, y) = batch(&mut rng, n, spec.in_channels * hw * hw, spec.classes);
    m.set_batch(n, &x, &y).unwrap();
    // perturb BN affine parameters away from (1, 0) so their gradients are generic
    let mut p = be.download_f64(&m.params).unwrap();
    for (i, v) in p.iter_mut().enumerate() {
        *v += 0.05 * ((i as f64) * 0.7).sin();
    }
    be.upload_f64(&p, &mut m.params).unwrap();
    m.forward(n, true);
    m.loss(n, true).unwrap();
    m.backward(n);
    let g = be.download_f64(&m.grads).unwrap();
    let h = 1e-5;
    let entries = m.graph.params.entries.clone();
    let mut checked = 0;
    for e in &entries {
        // a few coordinates of every tensor
        for j in [0, e.len / 2, e.len - 1] {
            let i = e.offset + j;
            let mut pp = p.clone();
            pp[i] = p[i] + h;
            let fp = loss_at(&mut m, n, &pp);
            pp[i] = p[i] - h;
            let fm = loss_at(&mut m, n, &pp);
            let num = (fp - fm) / (2.0 * h);
            let err = (num - g[i]).abs();
            assert!(
                err <= 1e-5 * (1.0 + num.abs().max(g[i].abs())),
                "{arch} {}[{j}]: analytic {} numeric {num}",
                e.name,
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * entries.len());
}

#[test]
fn preresnet18_gradients_match_finite_differences() {
    gradcheck("preresnet18", Stem::Cifar);
}

#[test]
fn resnet18_gradients_match_finite_differences() {
    gradcheck("resnet18", Stem::Cifar);
}

#[test]
fn imagenet_stem_gradients_match_finite_differences() {
    gradcheck("preresnet18", Stem::Imagenet);
}

#[test]
fn training_steps_are_deterministic_across_thread_counts_and_reduce_the_loss() {
    let (spec, hw) = tiny("preresnet18", Stem::Cifar);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let graph = Graph::build(&spec, hw, hw, None).unwrap();
            let be = Arc::new(CpuBackend::<f32>::new());
            let mut m = Model::new(be, graph, 8).unwrap();
            m.init(3).unwrap();
            let mut rng = Rng::new(4);
            let (x, y) = batch(&mut rng, 8, spec.in_channels * hw * hw, spec.classes);
            m.set_batch(8, &x, &y).unwrap();
            let hp = Sgd {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
            };
            let losses: Vec<f64> = (0..15).map(|_| m.train_step(8, &hp).unwrap().0).collect();
            (losses, m.params_host().unwrap())
        })
    };
    let (l1, p1) = run(1);
    let (l2, p2) = run(2);
    assert_eq!(l1, l2);
    assert_eq!(p1, p2);
    assert!(l1[14] < 0.5 * l1[0], "loss did not fall: {l1:?}");
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let (spec, hw) = tiny("preresnet18", Stem::Cifar);
    let graph = Graph::build(&spec, hw, hw, None).unwrap();
    let mut m = Model::new(Arc::new(CpuBackend::<f32>::new()), graph, 4).unwrap();
    let len = spec.in_channels * hw * hw;
    assert!(m.set_batch(5, &vec![0.0; 5 * len], &[0; 5]).is_err());
    assert!(m.set_batch(2, &vec![0.0; len], &[0; 2]).is_err());
    assert!(m.set_batch(1, &vec![0.0; len], &[3]).is_err());
    assert!(m.set_batch(1, &vec![0.0; len], &[2]).is_ok());
}
