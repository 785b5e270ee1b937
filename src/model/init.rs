//! Initial weights, drawn on the host so every backend and every rank starts identical.
//!
//! Convolutions: Kaiming normal with fan-out and ReLU gain (std = sqrt(2 / (c_out kh kw))).
//! BN: weight 1, bias 0, running mean 0, running variance 1. Linear: PyTorch's default,
//! uniform in +-1/sqrt(d_in) for weight and bias. Each tensor draws from its own stream,
//! keyed by its name, so adding a tensor never changes the others.

use super::graph::Graph;
use crate::rng::{Purpose, Rng};

fn name_key(name: &str) -> u64 {
    // FNV-1a: stable across platforms and Rust versions.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Initial (parameters, BN statistics) for the graph.
pub fn initial_values(graph: &Graph, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut p = vec![0.0f32; graph.params.total];
    for e in &graph.params.entries {
        let mut rng = Rng::stream(seed, Purpose::Init, &[name_key(&e.name)]);
        let out = &mut p[e.offset..e.offset + e.len];
        if e.name.starts_with("fc.") {
            let bound = 1.0 / (graph.spec.feature_width() as f64).sqrt();
            for v in out {
                *v = ((rng.uniform() * 2.0 - 1.0) * bound) as f32;
            }
        } else if e.shape.len() == 4 {
            let fan_out = (e.shape[0] * e.shape[2] * e.shape[3]) as f64;
            let std = (2.0 / fan_out).sqrt();
            for v in out {
                *v = (rng.normal() * std) as f32;
            }
        } else if e.name.ends_with(".weight") {
            out.fill(1.0);
        }
    }
    let mut s = vec![0.0f32; graph.stats.total];
    for e in &graph.stats.entries {
        if e.name.ends_with("running_var") {
            s[e.offset..e.offset + e.len].fill(1.0);
        }
    }
    (p, s)
}
