// norm.cu: batch normalisation over NCHW: training forward (batch statistics, running
// statistics update), evaluation forward, backward.
//
// Launch geometry (src/backend/cuda/launch.rs, `per_channel`): one block of 256 threads per
// channel (grid.x = c) for the training forward and the backward, which reduce over the
// channel's n*hw elements in f64 (each thread strides over the elements, then a tree in
// shared memory: 2 x 256 doubles = 4 KiB static) and then rewrite the channel's elements;
// evaluation forward is element-wise (256 threads, grid-stride, no shared memory).
// CPU references: src/backend/cpu/norm.rs (forward_train, forward_eval, backward), with the
// same f64 statistics, so results agree to f32 rounding of the reduction order.
#include "common.cuh"

#define NORM_THREADS 256

struct NormParams {
    GPTR(const float) x;
    GPTR(const float) dy;         // backward only
    GPTR(const float) gamma;
    GPTR(const float) beta;       // forward only
    GPTR(float) running_mean;     // train: updated; eval: read
    GPTR(float) running_var;
    GPTR(float) y;                // forward output, or dx
    GPTR(float) save_mean;        // train: written; backward: read
    GPTR(float) save_invstd;
    GPTR(float) dgamma;           // backward only
    GPTR(float) dbeta;
    i64 n, c, hw;
    float eps, momentum;
    u32 accumulate;               // backward: dx += ...
    u32 pad;
};

// Sum of the block's per-thread values; every thread gets the total (the same bits, a
// fixed tree order). Two barriers per call, so the caller may reuse `tree` right after.
__device__ __forceinline__ double block_sum(double v, u32 tid) {
    SHARED(double, tree, NORM_THREADS);
    tree[tid] = v;
    __syncthreads();
    for (u32 half = NORM_THREADS / 2; half > 0; half /= 2) {
        if (tid < half) tree[tid] = tree[tid] + tree[tid + half];
        __syncthreads();
    }
    double total = tree[0];
    __syncthreads();
    return total;
}

// element e of channel c: image e / hw, pixel e % hw
__device__ __forceinline__ i64 channel_index(const NormParams& p, i64 c, i64 e) {
    return ((e / p.hw) * p.c + c) * p.hw + e % p.hw;
}

LOFT_KERNEL(batchnorm_train_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x, m = p.n * p.hw;
    double s = 0.0;
    for (i64 e = tid; e < m; e += NORM_THREADS) s += (double)p.x[channel_index(p, c, e)];
    const double mean = block_sum(s, tid) / (double)m;
    double ss = 0.0;
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        double d = (double)p.x[channel_index(p, c, e)] - mean;
        ss += d * d;
    }
    ss = block_sum(ss, tid);
    const double var = ss / (double)m;
    const double invstd = 1.0 / sqrt(var + (double)p.eps);
    const double scale = (double)p.gamma[c] * invstd;
    const float a = (float)scale, b = (float)((double)p.beta[c] - mean * scale);
    if (tid == 0) {
        const double mom = (double)p.momentum;
        const double unbiased = m > 1 ? ss / (double)(m - 1) : var;
        p.save_mean[c] = (float)mean;
        p.save_invstd[c] = (float)invstd;
        p.running_mean[c] = (float)((1.0 - mom) * (double)p.running_mean[c] + mom * mean);
        p.running_var[c] = (float)((1.0 - mom) * (double)p.running_var[c] + mom * unbiased);
    }
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        p.y[i] = p.x[i] * a + b;
    }
}

LOFT_KERNEL(batchnorm_eval_forward_f32, NormParams) {
    GRID_STRIDE(i, p.n * p.c * p.hw) {
        i64 c = i / p.hw % p.c;
        double invstd = 1.0 / sqrt((double)p.running_var[c] + (double)p.eps);
        double scale = (double)p.gamma[c] * invstd;
        float a = (float)scale, b = (float)((double)p.beta[c] - (double)p.running_mean[c] * scale);
        p.y[i] = p.x[i] * a + b;
    }
}

// dx = gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)), written as a dy + b x + c0
LOFT_KERNEL(batchnorm_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x, m = p.n * p.hw;
    const double mean = (double)p.save_mean[c], invstd = (double)p.save_invstd[c];
    double sdy = 0.0, sdyx = 0.0;
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        double g = (double)p.dy[i];
        sdy += g;
        sdyx += g * ((double)p.x[i] - mean) * invstd;
    }
    sdy = block_sum(sdy, tid);
    sdyx = block_sum(sdyx, tid);
    if (tid == 0) {
        p.dbeta[c] = (float)sdy;
        p.dgamma[c] = (float)sdyx;
    }
    const double k = (double)p.gamma[c] * invstd / (double)m;
    const float a = (float)(k * (double)m);
    const float bx = (float)(-k * sdyx * invstd);
    const float c0 = (float)(k * (-sdy + sdyx * invstd * mean));
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        float v = a * p.dy[i] + bx * p.x[i] + c0;
        p.y[i] = p.accumulate ? p.y[i] + v : v;
    }
}
