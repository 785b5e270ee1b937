// elementwise.cu: fill, copy, scale, axpy, ReLU, add, mask, the SGD update and the run copy
// (LoFT's gather and scatter of filter slices).
//
// Launch geometry: 1-D grid-stride loops, 256 threads per block, blocks = min(ceil(n/256),
// 4096) (src/backend/cuda/launch.rs, `elementwise`), four elements per thread per pass with
// their loads issued together (grid_stride4 in common.cuh); copy_runs: one block of 256
// threads per run, grid.x = number of runs. No shared memory.
// CPU references: src/backend/cpu/elementwise.rs (fill/copy/scale/axpy/relu_forward/
// relu_backward/add_forward/apply_mask/sgd_step/copy_runs), bit-identical: every element
// is one f32 expression in the same order, products and sums never fused (mul_add).
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
struct Pair {
    float a, b;
};
struct Triple {
    float a, b, c;
};

LOFT_KERNEL(copy_forward_f32, CopyParams) {
    grid_stride4<Pair>(
        p.n, [&](i64 i) { return Pair{p.src[i], p.accumulate ? p.dst[i] : 0.0f}; },
        [&](i64 i, Pair v) { p.dst[i] = p.accumulate ? v.b + v.a : v.a; });
}

// x[i] *= a
struct ScaleParams {
    GPTR(float) x;
    i64 n;
    float a;
    u32 pad;
};
LOFT_KERNEL(scale_forward_f32, ScaleParams) {
    grid_stride4<float>(p.n, [&](i64 i) { return p.x[i]; }, [&](i64 i, float v) { p.x[i] = v * p.a; });
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
    grid_stride4<Pair>(
        p.n, [&](i64 i) { return Pair{p.x[i], p.y[i]}; }, [&](i64 i, Pair v) { p.y[i] = mul_add(p.a, v.a, v.b); });
}

// y = max(x, 0)
struct ReluParams {
    GPTR(const float) x;
    GPTR(float) y;
    i64 n;
};
LOFT_KERNEL(relu_forward_f32, ReluParams) {
    grid_stride4<float>(p.n, [&](i64 i) { return p.x[i]; }, [&](i64 i, float v) { p.y[i] = v > 0.0f ? v : 0.0f; });
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
    grid_stride4<Triple>(
        p.n, [&](i64 i) { return Triple{p.y[i], p.dy[i], p.accumulate ? p.dx[i] : 0.0f}; },
        [&](i64 i, Triple v) {
            float d = v.a > 0.0f ? v.b : 0.0f;
            p.dx[i] = p.accumulate ? v.c + d : d;
        });
}

// y = a + b
struct AddParams {
    GPTR(const float) a;
    GPTR(const float) b;
    GPTR(float) y;
    i64 n;
};
LOFT_KERNEL(add_forward_f32, AddParams) {
    grid_stride4<Pair>(p.n, [&](i64 i) { return Pair{p.a[i], p.b[i]}; }, [&](i64 i, Pair v) { p.y[i] = v.a + v.b; });
}

// x *= mask (a 0/1 mask)
struct MaskParams {
    GPTR(float) x;
    GPTR(const float) mask;
    i64 n;
};
LOFT_KERNEL(mask_forward_f32, MaskParams) {
    grid_stride4<Pair>(p.n, [&](i64 i) { return Pair{p.x[i], p.mask[i]}; }, [&](i64 i, Pair v) { p.x[i] = v.a * v.b; });
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
    grid_stride4<Triple>(
        p.n, [&](i64 i) { return Triple{p.params[i], p.grads[i], p.momentum[i]}; },
        [&](i64 i, Triple v) {
            float d = mul_add(p.wd, v.a, v.b);
            float m = mul_add(p.mu, v.c, d);
            p.grads[i] = d;
            p.momentum[i] = m;
            p.params[i] = __fsub_rn(v.a, __fmul_rn(p.lr, m));
        });
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
