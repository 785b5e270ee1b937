// conv.cu: 2-D convolution forward, backward-data and backward-filter as implicit GEMM.
//
// Each pass is a product C (M x N) = A (M x K) B (K x N) whose B operand is gathered straight
// from the NCHW tensor (no im2col buffer):
//   forward          M = c_out, N = n*ho*wo, K = (tap, c_in);  A = filters (tap, c_in, c_out)
//   backward-data    M = c_in,  N = n*h*w,   K = (tap, c_out); A = filters (tap, c_out, c_in)
//   backward-filter  M = c_out, N = c_in*kh*kw, K = n*ho*wo;   A = dY, B = input patches
// The two tap-major passes run K tap by tap and, inside a tap, over the channels in steps of
// 8: within a step every column reads one source pixel (or the padding) of 8 channels, so its
// bounds are checked once per step and its loads walk the channel planes. Their A operand is
// the filters regrouped tap-major by conv_filters_forward_f32 (into the backend's scratch),
// so the tile's rows are contiguous. The filter gradient runs K over the pixels.
//
// Launch geometry (src/backend/cuda/launch.rs, `conv`): 256 threads per block, one 128 x 128
// tile of C per block, grid (ceil(N'/128), ceil(M/128), phases x splits), N' the columns of
// the largest phase (N with one phase; see tap_major for the phases). Thread (tx, ty) =
// (tid % 16, tid / 16) accumulates an 8 x 8 block of C in registers: rows ty*4 + {0..3} and
// 64 + ty*4 + {0..3}, columns tx*4 + {0..3} and 64 + tx*4 + {0..3} (two float4 reads of each
// operand per K row, conflict-free). K runs in steps of 8; the A and B tiles of a step are
// double-buffered in shared memory (2 operands x 2 buffers x 8 x 132 floats = 16.5 KiB
// static; rows padded from 128 to 132 floats so the filter gradient's transposing stores hit
// 32 banks): each thread loads the next step's 4 + 4 values into registers while the block
// multiplies the current step, then stores them into the other buffer; one barrier per step.
// With splits > 1 (few tiles, or the filter gradient's long K), split z runs K steps
// [z * split_steps, (z+1) * split_steps) into slice z of the partial sums (splits slices,
// each laid out like the output) and conv_reduce_forward_f32 adds the slices in order.
// CPU references: src/backend/cpu/conv.rs (conv2d_forward, conv2d_backward_data,
// conv2d_backward_filter); equal within f32 summation-order rounding.
#include "common.cuh"

#define BM 128         // rows of C per block
#define BN 128         // columns of C per block
#define BK 8           // K per step
#define LDS 132        // floats per K row of a shared tile (BM or BN, padded)
#define TILE (BK * LDS)  // floats per buffer of one operand
#define CONV_THREADS 256

struct ConvParams {
    GPTR(const float) a_src;  // forward, backward-data: regrouped filters; backward-filter: dY
    GPTR(const float) b_src;  // forward: X, backward-data: dY, backward-filter: X
    GPTR(float) out;          // Y, dX or dW; or the split-K partial sums (splits, output)
    i64 n, c_in, h, w, c_out, kh, kw, stride, pad, ho, wo;
    i64 m, ncols;             // the GEMM's M and N
    i64 steps;                // K steps of BK in the whole product (the longest phase's)
    i64 split_steps;          // K steps per split
    i64 phases;               // backward-data with stride > 1: stride^2 phases of dX; else 1
    u32 accumulate;           // out += C instead of out = C (ignored for partial sums)
    u32 partial;              // 1: write the split's partial sums, 0: write the result
};

// acc += the step's A tile (rows) times its B tile (columns), both stored K-row-major.
template <class S>
__device__ __forceinline__ void multiply_step(float (&acc)[8][8], const S& as, const S& bs, i64 base, u32 tx,
                                              u32 ty) {
    UNROLL
    for (int kk = 0; kk < BK; kk++) {
        const i64 row = base + kk * LDS;
        float4 a0 = load4(as, row + ty * 4), a1 = load4(as, row + 64 + ty * 4);
        float4 b0 = load4(bs, row + tx * 4), b1 = load4(bs, row + 64 + tx * 4);
        float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
        UNROLL
        for (int i = 0; i < 8; i++)
            UNROLL
            for (int j = 0; j < 8; j++) acc[i][j] += av[i] * bv[j];
    }
}

// The pipeline of one K step (step = its index from the block's first, 0, 1, ...): store the
// step's loads (A and B element j at offset(j) of the step's buffer) while multiplying the
// previous step's buffer, then the step's one barrier. finish_steps multiplies the last.
template <class S, class Offset>
__device__ __forceinline__ void pipeline_step(float (&acc)[8][8], S& as, S& bs, int step,
                                              const float (&ra)[4], const float (&rb)[4], Offset offset, u32 tx,
                                              u32 ty) {
    const int buf = (step & 1) * TILE;
    if (step > 0) multiply_step(acc, as, bs, TILE - buf, tx, ty);
    UNROLL
    for (int j = 0; j < 4; j++) {
        as[buf + offset(j)] = ra[j];
        bs[buf + offset(j)] = rb[j];
    }
    __syncthreads();
}
template <class S>
__device__ __forceinline__ void finish_steps(float (&acc)[8][8], const S& as, const S& bs, int steps, u32 tx, u32 ty) {
    if (steps > 0) multiply_step(acc, as, bs, ((steps - 1) & 1) * TILE, tx, ty);
}

// A thread's 8 x 8 block of C, zeroed.
__device__ __forceinline__ void zero(float (&acc)[8][8]) {
    UNROLL
    for (int i = 0; i < 8; i++)
        UNROLL
        for (int j = 0; j < 8; j++) acc[i][j] = 0.0f;
}

// Row i (0..7) of a thread's block within the tile, and likewise its column j.
__device__ __forceinline__ i64 local(u32 t, int i) { return (i < 4 ? 0 : 64 - 4) + t * 4 + i; }

// Write a thread's 8 x 8 block of C (columns below `ncols`) to out_index(m, col) of the
// output (+=), or of slice `split` of the partial sums (slices laid out like the output).
template <class Index>
__device__ __forceinline__ void write_block(const ConvParams& p, const float (&acc)[8][8], i64 m0, i64 n0, i64 ncols,
                                            i64 split, u32 tx, u32 ty, Index out_index) {
    UNROLL
    for (int i = 0; i < 8; i++) {
        i64 m = m0 + local(ty, i);
        if (m >= p.m) continue;
        UNROLL
        for (int j = 0; j < 8; j++) {
            i64 col = n0 + local(tx, j);
            if (col >= ncols) continue;
            i64 o = out_index(m, col);
            if (p.partial) {
                p.out[split * p.m * p.ncols + o] = acc[i][j];
            } else {
                p.out[o] = p.accumulate ? p.out[o] + acc[i][j] : acc[i][j];
            }
        }
    }
}

// K steps [begin, end) of split `split` of a product of `steps` steps.
__device__ __forceinline__ void split_range(const ConvParams& p, i64 split, i64 steps, i64* begin, i64* end) {
    *begin = split * p.split_steps;
    *end = *begin + p.split_steps < steps ? *begin + p.split_steps : steps;
}

// The phase a tap-major block works on (see tap_major): its first map row and column, its
// rows and columns, its taps per filter row and column, and the block's K split.
struct Phase {
    int ps, ry, rx, y0, x0, tky, tkx;
    i64 rows, cols, split;
};
template <bool DATA>
__device__ __forceinline__ Phase phase_of(const ConvParams& p) {
    Phase f;
    const int stride = (int)p.stride, pad = (int)p.pad;
    const i64 ch = DATA ? p.h : p.ho, cw = DATA ? p.w : p.wo;
    const i64 splits = gridDim.z / p.phases;
    const int phase = (int)(blockIdx.z / splits);
    f.split = blockIdx.z % splits;
    f.ps = p.phases > 1 ? stride : 1;
    f.ry = phase / f.ps;
    f.rx = phase % f.ps;
    f.y0 = ((f.ry - pad) % f.ps + f.ps) % f.ps;
    f.x0 = ((f.rx - pad) % f.ps + f.ps) % f.ps;
    f.rows = f.y0 < ch ? (ch - f.y0 + f.ps - 1) / f.ps : 0;
    f.cols = f.x0 < cw ? (cw - f.x0 + f.ps - 1) / f.ps : 0;
    f.tky = f.ry < p.kh ? ((int)p.kh - f.ry + f.ps - 1) / f.ps : 0;
    f.tkx = f.rx < p.kw ? ((int)p.kw - f.rx + f.ps - 1) / f.ps : 0;
    return f;
}

// Forward (DATA false) and backward-data (DATA true). The columns are pixels (img, cy, cx)
// of the output map (ch x cw); each reads the source map (sh x sw, `chans` planes per image)
// at the pixel the step's tap (ky, kx) takes it to:
//   forward        sy = cy*stride - pad + ky
//   backward-data  sy = (cy + pad - ky) / stride where that divides exactly
// Backward-data with stride > 1 runs by phases, so that no K step multiplies zeros: phase
// (ry, rx) of dX holds the pixels with (cy + pad) % stride == ry (and likewise x), which only
// the taps ky % stride == ry (kx % stride == rx) reach. blockIdx.z = phase * splits + split;
// the phases write disjoint pixels of dX (or of each partial-sum slice), and a phase without
// taps (a 1x1 filter's odd pixels) writes zeros. Forward and stride 1: one phase, all taps.
template <bool DATA>
__device__ __forceinline__ void tap_major(const ConvParams& p) {
    SHARED(float, as, 2 * TILE);  // as[buffer*TILE + kk*LDS + row]
    SHARED(float, bs, 2 * TILE);  // bs[buffer*TILE + kk*LDS + col]
    const u32 tid = THREAD_INDEX;
    const u32 tx = tid % 16, ty = tid / 16;
    const Phase f = phase_of<DATA>(p);
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    if (n0 >= p.n * f.rows * f.cols) return;  // the whole block: a phase with fewer columns than the grid

    // 32-bit from here on: a filter bank and an image's planes hold fewer than 2^31 floats
    const int chans = (int)(DATA ? p.c_out : p.c_in), m = (int)p.m;
    const int sh = (int)(DATA ? p.ho : p.h), sw = (int)(DATA ? p.wo : p.w), plane = sh * sw;
    const int chunks = (chans + BK - 1) / BK;
    // the loads: this thread's tile row / column `ld` and K rows kq + 2j
    const u32 ld = tid % BM, kq = tid / BM;
    const bool a_in = m0 + ld < p.m;
    const GPTR(const float) a_at = p.a_src + (a_in ? m0 + ld : 0);
    const i64 col = n0 + ld;
    const bool b_in = col < p.n * f.rows * f.cols;
    // the source pixel of tap (u, v) of this phase, (ky, kx) = (ry + ps u, rx + ps v), is
    // (qy + u, qx + v) in the forward, qy = cy*stride - pad; and (qy - u, qx - v) in the
    // data gradient, qy = (cy + pad - ry) / stride, which the phase makes exact
    int qy = 0, qx = 0;
    i64 b_img = 0;
    if (b_in) {
        const int stride = (int)p.stride, pad = (int)p.pad;
        i64 img = col / (f.rows * f.cols), pix = col % (f.rows * f.cols);
        const int cy = f.y0 + f.ps * (int)(pix / f.cols), cx = f.x0 + f.ps * (int)(pix % f.cols);
        qy = DATA ? (cy + pad - f.ry) / stride : cy * stride - pad;
        qx = DATA ? (cx + pad - f.rx) / stride : cx * stride - pad;
        b_img = img * chans * plane;
    }
    const GPTR(const float) b_at = p.b_src + b_img;
    const int kw = (int)p.kw, tkx = f.tkx, tap0 = f.ry * kw + f.rx, tap_u = f.ps * kw, tap_v = f.ps;

    float acc[8][8];
    zero(acc);
    float ra[4], rb[4];
    i64 first, last;
    split_range(p, f.split, (i64)f.tky * f.tkx * chunks, &first, &last);
    const int s0 = (int)first, s1 = (int)last;

    for (int s = s0; s < s1; s++) {
        // this step's registers (the first step's straight into buffer 0)
        const int t = s / chunks, c0 = (s - t * chunks) * BK;
        const int u = t / tkx, v = t - u * tkx, tap = tap0 + u * tap_u + v * tap_v;
        const int sy = DATA ? qy - u : qy + u, sx = DATA ? qx - v : qx + v;
        const bool ok = b_in && sy >= 0 && sy < sh && sx >= 0 && sx < sw;
        UNROLL
        for (int j = 0; j < 4; j++) {
            const int c = c0 + kq + 2 * j;
            ra[j] = (a_in && c < chans) ? a_at[(tap * chans + c) * m] : 0.0f;
            rb[j] = (ok && c < chans) ? b_at[sy * sw + sx + c * plane] : 0.0f;
        }
        pipeline_step(acc, as, bs, s - s0, ra, rb, [&](int j) { return (kq + 2 * j) * LDS + ld; }, tx, ty);
    }
    finish_steps(acc, as, bs, s1 - s0, tx, ty);

    // the phase again (recomputed rather than held in registers through the loop)
    const Phase g = phase_of<DATA>(p);
    const i64 ch = DATA ? p.h : p.ho, cw = DATA ? p.w : p.wo, per_image = g.rows * g.cols;
    write_block(p, acc, m0, n0, p.n * per_image, g.split, tx, ty, [&](i64 row, i64 c) {
        const i64 pix = c % per_image;
        return (c / per_image * p.m + row) * ch * cw + (g.y0 + g.ps * (pix / g.cols)) * cw + g.x0 + g.ps * (pix % g.cols);
    });
}

// Backward-filter: A[co, (img,oy,ox)] = dY; B[(img,oy,ox), (ci,ky,kx)] = the input value the
// tap reads, 0 in the padding. Loads: K row kk = tid % 8 (consecutive pixels), tile rows and
// columns lr + 32j with lr = tid / 8.
__device__ __forceinline__ void filter_gradient(const ConvParams& p) {
    SHARED(float, as, 2 * TILE);
    SHARED(float, bs, 2 * TILE);
    const u32 tid = THREAD_INDEX;
    const u32 tx = tid % 16, ty = tid / 16;
    const i64 m0 = (i64)blockIdx.y * BM, n0 = (i64)blockIdx.x * BN;
    const u32 kk = tid % BK, lr = tid / BK;
    const i64 taps = p.kh * p.kw, hw = p.h * p.w, opix = p.ho * p.wo;
    const i64 k_total = p.n * opix;
    // this thread's four B columns, 32-bit to spare registers: the channel plane's offset in
    // an image (-1 past N) and the tap as ky * 256 + kx
    int c_off[4], tap_yx[4];
    UNROLL
    for (int j = 0; j < 4; j++) {
        i64 col = n0 + lr + 32 * j, tap = col % taps;
        c_off[j] = col < p.ncols ? (int)(col / taps * hw) : -1;
        tap_yx[j] = (int)(tap / p.kw * 256 + tap % p.kw);
    }
    const int stride = (int)p.stride, pad = (int)p.pad;

    float acc[8][8];
    zero(acc);
    float ra[4], rb[4];
    i64 s0, s1;
    split_range(p, blockIdx.z, p.steps, &s0, &s1);

    for (i64 s = s0; s < s1; s++) {
        const i64 k = s * BK + kk;
        const bool k_in = k < k_total;
        const i64 img = k_in ? k / opix : 0, pix = k_in ? k % opix : 0;
        const int oy = (int)(pix / p.wo), ox = (int)(pix % p.wo);
        const i64 a_at = img * p.c_out * opix + pix, b_img = img * p.c_in * hw;
        UNROLL
        for (int j = 0; j < 4; j++) {
            i64 m = m0 + lr + 32 * j;
            ra[j] = (k_in && m < p.m) ? p.a_src[a_at + m * opix] : 0.0f;
            int iy = oy * stride - pad + (tap_yx[j] >> 8), ix = ox * stride - pad + (tap_yx[j] & 255);
            bool ok = k_in && c_off[j] >= 0 && iy >= 0 && iy < p.h && ix >= 0 && ix < p.w;
            rb[j] = ok ? p.b_src[b_img + c_off[j] + (i64)iy * p.w + ix] : 0.0f;
        }
        pipeline_step(acc, as, bs, (int)(s - s0), ra, rb, [&](int j) { return kk * LDS + lr + 32 * j; }, tx, ty);
    }
    finish_steps(acc, as, bs, (int)(s1 - s0), tx, ty);

    write_block(p, acc, m0, n0, p.ncols, blockIdx.z, tx, ty, [&](i64 m, i64 c) { return m * p.ncols + c; });
}

// Two blocks per multiprocessor: at most 128 registers per thread.
LOFT_KERNEL_BOUNDED(conv_forward_f32, ConvParams, CONV_THREADS, 2) { tap_major<false>(p); }
LOFT_KERNEL_BOUNDED(conv_backward_data_f32, ConvParams, CONV_THREADS, 2) { tap_major<true>(p); }
LOFT_KERNEL_BOUNDED(conv_backward_filter_f32, ConvParams, CONV_THREADS, 2) { filter_gradient(p); }

// The filters W (c_out, c_in, taps) regrouped tap-major for the tap-major passes:
// by_input 0 (forward): out (taps, c_in, c_out); by_input 1 (backward-data): out (taps, c_out, c_in).
// Geometry: element-wise (256 threads, grid-stride over the output, whose writes coalesce).
struct FiltersParams {
    GPTR(const float) w;
    GPTR(float) out;
    i64 c_out, c_in, taps;
    u32 by_input;
    u32 pad;
};
LOFT_KERNEL(conv_filters_forward_f32, FiltersParams) {
    GRID_STRIDE(i, p.c_out * p.c_in * p.taps) {
        i64 inner = p.by_input ? p.c_in : p.c_out, middle = p.by_input ? p.c_out : p.c_in;
        i64 a = i % inner, b = i / inner % middle, tap = i / (inner * middle);
        i64 co = p.by_input ? b : a, ci = p.by_input ? a : b;
        p.out[i] = p.w[(co * p.c_in + ci) * p.taps + tap];
    }
}

// out[i] (+)= sum over s < splits of partial[s * len + i], in order of s.
// Geometry: element-wise (256 threads, grid-stride).
struct ReduceParams {
    GPTR(const float) partial;
    GPTR(float) out;
    i64 len;
    i64 splits;
    u32 accumulate;
    u32 pad;
};
LOFT_KERNEL(conv_reduce_forward_f32, ReduceParams) {
    GRID_STRIDE(i, p.len) {
        float v = p.partial[i];
        for (i64 s = 1; s < p.splits; s++) v += p.partial[s * p.len + i];
        p.out[i] = p.accumulate ? p.out[i] + v : v;
    }
}
