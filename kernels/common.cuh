// common.cuh: what every kernel file includes first; one spelling for NVRTC and the emulation.
//
// Kernels are written once and compiled two ways:
//   - by NVRTC for the GPU (LOFT_EMULATION undefined): the macros below are plain CUDA;
//   - as C++ for the host emulation (LOFT_EMULATION defined, see emulation/emulation.h):
//     every block runs its threads as fibers on one host thread, global and shared accesses
//     are bounds-checked, and __syncthreads() is a real barrier between fibers.
//
// Rules for kernel code, so both compilations mean the same thing:
//   - declare an entry point with LOFT_KERNEL(name, Params) { ... }; the body reads its
//     parameters from `p`, a struct mirrored field for field by a #[repr(C)] struct in
//     src/backend/cuda/params.rs (pointers are GPTR(T), 64-bit on both sides);
//   - shared memory only through SHARED(T, name, count) and DYNAMIC_SHARED(T, name);
//   - global memory only through GPTR pointers and indexing (p.x[i], p.x + offset);
//   - every thread of a block reaches every __syncthreads() (no early return before one);
//   - no warp shuffles or warp-synchronous code: reductions go through shared memory.
#pragma once

#ifdef LOFT_EMULATION
#include "emulation/emulation.h"
#else

typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

// A pointer into device memory, as it sits in a parameter struct.
#define GPTR(T) T*
// A kernel entry point taking its parameter struct by value.
#define LOFT_KERNEL(name, Params) extern "C" __global__ void name(const Params p)
// The same, for a kernel launched with at most `threads` threads per block whose registers
// must leave room for `blocks` blocks per multiprocessor.
#define LOFT_KERNEL_BOUNDED(name, Params, threads, blocks) \
    extern "C" __global__ void __launch_bounds__(threads, blocks) name(const Params p)
// Shared memory: a fixed array (16-byte aligned, for load4), and the launch's dynamic shared
// memory.
#define SHARED(T, name, count) __shared__ __align__(16) T name[count]
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]

// Four consecutive floats of a shared array as one 16-byte load; `i` a multiple of 4.
template <class S>
__device__ __forceinline__ float4 load4(const S& s, i64 i) {
    return *reinterpret_cast<const float4*>(&s[i]);
}

// Unroll the loop that follows (constant trip counts over register arrays), or unroll it
// n times (loops over memory: several loads in flight per thread).
#define UNROLL _Pragma("unroll")
#define LOFT_PRAGMA(x) _Pragma(#x)
#define UNROLL_BY(n) LOFT_PRAGMA(unroll n)

#endif

// Threads of the block as one number, and the block's size.
#define THREAD_INDEX (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z))
#define BLOCK_THREADS (blockDim.x * blockDim.y * blockDim.z)

// A rounded product and sum that the compiler may not contract into a fused multiply-add, so
// that a * b + c has the CPU's bits (Rust never contracts).
__device__ __forceinline__ float mul_add(float a, float b, float c) {
    return __fadd_rn(__fmul_rn(a, b), c);
}

// A grid-stride loop over [0, n) that takes four elements per thread per pass, i, i + s,
// i + 2s, i + 3s (s the grid's threads, so each load instruction still reads consecutive
// addresses across a warp): load(j) for all four first, then store(j, v), so four loads are
// in flight per thread (a load may not move above a store through a pointer that could
// alias). Every element once, whatever the grid.
template <class T, class Load, class Store>
__device__ __forceinline__ void grid_stride4(i64 n, Load load, Store store) {
    const i64 s = (i64)blockDim.x * gridDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += 4 * s) {
        T v[4];
        UNROLL
        for (int u = 0; u < 4; u++)
            if (i + u * s < n) v[u] = load(i + u * s);
        UNROLL
        for (int u = 0; u < 4; u++)
            if (i + u * s < n) store(i + u * s, v[u]);
    }
}

// A grid-stride loop over [0, n): every element once, whatever the grid.
#define GRID_STRIDE(i, n)                                                                        \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n);                     \
         i += (i64)blockDim.x * gridDim.x)
