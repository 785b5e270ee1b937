// emulation.h: the CUDA execution model on the host, for kernels compiled as C++.
//
// Included by common.cuh when LOFT_EMULATION is defined (build.rs compiles every kernel
// file that way into the emulated device). What it maps, and how:
//   - threadIdx, blockIdx, blockDim, gridDim: the running fiber's and block's indices;
//   - __syncthreads(): a barrier; runtime.cpp runs a block's threads as fibers, each until
//     it reaches the barrier, in the order the launch asks for (forward, reverse), so a
//     result that depends on the order reveals a missing barrier;
//   - GPTR(T): a pointer whose every access is checked against the live device allocations
//     (an access outside them is an error of the launch, not a crash);
//   - SHARED / DYNAMIC_SHARED: spans in the block's shared-memory arena, bounds-checked,
//     filled with NaN bytes at every block start (a read before a write shows), and counted
//     against the launch's shared-memory limit;
//   - atomicAdd: a real atomic (blocks may one day run on several host threads).
// The runtime side (fibers, allocation registry, limits) is in runtime.cpp.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstring>

typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;

struct dim3 {
    u32 x, y, z;
};

namespace emu {

// Indices of the running thread and block (runtime.cpp).
const dim3& thread_idx();
const dim3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
// Barrier of the block.
void syncthreads();
// `bytes` at `addr` lie inside one live allocation; otherwise the launch fails with `what`.
bool check_global(const void* addr, size_t bytes);
// Record the launch's first failure (the launch returns it); never returns to a bad access.
void fail(const char* what, long long a, long long b);
// The block's shared array for a declaration site (`key`): created by the first thread
// that reaches it, found by the others. `bytes` counts against the shared-memory limit.
void* block_shared(const void* key, size_t bytes, size_t align);
// The launch's dynamic shared memory and its size in bytes.
void* dynamic_shared(size_t* bytes);
// A location that bad accesses read and write instead of the real one.
void* dummy(size_t bytes);

template <class T>
struct gptr {
    T* raw;
    T& operator[](i64 i) const {
        T* a = raw + i;
        if (!check_global(a, sizeof(T))) return *static_cast<T*>(dummy(sizeof(T)));
        return *a;
    }
    T& operator*() const { return (*this)[0]; }
    gptr operator+(i64 o) const { return gptr{raw + o}; }
    gptr operator-(i64 o) const { return gptr{raw - o}; }
};

template <class T>
struct shared_span {
    T* raw;
    i64 n;
    T& operator[](i64 i) const {
        if (i < 0 || i >= n) {
            fail("shared memory index out of bounds (index, length)", i, n);
            return *static_cast<T*>(dummy(sizeof(T)));
        }
        return raw[i];
    }
};

// Shared arrays are 16-byte aligned, as SHARED declares them for the GPU.
template <class T>
inline shared_span<T> make_shared(const void* key, i64 count) {
    size_t align = alignof(T) > 16 ? alignof(T) : 16;
    return shared_span<T>{static_cast<T*>(block_shared(key, sizeof(T) * count, align)), count};
}

template <class T>
inline shared_span<T> make_dynamic() {
    size_t bytes = 0;
    T* raw = static_cast<T*>(dynamic_shared(&bytes));
    return shared_span<T>{raw, (i64)(bytes / sizeof(T))};
}

}  // namespace emu

struct float4 {
    float x, y, z, w;
};

namespace emu {

// load4: four bounds-checked reads, from a 16-byte-aligned element as on the GPU.
inline float4 load4(const shared_span<float>& s, i64 i) {
    if (reinterpret_cast<unsigned long long>(s.raw + i) % 16 != 0) {
        fail("load4 from a shared address that is not 16-byte aligned (index, length)", i, s.n);
        return float4{0, 0, 0, 0};
    }
    return float4{s[i], s[i + 1], s[i + 2], s[i + 3]};
}

inline float atomic_add(float* a, float v) {
    int* bits = reinterpret_cast<int*>(a);
    int expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
        float old;
        std::memcpy(&old, &expected, sizeof old);
        float next = old + v;
        int desired;
        std::memcpy(&desired, &next, sizeof desired);
        if (__atomic_compare_exchange_n(bits, &expected, desired, false, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED))
            return old;
    }
}

}  // namespace emu

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define __syncthreads() emu::syncthreads()
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
// Rounded product and sum, never contracted into a fused multiply-add (build.rs compiles
// the emulation with -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float atomicAdd(emu::gptr<float> a, float v) {
    if (!emu::check_global(a.raw, sizeof(float))) return 0.0f;
    return emu::atomic_add(a.raw, v);
}

#define GPTR(T) emu::gptr<T>
#define UNROLL
#define UNROLL_BY(n)
using emu::load4;
// The entry point the runtime calls: copies the parameter bytes into the struct (refusing a
// size that differs from the Rust mirror's) and runs the body for the current thread.
#define LOFT_KERNEL(name, Params)                                                             \
    static void name##_body(const Params p);                                                  \
    extern "C" void loft_emu_##name(const void* raw, unsigned long long len) {                \
        if (len != sizeof(Params)) {                                                          \
            emu::fail("parameter struct size differs from the kernel's (Rust, C)", (long long)len, \
                      (long long)sizeof(Params));                                             \
            return;                                                                           \
        }                                                                                     \
        Params p;                                                                             \
        std::memcpy(&p, raw, sizeof p);                                                       \
        name##_body(p);                                                                       \
    }                                                                                         \
    static void name##_body(const Params p)
#define LOFT_KERNEL_BOUNDED(name, Params, threads, blocks) LOFT_KERNEL(name, Params)
#define SHARED(T, name, count)         \
    static const char loft_key_##name = 0; \
    emu::shared_span<T> name = emu::make_shared<T>(&loft_key_##name, (count))
#define DYNAMIC_SHARED(T, name) emu::shared_span<T> name = emu::make_dynamic<T>()
