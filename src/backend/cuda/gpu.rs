//! The real GPU: the CUDA driver API through cudarc, kernels compiled by NVRTC at start-up.
//!
//! One GPU per rank: `cuda:N` picks GPU N; plain `cuda` the rank's local index on its node
//! (OpenMPI's `OMPI_COMM_WORLD_LOCAL_RANK`, Slurm's `SLURM_LOCALID`, or `MPI_LOCALRANKID`)
//! modulo the GPUs present. Every kernel file is compiled once per process for the GPU's
//! architecture (`sm_XY`) and loaded as CUBIN. Launches and copies go to the legacy default
//! stream, in order; [`Driver::sync`] waits for them and reports the first failure (a fault
//! inside a kernel included) as one line.

use super::driver::{DevicePtr, Driver, Launch};
use super::nvrtc;
use crate::{Error, Result};
use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_void, CString};

/// The local rank (index of this process among its node's ranks), from the launcher.
pub fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(0)
}

fn driver_error(what: &str, e: DriverError) -> Error {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Error::Backend(format!("{what}: {name} ({text})"))
}

/// Why `--device cuda` cannot run here, or nothing: the driver library and a GPU are present.
pub fn probe() -> Result<usize> {
    // SAFETY: only tries to load libcuda; no driver call is made when it is absent.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Backend(
            "no NVIDIA CUDA driver on this machine (libcuda.so.1 not found)".into(),
        ));
    }
    cu::init().map_err(|e| driver_error("the NVIDIA driver does not start", e))?;
    let count = cu::device::get_count().map_err(|e| driver_error("counting GPUs", e))?;
    if count <= 0 {
        return Err(Error::Backend("the NVIDIA driver is present but sees no GPU".into()));
    }
    Ok(count as usize)
}

/// A CUDA GPU with the kernels loaded.
pub struct GpuDriver {
    ordinal: usize,
    name: String,
    arch: String,
    ctx: sys::CUcontext,
    max_shared: u32,
    functions: HashMap<String, sys::CUfunction>,
    _modules: Vec<sys::CUmodule>,
}

// SAFETY: the context and module handles are process-wide driver objects; every call that
// uses them first makes the context current on the calling thread (`bind`).
unsafe impl Send for GpuDriver {}
// SAFETY: as above; the driver API is thread-safe for these calls.
unsafe impl Sync for GpuDriver {}

/// Device memory, freed on drop.
pub struct GpuMem {
    ptr: sys::CUdeviceptr,
    ctx: sys::CUcontext,
}

// SAFETY: a device address and its context, both valid from any thread once bound.
unsafe impl Send for GpuMem {}
// SAFETY: shared references only read the address.
unsafe impl Sync for GpuMem {}

impl Drop for GpuMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from malloc_sync in `ctx` and is freed once; a failure here (the
        // context already torn down at exit) leaves nothing to clean up.
        unsafe {
            let _ = cu::ctx::set_current(self.ctx);
            let _ = cu::free_sync(self.ptr);
        }
    }
}

impl GpuDriver {
    /// Open GPU `ordinal` (or the local rank's), compile and load every kernel.
    pub fn new(ordinal: Option<usize>) -> Result<GpuDriver> {
        let count = probe()?;
        let ordinal = match ordinal {
            Some(n) if n >= count => {
                return Err(Error::Backend(format!(
                    "--device cuda:{n}: this machine has {count} GPU(s)"
                )))
            }
            Some(n) => n,
            None => local_rank() % count,
        };
        let dev = cu::device::get(ordinal as i32).map_err(|e| driver_error("opening the GPU", e))?;
        let name = cu::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
        // SAFETY: `dev` came from device::get; the attributes are plain integer queries.
        let (major, minor, max_shared) = unsafe {
            let q = |a| cu::device::get_attribute(dev, a).map_err(|e| driver_error("querying the GPU", e));
            (
                q(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                q(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                q(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
            )
        };
        let arch = format!("sm_{major}{minor}");
        // SAFETY: the primary context of a valid device, retained for the life of the process
        // (never released: buffers may outlive this driver until exit).
        let ctx = unsafe { cu::primary_ctx::retain(dev) }.map_err(|e| driver_error("creating a context", e))?;
        let mut driver = GpuDriver {
            ordinal,
            name,
            arch,
            ctx,
            max_shared: max_shared as u32,
            functions: HashMap::new(),
            _modules: vec![],
        };
        driver.bind()?;
        for (file, src) in nvrtc::sources() {
            let compiled = nvrtc::compile(file, &src, &driver.arch)?;
            // SAFETY: a CUBIN NVRTC just produced for this GPU's architecture; the driver
            // copies it while loading.
            let module = unsafe { cu::module::load_data(compiled.image.as_ptr().cast()) }
                .map_err(|e| driver_error(&format!("loading {file} ({})", driver.arch), e))?;
            for k in &compiled.kernels {
                // SAFETY: `module` is loaded and never unloaded while the driver lives.
                let f = unsafe { cu::module::get_function(module, CString::new(k.name.clone()).unwrap()) }
                    .map_err(|e| driver_error(&format!("kernel {}", k.name), e))?;
                driver.functions.insert(k.name.clone(), f);
            }
            driver._modules.push(module);
        }
        Ok(driver)
    }

    /// Make this GPU's context current on the calling thread.
    fn bind(&self) -> Result<()> {
        // SAFETY: `ctx` is a retained primary context.
        unsafe { cu::ctx::set_current(self.ctx) }.map_err(|e| driver_error("binding the GPU", e))
    }

    /// The GPU's index on this node.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
}

impl Driver for GpuDriver {
    type Mem = GpuMem;

    fn name(&self) -> String {
        format!("cuda:{} ({}, {})", self.ordinal, self.name, self.arch)
    }
    fn max_shared(&self) -> u32 {
        self.max_shared
    }
    fn alloc(&self, bytes: usize) -> Result<GpuMem> {
        self.bind()?;
        // SAFETY: a fresh allocation of at least one byte, zeroed before use.
        unsafe {
            let ptr = cu::malloc_sync(bytes.max(1))
                .map_err(|e| driver_error(&format!("allocating {bytes} bytes on the GPU"), e))?;
            let mem = GpuMem { ptr, ctx: self.ctx };
            cu::memset_d8_sync(ptr, 0, bytes).map_err(|e| driver_error("clearing GPU memory", e))?;
            Ok(mem)
        }
    }
    fn ptr(&self, m: &GpuMem) -> DevicePtr {
        m.ptr
    }
    fn upload(&self, src: &[u8], dst: DevicePtr) -> Result<()> {
        self.bind()?;
        // SAFETY: `dst` lies in a live allocation of at least `src.len()` bytes (the backend
        // checks view bounds); the synchronous copy is ordered after queued launches.
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(|e| driver_error("copying to the GPU", e))
    }
    fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        // SAFETY: as in `upload`, in the other direction.
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(|e| driver_error("copying from the GPU", e))
    }
    fn launch(&self, name: &'static str, g: Launch, params: &[u8]) -> Result<()> {
        self.bind()?;
        let f = *self
            .functions
            .get(name)
            .ok_or_else(|| Error::Backend(format!("kernel {name} is not loaded")))?;
        let mut args = [params.as_ptr() as *mut c_void];
        // SAFETY: `f` takes one argument, the parameter struct these bytes are (mirrored
        // #[repr(C)], checked against the C struct size by the emulated device's tests); the
        // bytes outlive the call, which copies them; the pointers inside are live device
        // allocations borrowed for the op.
        unsafe {
            cu::launch_kernel(
                f,
                (g.grid[0], g.grid[1], g.grid[2]),
                (g.block[0], g.block[1], g.block[2]),
                g.shared,
                cu::stream::null(),
                &mut args,
            )
        }
        .map_err(|e| driver_error(&format!("launching {name} (grid {:?}, block {:?})", g.grid, g.block), e))
    }
    fn sync(&self) -> Result<()> {
        self.bind()?;
        cu::ctx::synchronize().map_err(|e| driver_error("the GPU failed", e))
    }
}
