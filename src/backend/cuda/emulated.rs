//! The emulated device: the CUDA kernels compiled as C++ into this binary and run on the host.
//!
//! `--device cuda-emu` (a testing device) trains through the CUDA backend on this driver, and
//! the op tests compare it with the CPU backend. Every launch runs twice, its threads once in
//! forward and once in reverse order within each block: the buffers the launch touches are
//! saved before, compared after, and a difference (a missing `__syncthreads()`, a race) fails
//! the launch. Global accesses are checked against the live allocations and shared accesses
//! against their arrays (`kernels/emulation/`); a launch over the device's limits is refused.
//! The launch geometry and parameter structs are the GPU's own (see [`super::launch`]).
//!
//! The kernels and the runtime are normally the ones build.rs compiled into this binary;
//! [`EmulatedDriver::from_library`] loads them from a shared library instead (the tests
//! build deliberately faulty kernels that way, to show the emulation catches them).

use super::driver::{DevicePtr, Driver, Launch};
use crate::{Error, Result};
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::sync::{Arc, Mutex};

type Entry = unsafe extern "C" fn(*const c_void, u64);
include!(concat!(env!("OUT_DIR"), "/emulated_kernels.rs"));

/// Mirrors `LaunchSpec` in `kernels/emulation/runtime.cpp`.
#[repr(C)]
struct LaunchSpec {
    grid: [u32; 3],
    block: [u32; 3],
    dynamic_shared: u32,
    max_shared: u32,
    order: u32,
    pad: u32,
}

extern "C" {
    fn loft_emu_alloc(bytes: u64) -> *mut c_void;
    fn loft_emu_free(p: *mut c_void);
    fn loft_emu_find(addr: u64, base: *mut u64, bytes: *mut u64) -> i32;
    fn loft_emu_launch(
        entry: Entry,
        spec: *const LaunchSpec,
        params: *const c_void,
        len: u64,
        err: *mut c_char,
        cap: u64,
    ) -> i32;
}

type AllocFn = unsafe extern "C" fn(u64) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type FindFn = unsafe extern "C" fn(u64, *mut u64, *mut u64) -> i32;
type LaunchFn = unsafe extern "C" fn(Entry, *const LaunchSpec, *const c_void, u64, *mut c_char, u64) -> i32;

/// The emulation's runtime entry points and kernels: linked into this binary, or loaded from
/// a shared library that stays loaded while anything holds this.
struct Runtime {
    alloc: AllocFn,
    free: FreeFn,
    find: FindFn,
    launch: LaunchFn,
    kernels: Vec<(String, Entry)>,
    _library: Option<libloading::Library>,
}

impl Runtime {
    fn linked() -> Runtime {
        Runtime {
            alloc: loft_emu_alloc,
            free: loft_emu_free,
            find: loft_emu_find,
            launch: loft_emu_launch,
            kernels: ENTRIES.iter().map(|(n, e)| (n.to_string(), *e)).collect(),
            _library: None,
        }
    }

    /// The runtime and the named kernels of a shared library built from
    /// `kernels/emulation/runtime.cpp` and kernel sources compiled with `LOFT_EMULATION`.
    fn load(path: &Path, kernels: &[&str]) -> Result<Runtime> {
        let bad = |e: libloading::Error| Error::Backend(format!("{}: {e}", path.display()));
        // SAFETY: loading runs the library's initialisers; the library is one built from this
        // project's emulation sources, whose initialisers only set up C++ statics.
        let lib = unsafe { libloading::Library::new(path) }.map_err(bad)?;
        // SAFETY: each symbol is looked up with the C signature runtime.cpp and the
        // LOFT_KERNEL macro give it, and the function pointers are kept only as long as
        // the library (held in the same struct).
        unsafe {
            let alloc = *lib.get::<AllocFn>(b"loft_emu_alloc").map_err(bad)?;
            let free = *lib.get::<FreeFn>(b"loft_emu_free").map_err(bad)?;
            let find = *lib.get::<FindFn>(b"loft_emu_find").map_err(bad)?;
            let launch = *lib.get::<LaunchFn>(b"loft_emu_launch").map_err(bad)?;
            let mut found = Vec::new();
            for k in kernels {
                let entry = *lib.get::<Entry>(format!("loft_emu_{k}").as_bytes()).map_err(bad)?;
                found.push((k.to_string(), entry));
            }
            Ok(Runtime {
                alloc,
                free,
                find,
                launch,
                kernels: found,
                _library: Some(lib),
            })
        }
    }
}

/// Shared memory per block the emulated device allows: the 48 KiB a CUDA block gets without
/// opting in to more.
pub const MAX_SHARED: u32 = 48 * 1024;

/// Memory of the emulated device (host memory the runtime registered).
pub struct EmulatedMem {
    ptr: *mut c_void,
    bytes: usize,
    runtime: Arc<Runtime>,
}

// SAFETY: the allocation is plain host memory owned by this value; the runtime's registry of
// allocations is guarded by a mutex, so it may be freed from any thread.
unsafe impl Send for EmulatedMem {}
// SAFETY: shared references only read the address; writes go through the driver's methods.
unsafe impl Sync for EmulatedMem {}

impl Drop for EmulatedMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from this runtime's alloc and is freed exactly once, here.
        unsafe { (self.runtime.free)(self.ptr) };
    }
}

/// The emulated device. `orders` are the thread orders every launch runs in (forward and
/// reverse by default).
pub struct EmulatedDriver {
    orders: Vec<u32>,
    runtime: Arc<Runtime>,
    /// first failure since the last sync
    failure: Mutex<Option<String>>,
}

impl Default for EmulatedDriver {
    fn default() -> Self {
        EmulatedDriver::new()
    }
}

impl EmulatedDriver {
    /// The emulated device, checking every launch in forward and reverse thread order.
    pub fn new() -> Self {
        EmulatedDriver {
            orders: vec![0, 1],
            runtime: Arc::new(Runtime::linked()),
            failure: Mutex::new(None),
        }
    }

    /// The emulated device of a shared library (runtime and `kernels`), e.g. kernels a test
    /// compiled itself; see `tests/emulation.rs`.
    pub fn from_library(path: &Path, kernels: &[&str]) -> Result<Self> {
        Ok(EmulatedDriver {
            runtime: Arc::new(Runtime::load(path, kernels)?),
            ..EmulatedDriver::new()
        })
    }

    /// Names of the kernels compiled into this binary's emulated device.
    pub fn kernels() -> impl Iterator<Item = &'static str> {
        ENTRIES.iter().map(|(n, _)| *n)
    }

    /// The live allocation holding `addr`, as (base, bytes).
    fn allocation_of(&self, addr: u64) -> Option<(u64, usize)> {
        let (mut base, mut bytes) = (0u64, 0u64);
        // SAFETY: the runtime only reads its registry (under its lock) and writes the outputs.
        let found = unsafe { (self.runtime.find)(addr, &mut base, &mut bytes) };
        (found != 0).then_some((base, bytes as usize))
    }

    /// The allocations a parameter struct points into (every aligned 64-bit word that is an
    /// address inside a live allocation), as (base, bytes).
    fn touched(&self, params: &[u8]) -> Vec<(u64, usize)> {
        let mut found: Vec<(u64, usize)> = Vec::new();
        for word in params.chunks_exact(8) {
            let a = u64::from_ne_bytes(word.try_into().unwrap());
            if let Some(alloc) = self.allocation_of(a) {
                if !found.contains(&alloc) {
                    found.push(alloc);
                }
            }
        }
        found
    }

    fn run(&self, entry: Entry, name: &str, geometry: Launch, params: &[u8], order: u32) -> Result<()> {
        let spec = LaunchSpec {
            grid: geometry.grid,
            block: geometry.block,
            dynamic_shared: geometry.shared,
            max_shared: MAX_SHARED,
            order,
            pad: 0,
        };
        let mut err = vec![0u8; 512];
        // SAFETY: `entry` is a kernel entry point from the generated table; `spec`, `params`
        // and `err` outlive the call, which is synchronous; the kernel's pointers were checked
        // by the runtime against live allocations before every access.
        let rc = unsafe {
            (self.runtime.launch)(
                entry,
                &spec,
                params.as_ptr().cast(),
                params.len() as u64,
                err.as_mut_ptr().cast(),
                err.len() as u64,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(Error::Backend(format!(
            "kernel {name} (grid {:?}, block {:?}): {}",
            geometry.grid,
            geometry.block,
            String::from_utf8_lossy(&err[..end])
        )))
    }

    fn launch_checked(&self, name: &str, geometry: Launch, params: &[u8]) -> Result<()> {
        let entry = self
            .runtime
            .kernels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| *e)
            .ok_or_else(|| Error::Backend(format!("kernel {name} is not compiled into the emulated device")))?;
        let touched = self.touched(params);
        let saved: Vec<Vec<u8>> = touched
            .iter()
            .map(|&(base, bytes)| self.bytes_at(base, bytes).to_vec())
            .collect();
        let mut first: Option<Vec<Vec<u8>>> = None;
        for &order in &self.orders {
            if first.is_some() {
                // start again from the launch's inputs
                for (&(base, bytes), s) in touched.iter().zip(&saved) {
                    self.bytes_at_mut(base, bytes).copy_from_slice(s);
                }
            }
            self.run(entry, name, geometry, params, order)?;
            let now: Vec<Vec<u8>> = touched
                .iter()
                .map(|&(base, bytes)| self.bytes_at(base, bytes).to_vec())
                .collect();
            match &first {
                None => first = Some(now),
                Some(f) if *f != now => {
                    return Err(Error::Backend(format!(
                        "kernel {name} (grid {:?}, block {:?}): results depend on the order its threads run in \
                         (a missing __syncthreads() or a race between threads)",
                        geometry.grid, geometry.block
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The bytes of a live allocation.
    fn bytes_at(&self, base: u64, bytes: usize) -> &[u8] {
        // SAFETY: (base, bytes) is a live allocation of this driver (from `touched`), host
        // memory that no kernel is running on (launches are synchronous).
        unsafe { std::slice::from_raw_parts(base as *const u8, bytes) }
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes_at_mut(&self, base: u64, bytes: usize) -> &mut [u8] {
        // SAFETY: as in `bytes_at`; the slice lives only for one copy and nothing else reads
        // or writes the allocation meanwhile.
        unsafe { std::slice::from_raw_parts_mut(base as *mut u8, bytes) }
    }

    /// Check that [addr, addr + bytes) lies in one live allocation.
    fn check_range(&self, addr: u64, bytes: usize, what: &str) -> Result<()> {
        match self.allocation_of(addr) {
            Some((base, len)) if addr + bytes as u64 <= base + len as u64 => Ok(()),
            _ => Err(Error::Backend(format!(
                "{what} of {bytes} bytes at {addr:#x} is outside every allocation"
            ))),
        }
    }
}

impl Driver for EmulatedDriver {
    type Mem = EmulatedMem;

    fn name(&self) -> String {
        "cuda-emu (the CUDA kernels under host emulation; a testing device)".into()
    }
    fn max_shared(&self) -> u32 {
        MAX_SHARED
    }
    fn alloc(&self, bytes: usize) -> Result<EmulatedMem> {
        // SAFETY: the runtime's alloc returns zeroed, registered memory of `bytes` bytes or null.
        let ptr = unsafe { (self.runtime.alloc)(bytes as u64) };
        if ptr.is_null() {
            return Err(Error::Backend(format!(
                "emulated device: out of memory allocating {bytes} bytes"
            )));
        }
        Ok(EmulatedMem {
            ptr,
            bytes,
            runtime: self.runtime.clone(),
        })
    }
    fn ptr(&self, m: &EmulatedMem) -> DevicePtr {
        m.ptr as u64
    }
    fn upload(&self, src: &[u8], dst: DevicePtr) -> Result<()> {
        self.check_range(dst, src.len(), "upload")?;
        self.bytes_at_mut(dst, src.len()).copy_from_slice(src);
        Ok(())
    }
    fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()> {
        self.check_range(src, dst.len(), "download")?;
        dst.copy_from_slice(self.bytes_at(src, dst.len()));
        Ok(())
    }
    fn launch(&self, name: &'static str, geometry: Launch, params: &[u8]) -> Result<()> {
        let r = self.launch_checked(name, geometry, params);
        if let Err(e) = &r {
            self.failure.lock().unwrap().get_or_insert_with(|| e.to_string());
        }
        r
    }
    fn sync(&self) -> Result<()> {
        match self.failure.lock().unwrap().take() {
            None => Ok(()),
            Some(e) => Err(Error::Backend(e)),
        }
    }
}

impl EmulatedMem {
    /// Bytes of the allocation.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
