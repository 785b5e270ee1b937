// loss.cu: softmax cross-entropy with the correct-count, and the bias of the linear layer.
//
// Launch geometry: softmax_xent: one block of 256 threads (grid 1); thread t handles samples
// t, t + 256, ...; the loss and correct-count partial sums meet in a fixed tree in shared
// memory (2 x 256 doubles = 4 KiB static). bias_forward / bias_backward: element-wise over
// the (n, d) outputs / the d biases (256 threads, grid-stride, no shared memory).
// CPU references: src/backend/cpu/elementwise.rs (softmax_xent; the bias part of
// linear_forward and linear_backward), computed in f64 like the CPU.
#include "common.cuh"

#define XENT_THREADS 256

struct XentParams {
    GPTR(const float) logits;  // (n, classes)
    GPTR(const float) labels;  // (n), class indices as floats
    GPTR(float) dlogits;       // (n, classes), written when with_grad
    GPTR(float) stats;         // (2): sum of losses, correct count
    i64 n, classes;
    u32 with_grad;
    u32 pad;
};

LOFT_KERNEL(softmax_xent_forward_f32, XentParams) {
    SHARED(double, loss_tree, XENT_THREADS);
    SHARED(double, hit_tree, XENT_THREADS);
    const u32 tid = THREAD_INDEX;
    double loss = 0.0, hits = 0.0;
    for (i64 i = tid; i < p.n; i += XENT_THREADS) {
        GPTR(const float) row = p.logits + i * p.classes;
        i64 label = (i64)p.labels[i];
        i64 best = 0;
        double mx = (double)row[0];
        for (i64 j = 0; j < p.classes; j++)
            if ((double)row[j] > mx) {
                mx = (double)row[j];
                best = j;
            }
        double z = 0.0;
        for (i64 j = 0; j < p.classes; j++) z += exp((double)row[j] - mx);
        double lse = mx + log(z);
        loss += lse - (double)row[label];
        hits += best == label ? 1.0 : 0.0;
        if (p.with_grad) {
            for (i64 j = 0; j < p.classes; j++) {
                double q = exp((double)row[j] - lse) - (j == label ? 1.0 : 0.0);
                p.dlogits[i * p.classes + j] = (float)(q / (double)p.n);
            }
        }
    }
    loss_tree[tid] = loss;
    hit_tree[tid] = hits;
    __syncthreads();
    for (u32 half = XENT_THREADS / 2; half > 0; half /= 2) {
        if (tid < half) {
            loss_tree[tid] = loss_tree[tid] + loss_tree[tid + half];
            hit_tree[tid] = hit_tree[tid] + hit_tree[tid + half];
        }
        __syncthreads();
    }
    if (tid == 0) {
        p.stats[0] = (float)loss_tree[0];
        p.stats[1] = (float)hit_tree[0];
    }
}

struct BiasParams {
    GPTR(const float) b;  // (d)
    GPTR(float) y;        // forward: (n, d), bias added; backward: dy (n, d) read
    GPTR(float) db;       // backward: (d)
    i64 n, d;
};

// y[i, o] += b[o]
LOFT_KERNEL(bias_forward_f32, BiasParams) {
    GRID_STRIDE(i, p.n * p.d) { p.y[i] = p.y[i] + p.b[i % p.d]; }
}

// db[o] = sum over i of dy[i, o] (in f64)
LOFT_KERNEL(bias_backward_f32, BiasParams) {
    GRID_STRIDE(o, p.d) {
        double s = 0.0;
        for (i64 i = 0; i < p.n; i++) s += (double)p.y[i * p.d + o];
        p.db[o] = (float)s;
    }
}
