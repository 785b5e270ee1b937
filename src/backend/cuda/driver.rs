//! What the CUDA backend needs from a device: memory, copies, kernel launches, a checked wait.
//!
//! Two drivers implement it: [`super::gpu::GpuDriver`] (a real GPU through cudarc, kernels
//! compiled by NVRTC) and [`super::emulated::EmulatedDriver`] (the same kernels compiled as
//! C++ into this binary, run by the host emulation in `kernels/emulation/`). Everything above
//! the driver (the launch geometry, the parameter structs, the op sequence) is shared, so the
//! emulated device tests all of it but the driver calls.

use crate::Result;

/// A device pointer as kernels see it (64 bits; a host address on the emulated device).
pub type DevicePtr = u64;

/// The geometry of one launch: blocks in the grid, threads per block, dynamic shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory per block.
    pub shared: u32,
}

impl Launch {
    /// A 1-D launch of `blocks` blocks of `threads` threads.
    pub fn linear(blocks: u32, threads: u32) -> Launch {
        Launch {
            grid: [blocks, 1, 1],
            block: [threads, 1, 1],
            shared: 0,
        }
    }
}

/// A kernel's parameter struct: `#[repr(C)]`, mirrored field for field by the struct the
/// kernel declares in `kernels/*.cu`, without padding bytes (explicit `pad` fields instead).
///
/// # Safety
/// The implementing type must be `#[repr(C)]`, contain only integers, floats and
/// [`DevicePtr`]s, and have no implicit padding, so that its bytes are all initialised.
pub unsafe trait KernelParams: Copy + Send + Sync + 'static {
    /// The struct's bytes, as the kernel receives them.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: a padding-free #[repr(C)] struct of plain numbers, so
        // all `size_of::<Self>()` bytes behind `self` are initialised and readable.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), std::mem::size_of::<Self>()) }
    }
}

/// A device that runs the kernels of `kernels/*.cu`.
pub trait Driver: Send + Sync + 'static {
    /// Owned device memory (freed on drop).
    type Mem: Send + Sync;
    /// What the device is, for logs and `summary.json`.
    fn name(&self) -> String;
    /// Shared memory a block may use, in bytes.
    fn max_shared(&self) -> u32;
    /// `bytes` of zeroed device memory.
    fn alloc(&self, bytes: usize) -> Result<Self::Mem>;
    /// The address of an allocation.
    fn ptr(&self, m: &Self::Mem) -> DevicePtr;
    /// Copy host bytes to device address `dst` (which lies in a live allocation).
    fn upload(&self, src: &[u8], dst: DevicePtr) -> Result<()>;
    /// Copy device bytes at `src` to the host.
    fn download(&self, src: DevicePtr, dst: &mut [u8]) -> Result<()>;
    /// Queue kernel `name` with the given geometry and parameter bytes. A failure may be
    /// reported here or only at the next [`Driver::sync`].
    fn launch(&self, name: &'static str, geometry: Launch, params: &[u8]) -> Result<()>;
    /// Wait for every queued launch and copy; the first failure since the last call.
    fn sync(&self) -> Result<()>;
}
