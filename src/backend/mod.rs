//! The backend interface: device buffers and the ops the layer walk is written against.
//!
//! The model, the trainer and (later) LoFT never touch tensor elements: they allocate device
//! buffers, take views into them and call ops. A backend is the CPU reference
//! ([`cpu::CpuBackend`], generic over f32/f64 so gradient checks run in f64) or a GPU.
//! Every op's geometry comes from [`crate::ops`]; backends do no shape arithmetic of their own.
//! Ops with an `accumulate` flag add into their output instead of overwriting it.
//!
//! Ops are queued, not checked: a device may run them asynchronously and report a failure
//! only later. [`Backend::sync`] is the checked point; the engine calls it once per step, so
//! a failed device ends the run with a one-line error instead of wrong numbers.
//!
//! Host transfers are explicit and few: [`Backend::upload`] (inputs, labels, initial and
//! restored weights), [`Backend::download_into`] (the two loss numbers of a step),
//! [`Backend::read_host`] (checkpoints, distances, outgoing collective payloads) and
//! [`Backend::with_host_mut`] (collectives that write a buffer), plus
//! [`Backend::prepare_runs`] (the run tables of a LoFT round). On the CPU the last three
//! borrow the buffer itself and copy nothing.

pub mod cpu;
pub mod cuda;
pub mod device;

pub use device::Device;

use crate::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use crate::Result;
use std::borrow::Cow;

/// One contiguous copy of a run table: `len` elements from offset `src` of the source view to
/// offset `dst` of the destination view. A table of runs gathers a rank's filter slices into a
/// packed buffer, scatters them back, or maps one model's layout onto another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub src: usize,
    pub dst: usize,
    pub len: usize,
}

/// Synchronized batch norm: a function that sums per-channel values over the ranks of a
/// data-parallel step, in place (an allreduce). Batch norm calls it between reducing its own
/// samples and using the result, so every rank normalises with the statistics of the whole
/// global batch and the step does not depend on how the batch is split. `None`: this rank's
/// samples alone.
pub type SumOverRanks<'a> = Option<&'a mut dyn FnMut(&mut [f64])>;

/// A compute device with its buffers and ops. Buffers hold the backend's scalar type; the
/// host side always speaks f32 (or f64 for checks).
pub trait Backend: Send + Sync + 'static {
    /// An owned device buffer.
    type Buf: Send + Sync;
    /// A run table prepared for [`Backend::copy_runs`] (on a GPU: uploaded once).
    type Runs: Send + Sync;
    /// A read-only view of part of a buffer.
    type View<'a>: Copy
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type ViewMut<'a>
    where
        Self: 'a;

    /// Human-readable device name.
    fn name(&self) -> String;
    /// Bytes of the backend's own workspace (scratch buffers of its ops).
    fn workspace_bytes(&self) -> usize {
        0
    }
    /// A zero-filled buffer of `len` elements.
    fn alloc(&self, len: usize) -> Result<Self::Buf>;
    /// Number of elements of a buffer.
    fn buf_len(&self, b: &Self::Buf) -> usize;
    /// Copy host values into the start of `dst`.
    fn upload(&self, host: &[f32], dst: &mut Self::Buf) -> Result<()>;
    /// Copy host f64 values into the start of `dst` (rounding if the device is f32).
    fn upload_f64(&self, host: &[f64], dst: &mut Self::Buf) -> Result<()>;
    /// Copy a buffer to the host as f32.
    fn download(&self, src: &Self::Buf) -> Result<Vec<f32>>;
    /// Copy a buffer to the host as f64.
    fn download_f64(&self, src: &Self::Buf) -> Result<Vec<f64>>;
    /// Copy the first `dst.len()` elements of a buffer into a host slice (no allocation).
    fn download_into(&self, src: &Self::Buf, dst: &mut [f64]) -> Result<()>;
    /// `len` elements at `off` as f32 on the host: the buffer itself where it is host memory
    /// of f32 (the CPU backend), otherwise a device-to-host copy.
    fn read_host<'a>(&self, b: &'a Self::Buf, off: usize, len: usize) -> Result<Cow<'a, [f32]>>;
    /// Run `f` on `len` elements at `off` as a writable host f32 slice and keep what it wrote:
    /// in place on the CPU, a download before and an upload after on a device.
    fn with_host_mut<R>(&self, b: &mut Self::Buf, off: usize, len: usize, f: impl FnOnce(&mut [f32]) -> R)
        -> Result<R>;
    /// The checked point: wait for every queued op and report the first failure since the
    /// last call (an out-of-memory, a launch error, a fault inside a kernel).
    fn sync(&self) -> Result<()>;
    /// View of `len` elements at `off`.
    fn view<'a>(&self, b: &'a Self::Buf, off: usize, len: usize) -> Self::View<'a>;
    /// Writable view of `len` elements at `off`.
    fn view_mut<'a>(&self, b: &'a mut Self::Buf, off: usize, len: usize) -> Self::ViewMut<'a>;
    /// Split a writable view at element `at` into `[0, at)` and `[at, len)`.
    fn split_mut<'a>(&self, v: Self::ViewMut<'a>, at: usize) -> (Self::ViewMut<'a>, Self::ViewMut<'a>)
    where
        Self: 'a;
    /// Set every element of the view to `value`.
    fn fill(&self, x: Self::ViewMut<'_>, value: f32);
    /// `dst = src` or `dst += src`.
    fn copy(&self, src: Self::View<'_>, dst: Self::ViewMut<'_>, accumulate: bool);
    /// `x *= a` (averaging after a sum over ranks).
    fn scale(&self, x: Self::ViewMut<'_>, a: f32);
    /// `y += a x`.
    fn axpy(&self, a: f32, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Prepare a run table for [`Backend::copy_runs`] (a host-to-device transfer on a GPU).
    fn prepare_runs(&self, runs: &[Run]) -> Result<Self::Runs>;
    /// For every run of the table: `dst[run.dst..][..run.len] = src[run.src..][..run.len]`.
    /// Runs never overlap in `dst`. This is the gather and the scatter of filter slices.
    fn copy_runs(&self, runs: &Self::Runs, src: Self::View<'_>, dst: Self::ViewMut<'_>);

    /// Convolution forward: x `(n, c_in, h, w)`, w `(c_out, c_in, kh, kw)` -> y `(n, c_out, ho, wo)`.
    fn conv2d_forward(&self, s: &Conv2d, x: Self::View<'_>, w: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Gradient of the input: dy `(n, c_out, ho, wo)`, w -> dx `(n, c_in, h, w)`.
    fn conv2d_backward_data(
        &self,
        s: &Conv2d,
        dy: Self::View<'_>,
        w: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        accumulate: bool,
    );
    /// Gradient of the weight: x, dy -> dw `(c_out, c_in, kh, kw)`.
    fn conv2d_backward_filter(
        &self,
        s: &Conv2d,
        x: Self::View<'_>,
        dy: Self::View<'_>,
        dw: Self::ViewMut<'_>,
        accumulate: bool,
    );

    /// Batch norm in training mode: normalise x `(n, c, hw)` with batch statistics, write y
    /// (through a ReLU when `s.relu`),
    /// save mean and 1/std `(c)` for the backward pass, and update the running statistics
    /// (running variance unbiased, as PyTorch does). With `sync`, the statistics are those of
    /// the global batch: the per-channel sums (then the sums of squared deviations from the
    /// global mean) go through `sync`: first the c sums followed by this rank's sample count,
    /// then the c squared deviations.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_forward_train(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        running_mean: Self::ViewMut<'_>,
        running_var: Self::ViewMut<'_>,
        y: Self::ViewMut<'_>,
        save_mean: Self::ViewMut<'_>,
        save_invstd: Self::ViewMut<'_>,
        sync: SumOverRanks<'_>,
    );
    /// Batch norm in evaluation mode (running statistics), through a ReLU when `s.relu`.
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_forward_eval(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        running_mean: Self::View<'_>,
        running_var: Self::View<'_>,
        y: Self::ViewMut<'_>,
    );
    /// Batch norm backward (training mode): dx, dgamma, dbeta from x, dy and the saved
    /// statistics. With `sync` (after a synchronized forward), dx is the gradient through
    /// the global batch's statistics: the per-channel sums of dy and dy * xhat, followed by
    /// this rank's sample count, go through `sync` (2c + 1 values); dgamma and dbeta stay
    /// this rank's sums (the gradient allreduce averages them like every other gradient).
    /// With `s.relu`, dy is masked by the fused op's output `y > 0` first: a backend reads
    /// `y` for it, or recomputes the gate from x, gamma, beta and the saved statistics as
    /// its forward computed it (the CPU backend, one stream of memory less).
    #[allow(clippy::too_many_arguments)]
    fn batchnorm_backward(
        &self,
        s: &BatchNorm,
        x: Self::View<'_>,
        y: Self::View<'_>,
        dy: Self::View<'_>,
        gamma: Self::View<'_>,
        beta: Self::View<'_>,
        save_mean: Self::View<'_>,
        save_invstd: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        dgamma: Self::ViewMut<'_>,
        dbeta: Self::ViewMut<'_>,
        accumulate_dx: bool,
        sync: SumOverRanks<'_>,
    );

    /// `y = max(x, 0)`.
    fn relu_forward(&self, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// `dx (+)= dy * [y > 0]`, from the forward output y.
    fn relu_backward(&self, y: Self::View<'_>, dy: Self::View<'_>, dx: Self::ViewMut<'_>, accumulate: bool);
    /// `y = a + b`.
    fn add_forward(&self, a: Self::View<'_>, b: Self::View<'_>, y: Self::ViewMut<'_>);

    /// Max pooling forward.
    fn maxpool_forward(&self, s: &Pool2d, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Max pooling backward: the gradient goes to the first maximum of each window.
    fn maxpool_backward(
        &self,
        s: &Pool2d,
        x: Self::View<'_>,
        y: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        accumulate: bool,
    );
    /// Global average pool: x `(n, c, hw)` -> y `(n, c)`.
    fn avgpool_forward(&self, n: usize, c: usize, hw: usize, x: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Global average pool backward.
    #[allow(clippy::too_many_arguments)]
    fn avgpool_backward(
        &self,
        n: usize,
        c: usize,
        hw: usize,
        dy: Self::View<'_>,
        dx: Self::ViewMut<'_>,
        accumulate: bool,
    );

    /// Linear forward: `y = x w^T + b`.
    fn linear_forward(&self, s: &Linear, x: Self::View<'_>, w: Self::View<'_>, b: Self::View<'_>, y: Self::ViewMut<'_>);
    /// Linear backward: dx (optional), dw, db.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        s: &Linear,
        x: Self::View<'_>,
        w: Self::View<'_>,
        dy: Self::View<'_>,
        dx: Option<Self::ViewMut<'_>>,
        dw: Self::ViewMut<'_>,
        db: Self::ViewMut<'_>,
        accumulate_dx: bool,
    );

    /// Softmax cross-entropy averaged over the batch: logits `(n, classes)`, labels `(n)` (class
    /// indices stored as floats) -> dlogits `(n, classes)` (gradient of the mean loss) and
    /// stats `(2)` = [sum of per-sample losses, number of correct top-1 predictions].
    #[allow(clippy::too_many_arguments)]
    fn softmax_xent(
        &self,
        n: usize,
        classes: usize,
        logits: Self::View<'_>,
        labels: Self::View<'_>,
        dlogits: Option<Self::ViewMut<'_>>,
        stats: Self::ViewMut<'_>,
    );

    /// One SGD step over a flat buffer: `g += wd p; m = mu m + g; p -= lr m`.
    fn sgd_step(&self, hp: &Sgd, params: Self::ViewMut<'_>, grads: Self::ViewMut<'_>, momentum: Self::ViewMut<'_>);
    /// `x *= mask` for a 0/1 mask: zero where the mask is 0, unchanged where it is 1.
    fn apply_mask(&self, x: Self::ViewMut<'_>, mask: Self::View<'_>);
}

/// Evaluate `$body` with `$be` bound to an `Arc` of the backend `$device` resolves to; an
/// error when the device is not available. The one place that picks a backend type: `$body`
/// is compiled once per backend, so everything it calls is generic over [`Backend`].
///
/// ```text
/// let summary = loft::on_device!(cfg.device, be => loft::train::run(&cfg, &ctl, comm, be))?;
/// ```
#[macro_export]
macro_rules! on_device {
    ($device:expr, $be:ident => $body:expr) => {
        match $crate::backend::Device::resolve($device) {
            Err(e) => Err(e),
            Ok($crate::backend::device::Resolved::Cpu) => {
                let $be = std::sync::Arc::new($crate::backend::cpu::CpuBackend::<f32>::new());
                $body
            }
            Ok($crate::backend::device::Resolved::Cuda(n)) => match $crate::backend::cuda::gpu::GpuDriver::new(n) {
                Err(e) => Err(e),
                Ok(d) => {
                    let $be = std::sync::Arc::new($crate::backend::cuda::CudaBackend::new(d));
                    $body
                }
            },
            Ok($crate::backend::device::Resolved::CudaEmulated) => {
                let $be = std::sync::Arc::new($crate::backend::cuda::CudaBackend::new(
                    $crate::backend::cuda::emulated::EmulatedDriver::new(),
                ));
                $body
            }
        }
    };
}
