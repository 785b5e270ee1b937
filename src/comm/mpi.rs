//! The MPI communicator (OpenMPI through the `mpi` crate), with deterministic collectives and
//! byte accounting.
//!
//! Allreduce runs in two phases so that the summation order is fixed: an all-to-all sends
//! chunk j of every rank's buffer to rank j, rank j sums its S contributions in rank order,
//! and an allgather returns the reduced chunks to everyone. The traffic equals that of a
//! bandwidth-optimal (ring) allreduce: 2 (S-1)/S n elements per rank each way.

use super::accounting::{chunk_len, F32};
use super::{sum_in_rank_order, Comm, Kind, Ledger, Purpose};
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;
use mpi::Count;

/// An MPI communicator over `MPI_COMM_WORLD`.
pub struct MpiComm {
    _universe: mpi::environment::Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    ledger: Ledger,
    /// Scratch: received chunk contributions `(S, chunk)`.
    scratch: Vec<f32>,
    counts: Vec<Count>,
    displs: Vec<Count>,
}

/// True when this process was started by an MPI launcher (mpirun, srun).
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl MpiComm {
    /// Initialise MPI (once per process). `None` if MPI cannot be initialised.
    pub fn init() -> Option<Self> {
        let universe = mpi::initialize()?;
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Some(MpiComm {
            _universe: universe,
            world,
            rank,
            size,
            ledger: Ledger::default(),
            scratch: Vec::new(),
            counts: Vec::new(),
            displs: Vec::new(),
        })
    }

    fn set_partition(&mut self, counts: impl Iterator<Item = usize>) {
        self.counts.clear();
        self.displs.clear();
        let mut off = 0;
        for c in counts {
            self.counts.push(c as Count);
            self.displs.push(off as Count);
            off += c;
        }
    }
}

impl MpiComm {
    /// The deterministic allreduce of one window: an all-to-all of chunks (rank j reduces
    /// chunk j in rank order), then an allgather of the reduced chunks.
    fn allreduce_window(&mut self, buf: &mut [f32]) {
        let (s, r, n) = (self.size, self.rank, buf.len());
        let chunks: Vec<usize> = (0..s)
            .map(|j| chunk_len(n as u64, s as u64, j as u64) as usize)
            .collect();
        let own = chunks[r];
        let chunk_off: usize = chunks[..r].iter().sum();
        // phase 1: chunk j of every rank to rank j
        grow(&mut self.scratch, s * own);
        let send_displs: Vec<Count> = chunks
            .iter()
            .scan(0, |o, &c| {
                let d = *o;
                *o += c;
                Some(d as Count)
            })
            .collect();
        let send_counts: Vec<Count> = chunks.iter().map(|&c| c as Count).collect();
        self.set_partition((0..s).map(|_| own));
        {
            let send = Partition::new(&buf[..], &send_counts[..], &send_displs[..]);
            let mut recv = PartitionMut::new(&mut self.scratch[..s * own], &self.counts[..], &self.displs[..]);
            self.world.all_to_all_varcount_into(&send, &mut recv);
        }
        // reduce own chunk in rank order
        {
            let parts: Vec<&[f32]> = (0..s).map(|j| &self.scratch[j * own..(j + 1) * own]).collect();
            sum_in_rank_order(&parts, &mut buf[chunk_off..chunk_off + own]);
        }
        // phase 2: allgather of the reduced chunks, straight into the buffer (the own chunk
        // is sent from the scratch, which phase 1 no longer needs)
        self.scratch[..own].copy_from_slice(&buf[chunk_off..chunk_off + own]);
        self.set_partition(chunks.iter().copied());
        let mut recv = PartitionMut::new(&mut buf[..], &self.counts[..], &self.displs[..]);
        self.world.all_gather_varcount_into(&self.scratch[..own], &mut recv);
    }
}

fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn allreduce_sum(&mut self, purpose: Purpose, buf: &mut [f32]) {
        let (s, n) = (self.size, buf.len());
        if s == 1 {
            return;
        }
        // windows of a multiple of S elements: every rank sends and receives exactly what one
        // allreduce of the whole buffer would (see accounting::chunk_len), with bounded scratch
        let w = super::window_elements(s);
        for lo in (0..n).step_by(w) {
            self.allreduce_window(&mut buf[lo..(lo + w).min(n)]);
        }
        let own = chunk_len(n as u64, s as u64, self.rank as u64) as usize;
        let elems = (n - own) + (s - 1) * own;
        self.ledger
            .record(purpose, Kind::Allreduce, F32 * elems as u64, F32 * elems as u64);
    }

    fn allreduce_sum_f64(&mut self, purpose: Purpose, buf: &mut [f64]) {
        let s = self.size;
        if s == 1 {
            return;
        }
        let n = buf.len();
        let mut all = vec![0f64; n * s];
        self.world.all_gather_into(&buf[..], &mut all[..]);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = all[i];
            for j in 1..s {
                *b += all[j * n + i];
            }
        }
        let bytes = 8 * n as u64;
        self.ledger
            .record(purpose, Kind::Allgather, bytes * (s as u64 - 1), bytes * (s as u64 - 1));
    }

    fn allgatherv(&mut self, purpose: Purpose, send: &[f32], counts: &[usize], recv: &mut [f32]) {
        assert_eq!(counts.len(), self.size, "allgatherv: one count per rank");
        assert_eq!(counts[self.rank], send.len(), "allgatherv: own count");
        let total: usize = counts.iter().sum();
        self.set_partition(counts.iter().copied());
        {
            let mut part = PartitionMut::new(&mut recv[..total], &self.counts[..], &self.displs[..]);
            self.world.all_gather_varcount_into(send, &mut part);
        }
        let s = self.size as u64;
        self.ledger.record(
            purpose,
            Kind::Allgather,
            F32 * (s - 1) * send.len() as u64,
            F32 * (total - send.len()) as u64,
        );
    }

    fn allgather_u64(&mut self, purpose: Purpose, value: u64) -> Vec<u64> {
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&value, &mut all[..]);
        let s = self.size as u64;
        self.ledger.record(purpose, Kind::Allgather, 8 * (s - 1), 8 * (s - 1));
        all
    }

    fn allgather_u64s(&mut self, purpose: Purpose, values: &[u64]) -> Vec<u64> {
        let mut all = vec![0u64; self.size * values.len()];
        self.world.all_gather_into(values, &mut all[..]);
        let (s, n) = (self.size as u64, values.len() as u64);
        self.ledger
            .record(purpose, Kind::Allgather, 8 * n * (s - 1), 8 * n * (s - 1));
        all
    }

    fn barrier(&mut self) {
        self.world.barrier();
    }

    fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
