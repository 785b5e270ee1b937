//! The single-process communicator: one rank, every collective a copy, no bytes moved.

use super::{Comm, Ledger, Purpose};

/// A communicator of one rank.
#[derive(Default)]
pub struct SingleComm {
    ledger: Ledger,
}

impl SingleComm {
    /// A new single-rank communicator.
    pub fn new() -> Self {
        SingleComm::default()
    }
}

impl Comm for SingleComm {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn allreduce_sum(&mut self, _purpose: Purpose, _buf: &mut [f32]) {}
    fn allreduce_sum_f64(&mut self, _purpose: Purpose, _buf: &mut [f64]) {}
    fn allgatherv(&mut self, _purpose: Purpose, send: &[f32], counts: &[usize], recv: &mut [f32]) {
        assert_eq!(counts, [send.len()], "allgatherv: counts of a single rank");
        recv[..send.len()].copy_from_slice(send);
    }
    fn allgather_u64(&mut self, _purpose: Purpose, value: u64) -> Vec<u64> {
        vec![value]
    }
    fn allgather_u64s(&mut self, _purpose: Purpose, values: &[u64]) -> Vec<u64> {
        values.to_vec()
    }
    fn barrier(&mut self) {}
    fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
