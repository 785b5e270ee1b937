// faulty.cu: kernels with the bugs the emulated device must catch (tests/emulation.rs).
// Each is launched as one block of 64 threads over a buffer of 64 floats.
#include "common.cuh"

struct FaultyParams {
    GPTR(float) x;  // 64 floats
    i64 n;          // 64
};

// Every thread writes its slot, then reads its neighbour's: correct with the barrier.
LOFT_KERNEL(neighbour_with_barrier_f32, FaultyParams) {
    SHARED(float, s, 64);
    u32 t = threadIdx.x;
    s[t] = (float)t;
    __syncthreads();
    p.x[t] = s[(t + 1) % 64];
}

// The same without the barrier: what a thread reads depends on who ran first.
LOFT_KERNEL(neighbour_without_barrier_f32, FaultyParams) {
    SHARED(float, s, 64);
    u32 t = threadIdx.x;
    s[t] = (float)t;
    p.x[t] = s[(t + 1) % 64];
}

// One element past the end of the buffer.
LOFT_KERNEL(global_past_the_end_f32, FaultyParams) { p.x[threadIdx.x + 1] = 1.0f; }

// One element past the end of a shared array.
LOFT_KERNEL(shared_past_the_end_f32, FaultyParams) {
    SHARED(float, s, 64);
    s[threadIdx.x + 1] = 1.0f;
    __syncthreads();
    p.x[threadIdx.x] = 0.0f;
}

// Half the block returns before a barrier the other half waits at.
LOFT_KERNEL(barrier_in_divergent_code_f32, FaultyParams) {
    if (threadIdx.x % 2 == 1) return;
    __syncthreads();
    p.x[threadIdx.x] = 1.0f;
}

// A shared read before any write: the emulation fills shared memory with NaN bytes.
LOFT_KERNEL(shared_read_before_write_f32, FaultyParams) {
    SHARED(float, s, 64);
    p.x[threadIdx.x] = s[threadIdx.x];
}

// 64 KiB of static shared memory: over the 48 KiB a block gets.
LOFT_KERNEL(too_much_shared_f32, FaultyParams) {
    SHARED(float, s, 16384);
    s[threadIdx.x] = 1.0f;
    __syncthreads();
    p.x[threadIdx.x] = s[threadIdx.x];
}
