// pool.cu: max pooling and global average pooling, forward and backward.
//
// Launch geometry: element-wise (256 threads per block, grid-stride, no shared memory) over
// the outputs (max forward), the inputs (max backward: each input gathers the gradient of
// the windows whose first maximum it is, so no two threads write one element), the (n, c)
// planes (average forward) or the inputs (average backward).
// CPU references: src/backend/cpu/elementwise.rs (maxpool_forward, maxpool_backward,
// avgpool_forward, avgpool_backward), bit-identical: the same window order, the same
// order of additions, the same f64 sums.
#include "common.cuh"

struct PoolParams {
    GPTR(const float) x;
    GPTR(const float) dy;  // backward only
    GPTR(float) y;         // forward output, or dx
    i64 n, c, h, w, k, stride, pad, ho, wo;
    u32 accumulate;
    u32 pad_;
};

// index within the plane of the first maximum of window (oy, ox)
__device__ __forceinline__ i64 argmax_window(const PoolParams& p, GPTR(const float) plane, i64 oy,
                                             i64 ox) {
    i64 best = -1;
    float best_v = 0.0f;
    for (i64 ky = 0; ky < p.k; ky++) {
        i64 iy = oy * p.stride + ky - p.pad;
        if (iy < 0 || iy >= p.h) continue;
        for (i64 kx = 0; kx < p.k; kx++) {
            i64 ix = ox * p.stride + kx - p.pad;
            if (ix < 0 || ix >= p.w) continue;
            float v = plane[iy * p.w + ix];
            if (best < 0 || v > best_v) {
                best = iy * p.w + ix;
                best_v = v;
            }
        }
    }
    return best;
}

LOFT_KERNEL(maxpool_forward_f32, PoolParams) {
    GRID_STRIDE(i, p.n * p.c * p.ho * p.wo) {
        i64 ox = i % p.wo, oy = i / p.wo % p.ho, plane = i / (p.wo * p.ho);
        GPTR(const float) xp = p.x + plane * p.h * p.w;
        p.y[i] = xp[argmax_window(p, xp, oy, ox)];
    }
}

LOFT_KERNEL(maxpool_backward_f32, PoolParams) {
    GRID_STRIDE(i, p.n * p.c * p.h * p.w) {
        i64 ix = i % p.w, iy = i / p.w % p.h, plane = i / (p.w * p.h);
        GPTR(const float) xp = p.x + plane * p.h * p.w;
        float g = p.accumulate ? p.y[i] : 0.0f;
        // the windows that contain (iy, ix), in increasing (oy, ox) as the CPU adds them
        i64 oy_lo = iy + p.pad - (p.k - 1), ox_lo = ix + p.pad - (p.k - 1);
        oy_lo = oy_lo <= 0 ? 0 : (oy_lo + p.stride - 1) / p.stride;
        ox_lo = ox_lo <= 0 ? 0 : (ox_lo + p.stride - 1) / p.stride;
        for (i64 oy = oy_lo; oy < p.ho && oy * p.stride - p.pad <= iy; oy++)
            for (i64 ox = ox_lo; ox < p.wo && ox * p.stride - p.pad <= ix; ox++)
                if (argmax_window(p, xp, oy, ox) == iy * p.w + ix)
                    g += p.dy[(plane * p.ho + oy) * p.wo + ox];
        p.y[i] = g;
    }
}

// y[plane] = mean of x over the plane's h*w elements (summed in f64)
LOFT_KERNEL(avgpool_forward_f32, PoolParams) {
    const i64 hw = p.h * p.w;
    GRID_STRIDE(plane, p.n * p.c) {
        double s = 0.0;
        for (i64 j = 0; j < hw; j++) s += (double)p.x[plane * hw + j];
        p.y[plane] = (float)(s * (1.0 / (double)hw));
    }
}

// dx (+)= dy[plane] / hw
LOFT_KERNEL(avgpool_backward_f32, PoolParams) {
    const i64 hw = p.h * p.w;
    const float inv = (float)(1.0 / (double)hw);
    GRID_STRIDE(i, p.n * p.c * hw) {
        float v = p.dy[i / hw] * inv;
        p.y[i] = p.accumulate ? p.y[i] + v : v;
    }
}
