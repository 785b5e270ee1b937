//! The emulated device catches what a real GPU would get wrong silently: a missing
//! `__syncthreads()`, an access outside a buffer or a shared array, a barrier in divergent
//! code, shared memory over the limit, a launch over the device's limits; and the kernel
//! tests catch a wrong index in the convolution (a mutant of `kernels/conv.cu` built here).
//!
//! The faulty kernels (`tests/emulation/faulty.cu`) and the mutant are compiled by this test
//! with the system C++ compiler into a shared library with the emulation's runtime, and
//! loaded through `EmulatedDriver::from_library`, the same driver the backend uses.

use loft::backend::cpu::CpuBackend;
use loft::backend::cuda::driver::{DevicePtr, Driver, KernelParams, Launch};
use loft::backend::cuda::emulated::EmulatedDriver;
use loft::backend::cuda::CudaBackend;
use loft::backend::Backend;
use loft::ops::Conv2d;
use loft::rng::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Compile `sources` (C++ or CUDA-as-C++) with the emulation's runtime into a shared library.
fn build_library(name: &str, sources: &[PathBuf]) -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}.so"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut cmd = Command::new(&cxx);
    cmd.args([
        "-std=c++17",
        "-O1",
        "-shared",
        "-fPIC",
        "-Wl,-Bsymbolic",
        "-DLOFT_EMULATION",
    ])
    .arg(format!("-I{ROOT}/kernels"))
    .arg("-o")
    .arg(&out)
    .args(["-x", "c++"])
    .arg(format!("{ROOT}/kernels/emulation/runtime.cpp"));
    for s in sources {
        cmd.args(["-x", "c++"]).arg(s);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{cxx}: {e} (a C++ compiler is needed, as for the build)"));
    assert!(status.success(), "compiling {name} failed");
    out
}

#[repr(C)]
#[derive(Clone, Copy)]
struct FaultyParams {
    x: DevicePtr,
    n: i64,
}
// SAFETY: #[repr(C)] of two 8-byte fields, no padding; mirrors FaultyParams in faulty.cu.
unsafe impl KernelParams for FaultyParams {}

const FAULTY: [&str; 7] = [
    "neighbour_with_barrier_f32",
    "neighbour_without_barrier_f32",
    "global_past_the_end_f32",
    "shared_past_the_end_f32",
    "barrier_in_divergent_code_f32",
    "shared_read_before_write_f32",
    "too_much_shared_f32",
];

/// Launch a faulty kernel on one block of `threads` threads over 64 floats: its output, or
/// the launch's error.
fn run(d: &EmulatedDriver, name: &'static str, threads: u32) -> Result<Vec<f32>, String> {
    let mem = d.alloc(64 * 4).unwrap();
    let p = FaultyParams { x: d.ptr(&mem), n: 64 };
    // a failure may come from the launch or from the next checked point
    let launched = d.launch(name, Launch::linear(1, threads), p.bytes());
    let synced = d.sync();
    launched.and(synced).map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; 64 * 4];
    d.download(d.ptr(&mem), &mut bytes).unwrap();
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes(b.try_into().unwrap()))
        .collect())
}

#[test]
fn the_emulation_catches_races_bad_accesses_divergent_barriers_and_limits() {
    let lib = build_library("faulty", &[PathBuf::from(format!("{ROOT}/tests/emulation/faulty.cu"))]);
    let d = EmulatedDriver::from_library(&lib, &FAULTY).unwrap();

    let good = run(&d, "neighbour_with_barrier_f32", 64).unwrap();
    assert_eq!(good, (0..64).map(|t| ((t + 1) % 64) as f32).collect::<Vec<_>>());

    let expect_error = |name: &'static str, threads: u32, words: &[&str]| {
        let e = run(&d, name, threads).expect_err(name);
        assert!(words.iter().all(|w| e.contains(w)), "{name}: {e}");
        assert!(!e.contains('\n'), "{name}: one line: {e}");
        // the failure was reported once; the device works again after
        assert!(d.sync().is_ok());
    };
    expect_error("neighbour_without_barrier_f32", 64, &["order", "__syncthreads"]);
    expect_error(
        "global_past_the_end_f32",
        64,
        &["global access outside every allocation", "thread 63"],
    );
    expect_error(
        "shared_past_the_end_f32",
        64,
        &["shared memory index out of bounds", "64, 64"],
    );
    expect_error(
        "barrier_in_divergent_code_f32",
        64,
        &["__syncthreads() reached by 32 of 64 threads"],
    );
    expect_error("too_much_shared_f32", 64, &["shared memory over the limit", "65536"]);
    expect_error("neighbour_with_barrier_f32", 2048, &["over the device's limits"]);

    // shared memory starts as NaN: a read before a write shows in the output
    let nan = run(&d, "shared_read_before_write_f32", 64).unwrap();
    assert!(nan.iter().all(|v| v.is_nan()), "{nan:?}");
}

/// `kernels/conv.cu` with one index changed (the forward's source column follows the tap's
/// row `u` where it should follow its column `v`).
fn mutant_conv() -> PathBuf {
    let src = std::fs::read_to_string(format!("{ROOT}/kernels/conv.cu")).unwrap();
    let right = "sx = DATA ? qx - v : qx + v;";
    assert!(src.contains(right), "the mutation's target line is gone from conv.cu");
    let mutant = src.replacen(right, "sx = DATA ? qx - v : qx + u;", 1);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conv_mutant.cu");
    std::fs::write(&path, mutant).unwrap();
    path
}

/// A convolution's forward pass on a backend.
fn conv_forward<B: Backend>(be: &B, s: &Conv2d, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (mut xb, mut wb) = (be.alloc(x.len()).unwrap(), be.alloc(w.len()).unwrap());
    be.upload(x, &mut xb).unwrap();
    be.upload(w, &mut wb).unwrap();
    let mut y = be.alloc(s.y_len()).unwrap();
    be.conv2d_forward(
        s,
        be.view(&xb, 0, x.len()),
        be.view(&wb, 0, w.len()),
        be.view_mut(&mut y, 0, s.y_len()),
    );
    be.sync().unwrap();
    be.download(&y).unwrap()
}

/// Largest |cpu - device| of a convolution forward pass, relative to the largest |cpu|.
fn forward_error<B: Backend>(be: &B, s: &Conv2d) -> f64 {
    let mut rng = Rng::new(7);
    let x: Vec<f32> = (0..s.x_len()).map(|_| rng.uniform() as f32 - 0.5).collect();
    let w: Vec<f32> = (0..s.w_len()).map(|_| rng.uniform() as f32 - 0.5).collect();
    let want = conv_forward(&CpuBackend::<f32>::new(), s, &x, &w);
    let got = conv_forward(be, s, &x, &w);
    let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs() as f64));
    want.iter()
        .zip(&got)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn a_wrong_index_in_the_convolution_kernel_is_caught() {
    let s = Conv2d {
        n: 2,
        c_in: 3,
        h: 7,
        w: 9,
        c_out: 5,
        kh: 3,
        kw: 3,
        stride: 1,
        pad: 1,
    };
    // the source as it is, built the same way: matches the CPU
    let original = build_library("conv_original", &[PathBuf::from(format!("{ROOT}/kernels/conv.cu"))]);
    let ok = CudaBackend::new(
        EmulatedDriver::from_library(&original, &["conv_filters_forward_f32", "conv_forward_f32"]).unwrap(),
    );
    let err = forward_error(&ok, &s);
    assert!(err < 1e-5, "the unmutated kernel differs from the CPU by {err}");
    // the mutant: far outside the kernel tests' tolerance
    let mutant = build_library("conv_mutant", &[mutant_conv()]);
    let bad = CudaBackend::new(
        EmulatedDriver::from_library(&mutant, &["conv_filters_forward_f32", "conv_forward_f32"]).unwrap(),
    );
    let err = forward_error(&bad, &s);
    assert!(err > 1e-2, "the mutant went unnoticed (error {err})");
}
