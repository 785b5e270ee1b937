//! A network on a backend: its flat buffers and the forward and backward walks over its ops.
//!
//! Buffers (all on the backend's device):
//! - `params`, `grads`, `momentum`: `(graph.params.total)`, one layout;
//! - `stats`: BN running statistics `(graph.stats.total)`;
//! - activation buffers `(capacity, c, h, w)` and, when training, their gradients (in buffers
//!   shared by gradients that are never live at once);
//! - `saves[i]`: mean and 1/std of BN op i from the last training forward, `(2, c)`;
//! - `labels`: `(capacity)` class indices as floats; `loss_stats`: `(2)` = [loss sum, correct].
//!
//! A model built with [`Model::new`] trains: every activation keeps its own buffer for the
//! backward pass. A model built with [`Model::for_evaluation`] only runs forward: tensors
//! share buffers once nothing reads them any more (a handful instead of one per tensor), and
//! it has no gradients (and momentum only when asked for). It owns no activation buffers:
//! for each evaluation it borrows idle ones from a training model ([`Model::borrow_buffers`])
//! and allocates only what it cannot borrow.
//!
//! Nothing here touches tensor elements from the host except `init`, `load`, `set_batch` and
//! the two loss numbers read back per batch.

pub mod arch;
pub mod graph;
pub mod init;
pub mod layout;
pub mod partition;
pub mod slices;

pub use arch::{ArchSpec, BlockInfo, Family, Stem};
pub use graph::{Graph, Op, TensorId};
pub use layout::{Entry, Layout, Role};

use crate::backend::Backend;
use crate::ops::{BatchNorm, Linear, Sgd};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// BN epsilon (PyTorch default).
pub const BN_EPS: f32 = 1e-5;
/// BN running-statistics momentum (PyTorch default).
pub const BN_MOMENTUM: f32 = 0.1;

/// A network with its buffers on a backend, for batches of up to `capacity` samples.
pub struct Model<B: Backend> {
    pub be: Arc<B>,
    pub graph: Graph,
    pub capacity: usize,
    pub params: B::Buf,
    /// Empty on an evaluation model.
    pub grads: B::Buf,
    /// Empty on an evaluation model built without momentum.
    pub momentum: B::Buf,
    pub stats: B::Buf,
    /// Activation buffers; tensor t lives in `acts[slot[t]]`, of `capacity * slot_len[slot]`
    /// elements at least (None while an evaluation model holds no buffers).
    acts: Vec<Option<B::Buf>>,
    slot: Vec<usize>,
    slot_len: Vec<usize>,
    /// Activation gradients by slot: tensor t's gradient lives in `dacts[dslot[t]]`, shared
    /// by tensors whose gradients are never live at once (see `gradient_slots`; empty on an
    /// evaluation model).
    dacts: Vec<Option<B::Buf>>,
    dslot: Vec<usize>,
    saves: Vec<B::Buf>,
    labels: B::Buf,
    /// Host staging of the labels as floats `(capacity)`.
    labels_host: Vec<f32>,
    loss_stats: B::Buf,
    /// When set, forward and backward add each op's wall time here (seconds by op kind).
    pub op_times: Option<OpTimes>,
}

/// Wall time per op, for profiling (`loft bench`): seconds by what ran, e.g. "conv 3x3/1
/// 64->128 16x16 forward", "batchnorm backward", "loss", "sgd". Ops are timed one by one
/// (on a GPU each after a sync), so the sum is the step time.
#[derive(Clone, Debug, Default)]
pub struct OpTimes {
    pub seconds: std::collections::BTreeMap<String, f64>,
}

impl OpTimes {
    /// Add `t` seconds to `what`.
    pub fn add(&mut self, what: String, t: f64) {
        *self.seconds.entry(what).or_default() += t;
    }
}

/// The profile name of a convolution pass.
fn conv_name(g: &crate::ops::Conv2d, pass: &str) -> String {
    format!(
        "conv {}x{}/{} {}->{} {}x{} {pass}",
        g.kh, g.kw, g.stride, g.c_in, g.c_out, g.h, g.w
    )
}

/// Where a borrowed activation buffer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// The lender's activation buffer i.
    Act(usize),
    /// The lender's activation-gradient buffer i.
    Grad(usize),
    /// Allocated for the loan.
    New,
}

/// The buffers an evaluation model borrowed, slot by slot (see [`Model::borrow_buffers`]).
#[must_use = "return the buffers with Model::return_buffers"]
pub struct Loan {
    origin: Vec<Option<Origin>>,
}

/// Bytes of a model's device buffers, by what they hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    /// Activations (including the input batch and labels).
    pub activations: usize,
    /// Gradients of the activations.
    pub activation_grads: usize,
    /// Parameters and BN running statistics.
    pub params_and_stats: usize,
    /// Parameter gradients and momentum.
    pub grads_and_momentum: usize,
    /// Saved BN batch statistics and the loss numbers.
    pub other: usize,
}

impl Memory {
    /// All of it.
    pub fn total(&self) -> usize {
        self.activations + self.activation_grads + self.params_and_stats + self.grads_and_momentum + self.other
    }
}

impl Op {
    /// Short name of the op kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Conv { .. } => "conv",
            Op::Bn { relu: true, .. } => "batchnorm+relu",
            Op::Bn { .. } => "batchnorm",
            Op::Relu { .. } => "relu",
            Op::Add { .. } => "add",
            Op::MaxPool { .. } => "maxpool",
            Op::AvgPool { .. } => "avgpool",
            Op::Linear { .. } => "linear",
        }
    }
}

/// Take buffer `i` out of a list for the duration of an op (put it back with `put`).
fn take<T>(v: &mut [Option<T>], i: usize) -> T {
    v[i].take().expect("activation buffer in use twice")
}

impl<B: Backend> Model<B> {
    /// A training model: every buffer for batches of up to `capacity` samples (parameters
    /// zeroed; see [`Model::init`]).
    pub fn new(be: Arc<B>, graph: Graph, capacity: usize) -> Result<Self> {
        let (slot, sizes) = training_slots(&graph);
        Self::alloc(be, graph, capacity, slot, &sizes, true, true)
    }

    /// An evaluation model: parameters, statistics (and momentum when `momentum`), and
    /// activation buffers shared between tensors whose lifetimes in the forward walk do not
    /// overlap. It runs [`Model::forward`] and [`Model::loss`] without gradients, in either
    /// BN mode.
    pub fn for_evaluation(be: Arc<B>, graph: Graph, capacity: usize, momentum: bool) -> Result<Self> {
        let (slot, sizes) = shared_slots(&graph);
        Self::alloc(be, graph, capacity, slot, &sizes, false, momentum)
    }

    /// Give every activation slot that has no buffer one for the next walks: an idle buffer of
    /// `lender` (a training model between its steps: its activations and their gradients are
    /// rewritten before they are read again) that is large enough, else a new one. Hand them
    /// back with [`Model::return_buffers`] before the lender steps again.
    pub fn borrow_buffers(&mut self, mut lender: Option<&mut Model<B>>) -> Result<Loan> {
        let mut pool: Vec<(Origin, usize)> = Vec::new();
        if let Some(l) = lender.as_deref() {
            let len = |b: &Option<B::Buf>| b.as_ref().map_or(0, |b| l.be.buf_len(b));
            pool.extend(l.acts.iter().enumerate().map(|(i, b)| (Origin::Act(i), len(b))));
            pool.extend(l.dacts.iter().enumerate().map(|(i, b)| (Origin::Grad(i), len(b))));
            pool.retain(|&(_, n)| n > 0);
        }
        let mut order: Vec<usize> = (0..self.acts.len()).filter(|&i| self.acts[i].is_none()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(self.slot_len[i]));
        let mut loan = Loan {
            origin: vec![None; self.acts.len()],
        };
        for i in order {
            let need = self.capacity * self.slot_len[i];
            // the smallest idle buffer that fits
            let fit = pool
                .iter()
                .enumerate()
                .filter(|(_, p)| p.1 >= need)
                .min_by_key(|(_, p)| p.1)
                .map(|(k, _)| k);
            let (origin, buf) = match (fit, lender.as_deref_mut()) {
                (Some(k), Some(l)) => {
                    let (origin, _) = pool.swap_remove(k);
                    let b = match origin {
                        Origin::Act(j) => l.acts[j].take(),
                        Origin::Grad(j) => l.dacts[j].take(),
                        Origin::New => None,
                    };
                    (origin, b.expect("an idle buffer"))
                }
                _ => (Origin::New, self.be.alloc(need)?),
            };
            self.acts[i] = Some(buf);
            loan.origin[i] = Some(origin);
        }
        Ok(loan)
    }

    /// Return the buffers of [`Model::borrow_buffers`] to their lender (new ones are freed).
    pub fn return_buffers(&mut self, mut lender: Option<&mut Model<B>>, loan: Loan) {
        for (i, origin) in loan.origin.into_iter().enumerate() {
            let Some(origin) = origin else { continue };
            let buf = self.acts[i].take();
            match (origin, lender.as_deref_mut()) {
                (Origin::Act(j), Some(l)) => l.acts[j] = buf,
                (Origin::Grad(j), Some(l)) => l.dacts[j] = buf,
                _ => drop(buf),
            }
        }
    }

    fn alloc(
        be: Arc<B>,
        graph: Graph,
        capacity: usize,
        slot: Vec<usize>,
        slot_sizes: &[usize],
        training: bool,
        momentum: bool,
    ) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::config("batch capacity must be at least 1"));
        }
        // a training model: every tensor and its gradient (the input has none), one after the
        // other; an evaluation model borrows its activation buffers per evaluation
        let mut acts = Vec::new();
        for &len in slot_sizes {
            acts.push(if training {
                Some(be.alloc(capacity * len)?)
            } else {
                None
            });
        }
        let (dslot, dsizes) = if training {
            gradient_slots(&graph)
        } else {
            (Vec::new(), Vec::new())
        };
        let dacts = dsizes
            .iter()
            .map(|&len| be.alloc(capacity * len).map(Some))
            .collect::<Result<Vec<_>>>()?;
        let saves = graph
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Bn { c, .. } => Some(be.alloc(2 * c)),
                _ => None,
            })
            .collect::<Result<Vec<_>>>()?;
        let n = graph.params.total;
        Ok(Model {
            params: be.alloc(n)?,
            grads: be.alloc(if training { n } else { 0 })?,
            momentum: be.alloc(if momentum { n } else { 0 })?,
            stats: be.alloc(graph.stats.total)?,
            labels: be.alloc(capacity)?,
            labels_host: vec![0.0; capacity],
            loss_stats: be.alloc(2)?,
            dacts,
            dslot,
            acts,
            slot,
            slot_len: slot_sizes.to_vec(),
            saves,
            op_times: None,
            capacity,
            graph,
            be,
        })
    }

    /// Whether this model trains (has gradients).
    pub fn trains(&self) -> bool {
        self.be.buf_len(&self.grads) > 0
    }

    /// Bytes held by the model's device buffers, by what they hold.
    pub fn memory(&self) -> Memory {
        let be = &*self.be;
        let len = |b: &B::Buf| be.buf_len(b) * 4;
        Memory {
            activations: self.acts.iter().flatten().map(len).sum::<usize>() + len(&self.labels),
            activation_grads: self.dacts.iter().flatten().map(len).sum(),
            params_and_stats: len(&self.params) + len(&self.stats),
            grads_and_momentum: len(&self.grads) + len(&self.momentum),
            other: self.saves.iter().map(len).sum::<usize>() + len(&self.loss_stats),
        }
    }

    /// Bytes held by the model's device buffers.
    pub fn device_bytes(&self) -> usize {
        self.memory().total()
    }

    /// Initialise parameters and statistics from the seed (see [`init`]); momentum zeroed.
    pub fn init(&mut self, seed: u64) -> Result<()> {
        let (p, s) = init::initial_values(&self.graph, seed);
        self.be.upload(&p, &mut self.params)?;
        self.be.upload(&s, &mut self.stats)?;
        self.reset_momentum();
        Ok(())
    }

    /// Zero the momentum buffer.
    pub fn reset_momentum(&mut self) {
        let n = self.be.buf_len(&self.momentum);
        let v = self.be.view_mut(&mut self.momentum, 0, n);
        self.be.fill(v, 0.0);
    }

    /// Upload parameters, statistics and (when given and held) momentum from the host, e.g.
    /// from a checkpoint. Lengths must match the layouts.
    pub fn load(&mut self, params: &[f32], stats: &[f32], momentum: Option<&[f32]>) -> Result<()> {
        let n = self.graph.params.total;
        let held = self.be.buf_len(&self.momentum);
        if params.len() != n || stats.len() != self.graph.stats.total || momentum.is_some_and(|m| m.len() != held) {
            return Err(Error::Shape(format!(
                "loading {} parameters and {} statistics into a model of {} and {}",
                params.len(),
                stats.len(),
                n,
                self.graph.stats.total
            )));
        }
        self.be.upload(params, &mut self.params)?;
        self.be.upload(stats, &mut self.stats)?;
        if let Some(m) = momentum {
            self.be.upload(m, &mut self.momentum)?;
        }
        Ok(())
    }

    /// Copy a batch in: x `(n, c, h, w)` normalised images, y `(n)` labels.
    pub fn set_batch(&mut self, n: usize, x: &[f32], y: &[u32]) -> Result<()> {
        let spec = &self.graph.tensors[self.graph.input];
        if n == 0 || n > self.capacity || x.len() < n * spec.len() || y.len() < n {
            return Err(Error::Shape(format!(
                "batch of {n} (x {} values, y {}) for capacity {} and {} values per sample",
                x.len(),
                y.len(),
                self.capacity,
                spec.len()
            )));
        }
        let buf = self.acts[self.slot[self.graph.input]].as_mut().expect("input buffer");
        self.be.upload(&x[..n * spec.len()], buf)?;
        let classes = self.graph.spec.classes;
        if let Some(&bad) = y[..n].iter().find(|&&l| l as usize >= classes) {
            return Err(Error::Shape(format!("label {bad} out of range for {classes} classes")));
        }
        for (h, &l) in self.labels_host.iter_mut().zip(&y[..n]) {
            *h = l as f32;
        }
        self.be.upload(&self.labels_host[..n], &mut self.labels)?;
        Ok(())
    }

    fn act_len(&self, t: TensorId, n: usize) -> usize {
        n * self.graph.tensors[t].len()
    }

    /// Forward walk for a batch of `n`; `train` uses batch statistics (and updates the running
    /// ones), otherwise running statistics.
    pub fn forward(&mut self, n: usize, train: bool) {
        self.forward_synced(n, train, None);
    }

    /// [`Model::forward`]; in training, with `sync`, every batch norm uses the statistics of
    /// the global batch (synchronized batch norm, see [`crate::backend::SumOverRanks`]).
    pub fn forward_synced(&mut self, n: usize, train: bool, mut sync: crate::backend::SumOverRanks<'_>) {
        let be = self.be.clone();
        let be = &*be;
        for i in 0..self.graph.ops.len() {
            let op = self.graph.ops[i];
            let started = self.op_times.as_ref().map(|_| {
                let _ = be.sync();
                std::time::Instant::now()
            });
            let y_id = op.output();
            let ylen = self.act_len(y_id, n);
            let mut ybuf = take(&mut self.acts, self.slot[y_id]);
            {
                let yv = be.view_mut(&mut ybuf, 0, ylen);
                match op {
                    Op::Conv { x, w, geom, .. } => {
                        let g = geom.with_n(n);
                        let e = &self.graph.params.entries[w];
                        let xb = self.acts[self.slot[x]].as_ref().expect("x");
                        be.conv2d_forward(
                            &g,
                            be.view(xb, 0, g.x_len()),
                            be.view(&self.params, e.offset, e.len),
                            yv,
                        );
                    }
                    Op::Bn {
                        x,
                        gamma,
                        mean,
                        c,
                        hw,
                        save,
                        relu,
                        ..
                    } => {
                        let s = BatchNorm {
                            n,
                            c,
                            hw,
                            eps: BN_EPS,
                            momentum: BN_MOMENTUM,
                            relu,
                        };
                        let ge = &self.graph.params.entries[gamma];
                        let me = &self.graph.stats.entries[mean];
                        let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, s.len());
                        let gv = be.view(&self.params, ge.offset, c);
                        let bv = be.view(&self.params, ge.offset + c, c);
                        if train {
                            let st = be.view_mut(&mut self.stats, me.offset, 2 * c);
                            let (rm, rv) = be.split_mut(st, c);
                            let sv = be.view_mut(&mut self.saves[save], 0, 2 * c);
                            let (sm, si) = be.split_mut(sv, c);
                            let f = sync.as_mut().map(|f| &mut **f as &mut dyn FnMut(&mut [f64]));
                            be.batchnorm_forward_train(&s, xv, gv, bv, rm, rv, yv, sm, si, f);
                        } else {
                            let rm = be.view(&self.stats, me.offset, c);
                            let rv = be.view(&self.stats, me.offset + c, c);
                            be.batchnorm_forward_eval(&s, xv, gv, bv, rm, rv, yv);
                        }
                    }
                    Op::Relu { x, .. } => {
                        let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, ylen);
                        be.relu_forward(xv, yv);
                    }
                    Op::Add { a, b, .. } if self.slot[a] == self.slot[y_id] => {
                        // in place: y's buffer holds a (see `training_slots`)
                        let bv = be.view(self.acts[self.slot[b]].as_ref().expect("b"), 0, ylen);
                        be.copy(bv, yv, true);
                    }
                    Op::Add { a, b, .. } => {
                        let av = be.view(self.acts[self.slot[a]].as_ref().expect("a"), 0, ylen);
                        let bv = be.view(self.acts[self.slot[b]].as_ref().expect("b"), 0, ylen);
                        be.add_forward(av, bv, yv);
                    }
                    Op::MaxPool { x, geom, .. } => {
                        let g = crate::ops::Pool2d { n, ..geom };
                        let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, n * g.c * g.h * g.w);
                        be.maxpool_forward(&g, xv, yv);
                    }
                    Op::AvgPool { x, c, hw, .. } => {
                        let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, n * c * hw);
                        be.avgpool_forward(n, c, hw, xv, yv);
                    }
                    Op::Linear { x, w, d_in, d_out, .. } => {
                        let s = Linear { n, d_in, d_out };
                        let e = &self.graph.params.entries[w];
                        let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, n * d_in);
                        let wv = be.view(&self.params, e.offset, d_out * d_in);
                        let bv = be.view(&self.params, e.offset + d_out * d_in, d_out);
                        be.linear_forward(&s, xv, wv, bv, yv);
                    }
                }
            }
            self.acts[self.slot[y_id]] = Some(ybuf);
            if let (Some(t), Some(times)) = (started, self.op_times.as_mut()) {
                let _ = be.sync();
                let what = match op {
                    Op::Conv { geom, .. } => conv_name(&geom.with_n(n), "forward"),
                    _ => format!("{} forward", op.kind()),
                };
                times.add(what, t.elapsed().as_secs_f64());
            }
        }
    }

    /// Loss of the last forward against the labels of the batch: (sum of per-sample losses,
    /// correct predictions). With `grad`, also writes the gradient of the mean loss into the
    /// logits' gradient.
    pub fn loss(&mut self, n: usize, grad: bool) -> Result<(f64, usize)> {
        self.compute_loss(n, grad);
        self.read_loss()
    }

    /// Queue the loss of the last forward (see [`Model::loss`]); [`Model::read_loss`] reads it.
    pub fn compute_loss(&mut self, n: usize, grad: bool) {
        let be = &*self.be;
        let classes = self.graph.spec.classes;
        let lt = self.graph.logits;
        let logits = be.view(self.acts[self.slot[lt]].as_ref().expect("logits"), 0, n * classes);
        let labels = be.view(&self.labels, 0, n);
        let stats = be.view_mut(&mut self.loss_stats, 0, 2);
        let dl = if grad {
            Some(be.view_mut(self.dacts[self.dslot[lt]].as_mut().expect("dlogits"), 0, n * classes))
        } else {
            None
        };
        be.softmax_xent(n, classes, logits, labels, dl, stats);
    }

    /// The (loss sum, correct) of the last [`Model::compute_loss`]: two numbers to the host.
    pub fn read_loss(&self) -> Result<(f64, usize)> {
        let mut s = [0.0; 2];
        self.be.download_into(&self.loss_stats, &mut s)?;
        Ok((s[0], s[1].round() as usize))
    }

    /// Backward walk for a batch of `n` after `forward(n, true)` and `loss(n, true)`: fills
    /// `grads` (overwritten, not accumulated).
    pub fn backward(&mut self, n: usize) {
        self.backward_synced(n, None);
    }

    /// [`Model::backward`] after [`Model::forward_synced`] with the same `sync`.
    pub fn backward_synced(&mut self, n: usize, mut sync: crate::backend::SumOverRanks<'_>) {
        assert!(self.trains(), "backward on an evaluation model");
        let be = self.be.clone();
        let be = &*be;
        let input = self.graph.input;
        for i in (0..self.graph.ops.len()).rev() {
            let op = self.graph.ops[i];
            let mut started = self.op_times.as_ref().map(|_| {
                let _ = be.sync();
                std::time::Instant::now()
            });
            let acc = self.graph.accumulate[i];
            let y_id = op.output();
            let ylen = self.act_len(y_id, n);
            let dybuf = take(&mut self.dacts, self.dslot[y_id]);
            let dy = be.view(&dybuf, 0, ylen);
            match op {
                Op::Conv { x, w, geom, .. } => {
                    let g = geom.with_n(n);
                    let (off, len) = (self.graph.params.entries[w].offset, self.graph.params.entries[w].len);
                    let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, g.x_len());
                    be.conv2d_backward_filter(&g, xv, dy, be.view_mut(&mut self.grads, off, len), false);
                    if let (Some(t), Some(times)) = (started, self.op_times.as_mut()) {
                        // the filter pass alone; the data pass is timed from here
                        let _ = be.sync();
                        times.add(conv_name(&g, "backward filter"), t.elapsed().as_secs_f64());
                        started = Some(std::time::Instant::now());
                    }
                    if x != input {
                        let dx = be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, g.x_len());
                        be.conv2d_backward_data(&g, dy, be.view(&self.params, off, len), dx, acc[0]);
                    }
                }
                Op::Bn {
                    x,
                    gamma,
                    c,
                    hw,
                    save,
                    relu,
                    ..
                } => {
                    let s = BatchNorm {
                        n,
                        c,
                        hw,
                        eps: BN_EPS,
                        momentum: BN_MOMENTUM,
                        relu,
                    };
                    let off = self.graph.params.entries[gamma].offset;
                    let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, s.len());
                    let yv = be.view(self.acts[self.slot[y_id]].as_ref().expect("y"), 0, s.len());
                    let gv = be.view(&self.params, off, c);
                    let bv = be.view(&self.params, off + c, c);
                    let sm = be.view(&self.saves[save], 0, c);
                    let si = be.view(&self.saves[save], c, c);
                    let (dg, db) = be.split_mut(be.view_mut(&mut self.grads, off, 2 * c), c);
                    let dx = be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, s.len());
                    let f = sync.as_mut().map(|f| &mut **f as &mut dyn FnMut(&mut [f64]));
                    be.batchnorm_backward(&s, xv, yv, dy, gv, bv, sm, si, dx, dg, db, acc[0], f);
                }
                Op::Relu { x, .. } => {
                    let yv = be.view(self.acts[self.slot[y_id]].as_ref().expect("y"), 0, ylen);
                    let dx = be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, ylen);
                    be.relu_backward(yv, dy, dx, acc[0]);
                }
                Op::Add { a, b, .. } => {
                    be.copy(
                        dy,
                        be.view_mut(self.dacts[self.dslot[a]].as_mut().expect("da"), 0, ylen),
                        acc[0],
                    );
                    be.copy(
                        dy,
                        be.view_mut(self.dacts[self.dslot[b]].as_mut().expect("db"), 0, ylen),
                        acc[1],
                    );
                }
                Op::MaxPool { x, geom, .. } => {
                    let g = crate::ops::Pool2d { n, ..geom };
                    let xlen = n * g.c * g.h * g.w;
                    let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, xlen);
                    let yv = be.view(self.acts[self.slot[y_id]].as_ref().expect("y"), 0, ylen);
                    let dx = be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, xlen);
                    be.maxpool_backward(&g, xv, yv, dy, dx, acc[0]);
                }
                Op::AvgPool { x, c, hw, .. } => {
                    let dx = be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, n * c * hw);
                    be.avgpool_backward(n, c, hw, dy, dx, acc[0]);
                }
                Op::Linear { x, w, d_in, d_out, .. } => {
                    let s = Linear { n, d_in, d_out };
                    let off = self.graph.params.entries[w].offset;
                    let xv = be.view(self.acts[self.slot[x]].as_ref().expect("x"), 0, n * d_in);
                    let wv = be.view(&self.params, off, d_out * d_in);
                    let (dw, db) = be.split_mut(be.view_mut(&mut self.grads, off, d_out * (d_in + 1)), d_out * d_in);
                    let dx = if x != input {
                        Some(be.view_mut(self.dacts[self.dslot[x]].as_mut().expect("dx"), 0, n * d_in))
                    } else {
                        None
                    };
                    be.linear_backward(&s, xv, wv, dy, dx, dw, db, acc[0]);
                }
            }
            self.dacts[self.dslot[y_id]] = Some(dybuf);
            if let (Some(t), Some(times)) = (started, self.op_times.as_mut()) {
                let _ = be.sync();
                let what = match op {
                    Op::Conv { geom, x, .. } if x != input => conv_name(&geom.with_n(n), "backward data"),
                    Op::Conv { .. } => continue,
                    _ => format!("{} backward", op.kind()),
                };
                times.add(what, t.elapsed().as_secs_f64());
            }
        }
    }

    /// One SGD step over every parameter.
    pub fn sgd_step(&mut self, hp: &Sgd) {
        let n = self.graph.params.total;
        let be = &*self.be;
        be.sgd_step(
            hp,
            be.view_mut(&mut self.params, 0, n),
            be.view_mut(&mut self.grads, 0, n),
            be.view_mut(&mut self.momentum, 0, n),
        );
    }

    /// One training step on the batch set by `set_batch`: forward, loss, backward, update.
    /// Returns (loss sum, correct).
    pub fn train_step(&mut self, n: usize, hp: &Sgd) -> Result<(f64, usize)> {
        self.forward(n, true);
        let t = std::time::Instant::now();
        let r = self.loss(n, true)?;
        if let Some(times) = self.op_times.as_mut() {
            times.add("loss (softmax cross-entropy)".into(), t.elapsed().as_secs_f64());
        }
        self.backward(n);
        let t = std::time::Instant::now();
        self.sgd_step(hp);
        if let Some(times) = self.op_times.as_mut() {
            let _ = self.be.sync();
            times.add("sgd".into(), t.elapsed().as_secs_f64());
        }
        Ok(r)
    }

    /// Evaluate the batch set by `set_batch` with running statistics. Returns (loss sum, correct).
    pub fn eval_step(&mut self, n: usize) -> Result<(f64, usize)> {
        self.forward(n, false);
        self.loss(n, false)
    }

    /// The logits `(n, classes)` of the last forward, on the host (evaluation's per-sample
    /// outputs: top-5 accuracy and the confusion matrix).
    pub fn logits_host(&self, n: usize) -> Result<Vec<f32>> {
        let classes = self.graph.spec.classes;
        let lt = self.graph.logits;
        let logits = self.acts[self.slot[lt]].as_ref().expect("logits after a forward");
        Ok(self.be.read_host(logits, 0, n * classes)?.into_owned())
    }

    /// Host copy of the parameters.
    pub fn params_host(&self) -> Result<Vec<f32>> {
        self.be.download(&self.params)
    }
}
/// Buffers handed out to tensors with disjoint lifetimes: each slot grows to the largest
/// tensor it holds.
#[derive(Default)]
struct SlotAlloc {
    sizes: Vec<usize>,
    free: Vec<usize>,
}

impl SlotAlloc {
    /// A slot for `need` elements: the smallest free slot that fits, else the largest free
    /// one (grown), else a new one.
    fn place(&mut self, need: usize) -> usize {
        let sizes = &self.sizes;
        let fit = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, &s)| sizes[s] >= need)
            .min_by_key(|(_, &s)| sizes[s])
            .or_else(|| self.free.iter().enumerate().max_by_key(|(_, &s)| sizes[s]))
            .map(|(i, _)| i);
        let s = match fit {
            Some(i) => self.free.swap_remove(i),
            None => {
                self.sizes.push(0);
                self.sizes.len() - 1
            }
        };
        self.sizes[s] = self.sizes[s].max(need);
        s
    }

    /// Slot `s` is free again.
    fn release(&mut self, s: usize) {
        if !self.free.contains(&s) {
            self.free.push(s);
        }
    }
}

/// Buffers for a forward-only walk: tensor t gets slot `slot[t]`, and a slot is reused once
/// every op that reads its tensor has run (the logits stay live for the loss). Returns the
/// slot of every tensor and the per-sample size of every slot.
fn shared_slots(g: &Graph) -> (Vec<usize>, Vec<usize>) {
    let ops = g.ops.len();
    let mut last_read = vec![0usize; g.tensors.len()];
    for (i, op) in g.ops.iter().enumerate() {
        for t in op.inputs() {
            last_read[t] = last_read[t].max(i);
        }
    }
    last_read[g.logits] = ops;
    let mut slot = vec![usize::MAX; g.tensors.len()];
    let mut alloc = SlotAlloc::default();
    slot[g.input] = alloc.place(g.tensors[g.input].len());
    for (i, op) in g.ops.iter().enumerate() {
        slot[op.output()] = alloc.place(g.tensors[op.output()].len());
        for t in op.inputs() {
            if last_read[t] == i {
                alloc.release(slot[t]);
            }
        }
    }
    (slot, alloc.sizes)
}

/// Activation slots of a training model: every tensor keeps its value for the backward pass,
/// except that a residual add writes its sum over its first input `a` when nothing needs `a`
/// afterwards: the add is its only reader, and the op that produced it does not read its own
/// output in the backward pass (a convolution or a batch norm without ReLU does not; a fused
/// batch norm + ReLU, a ReLU or a max pool does). The add's backward reads no values.
fn training_slots(g: &Graph) -> (Vec<usize>, Vec<usize>) {
    let mut readers = vec![0usize; g.tensors.len()];
    let mut producer = vec![None; g.tensors.len()];
    for op in &g.ops {
        for t in op.inputs() {
            readers[t] += 1;
        }
        producer[op.output()] = Some(*op);
    }
    readers[g.logits] += 1; // the loss
    let mut slot: Vec<usize> = (0..g.tensors.len()).collect();
    for op in &g.ops {
        if let Op::Add { a, y, .. } = *op {
            let free_after = match producer[a] {
                Some(Op::Conv { .. } | Op::Bn { relu: false, .. } | Op::Add { .. }) => readers[a] == 1,
                _ => false,
            };
            if free_after {
                slot[y] = slot[a];
            }
        }
    }
    // renumber the slots in use, each sized for the largest tensor it holds
    let mut index = vec![usize::MAX; g.tensors.len()];
    let mut sizes = Vec::new();
    for (&s, t) in slot.iter().zip(&g.tensors) {
        if index[s] == usize::MAX {
            index[s] = sizes.len();
            sizes.push(0);
        }
        sizes[index[s]] = sizes[index[s]].max(t.len());
    }
    (slot.iter().map(|&s| index[s]).collect(), sizes)
}

/// Activation-gradient slots of a training model: walking the ops backwards, a tensor's
/// gradient is live from the first op that writes it (its last consumer; the loss for the
/// logits) to the op that produced the tensor, which reads it. Gradients whose live ranges do
/// not overlap share a buffer; at each op its inputs' new gradients are placed before its
/// output's is released, so an op never reads and writes one buffer. The first write into a
/// shared buffer overwrites (see [`Graph::accumulate`]). The input has no gradient
/// (`usize::MAX`).
fn gradient_slots(g: &Graph) -> (Vec<usize>, Vec<usize>) {
    let mut slot = vec![usize::MAX; g.tensors.len()];
    let mut alloc = SlotAlloc::default();
    slot[g.logits] = alloc.place(g.tensors[g.logits].len());
    for op in g.ops.iter().rev() {
        for t in op.inputs() {
            if t != g.input && slot[t] == usize::MAX {
                slot[t] = alloc.place(g.tensors[t].len());
            }
        }
        let y = op.output();
        if slot[y] == usize::MAX {
            // never consumed: a zeroed buffer of its own that nothing writes
            slot[y] = alloc.sizes.len();
            alloc.sizes.push(g.tensors[y].len());
        } else {
            alloc.release(slot[y]);
        }
    }
    (slot, alloc.sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live range of every tensor's gradient in backward steps (op i runs at step
    /// `ops - 1 - i`; the loss at step -1).
    fn live_ranges(g: &Graph) -> Vec<Option<(i64, i64)>> {
        let last = g.ops.len() as i64 - 1;
        let mut r: Vec<Option<(i64, i64)>> = vec![None; g.tensors.len()];
        r[g.logits] = Some((-1, -1));
        for (i, op) in g.ops.iter().enumerate() {
            let step = last - i as i64;
            let y = op.output();
            let start = r[y].map_or(step, |(s, _)| s);
            r[y] = Some((start, step));
        }
        for (i, op) in g.ops.iter().enumerate() {
            for t in op.inputs() {
                if let Some((s, _)) = r[t].as_mut() {
                    *s = (*s).min(last - i as i64);
                }
            }
        }
        r[g.input] = None;
        r
    }

    #[test]
    fn gradients_share_buffers_only_when_never_live_together() {
        for arch in ["preresnet18", "resnet34"] {
            let spec = ArchSpec::named(arch).unwrap();
            let g = Graph::build(&spec, 32, 32, None).unwrap();
            let (slot, sizes) = gradient_slots(&g);
            let ranges = live_ranges(&g);
            for a in 0..g.tensors.len() {
                for b in a + 1..g.tensors.len() {
                    let (Some(ra), Some(rb)) = (ranges[a], ranges[b]) else {
                        continue;
                    };
                    if slot[a] == slot[b] {
                        assert!(
                            ra.1 < rb.0 || rb.1 < ra.0,
                            "{arch}: tensors {a} {ra:?} and {b} {rb:?} share a slot"
                        );
                    }
                }
                if a != g.input {
                    assert!(sizes[slot[a]] >= g.tensors[a].len(), "{arch}: slot too small");
                }
            }
            // a handful of buffers instead of one per tensor
            let per_tensor: usize = (0..g.tensors.len())
                .filter(|&t| t != g.input)
                .map(|t| g.tensors[t].len())
                .sum();
            let shared: usize = sizes.iter().sum();
            assert!(shared * 5 < per_tensor, "{arch}: {shared} of {per_tensor}");
        }
    }
}
