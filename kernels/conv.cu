// conv.cu: 2-D convolution forward, backward-data and backward-filter as implicit GEMM.
//
// Each pass is a product C (M x N) = A (M x K) B (K x N) whose operands are read straight
// from the NCHW tensors (no im2col buffer):
//   forward          M = c_out, N = n*ho*wo, K = c_in*kh*kw; A = W, B = input patches
//   backward-data    M = c_in,  N = n*h*w,   K = c_out*kh*kw; A = W regrouped, B = dY taps
//   backward-filter  M = c_out, N = c_in*kh*kw, K = n*ho*wo; A = dY, B = input patches
// Launch geometry (src/backend/cuda/launch.rs, `conv`): 256 threads per block, one 64 x 64
// tile of C per block, grid (ceil(N/64), ceil(M/64), splits). Each thread accumulates a 4x4
// block of C in registers over K in steps of 16, staging A and B tiles in shared memory
// (2 x 16 x 64 floats = 8 KiB static). With splits > 1 (backward-filter, where K is the
// large dimension), block z sums one slice of K into `partial` (splits, M, N) and
// conv_reduce_forward_f32 adds the slices in order.
// CPU references: src/backend/cpu/conv.rs (conv2d_forward, conv2d_backward_data,
// conv2d_backward_filter); equal within f32 summation-order rounding.
#include "common.cuh"

#define TILE_M 64
#define TILE_N 64
#define TILE_K 16
#define CONV_THREADS 256

struct ConvParams {
    GPTR(const float) a_src;  // forward: W, backward-data: W, backward-filter: dY
    GPTR(const float) b_src;  // forward: X, backward-data: dY, backward-filter: X
    GPTR(float) out;          // Y, dX or dW; or the split-K partial sums (splits, M, N)
    i64 n, c_in, h, w, c_out, kh, kw, stride, pad, ho, wo;
    i64 m, ncols, k;          // the GEMM's M, N, K
    i64 k_chunk;              // K per split (a multiple of TILE_K)
    u32 accumulate;           // out += C instead of out = C (ignored for partial sums)
    u32 partial;              // 1: write the split's partial sums, 0: write the result
};

// The input value tap (ci,ky,kx) of output pixel (img,oy,ox) reads, 0 in the padding: the
// im2col matrix of forward and backward-filter, one element at a time.
__device__ __forceinline__ float patch(const ConvParams& p, i64 tap, i64 pixel) {
    i64 kx = tap % p.kw, ky = tap / p.kw % p.kh, ci = tap / (p.kw * p.kh);
    i64 ox = pixel % p.wo, oy = pixel / p.wo % p.ho, img = pixel / (p.wo * p.ho);
    i64 iy = oy * p.stride - p.pad + ky, ix = ox * p.stride - p.pad + kx;
    if (iy < 0 || iy >= p.h || ix < 0 || ix >= p.w) return 0.0f;
    return p.b_src[((img * p.c_in + ci) * p.h + iy) * p.w + ix];
}

// forward: A[co, (ci,ky,kx)] = W; B[(ci,ky,kx), (img,oy,ox)] = X or 0 in the padding
struct Forward {
    static __device__ __forceinline__ float a(const ConvParams& p, i64 m, i64 k) {
        return p.a_src[m * p.k + k];
    }
    static __device__ __forceinline__ float b(const ConvParams& p, i64 k, i64 col) { return patch(p, k, col); }
    static __device__ __forceinline__ i64 out_index(const ConvParams& p, i64 m, i64 col) {
        i64 pix = col % (p.ho * p.wo), img = col / (p.ho * p.wo);
        return (img * p.c_out + m) * p.ho * p.wo + pix;
    }
};

// backward-data: A[ci, (co,ky,kx)] = W[co, ci, ky, kx];
// B[(co,ky,kx), (img,iy,ix)] = dY[img, co, oy, ox] where iy = oy*stride - pad + ky
struct BackwardData {
    static __device__ __forceinline__ float a(const ConvParams& p, i64 m, i64 k) {
        i64 tap = k % (p.kh * p.kw), co = k / (p.kh * p.kw);
        return p.a_src[(co * p.c_in + m) * p.kh * p.kw + tap];
    }
    static __device__ __forceinline__ float b(const ConvParams& p, i64 k, i64 col) {
        i64 kx = k % p.kw, ky = k / p.kw % p.kh, co = k / (p.kw * p.kh);
        i64 ix = col % p.w, iy = col / p.w % p.h, img = col / (p.w * p.h);
        i64 ty = iy + p.pad - ky, tx = ix + p.pad - kx;
        if (ty < 0 || tx < 0 || ty % p.stride != 0 || tx % p.stride != 0) return 0.0f;
        i64 oy = ty / p.stride, ox = tx / p.stride;
        if (oy >= p.ho || ox >= p.wo) return 0.0f;
        return p.b_src[((img * p.c_out + co) * p.ho + oy) * p.wo + ox];
    }
    static __device__ __forceinline__ i64 out_index(const ConvParams& p, i64 m, i64 col) {
        i64 pix = col % (p.h * p.w), img = col / (p.h * p.w);
        return (img * p.c_in + m) * p.h * p.w + pix;
    }
};

// backward-filter: A[co, (img,oy,ox)] = dY; B[(img,oy,ox), (ci,ky,kx)] = X patch value
struct BackwardFilter {
    static __device__ __forceinline__ float a(const ConvParams& p, i64 m, i64 k) {
        i64 pix = k % (p.ho * p.wo), img = k / (p.ho * p.wo);
        return p.a_src[(img * p.c_out + m) * p.ho * p.wo + pix];
    }
    static __device__ __forceinline__ float b(const ConvParams& p, i64 k, i64 col) { return patch(p, col, k); }
    static __device__ __forceinline__ i64 out_index(const ConvParams& p, i64 m, i64 col) {
        return m * p.ncols + col;
    }
};

// One 64 x 64 tile of C = A B over this block's slice of K.
template <class Pass>
__device__ __forceinline__ void implicit_gemm(const ConvParams& p) {
    SHARED(float, as, TILE_K * TILE_M);  // as[kk * TILE_M + row]
    SHARED(float, bs, TILE_K * TILE_N);  // bs[kk * TILE_N + col]
    const u32 tid = THREAD_INDEX;
    const u32 tx = tid % 16, ty = tid / 16;
    const i64 m0 = (i64)blockIdx.y * TILE_M, n0 = (i64)blockIdx.x * TILE_N;
    const i64 k_begin = (i64)blockIdx.z * p.k_chunk;
    i64 k_end = k_begin + p.k_chunk;
    if (k_end > p.k) k_end = p.k;

    float acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    for (i64 k0 = k_begin; k0 < k_end; k0 += TILE_K) {
        // stage A: thread reads 4 elements; consecutive threads walk k (contiguous in W)
        for (int l = 0; l < 4; l++) {
            u32 e = tid + l * CONV_THREADS;
            u32 row = e / TILE_K, kk = e % TILE_K;
            i64 m = m0 + row, k = k0 + kk;
            as[kk * TILE_M + row] = (m < p.m && k < k_end) ? Pass::a(p, m, k) : 0.0f;
        }
        // stage B: consecutive threads walk the columns (contiguous output pixels)
        for (int l = 0; l < 4; l++) {
            u32 e = tid + l * CONV_THREADS;
            u32 kk = e / TILE_N, col = e % TILE_N;
            i64 n = n0 + col, k = k0 + kk;
            bs[kk * TILE_N + col] = (n < p.ncols && k < k_end) ? Pass::b(p, k, n) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < TILE_K; kk++) {
            float av[4], bv[4];
            for (int i = 0; i < 4; i++) av[i] = as[kk * TILE_M + ty * 4 + i];
            for (int j = 0; j < 4; j++) bv[j] = bs[kk * TILE_N + tx * 4 + j];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) acc[i][j] += av[i] * bv[j];
        }
        __syncthreads();
    }

    for (int i = 0; i < 4; i++) {
        i64 m = m0 + ty * 4 + i;
        if (m >= p.m) continue;
        for (int j = 0; j < 4; j++) {
            i64 n = n0 + tx * 4 + j;
            if (n >= p.ncols) continue;
            if (p.partial) {
                p.out[((i64)blockIdx.z * p.m + m) * p.ncols + n] = acc[i][j];
            } else {
                i64 o = Pass::out_index(p, m, n);
                p.out[o] = p.accumulate ? p.out[o] + acc[i][j] : acc[i][j];
            }
        }
    }
}

LOFT_KERNEL(conv_forward_f32, ConvParams) { implicit_gemm<Forward>(p); }
LOFT_KERNEL(conv_backward_data_f32, ConvParams) { implicit_gemm<BackwardData>(p); }
LOFT_KERNEL(conv_backward_filter_f32, ConvParams) { implicit_gemm<BackwardFilter>(p); }

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
