//! The kernel table `loft kernels` prints: ptxas's registers, shared memory, stack and
//! spills for every kernel and architecture, beside each kernel's arithmetic intensity.

use super::launch::{CONV_TILE, CONV_TILE_K};
use super::nvrtc::{self, KernelInfo};
use crate::Result;

/// FLOPs per byte of global memory traffic, per element or per tile, from the kernel's
/// loop structure (see `kernels/*.cu`); `None` where it depends on the shape.
pub fn intensity(kernel: &str) -> Option<f64> {
    // (flops, bytes read + written) per element
    let per_element = |flops: f64, words: f64| Some(flops / (4.0 * words));
    match kernel {
        // one 128 x 128 tile per K step of 8: 2*128*128*8 FLOPs over (128 + 128) * 8 floats read
        "conv_forward_f32" | "conv_backward_data_f32" | "conv_backward_filter_f32" => {
            let (t, k) = (CONV_TILE as f64, CONV_TILE_K as f64);
            Some(2.0 * t * t * k / (4.0 * 2.0 * t * k))
        }
        "fill_forward_f32" | "runs_forward_f32" => per_element(0.0, 1.0),
        "copy_forward_f32" => per_element(1.0, 3.0),
        "scale_forward_f32" => per_element(1.0, 2.0),
        "axpy_forward_f32" => per_element(2.0, 3.0),
        "relu_forward_f32" => per_element(1.0, 2.0),
        "relu_backward_f32" => per_element(2.0, 4.0),
        "add_forward_f32" | "mask_forward_f32" => per_element(1.0, 3.0),
        "sgd_forward_f32" => per_element(6.0, 6.0),
        "batchnorm_eval_forward_f32" => per_element(2.0, 2.0),
        // the reductions read x (phase 0: an add, phase 1: a subtract, a multiply, an add);
        // the normalisations read x (and dy) and write y (dx)
        "batchnorm_partial_forward_f32" => per_element(2.0, 1.0),
        "batchnorm_apply_forward_f32" => per_element(2.0, 2.0),
        "batchnorm_sums_backward_f32" => per_element(5.0, 2.0),
        "batchnorm_apply_backward_f32" => per_element(5.0, 3.0),
        "bias_forward_f32" => per_element(1.0, 2.0),
        "avgpool_backward_f32" => per_element(1.0, 2.0),
        // a gather and a write per element
        "conv_filters_forward_f32" => per_element(0.0, 2.0),
        "conv_reduce_forward_f32" => None,
        _ => None,
    }
}

/// Compile every kernel file for each architecture: ptxas's figures per kernel.
pub fn collect(archs: &[&str]) -> Result<Vec<KernelInfo>> {
    let mut all = Vec::new();
    for arch in archs {
        for (file, src) in nvrtc::sources() {
            all.extend(nvrtc::compile(file, &src, arch)?.kernels);
        }
    }
    Ok(all)
}

/// The Markdown table of `rows`.
pub fn markdown(rows: &[KernelInfo]) -> String {
    let mut s = String::from(
        "| kernel | arch | registers | shared bytes | stack bytes | spill stores | spill loads | FLOP/byte |\n\
         |---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for k in rows {
        let ai = intensity(&k.name).map_or("shape-dependent".to_string(), |v| format!("{v:.2}"));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {ai} |\n",
            k.name, k.arch, k.registers, k.shared_bytes, k.stack_bytes, k.spill_store_bytes, k.spill_load_bytes
        ));
    }
    s
}
