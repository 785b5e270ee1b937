//! A data stream: the batches one worker (or one data-parallel rank) draws, in order, and
//! how many it has drawn, which is all a checkpoint needs to continue it.

use crate::backend::Backend;
use crate::data::Loader;
use crate::model::Model;
use crate::Result;

/// The batches of a loader, epoch after epoch, from position `drawn`.
pub struct Stream<'d> {
    loader: Loader<'d>,
    /// Batches per epoch (data-parallel ranks agree on one count).
    per_epoch: u64,
    /// The sample order of epoch `order_epoch` (computed once per epoch).
    order: Vec<usize>,
    order_epoch: Option<u64>,
    /// Batches drawn so far.
    pub drawn: u64,
    /// Host staging of one batch: images `(batch, c, h, w)` and labels `(batch)`.
    x: Vec<f32>,
    y: Vec<u32>,
}

impl<'d> Stream<'d> {
    /// A stream of `per_epoch` batches of up to `batch` samples of `image_len` values per epoch.
    pub fn new(loader: Loader<'d>, per_epoch: usize, batch: usize, image_len: usize) -> Self {
        Stream {
            loader,
            per_epoch: per_epoch.max(1) as u64,
            order: Vec::new(),
            order_epoch: None,
            drawn: 0,
            x: vec![0.0; batch * image_len],
            y: vec![0; batch],
        }
    }

    /// The epoch the next batch belongs to, and its index in that epoch.
    pub fn position(&self) -> (u64, u64) {
        (self.drawn / self.per_epoch, self.drawn % self.per_epoch)
    }

    /// Batches per epoch.
    pub fn per_epoch(&self) -> usize {
        self.per_epoch as usize
    }

    /// Load the next batch into `model` (a host-to-device transfer); returns its size.
    pub fn next_into<B: Backend>(&mut self, model: &mut Model<B>) -> Result<usize> {
        let (epoch, b) = self.position();
        if self.order_epoch != Some(epoch) {
            self.order = self.loader.order(epoch);
            self.order_epoch = Some(epoch);
        }
        let n = self
            .loader
            .fill(&self.order, epoch, b as usize, &mut self.x, &mut self.y)?;
        self.drawn += 1;
        model.set_batch(n, &self.x, &self.y)?;
        Ok(n)
    }
}
