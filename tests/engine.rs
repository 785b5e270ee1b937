//! The engine on a second backend: a wrapper around the CPU backend whose buffers are opaque
//! and which counts every host transfer. Dense training, fine-tuning of a masked ticket and
//! LoFT pre-training run on it unchanged; the counts must equal the documented transfers
//! (batches and labels in, two loss numbers out, collective payloads, checkpoints), so no
//! training path touches a buffer on the host between steps. A device failure reported at the
//! checked point ends the run with a one-line error.

use loft::backend::cpu::CpuBackend;
use loft::backend::{Backend, Run, SumOverRanks};
use loft::comm::single::SingleComm;
use loft::data::DatasetKind;
use loft::engine::RunControl;
use loft::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A device buffer nobody outside the backend can index.
pub struct Opaque(Vec<f32>);

/// Host transfers seen by [`Counting`].
#[derive(Default, Debug)]
struct Transfers {
    uploads: AtomicUsize,
    downloads: AtomicUsize,
    read_host: AtomicUsize,
    with_host_mut: AtomicUsize,
    run_tables: AtomicUsize,
    syncs: AtomicUsize,
}

/// The CPU backend behind opaque buffers, counting transfers; optionally failing at the
/// N-th checked point.
struct Counting {
    cpu: CpuBackend<f32>,
    seen: Transfers,
    fail_at_sync: Option<usize>,
}

impl Counting {
    fn new(fail_at_sync: Option<usize>) -> Self {
        Counting {
            cpu: CpuBackend::new(),
            seen: Transfers::default(),
            fail_at_sync,
        }
    }
    fn count(&self, c: &AtomicUsize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
    fn get(c: &AtomicUsize) -> usize {
        c.load(Ordering::Relaxed)
    }
}

impl Backend for Counting {
    type Buf = Opaque;
    type Runs = Vec<Run>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> String {
        "counting (cpu)".into()
    }
    fn alloc(&self, len: usize) -> loft::Result<Opaque> {
        Ok(Opaque(self.cpu.alloc(len)?))
    }
    fn buf_len(&self, b: &Opaque) -> usize {
        b.0.len()
    }
    fn upload(&self, host: &[f32], dst: &mut Opaque) -> loft::Result<()> {
        self.count(&self.seen.uploads);
        self.cpu.upload(host, &mut dst.0)
    }
    fn upload_f64(&self, host: &[f64], dst: &mut Opaque) -> loft::Result<()> {
        self.count(&self.seen.uploads);
        self.cpu.upload_f64(host, &mut dst.0)
    }
    fn download(&self, src: &Opaque) -> loft::Result<Vec<f32>> {
        self.count(&self.seen.downloads);
        self.cpu.download(&src.0)
    }
    fn download_f64(&self, src: &Opaque) -> loft::Result<Vec<f64>> {
        self.count(&self.seen.downloads);
        self.cpu.download_f64(&src.0)
    }
    fn download_into(&self, src: &Opaque, dst: &mut [f64]) -> loft::Result<()> {
        self.count(&self.seen.downloads);
        self.cpu.download_into(&src.0, dst)
    }
    fn read_host<'a>(&self, b: &'a Opaque, off: usize, len: usize) -> loft::Result<Cow<'a, [f32]>> {
        self.count(&self.seen.read_host);
        self.cpu.read_host(&b.0, off, len)
    }
    fn with_host_mut<R>(
        &self,
        b: &mut Opaque,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> loft::Result<R> {
        self.count(&self.seen.with_host_mut);
        self.cpu.with_host_mut(&mut b.0, off, len, f)
    }
    fn sync(&self) -> loft::Result<()> {
        let n = self.seen.syncs.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fail_at_sync == Some(n) {
            return Err(loft::Error::Backend(
                "device fault injected by the test (illegal address)".into(),
            ));
        }
        self.cpu.sync()
    }
    fn view<'a>(&self, b: &'a Opaque, off: usize, len: usize) -> &'a [f32] {
        self.cpu.view(&b.0, off, len)
    }
    fn view_mut<'a>(&self, b: &'a mut Opaque, off: usize, len: usize) -> &'a mut [f32] {
        self.cpu.view_mut(&mut b.0, off, len)
    }
    fn split_mut<'a>(&self, v: &'a mut [f32], at: usize) -> (&'a mut [f32], &'a mut [f32])
    where
        Self: 'a,
    {
        v.split_at_mut(at)
    }
    fn fill(&self, x: &mut [f32], value: f32) {
        self.cpu.fill(x, value)
    }
    fn copy(&self, src: &[f32], dst: &mut [f32], accumulate: bool) {
        self.cpu.copy(src, dst, accumulate)
    }
    fn scale(&self, x: &mut [f32], a: f32) {
        self.cpu.scale(x, a)
    }
    fn axpy(&self, a: f32, x: &[f32], y: &mut [f32]) {
        self.cpu.axpy(a, x, y)
    }
    fn prepare_runs(&self, runs: &[Run]) -> loft::Result<Vec<Run>> {
        self.count(&self.seen.run_tables);
        self.cpu.prepare_runs(runs)
    }
    fn copy_runs(&self, runs: &Vec<Run>, src: &[f32], dst: &mut [f32]) {
        self.cpu.copy_runs(runs, src, dst)
    }
    fn conv2d_forward(&self, s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) {
        self.cpu.conv2d_forward(s, x, w, y)
    }
    fn conv2d_backward_data(&self, s: &Conv2d, dy: &[f32], w: &[f32], dx: &mut [f32], acc: bool) {
        self.cpu.conv2d_backward_data(s, dy, w, dx, acc)
    }
    fn conv2d_backward_filter(&self, s: &Conv2d, x: &[f32], dy: &[f32], dw: &mut [f32], acc: bool) {
        self.cpu.conv2d_backward_filter(s, x, dy, dw, acc)
    }
    fn batchnorm_forward_train(
        &self,
        s: &BatchNorm,
        x: &[f32],
        gamma: &[f32],
        beta: &[f32],
        rm: &mut [f32],
        rv: &mut [f32],
        y: &mut [f32],
        sm: &mut [f32],
        si: &mut [f32],
        sync: SumOverRanks<'_>,
    ) {
        self.cpu
            .batchnorm_forward_train(s, x, gamma, beta, rm, rv, y, sm, si, sync)
    }
    fn batchnorm_forward_eval(
        &self,
        s: &BatchNorm,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        rm: &[f32],
        rv: &[f32],
        y: &mut [f32],
    ) {
        self.cpu.batchnorm_forward_eval(s, x, g, b, rm, rv, y)
    }
    fn batchnorm_backward(
        &self,
        s: &BatchNorm,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        gamma: &[f32],
        beta: &[f32],
        sm: &[f32],
        si: &[f32],
        dx: &mut [f32],
        dg: &mut [f32],
        db: &mut [f32],
        acc: bool,
        sync: SumOverRanks<'_>,
    ) {
        self.cpu
            .batchnorm_backward(s, x, y, dy, gamma, beta, sm, si, dx, dg, db, acc, sync)
    }
    fn relu_forward(&self, x: &[f32], y: &mut [f32]) {
        self.cpu.relu_forward(x, y)
    }
    fn relu_backward(&self, y: &[f32], dy: &[f32], dx: &mut [f32], acc: bool) {
        self.cpu.relu_backward(y, dy, dx, acc)
    }
    fn add_forward(&self, a: &[f32], b: &[f32], y: &mut [f32]) {
        self.cpu.add_forward(a, b, y)
    }
    fn maxpool_forward(&self, s: &Pool2d, x: &[f32], y: &mut [f32]) {
        self.cpu.maxpool_forward(s, x, y)
    }
    fn maxpool_backward(&self, s: &Pool2d, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32], acc: bool) {
        self.cpu.maxpool_backward(s, x, y, dy, dx, acc)
    }
    fn avgpool_forward(&self, n: usize, c: usize, hw: usize, x: &[f32], y: &mut [f32]) {
        self.cpu.avgpool_forward(n, c, hw, x, y)
    }
    fn avgpool_backward(&self, n: usize, c: usize, hw: usize, dy: &[f32], dx: &mut [f32], acc: bool) {
        self.cpu.avgpool_backward(n, c, hw, dy, dx, acc)
    }
    fn linear_forward(&self, s: &Linear, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32]) {
        self.cpu.linear_forward(s, x, w, b, y)
    }
    fn linear_backward(
        &self,
        s: &Linear,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        dw: &mut [f32],
        db: &mut [f32],
        acc: bool,
    ) {
        self.cpu.linear_backward(s, x, w, dy, dx, dw, db, acc)
    }
    fn softmax_xent(
        &self,
        n: usize,
        classes: usize,
        logits: &[f32],
        labels: &[f32],
        dl: Option<&mut [f32]>,
        stats: &mut [f32],
    ) {
        self.cpu.softmax_xent(n, classes, logits, labels, dl, stats)
    }
    fn sgd_step(&self, hp: &Sgd, p: &mut [f32], g: &mut [f32], m: &mut [f32]) {
        self.cpu.sgd_step(hp, p, g, m)
    }
    fn apply_mask(&self, x: &mut [f32], mask: &[f32]) {
        self.cpu.apply_mask(x, mask)
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loft-engine-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn arch() -> loft::model::ArchSpec {
    let mut a = loft::model::ArchSpec::named("preresnet18").unwrap();
    a.base_width = 2;
    a
}

/// 64 training and 24 test samples of the default synthetic set.
fn synthetic() -> DatasetKind {
    let mut k = DatasetKind::parse("synthetic").unwrap();
    if let DatasetKind::Synthetic(s) = &mut k {
        s.train = 64;
        s.test = 24;
    }
    k
}

fn train_config(out: &std::path::Path, epochs: usize) -> loft::train::TrainConfig {
    let dataset = synthetic();
    let mut arch = arch();
    let (c, _, _, classes) = dataset.shape();
    arch.in_channels = c;
    arch.classes = classes;
    loft::train::TrainConfig {
        arch,
        augment: dataset.default_augment(),
        dataset,
        data_dir: PathBuf::new(),
        train_subset: 0,
        test_subset: 0,
        val_size: 0,
        epochs,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: loft::schedule::Kind::Cosine,
        warmup_epochs: 0.0,
        seed: 3,
        out: out.to_path_buf(),
        progress: loft::progress::Style::None,
        ticket: None,
        device: Default::default(),
    }
}

#[test]
fn dense_training_moves_only_batches_losses_and_checkpoints() {
    let out = tmp("dense");
    let cfg = train_config(&out, 2);
    let be = Arc::new(Counting::new(None));
    let ctl = RunControl::new(&out, 1, 5);
    let s = loft::train::run(&cfg, ctl, &mut SingleComm::new(), be.clone()).unwrap();
    assert!(s.final_test_acc >= 0.0);
    let (steps, eval_batches, checkpoints) = (2 * 64 / 16, 2 * 24usize.div_ceil(16), 2);
    let t = &be.seen;
    // initial parameters and statistics; images and labels of every batch
    assert_eq!(Counting::get(&t.uploads), 2 + 2 * (steps + eval_batches));
    // the loss sum and correct count of every batch
    assert_eq!(Counting::get(&t.downloads), steps + eval_batches);
    // parameters, statistics and momentum of every checkpoint
    assert_eq!(Counting::get(&t.read_host), 3 * checkpoints);
    assert_eq!(
        Counting::get(&t.with_host_mut),
        0,
        "one rank has no collective payloads"
    );
    assert_eq!(Counting::get(&t.run_tables), 0);
    // one checked point per step and per evaluation
    assert_eq!(Counting::get(&t.syncs), steps + 2);
    // the same run on the CPU backend gives the same bits
    let cpu_out = tmp("dense-cpu");
    let cpu = Arc::new(CpuBackend::<f32>::new());
    loft::train::run(
        &train_config(&cpu_out, 2),
        RunControl::new(&cpu_out, 1, 5),
        &mut SingleComm::new(),
        cpu,
    )
    .unwrap();
    let last = |d: &std::path::Path| {
        let f = loft::checkpoint::list(&d.join("checkpoints")).unwrap();
        loft::checkpoint::Checkpoint::read(&f.last().unwrap().1).unwrap()
    };
    assert!(last(&out).params == last(&cpu_out).params);
}

#[test]
fn loft_pretraining_moves_only_batches_losses_payloads_and_checkpoints() {
    let out = tmp("loft");
    let dataset = synthetic();
    let tc = train_config(&out, 1);
    let (rounds, local_steps, workers, recal) = (3usize, 2usize, 2usize, 2usize);
    let cfg = loft::loft::PretrainConfig {
        method: loft::loft::Method::Loft,
        arch: tc.arch.clone(),
        augment: dataset.default_augment(),
        dataset,
        data_dir: PathBuf::new(),
        train_subset: 0,
        test_subset: 0,
        val_size: 0,
        rounds,
        local_steps,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        schedule: loft::schedule::Kind::Cosine,
        warmup_rounds: 0.0,
        reset_momentum: false,
        keep_momentum: true,
        seed: 4,
        eval_every: 3,
        simulate: workers,
        verify: false,
        bn_recalibrate: recal,
        out: out.clone(),
        progress: loft::progress::Style::None,
        distance_every: 1,
        distance_ratio: 0.5,
        early_stop: None,
        device: Default::default(),
    };
    let be = Arc::new(Counting::new(None));
    let ctl = RunControl::new(&out, 10, 5);
    loft::loft::run(&cfg, ctl, &mut SingleComm::new(), be.clone()).unwrap();
    let steps = rounds * local_steps * workers;
    let evals = 1;
    let eval_batches = evals * (recal + 24usize.div_ceil(16));
    let t = &be.seen;
    assert_eq!(Counting::get(&t.uploads), 2 + 2 * steps + 2 * eval_batches);
    assert_eq!(Counting::get(&t.downloads), steps + evals * 24usize.div_ceil(16));
    // the distance record of round 0 (the initialisation) and of every round, 3 buffers of
    // each checkpoint (round 0 and the final one), params.f32 (2)
    assert_eq!(Counting::get(&t.read_host), 1 + rounds + 2 * 3 + 2);
    // the shared allreduce of every round
    assert_eq!(Counting::get(&t.with_host_mut), rounds);
    // fixed (one window): shared packing of each local worker and unpacking, parameters,
    // statistics and momentum (3 each); per round and worker: extraction (2) and insertion (3)
    assert_eq!(Counting::get(&t.run_tables), 3 * workers + 3 + rounds * workers * 5);
    assert_eq!(Counting::get(&t.syncs), steps + rounds + evals);
}

#[test]
fn a_device_failure_at_the_checked_point_ends_the_run_with_one_line() {
    let out = tmp("failure");
    let cfg = train_config(&out, 2);
    let be = Arc::new(Counting::new(Some(3)));
    let ctl = RunControl::new(&out, 1, 5);
    let e = loft::train::run(&cfg, ctl, &mut SingleComm::new(), be.clone()).expect_err("the run must fail");
    let msg = e.to_string();
    assert!(msg.contains("illegal address") && !msg.contains('\n'), "{msg}");
    // it stopped at the third step: no further steps, no checkpoint, no summary
    assert_eq!(Counting::get(&be.seen.syncs), 3);
    assert!(loft::checkpoint::list(&out.join("checkpoints")).unwrap().is_empty());
    assert!(!out.join("summary.json").exists());
}
