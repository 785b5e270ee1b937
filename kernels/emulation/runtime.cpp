// runtime.cpp: the emulated device's runtime: allocations, launches, fibers and barriers.
//
// A launch runs its blocks one after another on the calling host thread. The threads of a
// block are fibers with their own stacks: the scheduler resumes each in turn (forward or
// reverse order, as the launch asks) until it reaches __syncthreads() or returns, then
// starts the next sweep. Between two barriers the threads therefore run one at a time, to
// completion, in the chosen order: a thread that reads shared memory another thread writes
// without a barrier in between sees a different value in the two orders.
//
// Device memory is host memory from loft_emu_alloc; every access a kernel makes through a
// GPTR is checked against the live allocations, every shared access against its array.
// The first failure of a launch (bad access, barrier reached by only part of the block,
// a parameter struct of the wrong size, a launch over the limits) is returned as text.
//
// C ABI, called from src/backend/cuda/emulated.rs:
//   void* loft_emu_alloc(u64 bytes); void loft_emu_free(void*);
//   int   loft_emu_launch(entry, const LaunchSpec*, const void* params, u64 len, char* err, u64 cap);

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emulation.h"

namespace {

// ---- allocations ----------------------------------------------------------------------

std::mutex g_alloc_mutex;
std::map<uintptr_t, size_t> g_allocs;  // base address -> bytes
// Bumped on every free, so a thread's cached allocation is re-checked after one.
uint64_t g_generation = 0;

// The last few allocations a host thread hit: a kernel's accesses go to a handful of
// buffers, so most checks end here without the lock.
struct AllocCache {
    uintptr_t base[4] = {0, 0, 0, 0};
    size_t bytes[4] = {0, 0, 0, 0};
    uint64_t generation = ~0ull;
    unsigned next = 0;
};
thread_local AllocCache t_cache;

bool find_alloc(uintptr_t a, size_t n) {
    uint64_t gen = __atomic_load_n(&g_generation, __ATOMIC_ACQUIRE);
    AllocCache& c = t_cache;
    if (c.generation == gen) {
        for (int i = 0; i < 4; i++)
            if (a >= c.base[i] && a + n <= c.base[i] + c.bytes[i]) return true;
    } else {
        c = AllocCache{};
        c.generation = gen;
    }
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return false;
    --it;
    if (a + n > it->first + it->second) return false;
    c.base[c.next] = it->first;
    c.bytes[c.next] = it->second;
    c.next = (c.next + 1) % 4;
    return true;
}

// ---- fibers ---------------------------------------------------------------------------

enum class State { Ready, AtBarrier, Done };

struct Fiber {
    void* sp = nullptr;
    dim3 idx{0, 0, 0};
    State state = State::Ready;
};

constexpr size_t kStackBytes = 64 * 1024;
constexpr u32 kMaxThreads = 1024;

typedef void (*Entry)(const void*, unsigned long long);

// What one host thread knows about the launch it is running.
struct Runner {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    void* scheduler_sp = nullptr;
    size_t current = 0;
    dim3 block{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    Entry entry = nullptr;
    const void* params = nullptr;
    unsigned long long params_len = 0;
    bool in_kernel = false;
    // shared memory: [dynamic | static arrays in order of first use]
    std::vector<unsigned char> arena;
    size_t dynamic_bytes = 0, used = 0, limit = 0;
    std::vector<std::pair<const void*, size_t>> arrays;  // declaration key -> offset
    std::vector<unsigned char> overflow;                 // arrays past the limit (failed)
    std::string error;
    alignas(16) unsigned char dummy[256];
};
thread_local Runner t_run;

void record(const std::string& what) {
    if (t_run.error.empty()) t_run.error = what;
}

}  // namespace

// Switch stacks: save the callee-saved registers and the FP control words on the current
// stack, store its pointer in *from, load `to` and restore what it saved there.
extern "C" void loft_emu_switch(void** from, void* to);
#if defined(__x86_64__)
asm(R"(
    .text
    .globl loft_emu_switch
    .type loft_emu_switch,@function
loft_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size loft_emu_switch,.-loft_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#else
#error "the emulated device's fibers are written for x86-64"
#endif

namespace {

[[noreturn]] void fiber_main() {
    Runner& r = t_run;
    r.entry(r.params, r.params_len);
    r.fibers[r.current].state = State::Done;
    loft_emu_switch(&r.fibers[r.current].sp, r.scheduler_sp);
    std::abort();  // a finished fiber is never resumed
}

// A fresh stack whose first switch "returns" into fiber_main with the ABI's alignment.
void* fresh_stack(char* stack) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
    uint64_t* sp = reinterpret_cast<uint64_t*>(top);
    *--sp = 0;                                              // fiber_main's return slot
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);        // ret target
    for (int i = 0; i < 6; i++) *--sp = 0;                  // rbp rbx r12 r13 r14 r15
    --sp;
    uint32_t mxcsr = 0x1F80, fpcw = 0x037F;                 // the ABI's default FP state
    std::memcpy(reinterpret_cast<char*>(sp), &mxcsr, 4);
    std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 4);
    return sp;
}

// Run one block to completion; false when the launch failed.
bool run_block(int order) {
    Runner& r = t_run;
    size_t n = (size_t)r.block_dim.x * r.block_dim.y * r.block_dim.z;
    while (r.stacks.size() < n) r.stacks.push_back(new char[kStackBytes]);
    r.fibers.assign(n, Fiber{});
    for (size_t t = 0; t < n; t++) {
        Fiber& f = r.fibers[t];
        f.idx = dim3{u32(t % r.block_dim.x), u32(t / r.block_dim.x % r.block_dim.y),
                     u32(t / (r.block_dim.x * r.block_dim.y))};
        f.sp = fresh_stack(r.stacks[t]);
    }
    // shared memory: forget the arrays, poison the arena
    r.arrays.clear();
    r.used = r.dynamic_bytes;
    std::memset(r.arena.data(), 0xFF, r.arena.size());
    for (;;) {
        for (size_t k = 0; k < n; k++) {
            size_t t = order == 0 ? k : n - 1 - k;
            if (r.fibers[t].state == State::Done) continue;
            r.fibers[t].state = State::Ready;
            r.current = t;
            loft_emu_switch(&r.scheduler_sp, r.fibers[t].sp);
        }
        size_t done = 0;
        for (const Fiber& f : r.fibers) done += f.state == State::Done;
        if (done == n) return r.error.empty();
        if (done != 0) {
            record("__syncthreads() reached by " + std::to_string(n - done) + " of " +
                   std::to_string(n) + " threads of a block (the others returned)");
            return false;
        }
        if (!r.error.empty()) return false;
    }
}

}  // namespace

namespace emu {

const dim3& thread_idx() { return t_run.fibers[t_run.current].idx; }
const dim3& block_idx() { return t_run.block; }
const dim3& block_dim() { return t_run.block_dim; }
const dim3& grid_dim() { return t_run.grid_dim; }

void syncthreads() {
    Runner& r = t_run;
    r.fibers[r.current].state = State::AtBarrier;
    loft_emu_switch(&r.fibers[r.current].sp, r.scheduler_sp);
}

void fail(const char* what, long long a, long long b) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s: %lld, %lld (block %u,%u,%u thread %u,%u,%u)", what, a, b,
                  t_run.block.x, t_run.block.y, t_run.block.z, thread_idx().x, thread_idx().y,
                  thread_idx().z);
    record(buf);
}

bool check_global(const void* addr, size_t bytes) {
    if (find_alloc(reinterpret_cast<uintptr_t>(addr), bytes)) return true;
    char buf[200];
    std::snprintf(buf, sizeof buf, "global access outside every allocation at %p (%zu bytes)",
                  addr, bytes);
    fail(buf, 0, 0);
    return false;
}

void* block_shared(const void* key, size_t bytes, size_t align) {
    Runner& r = t_run;
    for (const auto& a : r.arrays)
        if (a.first == key) return r.arena.data() + a.second;
    size_t offset = (r.used + align - 1) / align * align;
    if (offset + bytes > r.limit) {
        fail("shared memory over the limit (bytes wanted, limit)", (long long)(offset + bytes),
             (long long)r.limit);
        // somewhere harmless to run on until the block ends
        if (r.overflow.size() < bytes) r.overflow.resize(bytes);
        return r.overflow.data();
    }
    r.used = offset + bytes;
    r.arrays.emplace_back(key, offset);
    return r.arena.data() + offset;
}

void* dynamic_shared(size_t* bytes) {
    *bytes = t_run.dynamic_bytes;
    return t_run.arena.data();
}

void* dummy(size_t bytes) {
    if (bytes > sizeof t_run.dummy) std::abort();
    return t_run.dummy;
}

}  // namespace emu

// The geometry of a launch, mirrored by `LaunchSpec` in src/backend/cuda/emulated.rs.
struct LaunchSpec {
    u32 grid[3];
    u32 block[3];
    u32 dynamic_shared;
    u32 max_shared;  // the device's shared memory per block
    u32 order;       // 0: threads forward, 1: reverse
    u32 pad;
};

extern "C" void* loft_emu_alloc(unsigned long long bytes) {
    size_t n = bytes == 0 ? 1 : bytes;
    void* p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    if (!p) return nullptr;
    std::memset(p, 0, n);
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    g_allocs[reinterpret_cast<uintptr_t>(p)] = bytes;
    return p;
}

extern "C" void loft_emu_free(void* p) {
    {
        std::lock_guard<std::mutex> lock(g_alloc_mutex);
        g_allocs.erase(reinterpret_cast<uintptr_t>(p));
        __atomic_add_fetch(&g_generation, 1, __ATOMIC_RELEASE);
    }
    std::free(p);
}

extern "C" int loft_emu_launch(Entry entry, const LaunchSpec* s, const void* params,
                               unsigned long long params_len, char* err, unsigned long long cap) {
    Runner& r = t_run;
    r.error.clear();
    u64 threads = (u64)s->block[0] * s->block[1] * s->block[2];
    if (threads == 0 || threads > kMaxThreads || s->block[0] > 1024 || s->block[1] > 1024 ||
        s->block[2] > 64)
        record("block of " + std::to_string(s->block[0]) + "x" + std::to_string(s->block[1]) +
               "x" + std::to_string(s->block[2]) + " threads is over the device's limits");
    else if (s->grid[0] == 0 || s->grid[1] == 0 || s->grid[2] == 0 || s->grid[1] > 65535 ||
             s->grid[2] > 65535 || s->grid[0] > 0x7fffffffu)
        record("grid of " + std::to_string(s->grid[0]) + "x" + std::to_string(s->grid[1]) + "x" +
               std::to_string(s->grid[2]) + " blocks is over the device's limits");
    else if (s->dynamic_shared > s->max_shared)
        record("dynamic shared memory of " + std::to_string(s->dynamic_shared) +
               " bytes is over the device's " + std::to_string(s->max_shared));
    if (r.error.empty()) {
        r.entry = entry;
        r.params = params;
        r.params_len = params_len;
        r.block_dim = dim3{s->block[0], s->block[1], s->block[2]};
        r.grid_dim = dim3{s->grid[0], s->grid[1], s->grid[2]};
        r.dynamic_bytes = s->dynamic_shared;
        r.limit = s->max_shared;
        r.arena.assign(s->max_shared, 0);
        r.in_kernel = true;
        for (u32 z = 0; z < s->grid[2] && r.error.empty(); z++)
            for (u32 y = 0; y < s->grid[1] && r.error.empty(); y++)
                for (u32 x = 0; x < s->grid[0] && r.error.empty(); x++) {
                    r.block = dim3{x, y, z};
                    run_block(s->order);
                }
        r.in_kernel = false;
    }
    if (r.error.empty()) return 0;
    if (cap > 0) {
        size_t n = std::min<size_t>(r.error.size(), cap - 1);
        std::memcpy(err, r.error.data(), n);
        err[n] = 0;
    }
    return 1;
}

// The live allocation holding `addr`: 1 and its base and size, or 0.
extern "C" int loft_emu_find(unsigned long long addr, unsigned long long* base,
                             unsigned long long* bytes) {
    std::lock_guard<std::mutex> lock(g_alloc_mutex);
    auto it = g_allocs.upper_bound(addr);
    if (it == g_allocs.begin()) return 0;
    --it;
    if (addr >= it->first + std::max<size_t>(it->second, 1)) return 0;
    *base = it->first;
    *bytes = it->second;
    return 1;
}
