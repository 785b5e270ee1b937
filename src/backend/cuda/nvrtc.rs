//! NVRTC: compiling the embedded kernel sources to GPU code at run time, with ptxas's report.
//!
//! No GPU is needed to compile. NVRTC is loaded at run time (cudarc's dynamic loading) from,
//! in order: `LOFT_NVRTC_DIR`; the wheel `make deps` installs in `.deps/nvrtc` of the source
//! tree this binary was built from; `lib/` beside the binary (a GPU bundle); the system's
//! library path. Each kernel file is compiled on its own, with `kernels/common.cuh` pasted
//! in place of its `#include` (the embedded sources have no folder to include from).
//!
//! [`compile`] returns the CUBIN and, parsed from ptxas's verbose log, each kernel's
//! registers, shared memory, stack and spills: `loft kernels` prints them, and the tests fail
//! on a spill.

use crate::{Error, Result};
use cudarc::nvrtc::{result, sys};
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::OnceLock;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// The kernel files, each with `common.cuh` pasted in: (file name, source).
pub fn sources() -> Vec<(&'static str, String)> {
    FILES
        .iter()
        .map(|(name, src)| (*name, src.replace("#include \"common.cuh\"", COMMON)))
        .collect()
}

/// What ptxas reports for one kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelInfo {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// A compiled kernel file.
pub struct Compiled {
    /// The CUBIN for [`Compiled::arch`].
    pub image: Vec<u8>,
    pub arch: String,
    /// ptxas's report per kernel, in the log's order.
    pub kernels: Vec<KernelInfo>,
    /// NVRTC's log, verbatim.
    pub log: String,
}

/// Folders that may hold `libnvrtc.so.13`, in the order they are tried.
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("LOFT_NVRTC_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/.deps/nvrtc/nvidia/cu13/lib"
    )));
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        dirs.push(exe_dir.join("lib"));
    }
    dirs
}

/// Load NVRTC once per process; the error says where it was looked for.
pub fn load() -> Result<()> {
    static LOADED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            for dir in candidate_dirs() {
                let lib = dir.join("libnvrtc.so.13");
                if !lib.exists() {
                    continue;
                }
                // load the builtins first, so NVRTC's own dlopen of them by name finds them
                for name in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
                    // SAFETY: NVRTC's libraries from NVIDIA's wheel; loading runs only their
                    // own initialisers. They stay loaded for the life of the process.
                    match unsafe { libloading::Library::new(dir.join(name)) } {
                        Ok(l) => std::mem::forget(l),
                        Err(e) => return Err(format!("{}: {e}", dir.join(name).display())),
                    }
                }
                break;
            }
            // SAFETY: probes for the library by name (now loaded, or on the system path).
            if unsafe { sys::is_culib_present() } {
                Ok(())
            } else {
                let looked: Vec<String> = candidate_dirs().iter().map(|d| d.display().to_string()).collect();
                Err(format!(
                    "NVRTC (libnvrtc.so.13) not found in {} or on the library path; `make deps` installs it",
                    looked.join(", ")
                ))
            }
        })
        .clone()
        .map_err(Error::Backend)
}

/// Compile one kernel file (`name`, full source) for `arch` (`sm_80`, `sm_90`, ...). A
/// compile error carries NVRTC's log verbatim.
pub fn compile(name: &str, source: &str, arch: &str) -> Result<Compiled> {
    load()?;
    let src = CString::new(source).map_err(|_| Error::Backend(format!("{name}: NUL byte in the source")))?;
    let cname = CString::new(name).unwrap();
    let prog = result::create_program(&src, Some(&cname)).map_err(|e| Error::Backend(format!("{name}: {e:?}")))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` is a live program from create_program; it is destroyed exactly once,
    // below, after the log and the CUBIN are copied out.
    let compiled = unsafe { result::compile_program(prog, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }
        .map(|raw| {
            // SAFETY: NVRTC's log is a NUL-terminated string in the returned buffer.
            unsafe { CStr::from_ptr(raw.as_ptr()) }.to_string_lossy().into_owned()
        })
        .unwrap_or_default();
    let image = match compiled {
        Ok(()) => cubin(prog),
        Err(e) => Err(Error::Backend(format!(
            "{name} ({arch}) does not compile ({e:?}):\n{log}"
        ))),
    };
    // SAFETY: `prog` is live and not used after this.
    unsafe { result::destroy_program(prog) }.map_err(|e| Error::Backend(format!("{name}: {e:?}")))?;
    let image = image?;
    Ok(Compiled {
        image,
        arch: arch.to_string(),
        kernels: parse_ptxas(&log, arch),
        log,
    })
}

fn cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; NVRTC writes the size, then exactly `size` bytes
    // into a buffer of that length.
    unsafe {
        sys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| Error::Backend(format!("CUBIN size: {e:?}")))?;
        let mut image = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast())
            .result()
            .map_err(|e| Error::Backend(format!("CUBIN: {e:?}")))?;
        Ok(image)
    }
}

/// The number before `unit` in `line` (`"Used 40 registers"` -> 40 for "registers").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let at = line.find(unit)?;
    line[..at].split_whitespace().last()?.parse().ok()
}

/// Per-kernel figures from ptxas's verbose log:
/// ```text
/// ptxas info    : Compiling entry function 'conv_forward_f32' for 'sm_90'
/// ptxas info    : Function properties for conv_forward_f32
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 64 registers, used 1 barriers, 8192 bytes smem, 536 bytes cmem[0]
/// ```
pub fn parse_ptxas(log: &str, arch: &str) -> Vec<KernelInfo> {
    let mut out: Vec<KernelInfo> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelInfo {
                name,
                arch: arch.to_string(),
                ..KernelInfo::default()
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("stack frame") {
                k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
                k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
                k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_before(line, "registers").unwrap_or(0);
                k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_reports_are_parsed_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'a_f32' for 'sm_90'\n\
                   ptxas info    : Function properties for a_f32\n    \
                   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
                   ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem, 536 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'b_f32' for 'sm_90'\n\
                   ptxas info    : Function properties for b_f32\n    \
                   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
                   ptxas info    : Used 12 registers, 380 bytes cmem[0]\n";
        let k = parse_ptxas(log, "sm_90");
        assert_eq!(k.len(), 2);
        assert_eq!(
            k[0],
            KernelInfo {
                name: "a_f32".into(),
                arch: "sm_90".into(),
                registers: 40,
                shared_bytes: 8192,
                stack_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 12
            }
        );
        assert_eq!(
            (
                k[1].name.as_str(),
                k[1].registers,
                k[1].shared_bytes,
                k[1].spill_load_bytes
            ),
            ("b_f32", 12, 0, 0)
        );
    }

    #[test]
    fn every_kernel_file_has_the_common_header_pasted_in() {
        for (name, src) in sources() {
            assert!(!src.contains("#include \"common.cuh\""), "{name}");
            assert!(src.contains("#define LOFT_KERNEL"), "{name}");
        }
    }
}
