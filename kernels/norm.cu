// norm.cu: batch normalisation over NCHW: training forward (batch statistics, running
// statistics update), evaluation forward, backward; synchronized batch norm, whose
// per-channel sums the host adds over the ranks between launches, runs the same kernels.
//
// Launch geometry (src/backend/cuda/launch.rs, `norm`): blocks of 256 threads on a grid
// (slices, c): block (s, c) covers images [s * slice_images, (s+1) * slice_images) of channel
// c, enough slices that the grid fills the GPU. Inside a block the threads walk the slice's
// planes without a division per element (`for_slice`). Nothing is reduced across blocks with
// atomics: a reduction kernel writes one f64 partial per block to `partials` (doubles,
// [quantity][c][slice]), and the kernel after it adds channel c's partials in slice order,
// so every block of the channel sees the same bits, run after run. Shared memory: the f64
// tree of block_sum, 256 doubles = 2 KiB static.
//   training forward: partial(phase 0: sum x), partial(phase 1: sum (x - mean)^2), apply
//   backward:         sums (sum dy, sum dy xhat), apply
//   evaluation:       eval (scale and shift from the running statistics, once per block)
// Synchronized: the host reads the partials, adds them per channel in slice order, sums over
// the ranks and hands the global values back through `sums` as (hi, lo) float pairs,
// hi = (float)v and lo = (float)(v - hi) (48 bits of the double): the mean at sums[2c] for
// partial phase 2; mean, 1/std and unbiased variance at sums[6c .. 6c+6] for the forward
// apply (phase 1); sum dy and sum dy xhat at sums[4c .. 4c+4] for the backward apply (phase 1).
// CPU references: src/backend/cpu/norm.rs (forward_train, forward_eval, backward, with and
// without `sync`), with the same f64 statistics, so results agree to f32 rounding of the
// reduction order.
#include "common.cuh"

#define NORM_THREADS 256

struct NormParams {
    GPTR(const float) x;
    GPTR(const float) dy;         // backward only
    GPTR(const float) gamma;
    GPTR(const float) beta;       // forward; backward with the fused ReLU (its gate)
    GPTR(float) running_mean;     // train: updated; eval: read
    GPTR(float) running_var;
    GPTR(float) y;                // forward output, or dx
    GPTR(float) save_mean;        // train: written; backward: read
    GPTR(float) save_invstd;
    GPTR(float) dgamma;           // backward only
    GPTR(float) dbeta;
    GPTR(float) sums;             // synchronized: the global per-channel values as (hi, lo) pairs
    GPTR(double) partials;        // per block sums: [2][c][slices]
    i64 n, c, hw;
    i64 slices, slice_images;     // the grid's x, and the images each slice covers
    i64 total;                    // synchronized backward apply: samples x hw of the global batch
    float eps, momentum;
    u32 accumulate;               // backward: dx += ...
    u32 phase;                    // see each kernel
    u32 relu;                     // ReLU fused: forward writes max(y, 0), backward masks dy by x a + b > 0
    u32 pad_;
};

// The forward's pre-activation x a + b, as a product then a sum (never contracted into one
// fused multiply-add), so the same bits as the CPU's and the backward's recomputed gate.
__device__ __forceinline__ float affine(float x, float a, float b) { return mul_add(x, a, b); }

// The forward's output value: through the fused ReLU when p.relu (NaN -> 0, as on the CPU).
__device__ __forceinline__ float relu_if(const NormParams& p, float v) {
    return p.relu && !(v > 0.0f) ? 0.0f : v;
}

// The output gradient at i: dy, masked when p.relu by the forward's gate recomputed from x
// with the forward's (a, b), as the CPU does (no read of the forward's output).
__device__ __forceinline__ float grad_at(const NormParams& p, i64 i, float a, float b) {
    return p.relu && !(affine(p.x[i], a, b) > 0.0f) ? 0.0f : p.dy[i];
}

// The training forward's (scale, shift) of channel c from the statistics as saved (rounded
// to float), as the CPU's `fused_affine` computes them.
__device__ __forceinline__ void fused_affine(const NormParams& p, i64 c, float mean, float invstd, float* a, float* b) {
    const double scale = (double)p.gamma[c] * (double)invstd;
    *a = (float)scale;
    *b = (float)((double)p.beta[c] - (double)mean * scale);
}

// A double from two floats (hi, lo).
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

// The element indices of this block's slice of channel blockIdx.y, as arithmetic sequences
// seq(start, step, count) for the calling thread. Planes of 256 pixels or more: the threads
// stride over each plane (a sequence per image); smaller planes: 256 / hw images at a time,
// a thread per (image, pixel), one sequence over the images. No index divided per element.
template <class Seq>
__device__ __forceinline__ void slice_sequences(const NormParams& p, u32 tid, Seq seq) {
    const i64 c = blockIdx.y, hw = p.hw;
    const i64 img0 = (i64)blockIdx.x * p.slice_images;
    const i64 img1 = img0 + p.slice_images < p.n ? img0 + p.slice_images : p.n;
    if (hw >= NORM_THREADS) {
        const i64 count = tid < hw ? (hw - tid + NORM_THREADS - 1) / NORM_THREADS : 0;
        for (i64 img = img0; img < img1; img++) seq((img * p.c + c) * hw + tid, (i64)NORM_THREADS, count);
    } else {
        const i64 group = NORM_THREADS / hw, first = img0 + tid / hw;
        if (tid < group * hw && first < img1)
            seq((first * p.c + c) * hw + tid % hw, group * p.c * hw, (img1 - first + group - 1) / group);
    }
}

// f(i) for every element index i of this block's slice (the reductions: loads only, which
// the unrolled loop keeps several of in flight).
template <class F>
__device__ __forceinline__ void for_slice(const NormParams& p, u32 tid, F f) {
    slice_sequences(p, tid, [&](i64 start, i64 step, i64 count) {
        UNROLL_BY(4)
        for (i64 k = 0; k < count; k++) f(start + k * step);
    });
}

// store(i, load(i)) for every element index i of this block's slice, four at a time with
// their loads issued first (a load may not pass a store through a possibly aliasing pointer).
template <class T, class Load, class Store>
__device__ __forceinline__ void stream_slice(const NormParams& p, u32 tid, Load load, Store store) {
    slice_sequences(p, tid, [&](i64 start, i64 step, i64 count) {
        for (i64 k = 0; k < count; k += 4) {
            T v[4];
            UNROLL
            for (int u = 0; u < 4; u++)
                if (k + u < count) v[u] = load(start + (k + u) * step);
            UNROLL
            for (int u = 0; u < 4; u++)
                if (k + u < count) store(start + (k + u) * step, v[u]);
        }
    });
}

// Channel c's sum of quantity q (0 or 1) over the batch: its partials in slice order.
__device__ __forceinline__ double channel_sum(const NormParams& p, int q, i64 c) {
    double s = 0.0;
    for (i64 b = 0; b < p.slices; b++) s += p.partials[(q * p.c + c) * p.slices + b];
    return s;
}

// Thread 0 stores the block's total of v as its partial of quantity q.
__device__ __forceinline__ void put_partial(const NormParams& p, int q, double v, u32 tid) {
    const double total = block_sum(v, tid);
    if (tid == 0) p.partials[(q * p.c + blockIdx.y) * p.slices + blockIdx.x] = total;
}

// Reductions of the training forward. phase 0: sum x. Phase 1: sum (x - mean)^2, the mean
// of this batch (from the phase-0 partials); phase 2: the same about the global mean at
// sums[2c] (synchronized).
LOFT_KERNEL(batchnorm_partial_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.y;
    double s = 0.0;
    if (p.phase == 0) {
        for_slice(p, tid, [&](i64 i) { s += (double)p.x[i]; });
    } else {
        const double mean = p.phase == 1 ? channel_sum(p, 0, c) / (double)(p.n * p.hw) : get_pair(p.sums + 2 * c);
        for_slice(p, tid, [&](i64 i) {
            double d = (double)p.x[i] - mean;
            s += d * d;
        });
    }
    put_partial(p, p.phase == 0 ? 0 : 1, s, tid);
}

// Normalisation of the training forward: y = x a + b (ReLU fused when p.relu) with (a, b)
// from the saved statistics; block (0, c) saves them and updates the running statistics.
// phase 0: this batch's statistics from the partials; phase 1: the global mean, 1/std and
// unbiased variance at sums[6c ..] (synchronized).
LOFT_KERNEL(batchnorm_apply_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.y;
    double mean, invstd, unbiased;
    if (p.phase == 0) {
        const i64 m = p.n * p.hw;
        const double ss = channel_sum(p, 1, c), var = ss / (double)m;
        mean = channel_sum(p, 0, c) / (double)m;
        invstd = 1.0 / sqrt(var + (double)p.eps);
        unbiased = m > 1 ? ss / (double)(m - 1) : var;
    } else {
        mean = get_pair(p.sums + 6 * c);
        invstd = get_pair(p.sums + 6 * c + 2);
        unbiased = get_pair(p.sums + 6 * c + 4);
    }
    float a, b;
    fused_affine(p, c, (float)mean, (float)invstd, &a, &b);
    if (blockIdx.x == 0 && tid == 0) {
        const double mom = (double)p.momentum;
        p.save_mean[c] = (float)mean;
        p.save_invstd[c] = (float)invstd;
        p.running_mean[c] = (float)((1.0 - mom) * (double)p.running_mean[c] + mom * mean);
        p.running_var[c] = (float)((1.0 - mom) * (double)p.running_var[c] + mom * unbiased);
    }
    stream_slice<float>(p, tid, [&](i64 i) { return p.x[i]; }, [&](i64 i, float x) { p.y[i] = relu_if(p, affine(x, a, b)); });
}

// Evaluation forward: scale and shift from the running statistics, once per block.
LOFT_KERNEL(batchnorm_eval_forward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.y;
    const double invstd = 1.0 / sqrt((double)p.running_var[c] + (double)p.eps);
    const double scale = (double)p.gamma[c] * invstd;
    const float a = (float)scale, b = (float)((double)p.beta[c] - (double)p.running_mean[c] * scale);
    stream_slice<float>(p, tid, [&](i64 i) { return p.x[i]; }, [&](i64 i, float x) { p.y[i] = relu_if(p, affine(x, a, b)); });
}

// Reductions of the backward: sum dy (quantity 0) and sum dy xhat (quantity 1) over the
// slice, xhat from the saved mean and 1/std.
LOFT_KERNEL(batchnorm_sums_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.y;
    const double mean = (double)p.save_mean[c], invstd = (double)p.save_invstd[c];
    float ga, gb;
    fused_affine(p, c, p.save_mean[c], p.save_invstd[c], &ga, &gb);
    double s = 0.0, sx = 0.0;
    for_slice(p, tid, [&](i64 i) {
        double g = (double)grad_at(p, i, ga, gb);
        s += g;
        sx += g * ((double)p.x[i] - mean) * invstd;
    });
    put_partial(p, 0, s, tid);
    put_partial(p, 1, sx, tid);
}

// dx (+)= gamma invstd / M (M dy - sum dy - xhat sum(dy xhat)), written as a dy + b x + c0;
// phase 0: M and the sums of this batch (the partials); phase 1: the global sums at
// sums[4c ..] and M = p.total (synchronized). Block (0, c) writes dbeta and dgamma, this
// rank's sums either way.
LOFT_KERNEL(batchnorm_apply_backward_f32, NormParams) {
    const u32 tid = THREAD_INDEX;
    const i64 c = blockIdx.y;
    const double local_dy = channel_sum(p, 0, c), local_dyx = channel_sum(p, 1, c);
    if (blockIdx.x == 0 && tid == 0) {
        p.dbeta[c] = (float)local_dy;
        p.dgamma[c] = (float)local_dyx;
    }
    const bool synced = p.phase == 1;
    const double total = synced ? (double)p.total : (double)(p.n * p.hw);
    const double sdy = synced ? get_pair(p.sums + 4 * c) : local_dy;
    const double sdyx = synced ? get_pair(p.sums + 4 * c + 2) : local_dyx;
    const double mean = (double)p.save_mean[c], invstd = (double)p.save_invstd[c];
    const double k = (double)p.gamma[c] * invstd / total;
    const float a = (float)(k * total);
    const float bx = (float)(-k * sdyx * invstd);
    const float c0 = (float)(k * (-sdy + sdyx * invstd * mean));
    float ga, gb;
    fused_affine(p, c, p.save_mean[c], p.save_invstd[c], &ga, &gb);
    struct In {
        float x, dy, dx;
    };
    stream_slice<In>(
        p, tid, [&](i64 i) { return In{p.x[i], p.dy[i], p.accumulate ? p.y[i] : 0.0f}; },
        [&](i64 i, In v) {
            const float g = p.relu && !(affine(v.x, ga, gb) > 0.0f) ? 0.0f : v.dy;
            const float d = a * g + bx * v.x + c0;
            p.y[i] = p.accumulate ? v.dx + d : d;
        });
}
