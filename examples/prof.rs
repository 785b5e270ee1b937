use loft::backend::cpu::CpuBackend;
use loft::model::{ArchSpec, Graph, Model};
use loft::ops::Sgd;
use std::sync::Arc;
fn main() {
    let base: usize = std::env::args().nth(1).unwrap().parse().unwrap();
    let mut spec = ArchSpec::named("preresnet18").unwrap();
    spec.base_width = base;
    spec.in_channels = 1;
    let g = Graph::build(&spec, 28, 28, None).unwrap();
    let n = 128;
    let mut m = Model::new(Arc::new(CpuBackend::<f32>::new()), g, n).unwrap();
    m.init(1).unwrap();
    let x = vec![0.1f32; n * 784];
    let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
    m.set_batch(n, &x, &y).unwrap();
    let hp = Sgd {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
    };
    m.train_step(n, &hp).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        m.forward(n, true);
    }
    let tf = t.elapsed().as_secs_f64() / 5.0;
    m.loss(n, true).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..5 {
        m.backward(n);
    }
    let tb = t.elapsed().as_secs_f64() / 5.0;
    let t = std::time::Instant::now();
    for _ in 0..5 {
        m.sgd_step(&hp);
    }
    let ts = t.elapsed().as_secs_f64() / 5.0;
    println!(
        "fwd {:.1} ms bwd {:.1} ms sgd {:.2} ms -> {:.0} img/s; flops/sample {:.1} MFLOP",
        tf * 1e3,
        tb * 1e3,
        ts * 1e3,
        n as f64 / (tf + tb + ts),
        m.graph.flops_per_sample() / 1e6
    );
    // per-op timing
    m.op_times = Some(Default::default());
    m.forward(n, true);
    m.loss(n, true).unwrap();
    m.backward(n);
    let t = m.op_times.take().unwrap();
    for (k, v) in &t.forward {
        println!("fwd {k:>10}: {:.1} ms", v * 1e3);
    }
    for (k, v) in &t.backward {
        println!("bwd {k:>10}: {:.1} ms", v * 1e3);
    }
    let be = CpuBackend::<f32>::new();
    for (s, count, name) in loft::bench::distinct_convs(&m.graph, n) {
        let (f, bd, bf) = loft::bench::time_conv(&be, &s);
        let fl = s.flops() / 1e9;
        println!(
            "{name:>22} x{count} {}->{} k{} s{} {}x{}: fwd {:.0} bd {:.0} bf {:.0} GFLOP/s  ms {:.1} {:.1} {:.1}",
            s.c_in,
            s.c_out,
            s.kh,
            s.stride,
            s.h,
            s.w,
            fl / f,
            fl / bd,
            fl / bf,
            f * 1e3,
            bd * 1e3,
            bf * 1e3
        );
    }
}
#[allow(dead_code)]
fn unused() {}
