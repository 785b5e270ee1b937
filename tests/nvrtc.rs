//! NVRTC compiles every kernel for sm_80 and sm_90, with no GPU; ptxas's figures are printed
//! and a kernel that spills registers fails. Skipped (with a note) where NVRTC is not
//! installed, unless LOFT_REQUIRE_DATA is set (as `make test` and CI do).

use loft::backend::cuda::emulated::EmulatedDriver;
use loft::backend::cuda::nvrtc;

fn nvrtc_or_skip() -> bool {
    match nvrtc::load() {
        Ok(()) => true,
        Err(e) if std::env::var_os("LOFT_REQUIRE_DATA").is_some() => {
            panic!("LOFT_REQUIRE_DATA is set but NVRTC is missing: {e}")
        }
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    if !nvrtc_or_skip() {
        return;
    }
    let emulated: Vec<&str> = EmulatedDriver::kernels().collect();
    println!("| kernel | arch | registers | shared bytes | stack bytes | spill stores | spill loads |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for arch in ["sm_80", "sm_90"] {
        let mut compiled_names = Vec::new();
        for (file, src) in nvrtc::sources() {
            let c = nvrtc::compile(file, &src, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(!c.image.is_empty(), "{file} {arch}: empty CUBIN");
            for k in &c.kernels {
                println!(
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    k.name, k.arch, k.registers, k.shared_bytes, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
                );
                assert_eq!(
                    k.spill_store_bytes + k.spill_load_bytes,
                    0,
                    "{} spills on {arch}:\n{}",
                    k.name,
                    c.log
                );
                assert!(k.registers > 0, "{}: no register count in the log:\n{}", k.name, c.log);
                compiled_names.push(k.name.clone());
            }
        }
        // the GPU gets every kernel the emulated device runs, and no other
        compiled_names.sort();
        let mut want: Vec<String> = emulated.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(
            compiled_names, want,
            "{arch}: kernels compiled by NVRTC and by the emulation differ"
        );
    }
}

#[test]
fn a_compile_error_shows_nvrtcs_log() {
    if !nvrtc_or_skip() {
        return;
    }
    let bad = "extern \"C\" __global__ void broken_f32(float* x) { x[0] = undeclared_name; }";
    let e = nvrtc::compile("broken.cu", bad, "sm_90")
        .err()
        .expect("a compile error")
        .to_string();
    assert!(e.contains("broken.cu") && e.contains("undeclared_name"), "{e}");
}
