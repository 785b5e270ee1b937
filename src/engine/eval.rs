//! Evaluation of a model on the test set, each rank on its shard, with an optional
//! re-estimation of the BN running statistics first (for a model re-assembled from
//! sub-networks whose statistics were gathered on narrow networks).

use super::allreduce_mean;
use crate::backend::Backend;
use crate::comm::{Comm, Purpose};
use crate::data::Loader;
use crate::model::Model;
use crate::Result;

/// Where evaluation reads its batches.
pub struct Evaluation<'a, 'd> {
    /// This rank's shard of the test set, in its natural order.
    pub test: &'a Loader<'d>,
    /// BN recalibration: a stream of training batches and how many to run (0: none).
    pub recal: Option<(&'a Loader<'d>, usize)>,
    /// Host staging of one batch.
    x: Vec<f32>,
    y: Vec<u32>,
}

impl<'a, 'd> Evaluation<'a, 'd> {
    /// Evaluation on `test` in batches of up to `batch` samples of `image_len` values.
    pub fn new(test: &'a Loader<'d>, batch: usize, image_len: usize) -> Self {
        Evaluation {
            test,
            recal: None,
            x: vec![0.0; batch * image_len],
            y: vec![0; batch],
        }
    }

    /// Re-estimate the BN statistics with `batches` training-mode forward passes on `loader`
    /// before each evaluation (evaluation only: the model's statistics are restored).
    pub fn with_recalibration(mut self, loader: &'a Loader<'d>, batches: usize) -> Self {
        self.recal = (batches > 0).then_some((loader, batches));
        self
    }

    /// (mean test loss, test accuracy %) of `model` over every rank's shard; `round` picks the
    /// recalibration batches. The model's BN statistics are unchanged afterwards. An
    /// evaluation model borrows its activation buffers from `lender` (an idle training model)
    /// for the length of the evaluation.
    pub fn run<B: Backend>(
        &mut self,
        model: &mut Model<B>,
        mut lender: Option<&mut Model<B>>,
        comm: &mut dyn Comm,
        round: u64,
    ) -> Result<(f64, f64)> {
        let loan = model.borrow_buffers(lender.as_deref_mut())?;
        let result = self.walk(model, comm, round);
        model.return_buffers(lender, loan);
        result
    }

    /// Recalibration and the test set, on buffers already in place.
    fn walk<B: Backend>(&mut self, model: &mut Model<B>, comm: &mut dyn Comm, round: u64) -> Result<(f64, f64)> {
        let be = model.be.clone();
        let ns = model.graph.stats.total;
        let mut saved = None;
        if let Some((loader, batches)) = self.recal {
            let mut keep = be.alloc(ns)?;
            be.copy(be.view(&model.stats, 0, ns), be.view_mut(&mut keep, 0, ns), false);
            saved = Some(keep);
            let order = loader.order(round);
            for b in 0..batches.min(loader.batches_per_epoch()) {
                let n = loader.fill(&order, round, b, &mut self.x, &mut self.y)?;
                model.set_batch(n, &self.x, &self.y)?;
                model.forward(n, true);
            }
            if comm.size() > 1 {
                allreduce_mean(&*be, comm, Purpose::Metrics, &mut model.stats, ns)?;
            }
        }
        let (mut loss, mut correct, mut seen) = (0.0, 0.0, 0.0);
        let order = self.test.order(0);
        for b in 0..self.test.batches_per_epoch() {
            let n = self.test.fill(&order, 0, b, &mut self.x, &mut self.y)?;
            model.set_batch(n, &self.x, &self.y)?;
            let (l, c) = model.eval_step(n)?;
            loss += l;
            correct += c as f64;
            seen += n as f64;
        }
        if let Some(keep) = saved {
            be.copy(be.view(&keep, 0, ns), be.view_mut(&mut model.stats, 0, ns), false);
        }
        be.sync()?;
        let mut e = [loss, correct, seen];
        if comm.size() > 1 {
            comm.allreduce_sum_f64(Purpose::Metrics, &mut e);
        }
        Ok((e[0] / e[2].max(1.0), 100.0 * e[1] / e[2].max(1.0)))
    }
}
