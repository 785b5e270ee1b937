//! Op geometry shared by every backend: shapes, output sizes and FLOP counts.
//!
//! Backends never redo shape arithmetic: the model builds these structs once and passes them
//! to the backend's ops. All activations are NCHW, row-major, f32 on the device.

use serde::{Deserialize, Serialize};

/// A 2-D convolution without bias. Input `(n, c_in, h, w)`, weight `(c_out, c_in, kh, kw)`,
/// output `(n, c_out, h_out, w_out)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv2d {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// Output height.
    pub fn h_out(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    /// Output width.
    pub fn w_out(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the im2col matrix: `c_in * kh * kw`.
    pub fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    /// Elements of the input.
    pub fn x_len(&self) -> usize {
        self.n * self.c_in * self.h * self.w
    }
    /// Elements of the output.
    pub fn y_len(&self) -> usize {
        self.n * self.c_out * self.h_out() * self.w_out()
    }
    /// Elements of the weight.
    pub fn w_len(&self) -> usize {
        self.c_out * self.k()
    }
    /// Multiply-adds times two of the forward pass (each backward pass costs the same).
    pub fn flops(&self) -> f64 {
        2.0 * (self.n * self.c_out * self.h_out() * self.w_out()) as f64 * self.k() as f64
    }
    /// The same convolution for a batch of `n`.
    pub fn with_n(&self, n: usize) -> Self {
        Conv2d { n, ..*self }
    }
    /// True for a 1x1 stride-1 unpadded convolution (a plain matrix product per image).
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
}

/// Batch normalisation over `(n, c, hw)`: statistics per channel over n and hw.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchNorm {
    pub n: usize,
    pub c: usize,
    pub hw: usize,
    pub eps: f32,
    /// Running-statistics momentum (PyTorch's convention: new = (1-m) old + m batch).
    pub momentum: f32,
    /// ReLU fused after the normalisation: the forward writes `max(y, 0)`, and the backward
    /// takes the gradient of that output, masked by it (`dy [y > 0]`) before the batch norm's.
    #[serde(default)]
    pub relu: bool,
}

impl BatchNorm {
    /// Elements of the input.
    pub fn len(&self) -> usize {
        self.n * self.c * self.hw
    }
    /// True when the tensor is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Max pooling: input `(n, c, h, w)`, output `(n, c, h_out, w_out)`; padding never wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool2d {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Pool2d {
    /// Output height.
    pub fn h_out(&self) -> usize {
        (self.h + 2 * self.pad - self.k) / self.stride + 1
    }
    /// Output width.
    pub fn w_out(&self) -> usize {
        (self.w + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// Fully connected layer: input `(n, d_in)`, weight `(d_out, d_in)`, bias `(d_out)`,
/// output `(n, d_out)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linear {
    pub n: usize,
    pub d_in: usize,
    pub d_out: usize,
}

/// SGD hyper-parameters for one update (PyTorch semantics, no dampening, no Nesterov).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}
