// elementwise.cu: fill, copy, scale, axpy, ReLU, add, mask, the SGD update and the run copy
// (LoFT's gather and scatter of filter slices).
//
// Launch geometry: 1-D grid-stride loops, 256 threads per block, blocks = min(ceil(n/256),
// 4096) (src/backend/cuda/launch.rs, `elementwise`); copy_runs: one block of 256 threads
// per run, grid.x = number of runs. No shared memory.
// CPU references: src/backend/cpu/elementwise.rs (fill/copy/scale/axpy/relu_forward/
// relu_backward/add_forward/apply_mask/sgd_step/copy_runs), bit-identical: every element
// is one f32 expression in the same order.
#include "common.cuh"

// x[i] = value
struct FillParams {
    GPTR(float) x;
    i64 n;
    float value;
    u32 pad;
};
LOFT_KERNEL(fill_forward_f32, FillParams) {
    GRID_STRIDE(i, p.n) { p.x[i] = p.value; }
}

// dst[i] = src[i], or dst[i] += src[i] when accumulate
struct CopyParams {
    GPTR(const float) src;
    GPTR(float) dst;
    i64 n;
    u32 accumulate;
    u32 pad;
};
LOFT_KERNEL(copy_forward_f32, CopyParams) {
    GRID_STRIDE(i, p.n) {
        float v = p.src[i];
        if (p.accumulate) v = p.dst[i] + v;
        p.dst[i] = v;
    }
}

// x[i] *= a
struct ScaleParams {
    GPTR(float) x;
    i64 n;
    float a;
    u32 pad;
};
LOFT_KERNEL(scale_forward_f32, ScaleParams) {
    GRID_STRIDE(i, p.n) { p.x[i] = p.x[i] * p.a; }
}

// y[i] += a x[i]
struct AxpyParams {
    GPTR(const float) x;
    GPTR(float) y;
    i64 n;
    float a;
    u32 pad;
};
LOFT_KERNEL(axpy_forward_f32, AxpyParams) {
    GRID_STRIDE(i, p.n) { p.y[i] = p.y[i] + p.a * p.x[i]; }
}

// y = max(x, 0)
struct ReluParams {
    GPTR(const float) x;
    GPTR(float) y;
    i64 n;
};
LOFT_KERNEL(relu_forward_f32, ReluParams) {
    GRID_STRIDE(i, p.n) {
        float v = p.x[i];
        p.y[i] = v > 0.0f ? v : 0.0f;
    }
}

// dx (+)= dy where y > 0
struct ReluBackwardParams {
    GPTR(const float) y;
    GPTR(const float) dy;
    GPTR(float) dx;
    i64 n;
    u32 accumulate;
    u32 pad;
};
LOFT_KERNEL(relu_backward_f32, ReluBackwardParams) {
    GRID_STRIDE(i, p.n) {
        float d = p.y[i] > 0.0f ? p.dy[i] : 0.0f;
        if (p.accumulate) d = p.dx[i] + d;
        p.dx[i] = d;
    }
}

// y = a + b
struct AddParams {
    GPTR(const float) a;
    GPTR(const float) b;
    GPTR(float) y;
    i64 n;
};
LOFT_KERNEL(add_forward_f32, AddParams) {
    GRID_STRIDE(i, p.n) { p.y[i] = p.a[i] + p.b[i]; }
}

// x *= mask (a 0/1 mask)
struct MaskParams {
    GPTR(float) x;
    GPTR(const float) mask;
    i64 n;
};
LOFT_KERNEL(mask_forward_f32, MaskParams) {
    GRID_STRIDE(i, p.n) { p.x[i] = p.x[i] * p.mask[i]; }
}

// SGD with momentum and weight decay (PyTorch): g += wd p; m = mu m + g; p -= lr m
struct SgdParams {
    GPTR(float) params;
    GPTR(float) grads;
    GPTR(float) momentum;
    i64 n;
    float lr, mu, wd;
    u32 pad;
};
LOFT_KERNEL(sgd_forward_f32, SgdParams) {
    GRID_STRIDE(i, p.n) {
        float w = p.params[i];
        float d = p.grads[i] + p.wd * w;
        float m = p.mu * p.momentum[i] + d;
        p.grads[i] = d;
        p.momentum[i] = m;
        p.params[i] = w - p.lr * m;
    }
}

// For run r of the table (src, dst, len triples of i64): dst[dst_r + j] = src[src_r + j],
// j < len_r. Block r copies run r; runs never overlap in dst.
struct RunsParams {
    GPTR(const i64) runs;  // (count, 3)
    GPTR(const float) src;
    GPTR(float) dst;
    i64 count;
};
LOFT_KERNEL(runs_forward_f32, RunsParams) {
    for (i64 r = blockIdx.x; r < p.count; r += gridDim.x) {
        i64 s = p.runs[3 * r], d = p.runs[3 * r + 1], len = p.runs[3 * r + 2];
        for (i64 j = threadIdx.x; j < len; j += blockDim.x) p.dst[d + j] = p.src[s + j];
    }
}
