// norm.cu: batch normalisation over NCHW: training forward (batch statistics, running
// statistics update), evaluation forward, backward; and the split kernels of synchronized
// batch norm, whose per-channel sums the host adds over the ranks between launches.
//
// Launch geometry (src/backend/cuda/launch.rs, `per_channel`): one block of 256 threads per
// channel (grid.x = c) for the training forward and the backward, which reduce over the
// channel's n*hw elements in f64 (each thread strides over the elements, then a tree in
// shared memory: 2 x 256 doubles = 4 KiB static) and then rewrite the channel's elements;
// evaluation forward is element-wise (256 threads, grid-stride, no shared memory).
// The synchronized kernels use the same per-channel geometry. Per-channel f64 values cross
// to and from the host through `sums` as (hi, lo) float pairs, hi = (float)v and
// lo = (float)(v - hi) (48 bits of the double): the moments kernel writes sums[2c, 2c+1]; the
// forward apply kernel reads the global mean, 1/std and unbiased variance from
// sums[6c .. 6c+6]; the backward sums kernel writes sum dy and sum dy xhat to sums[4c .. 4c+4]
// and the backward apply kernel reads their global values back from there.
// CPU references: src/backend/cpu/norm.rs (forward_train, forward_eval, backward, with and
// without `sync`), with the same f64 statistics, so results agree to f32 rounding of the
// reduction order.
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
    GPTR(float) sums;             // synchronized kernels: per-channel (hi, lo) pairs
    GPTR(const float) out;        // backward with relu: the fused forward's output
    i64 n, c, hw;
    i64 total;                    // synchronized backward apply: samples x hw of the global batch
    float eps, momentum;
    u32 accumulate;               // backward: dx += ...
    u32 phase;                    // moments kernel: 0 the sums of x, 1 the squared deviations
    u32 relu;                     // ReLU fused: forward writes max(y, 0), backward masks dy by out > 0
    u32 pad_;
};

// The forward's output value: through the fused ReLU when p.relu (NaN -> 0, as on the CPU).
__device__ __forceinline__ float relu_if(const NormParams& p, float v) {
    return p.relu && !(v > 0.0f) ? 0.0f : v;
}

// The output gradient at i: dy, masked by the fused ReLU's output when p.relu.
__device__ __forceinline__ float grad_at(const NormParams& p, i64 i) {
    return p.relu && !(p.out[i] > 0.0f) ? 0.0f : p.dy[i];
}

// The training forward's (scale, shift) of channel c from the statistics as saved (rounded
// to float), as the CPU's `fused_affine` computes them.
__device__ __forceinline__ void fused_affine(const NormParams& p, i64 c, float mean, float invstd, float* a, float* b) {
    const double scale = (double)p.gamma[c] * (double)invstd;
    *a = (float)scale;
    *b = (float)((double)p.beta[c] - (double)mean * scale);
}

// A double as two floats, and back.
__device__ __forceinline__ void put_pair(GPTR(float) at, double v) {
    const float hi = (float)v;
    at[0] = hi;
    at[1] = (float)(v - (double)hi);
}
__device__ __forceinline__ double get_pair(GPTR(float) at) {
    return (double)at[0] + (double)at[1];
}

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

// This block's channel c: sum dy and sum dy xhat over its n*hw elements (every thread gets
// both), xhat from the saved mean and 1/std.
__device__ __forceinline__ void backward_sums(const NormParams& p, i64 c, u32 tid, double* sdy, double* sdyx) {
    const i64 m = p.n * p.hw;
    const double mean = (double)p.save_mean[c], invstd = (double)p.save_invstd[c];
    double s = 0.0, sx = 0.0;
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        double g = (double)grad_at(p, i);
        s += g;
        sx += g * ((double)p.x[i] - mean) * invstd;
    }
    *sdy = block_sum(s, tid);
    *sdyx = block_sum(sx, tid);
}

// dx (+)= gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)) over channel c, written as
// a dy + b x + c0; M, the sums: of this batch, or of the global one (synchronized).
__device__ __forceinline__ void write_dx(const NormParams& p, i64 c, u32 tid, double total, double sdy, double sdyx) {
    const i64 m = p.n * p.hw;
    const double mean = (double)p.save_mean[c], invstd = (double)p.save_invstd[c];
    const double k = (double)p.gamma[c] * invstd / total;
    const float a = (float)(k * total);
    const float bx = (float)(-k * sdyx * invstd);
    const float c0 = (float)(k * (-sdy + sdyx * invstd * mean));
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        float v = a * grad_at(p, i) + bx * p.x[i] + c0;
        p.y[i] = p.accumulate ? p.y[i] + v : v;
    }
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
    float a, b;
    fused_affine(p, c, (float)mean, (float)invstd, &a, &b);
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
        p.y[i] = relu_if(p, p.x[i] * a + b);
    }
}

LOFT_KERNEL(batchnorm_eval_forward_f32, NormParams) {
    GRID_STRIDE(i, p.n * p.c * p.hw) {
        i64 c = i / p.hw % p.c;
        double invstd = 1.0 / sqrt((double)p.running_var[c] + (double)p.eps);
        double scale = (double)p.gamma[c] * invstd;
        float a = (float)scale, b = (float)((double)p.beta[c] - (double)p.running_mean[c] * scale);
        p.y[i] = relu_if(p, p.x[i] * a + b);
    }
}

// dx = gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)), written as a dy + b x + c0
LOFT_KERNEL(batchnorm_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x, m = p.n * p.hw;
    double sdy, sdyx;
    backward_sums(p, c, tid, &sdy, &sdyx);
    if (tid == 0) {
        p.dbeta[c] = (float)sdy;
        p.dgamma[c] = (float)sdyx;
    }
    write_dx(p, c, tid, (double)m, sdy, sdyx);
}

// Synchronized forward, reductions: phase 0 writes this rank's sum of x for channel c; phase 1
// reads the global mean from the same slot and writes the sum of squared deviations from it.
LOFT_KERNEL(batchnorm_moments_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x, m = p.n * p.hw;
    const double mean = p.phase == 1 ? get_pair(p.sums + 2 * c) : 0.0;
    double s = 0.0;
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        double v = (double)p.x[channel_index(p, c, e)];
        if (p.phase == 1) {
            v -= mean;
            v *= v;
        }
        s += v;
    }
    s = block_sum(s, tid);
    if (tid == 0) put_pair(p.sums + 2 * c, s);
}

// Synchronized forward, normalisation: the global mean, 1/std and unbiased variance of
// channel c from sums[6c ..]; the rest as in batchnorm_train_forward_f32.
LOFT_KERNEL(batchnorm_apply_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x, m = p.n * p.hw;
    const double mean = get_pair(p.sums + 6 * c);
    const double invstd = get_pair(p.sums + 6 * c + 2);
    float a, b;
    fused_affine(p, c, (float)mean, (float)invstd, &a, &b);
    if (tid == 0) {
        const double mom = (double)p.momentum;
        const double unbiased = get_pair(p.sums + 6 * c + 4);
        p.save_mean[c] = (float)mean;
        p.save_invstd[c] = (float)invstd;
        p.running_mean[c] = (float)((1.0 - mom) * (double)p.running_mean[c] + mom * mean);
        p.running_var[c] = (float)((1.0 - mom) * (double)p.running_var[c] + mom * unbiased);
    }
    for (i64 e = tid; e < m; e += NORM_THREADS) {
        i64 i = channel_index(p, c, e);
        p.y[i] = relu_if(p, p.x[i] * a + b);
    }
}

// Synchronized backward, reductions: this rank's sum dy and sum dy xhat of channel c, into
// dbeta and dgamma and (as pairs) into sums[4c ..].
LOFT_KERNEL(batchnorm_sums_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x;
    double sdy, sdyx;
    backward_sums(p, c, tid, &sdy, &sdyx);
    if (tid == 0) {
        p.dbeta[c] = (float)sdy;
        p.dgamma[c] = (float)sdyx;
        put_pair(p.sums + 4 * c, sdy);
        put_pair(p.sums + 4 * c + 2, sdyx);
    }
}

// Synchronized backward, dx: as batchnorm_backward_f32 with the global sums of sums[4c ..]
// and the global count p.total.
LOFT_KERNEL(batchnorm_apply_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.x;
    write_dx(p, c, tid, (double)p.total, get_pair(p.sums + 4 * c), get_pair(p.sums + 4 * c + 2));
}
