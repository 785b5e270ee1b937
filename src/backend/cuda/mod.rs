//! The CUDA backend: the ops of [`Backend`] as hand-written kernels (`kernels/*.cu`).
//!
//! [`CudaBackend`] is generic over the [`Driver`] that runs the kernels: a real GPU (cudarc,
//! kernels compiled by NVRTC) or the emulated device (the same kernels compiled as C++ and
//! run on the host, see [`emulated`]). Everything here, the buffers, the views, the
//! parameter structs and the launch geometry ([`launch`]), is the same for both.
//!
//! Ops queue launches and return nothing; a failed launch is remembered and reported by the
//! next [`Backend::sync`], the engine's checked point.

pub mod driver;
pub mod emulated;
pub mod gpu;
pub mod launch;
pub mod nvrtc;
pub mod table;

use super::{Backend, Run, SumOverRanks};
use crate::ops::{BatchNorm, Conv2d, Linear, Pool2d, Sgd};
use crate::{Error, Result};
use driver::{DevicePtr, Driver, KernelParams};
use launch::*;
use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Mutex;

const F32: u64 = 4;

/// A device buffer of f32: the driver's allocation and its length in elements.
pub struct DeviceBuf<M> {
    _mem: M,
    ptr: DevicePtr,
    len: usize,
}

/// A run table on the device: (src, dst, len) as i64 triples.
pub struct DeviceRuns<M> {
    _mem: Option<M>,
    ptr: DevicePtr,
    count: usize,
}

/// A read-only view of `len` elements at device address `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    ptr: DevicePtr,
    len: usize,
    _borrow: PhantomData<&'a [f32]>,
}

/// A writable view of `len` elements at device address `ptr`.
#[derive(Debug)]
pub struct ViewMut<'a> {
    ptr: DevicePtr,
    len: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

/// The CUDA backend on driver `D`.
pub struct CudaBackend<D: Driver> {
    driver: D,
    /// first failed launch since the last sync
    failure: Mutex<Option<String>>,
    /// split-K partial sums of the filter gradient, grown to the largest layer once
    scratch: Mutex<Option<DeviceBuf<D::Mem>>>,
}

impl<D: Driver> CudaBackend<D> {
    /// The backend on a driver.
    pub fn new(driver: D) -> Self {
        CudaBackend {
            driver,
            failure: Mutex::new(None),
            scratch: Mutex::new(None),
        }
    }

    /// The driver.
    pub fn driver(&self) -> &D {
        &self.driver
    }

    /// Remember the first failure; ops report through [`Backend::sync`].
    fn record(&self, r: Result<()>) {
        if let Err(e) = r {
            self.failure.lock().unwrap().get_or_insert_with(|| e.to_string());
        }
    }

    fn elementwise<P: KernelParams>(&self, name: &'static str, n: usize, p: P) {
        self.record(launch_elementwise(&self.driver, name, n, p));
    }

    /// A scratch buffer of at least `len` elements (the old one when large enough).
    fn with_scratch<R>(&self, len: usize, f: impl FnOnce(DevicePtr) -> Result<R>) -> Result<R> {
        let mut s = self.scratch.lock().unwrap();
        if s.as_ref().is_none_or(|b| b.len < len) {
            *s = None;
            *s = Some(self.alloc(len)?);
        }
        f(s.as_ref().unwrap().ptr)
    }

    /// Write f64 values as (hi, lo) float pairs at `at`.
    fn write_pairs(&self, at: DevicePtr, values: &[f64]) -> Result<()> {
        let v: Vec<f32> = values
            .iter()
            .flat_map(|&x| {
                let hi = x as f32;
                [hi, (x - f64::from(hi)) as f32]
            })
            .collect();
        self.driver.upload(as_bytes(&v), at)
    }

    /// `count` f64 values at `at`.
    fn read_doubles(&self, at: DevicePtr, count: usize) -> Result<Vec<f64>> {
        let mut bytes = vec![0u8; 8 * count];
        self.driver.download(at, &mut bytes)?;
        Ok(bytes
            .chunks_exact(8)
            .map(|b| f64::from_ne_bytes(b.try_into().unwrap()))
            .collect())
    }

    /// Per channel, the sum of its partials of quantity `q` in slice order (as the kernels
    /// add them; see `kernels/norm.cu`).
    fn channel_sums(&self, p: &NormParams, q: usize) -> Result<Vec<f64>> {
        let (c, slices) = (p.c as usize, p.slices as usize);
        let v = self.read_doubles(p.partials + 8 * (q * c * slices) as u64, c * slices)?;
        Ok(v.chunks_exact(slices).map(|ch| ch.iter().sum()).collect())
    }

    /// Run `f` with `p`'s slices set and its partials (and, for `sums` > 0, that many
    /// floats of (hi, lo) pairs after them) in the scratch buffer.
    fn with_norm_scratch(&self, p: NormParams, sums: usize, f: impl FnOnce(NormParams) -> Result<()>) -> Result<()> {
        let (slices, images) = norm_slices(p.n as usize, p.c as usize, p.hw as usize);
        let partials = 2 * p.c as usize * slices; // doubles
        self.with_scratch(2 * partials + sums, |scratch| {
            f(NormParams {
                partials: scratch,
                sums: if sums > 0 { scratch + 8 * partials as u64 } else { 0 },
                slices: slices as i64,
                slice_images: images as i64,
                ..p
            })
        })
    }

    /// Training forward (see [`Backend::batchnorm_forward_train`]): the two reductions and
    /// the normalisation; synchronized, the host adds the ranks' sums after each reduction.
    fn batchnorm_forward(&self, p: NormParams, s: &BatchNorm, sync: SumOverRanks<'_>) -> Result<()> {
        let c = s.c;
        let Some(sync) = sync else {
            return self.with_norm_scratch(p, 0, |p| {
                for phase in [0, 1] {
                    let q = NormParams { phase, ..p };
                    self.driver
                        .launch("batchnorm_partial_forward_f32", norm(&q), q.bytes())?;
                }
                self.driver.launch("batchnorm_apply_forward_f32", norm(&p), p.bytes())
            });
        };
        self.with_norm_scratch(p, 6 * c, |p| {
            let mut p = NormParams { phase: 0, ..p };
            self.driver
                .launch("batchnorm_partial_forward_f32", norm(&p), p.bytes())?;
            let mut v = self.channel_sums(&p, 0)?;
            v.push((s.n * s.hw) as f64);
            sync(&mut v);
            let m = v[c];
            let mean: Vec<f64> = v[..c].iter().map(|x| x / m).collect();
            self.write_pairs(p.sums, &mean)?;
            p.phase = 2;
            self.driver
                .launch("batchnorm_partial_forward_f32", norm(&p), p.bytes())?;
            let mut squares = self.channel_sums(&p, 1)?;
            sync(&mut squares);
            let mut w = Vec::with_capacity(3 * c);
            for (&mean, &ss) in mean.iter().zip(&squares) {
                let var = ss / m;
                let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
                w.extend([mean, 1.0 / (var + f64::from(s.eps)).sqrt(), unbiased]);
            }
            self.write_pairs(p.sums, &w)?;
            p.phase = 1;
            self.driver.launch("batchnorm_apply_forward_f32", norm(&p), p.bytes())
        })
    }

    /// Backward (see [`Backend::batchnorm_backward`]): the sums, then dx; synchronized, the
    /// host adds the ranks' sums in between.
    fn batchnorm_backward_sums(&self, p: NormParams, s: &BatchNorm, sync: SumOverRanks<'_>) -> Result<()> {
        let c = s.c;
        let sums = if sync.is_some() { 4 * c } else { 0 };
        self.with_norm_scratch(p, sums, |mut p| {
            self.driver.launch("batchnorm_sums_backward_f32", norm(&p), p.bytes())?;
            p.phase = 0;
            if let Some(sync) = sync {
                // (sum dy of every channel, then sum dy xhat, samples), summed over the ranks
                let mut v = self.channel_sums(&p, 0)?;
                v.extend(self.channel_sums(&p, 1)?);
                v.push((s.n * s.hw) as f64);
                sync(&mut v);
                let back: Vec<f64> = (0..2 * c).map(|i| v[(i % 2) * c + i / 2]).collect();
                self.write_pairs(p.sums, &back)?;
                p.total = v[2 * c].round() as i64;
                p.phase = 1;
            }
            self.driver.launch("batchnorm_apply_backward_f32", norm(&p), p.bytes())
        })
    }

    /// One implicit-GEMM pass of a convolution (see `kernels/conv.cu`) with its M, N and K
    /// steps set. The tap-major passes (`regroup` = the filters `p.a_src` and how to regroup
    /// them) first write the filters tap-major into the scratch buffer; a pass whose output
    /// has few tiles, or whose K is long, runs in K slices into the scratch buffer and a
    /// reduction adds them.
    fn conv_pass(&self, name: &'static str, mut p: ConvParams, regroup: Option<FiltersParams>) -> Result<()> {
        if p.m == 0 || p.ncols == 0 {
            return Ok(());
        }
        let (m, n, steps) = (p.m as usize, p.ncols as usize, p.steps as usize);
        let splits = conv_splits(m, conv_phase_cols(&p) * p.phases as usize, steps);
        p.split_steps = steps.div_ceil(splits).max(1) as i64;
        let splits = steps.div_ceil(p.split_steps as usize).max(1);
        // scratch: [regrouped filters, rounded up to 16 floats][partial sums (splits, output)]
        let filters = regroup.map_or(0, |f| ((f.c_out * f.c_in * f.taps) as usize).next_multiple_of(16));
        let partials = if splits > 1 { splits * m * n } else { 0 };
        if filters + partials == 0 {
            p.partial = 0;
            return self.driver.launch(name, conv(&p), p.bytes());
        }
        self.with_scratch(filters + partials, |scratch| {
            if let Some(f) = regroup {
                let f = FiltersParams { out: scratch, ..f };
                launch_elementwise(
                    &self.driver,
                    "conv_filters_forward_f32",
                    (f.c_out * f.c_in * f.taps) as usize,
                    f,
                )?;
                p.a_src = scratch;
            }
            if splits == 1 {
                p.partial = 0;
                return self.driver.launch(name, conv(&p), p.bytes());
            }
            let partial = scratch + F32 * filters as u64;
            let q = ConvParams {
                out: partial,
                partial: 1,
                ..p
            };
            self.driver.launch(name, conv(&q), q.bytes())?;
            let r = ReduceParams {
                partial,
                out: p.out,
                len: (m * n) as i64,
                splits: splits as i64,
                accumulate: p.accumulate,
                pad: 0,
            };
            launch_elementwise(&self.driver, "conv_reduce_forward_f32", m * n, r)
        })
    }
}

/// The filters `w` of `s` to regroup tap-major: by input channel (`by_input`, the data
/// gradient's (tap, c_out, c_in)) or by output channel (the forward's (tap, c_in, c_out)).
fn regroup(s: &Conv2d, w: DevicePtr, by_input: bool) -> Option<FiltersParams> {
    Some(FiltersParams {
        w,
        out: 0,
        c_out: s.c_out as i64,
        c_in: s.c_in as i64,
        taps: (s.kh * s.kw) as i64,
        by_input: by_input as u32,
        pad: 0,
    })
}

/// K steps of the forward: every tap, the input channels in steps of 8.
fn forward_steps(s: &Conv2d) -> i64 {
    (s.kh * s.kw * s.c_in.div_ceil(CONV_TILE_K)) as i64
}

/// K steps of the data gradient's largest phase: the taps one stride apart from (0, 0), the
/// output channels in steps.
fn data_steps(s: &Conv2d) -> i64 {
    (s.kh.div_ceil(s.stride) * s.kw.div_ceil(s.stride) * s.c_out.div_ceil(CONV_TILE_K)) as i64
}

/// The convolution's geometry as kernel parameters (operands and GEMM sizes left to fill).
fn conv_params(s: &Conv2d) -> ConvParams {
    ConvParams {
        a_src: 0,
        b_src: 0,
        out: 0,
        n: s.n as i64,
        c_in: s.c_in as i64,
        h: s.h as i64,
        w: s.w as i64,
        c_out: s.c_out as i64,
        kh: s.kh as i64,
        kw: s.kw as i64,
        stride: s.stride as i64,
        pad: s.pad as i64,
        ho: s.h_out() as i64,
        wo: s.w_out() as i64,
        m: 0,
        ncols: 0,
        steps: 0,
        split_steps: 0,
        phases: 1,
        accumulate: 0,
        partial: 0,
    }
}

fn pool_params(s: &Pool2d, x: DevicePtr, dy: DevicePtr, y: DevicePtr, accumulate: bool) -> PoolParams {
    PoolParams {
        x,
        dy,
        y,
        n: s.n as i64,
        c: s.c as i64,
        h: s.h as i64,
        w: s.w as i64,
        k: s.k as i64,
        stride: s.stride as i64,
        pad: s.pad as i64,
        ho: s.h_out() as i64,
        wo: s.w_out() as i64,
        accumulate: accumulate as u32,
        pad_: 0,
    }
}

fn norm_params(s: &BatchNorm) -> NormParams {
    NormParams {
        x: 0,
        dy: 0,
        gamma: 0,
        beta: 0,
        running_mean: 0,
        running_var: 0,
        y: 0,
        save_mean: 0,
        save_invstd: 0,
        dgamma: 0,
        dbeta: 0,
        sums: 0,
        partials: 0,
        n: s.n as i64,
        c: s.c as i64,
        hw: s.hw as i64,
        slices: 1,
        slice_images: s.n as i64,
        total: (s.n * s.hw) as i64,
        eps: s.eps,
        momentum: s.momentum,
        accumulate: 0,
        phase: 0,
        relu: s.relu as u32,
        pad_: 0,
    }
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn as_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every byte pattern is a valid f32, so writes through the
    // byte view leave valid floats.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

impl<D: Driver> Backend for CudaBackend<D> {
    type Buf = DeviceBuf<D::Mem>;
    type Runs = DeviceRuns<D::Mem>;
    type View<'a> = View<'a>;
    type ViewMut<'a> = ViewMut<'a>;

    fn name(&self) -> String {
        self.driver.name()
    }
    fn workspace_bytes(&self) -> usize {
        self.scratch.lock().unwrap().as_ref().map_or(0, |b| b.len * 4)
    }
    fn alloc(&self, len: usize) -> Result<Self::Buf> {
        let mem = self.driver.alloc(len * 4)?;
        let ptr = self.driver.ptr(&mem);
        Ok(DeviceBuf { _mem: mem, ptr, len })
    }
    fn buf_len(&self, b: &Self::Buf) -> usize {
        b.len
    }
    fn upload(&self, host: &[f32], dst: &mut Self::Buf) -> Result<()> {
        if host.len() > dst.len {
            return Err(Error::Shape(format!(
                "upload of {} values into a buffer of {}",
                host.len(),
                dst.len
            )));
        }
        self.driver.upload(as_bytes(host), dst.ptr)
    }
    fn upload_f64(&self, host: &[f64], dst: &mut Self::Buf) -> Result<()> {
        let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload(&v, dst)
    }
    fn download(&self, src: &Self::Buf) -> Result<Vec<f32>> {
        Ok(self.read_host(src, 0, src.len)?.into_owned())
    }
    fn download_f64(&self, src: &Self::Buf) -> Result<Vec<f64>> {
        Ok(self.download(src)?.into_iter().map(f64::from).collect())
    }
    fn download_into(&self, src: &Self::Buf, dst: &mut [f64]) -> Result<()> {
        let v = self.read_host(src, 0, dst.len())?;
        for (d, s) in dst.iter_mut().zip(v.iter()) {
            *d = f64::from(*s);
        }
        Ok(())
    }
    fn read_host<'a>(&self, b: &'a Self::Buf, off: usize, len: usize) -> Result<Cow<'a, [f32]>> {
        assert!(
            off + len <= b.len,
            "read_host of [{off}, {}) from a buffer of {}",
            off + len,
            b.len
        );
        let mut v = vec![0f32; len];
        self.driver.download(b.ptr + F32 * off as u64, as_bytes_mut(&mut v))?;
        Ok(Cow::Owned(v))
    }
    fn with_host_mut<R>(
        &self,
        b: &mut Self::Buf,
        off: usize,
        len: usize,
        f: impl FnOnce(&mut [f32]) -> R,
    ) -> Result<R> {
        let mut v = self.read_host(b, off, len)?.into_owned();
        let r = f(&mut v);
        self.driver.upload(as_bytes(&v), b.ptr + F32 * off as u64)?;
        Ok(r)
    }
    fn sync(&self) -> Result<()> {
        let queued = self.driver.sync();
        match self.failure.lock().unwrap().take() {
            Some(e) => Err(Error::Backend(e)),
            None => queued,
        }
    }
    fn view<'a>(&self, b: &'a Self::Buf, off: usize, len: usize) -> View<'a> {
        assert!(
            off + len <= b.len,
            "view [{off}, {}) of a buffer of {}",
            off + len,
            b.len
        );
        View {
            ptr: b.ptr + F32 * off as u64,
            len,
            _borrow: PhantomData,
        }
    }
    fn view_mut<'a>(&self, b: &'a mut Self::Buf, off: usize, len: usize) -> ViewMut<'a> {
        assert!(
            off + len <= b.len,
            "view [{off}, {}) of a buffer of {}",
            off + len,
            b.len
        );
        ViewMut {
            ptr: b.ptr + F32 * off as u64,
            len,
            _borrow: PhantomData,
        }
    }
    fn split_mut<'a>(&self, v: ViewMut<'a>, at: usize) -> (ViewMut<'a>, ViewMut<'a>)
    where
        Self: 'a,
    {
        assert!(at <= v.len, "split at {at} of a view of {}", v.len);
        let tail = ViewMut {
            ptr: v.ptr + F32 * at as u64,
            len: v.len - at,
            _borrow: PhantomData,
        };
        (ViewMut { len: at, ..v }, tail)
    }
    fn fill(&self, x: ViewMut<'_>, value: f32) {
        let p = FillParams {
            x: x.ptr,
            n: x.len as i64,
            value,
            pad: 0,
        };
        self.elementwise("fill_forward_f32", x.len, p);
    }
    fn copy(&self, src: View<'_>, dst: ViewMut<'_>, accumulate: bool) {
        let n = src.len.min(dst.len);
        let p = CopyParams {
            src: src.ptr,
            dst: dst.ptr,
            n: n as i64,
            accumulate: accumulate as u32,
            pad: 0,
        };
        self.elementwise("copy_forward_f32", n, p);
    }
    fn scale(&self, x: ViewMut<'_>, a: f32) {
        let p = ScaleParams {
            x: x.ptr,
            n: x.len as i64,
            a,
            pad: 0,
        };
        self.elementwise("scale_forward_f32", x.len, p);
    }
    fn axpy(&self, a: f32, x: View<'_>, y: ViewMut<'_>) {
        let n = x.len.min(y.len);
        self.elementwise(
            "axpy_forward_f32",
            n,
            AxpyParams {
                x: x.ptr,
                y: y.ptr,
                n: n as i64,
                a,
                pad: 0,
            },
        );
    }
    fn prepare_runs(&self, runs: &[Run]) -> Result<Self::Runs> {
        if runs.is_empty() {
            return Ok(DeviceRuns {
                _mem: None,
                ptr: 0,
                count: 0,
            });
        }
        let table: Vec<i64> = runs
            .iter()
            .flat_map(|r| [r.src as i64, r.dst as i64, r.len as i64])
            .collect();
        // SAFETY: i64 has no padding; the byte view covers exactly the table.
        let bytes = unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), table.len() * 8) };
        let mem = self.driver.alloc(bytes.len())?;
        let ptr = self.driver.ptr(&mem);
        self.driver.upload(bytes, ptr)?;
        Ok(DeviceRuns {
            _mem: Some(mem),
            ptr,
            count: runs.len(),
        })
    }
    fn copy_runs(&self, runs: &Self::Runs, src: View<'_>, dst: ViewMut<'_>) {
        let p = RunsParams {
            runs: runs.ptr,
            src: src.ptr,
            dst: dst.ptr,
            count: runs.count as i64,
        };
        self.record(launch_runs(&self.driver, p));
    }

    fn conv2d_forward(&self, s: &Conv2d, x: View<'_>, w: View<'_>, y: ViewMut<'_>) {
        let p = ConvParams {
            a_src: w.ptr,
            b_src: x.ptr,
            out: y.ptr,
            m: s.c_out as i64,
            ncols: (s.n * s.h_out() * s.w_out()) as i64,
            steps: forward_steps(s),
            ..conv_params(s)
        };
        self.record(self.conv_pass("conv_forward_f32", p, regroup(s, w.ptr, false)));
    }
    fn conv2d_backward_data(&self, s: &Conv2d, dy: View<'_>, w: View<'_>, dx: ViewMut<'_>, accumulate: bool) {
        let p = ConvParams {
            a_src: w.ptr,
            b_src: dy.ptr,
            out: dx.ptr,
            m: s.c_in as i64,
            ncols: (s.n * s.h * s.w) as i64,
            steps: data_steps(s),
            phases: if s.stride > 1 { (s.stride * s.stride) as i64 } else { 1 },
            accumulate: accumulate as u32,
            ..conv_params(s)
        };
        self.record(self.conv_pass("conv_backward_data_f32", p, regroup(s, w.ptr, true)));
    }
    fn conv2d_backward_filter(&self, s: &Conv2d, x: View<'_>, dy: View<'_>, dw: ViewMut<'_>, accumulate: bool) {
        let p = ConvParams {
            a_src: dy.ptr,
            b_src: x.ptr,
            out: dw.ptr,
            m: s.c_out as i64,
            ncols: s.k() as i64,
            steps: (s.n * s.h_out() * s.w_out()).div_ceil(CONV_TILE_K) as i64,
            accumulate: accumulate as u32,
            ..conv_params(s)
        };
        self.record(self.conv_pass("conv_backward_filter_f32", p, None));
    }

    fn batchnorm_forward_train(
        &self,
        s: &BatchNorm,
        x: View<'_>,
        gamma: View<'_>,
        beta: View<'_>,
        running_mean: ViewMut<'_>,
        running_var: ViewMut<'_>,
        y: ViewMut<'_>,
        save_mean: ViewMut<'_>,
        save_invstd: ViewMut<'_>,
        sync: SumOverRanks<'_>,
    ) {
        let p = NormParams {
            x: x.ptr,
            gamma: gamma.ptr,
            beta: beta.ptr,
            running_mean: running_mean.ptr,
            running_var: running_var.ptr,
            y: y.ptr,
            save_mean: save_mean.ptr,
            save_invstd: save_invstd.ptr,
            ..norm_params(s)
        };
        if s.c > 0 {
            self.record(self.batchnorm_forward(p, s, sync));
        }
    }
    fn batchnorm_forward_eval(
        &self,
        s: &BatchNorm,
        x: View<'_>,
        gamma: View<'_>,
        beta: View<'_>,
        running_mean: View<'_>,
        running_var: View<'_>,
        y: ViewMut<'_>,
    ) {
        let p = NormParams {
            x: x.ptr,
            gamma: gamma.ptr,
            beta: beta.ptr,
            running_mean: running_mean.ptr,
            running_var: running_var.ptr,
            y: y.ptr,
            ..norm_params(s)
        };
        if s.c > 0 {
            let (slices, images) = norm_slices(s.n, s.c, s.hw);
            let p = NormParams {
                slices: slices as i64,
                slice_images: images as i64,
                ..p
            };
            self.record(self.driver.launch("batchnorm_eval_forward_f32", norm(&p), p.bytes()));
        }
    }
    fn batchnorm_backward(
        &self,
        s: &BatchNorm,
        x: View<'_>,
        _y: View<'_>,
        dy: View<'_>,
        gamma: View<'_>,
        beta: View<'_>,
        save_mean: View<'_>,
        save_invstd: View<'_>,
        dx: ViewMut<'_>,
        dgamma: ViewMut<'_>,
        dbeta: ViewMut<'_>,
        accumulate_dx: bool,
        sync: SumOverRanks<'_>,
    ) {
        // the fused ReLU's gate is recomputed from x, gamma and beta, as on the CPU: y unread
        let p = NormParams {
            x: x.ptr,
            dy: dy.ptr,
            beta: beta.ptr,
            gamma: gamma.ptr,
            save_mean: save_mean.ptr,
            save_invstd: save_invstd.ptr,
            y: dx.ptr,
            dgamma: dgamma.ptr,
            dbeta: dbeta.ptr,
            accumulate: accumulate_dx as u32,
            ..norm_params(s)
        };
        if s.c > 0 {
            self.record(self.batchnorm_backward_sums(p, s, sync));
        }
    }

    fn relu_forward(&self, x: View<'_>, y: ViewMut<'_>) {
        let n = x.len.min(y.len);
        self.elementwise(
            "relu_forward_f32",
            n,
            ReluParams {
                x: x.ptr,
                y: y.ptr,
                n: n as i64,
            },
        );
    }
    fn relu_backward(&self, y: View<'_>, dy: View<'_>, dx: ViewMut<'_>, accumulate: bool) {
        let n = dx.len;
        let p = ReluBackwardParams {
            y: y.ptr,
            dy: dy.ptr,
            dx: dx.ptr,
            n: n as i64,
            accumulate: accumulate as u32,
            pad: 0,
        };
        self.elementwise("relu_backward_f32", n, p);
    }
    fn add_forward(&self, a: View<'_>, b: View<'_>, y: ViewMut<'_>) {
        let n = y.len;
        self.elementwise(
            "add_forward_f32",
            n,
            AddParams {
                a: a.ptr,
                b: b.ptr,
                y: y.ptr,
                n: n as i64,
            },
        );
    }

    fn maxpool_forward(&self, s: &Pool2d, x: View<'_>, y: ViewMut<'_>) {
        let p = pool_params(s, x.ptr, 0, y.ptr, false);
        self.elementwise("maxpool_forward_f32", s.n * s.c * s.h_out() * s.w_out(), p);
    }
    fn maxpool_backward(&self, s: &Pool2d, x: View<'_>, _y: View<'_>, dy: View<'_>, dx: ViewMut<'_>, accumulate: bool) {
        let p = pool_params(s, x.ptr, dy.ptr, dx.ptr, accumulate);
        self.elementwise("maxpool_backward_f32", s.n * s.c * s.h * s.w, p);
    }
    fn avgpool_forward(&self, n: usize, c: usize, hw: usize, x: View<'_>, y: ViewMut<'_>) {
        let s = Pool2d {
            n,
            c,
            h: hw,
            w: 1,
            k: 1,
            stride: 1,
            pad: 0,
        };
        self.elementwise("avgpool_forward_f32", n * c, pool_params(&s, x.ptr, 0, y.ptr, false));
    }
    fn avgpool_backward(&self, n: usize, c: usize, hw: usize, dy: View<'_>, dx: ViewMut<'_>, accumulate: bool) {
        let s = Pool2d {
            n,
            c,
            h: hw,
            w: 1,
            k: 1,
            stride: 1,
            pad: 0,
        };
        self.elementwise(
            "avgpool_backward_f32",
            n * c * hw,
            pool_params(&s, 0, dy.ptr, dx.ptr, accumulate),
        );
    }

    fn linear_forward(&self, s: &Linear, x: View<'_>, w: View<'_>, b: View<'_>, y: ViewMut<'_>) {
        let conv = linear_as_conv(s);
        let y_ptr = y.ptr;
        self.conv2d_forward(&conv, x, w, y);
        let p = BiasParams {
            b: b.ptr,
            y: y_ptr,
            db: 0,
            n: s.n as i64,
            d: s.d_out as i64,
        };
        self.elementwise("bias_forward_f32", s.n * s.d_out, p);
    }
    fn linear_backward(
        &self,
        s: &Linear,
        x: View<'_>,
        w: View<'_>,
        dy: View<'_>,
        dx: Option<ViewMut<'_>>,
        dw: ViewMut<'_>,
        db: ViewMut<'_>,
        accumulate_dx: bool,
    ) {
        let conv = linear_as_conv(s);
        if let Some(dx) = dx {
            self.conv2d_backward_data(&conv, dy, w, dx, accumulate_dx);
        }
        self.conv2d_backward_filter(&conv, x, dy, dw, false);
        let p = BiasParams {
            b: 0,
            y: dy.ptr,
            db: db.ptr,
            n: s.n as i64,
            d: s.d_out as i64,
        };
        self.elementwise("bias_backward_f32", s.d_out, p);
    }

    fn softmax_xent(
        &self,
        n: usize,
        classes: usize,
        logits: View<'_>,
        labels: View<'_>,
        dlogits: Option<ViewMut<'_>>,
        stats: ViewMut<'_>,
    ) {
        let p = XentParams {
            logits: logits.ptr,
            labels: labels.ptr,
            dlogits: dlogits.as_ref().map_or(0, |d| d.ptr),
            stats: stats.ptr,
            n: n as i64,
            classes: classes as i64,
            with_grad: dlogits.is_some() as u32,
            pad: 0,
        };
        let g = driver::Launch::linear(1, XENT_THREADS);
        self.record(self.driver.launch("softmax_xent_forward_f32", g, p.bytes()));
    }

    fn sgd_step(&self, hp: &Sgd, params: ViewMut<'_>, grads: ViewMut<'_>, momentum: ViewMut<'_>) {
        let n = params.len;
        let p = SgdParams {
            params: params.ptr,
            grads: grads.ptr,
            momentum: momentum.ptr,
            n: n as i64,
            lr: hp.lr,
            mu: hp.momentum,
            wd: hp.weight_decay,
            pad: 0,
        };
        self.elementwise("sgd_forward_f32", n, p);
    }
    fn apply_mask(&self, x: ViewMut<'_>, mask: View<'_>) {
        let n = x.len;
        self.elementwise(
            "mask_forward_f32",
            n,
            MaskParams {
                x: x.ptr,
                mask: mask.ptr,
                n: n as i64,
            },
        );
    }
}

/// A linear layer as a 1x1 convolution over 1x1 images: x `(n, d_in)` is `(n, d_in, 1, 1)`.
fn linear_as_conv(s: &Linear) -> Conv2d {
    Conv2d {
        n: s.n,
        c_in: s.d_in,
        h: 1,
        w: 1,
        c_out: s.d_out,
        kh: 1,
        kw: 1,
        stride: 1,
        pad: 0,
    }
}
