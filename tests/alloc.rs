//! The training hot loop allocates nothing once warmed up (counted by a global allocator).
//!
//! Allocations made inside the gemm crate (its per-call packing buffers) are counted apart:
//! they belong to the dependency, not to loft's code.

use loft::backend::cpu::CpuBackend;
use loft::model::{ArchSpec, Graph, Model, Stem};
use loft::ops::Sgd;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;

fn count() {
    if !loft::backend::cpu::gemm::inside_gemm() {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts them.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const WARMUP: usize = 8;

fn steady_state_allocations(arch: &str, stem: Stem, hw: usize, threads: usize) -> usize {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut spec = ArchSpec::named(arch).unwrap();
        spec.base_width = 4;
        spec.stem = stem;
        let g = Graph::build(&spec, hw, hw, None).unwrap();
        let n = 16;
        let mut m = Model::new(Arc::new(CpuBackend::<f32>::new()), g, n).unwrap();
        m.init(1).unwrap();
        let x = vec![0.25f32; n * 3 * hw * hw];
        let y: Vec<u32> = (0..n as u32).map(|i| i % 10).collect();
        let hp = Sgd {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 5e-4,
        };
        for _ in 0..WARMUP {
            m.set_batch(n, &x, &y).unwrap();
            m.train_step(n, &hp).unwrap();
            m.eval_step(n).unwrap();
        }
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for _ in 0..10 {
            m.set_batch(n, &x, &y).unwrap();
            m.train_step(n, &hp).unwrap();
            m.eval_step(n).unwrap();
        }
        ALLOCATIONS.load(Ordering::SeqCst) - before
    })
}

/// With several threads, rayon's work-stealing deques free memory through crossbeam-epoch,
/// which now and then allocates a bag for its garbage (a few allocations per run, more under
/// load). Anything loft did per op or per step would show up at least 10 times (once per
/// measured step), usually hundreds.
const SCHEDULER_NOISE: usize = 9;

#[test]
fn training_steps_allocate_nothing_after_warmup() {
    for (arch, stem, hw) in [("preresnet18", Stem::Cifar, 16), ("resnet18", Stem::Imagenet, 32)] {
        // one thread: no work stealing, so every allocation would be loft's own
        let n = steady_state_allocations(arch, stem, hw, 1);
        assert_eq!(n, 0, "{arch}: {n} allocations in 10 steady-state steps on one thread");
        let n = steady_state_allocations(arch, stem, hw, 2);
        assert!(
            n <= SCHEDULER_NOISE,
            "{arch}: {n} allocations in 10 steady-state steps on two threads"
        );
    }
}
