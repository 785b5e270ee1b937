//! Communication between ranks: a small trait, a single-process and an MPI implementation,
//! and the ledger every collective goes through.
//!
//! Collectives are deterministic: the allreduce sums contributions in rank order (rank j
//! reduces chunk j of the buffer, then the chunks are gathered), so an S-rank run gives the
//! same bits as a single process that simulates the S ranks one after another.

pub mod accounting;
pub mod ledger;
pub mod mpi;
pub mod single;

pub use ledger::{Kind, Ledger, Purpose, Tally};

/// A communicator of `size` ranks.
pub trait Comm {
    /// This rank, 0-based.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// In-place sum over ranks, each element summed in rank order 0, 1, .., S-1.
    fn allreduce_sum(&mut self, purpose: Purpose, buf: &mut [f32]);
    /// In-place sum of f64 values over ranks (metrics), in rank order.
    fn allreduce_sum_f64(&mut self, purpose: Purpose, buf: &mut [f64]);
    /// Gather every rank's `send` (rank r contributes `counts[r]` elements) into `recv`, the
    /// concatenation in rank order.
    fn allgatherv(&mut self, purpose: Purpose, send: &[f32], counts: &[usize], recv: &mut [f32]);
    /// Gather one u64 from every rank.
    fn allgather_u64(&mut self, purpose: Purpose, value: u64) -> Vec<u64>;
    /// Gather `values` (the same count on every rank) from every rank, in rank order.
    fn allgather_u64s(&mut self, purpose: Purpose, values: &[u64]) -> Vec<u64>;
    /// Wait for every rank.
    fn barrier(&mut self);
    /// This rank's ledger.
    fn ledger(&self) -> &Ledger;
    /// This rank's ledger, to restore it when a run resumes.
    fn ledger_mut(&mut self) -> &mut Ledger;
    /// End the whole job with `code` (every rank), after this rank's message is printed.
    fn abort(&self, code: i32) -> !;
}

/// Elements a collective moves per call at most, summed over ranks (4 MiB of f32, large
/// enough for full bandwidth on a node or a fabric): collectives on larger buffers go in
/// windows, so their scratch stays bounded.
pub const WINDOW_BUDGET: usize = 1 << 20;

/// The window of a collective over `s` ranks: [`WINDOW_BUDGET`] (or, as a test hook,
/// `LOFT_COMM_WINDOW` elements) rounded down to a multiple of `s`, at least `s`. A multiple
/// of `s` keeps every rank's share of an allreduce exactly what it is without windows.
pub fn window_elements(s: usize) -> usize {
    let budget = std::env::var("LOFT_COMM_WINDOW")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&v| v > 0)
        .unwrap_or(WINDOW_BUDGET);
    (budget / s).max(1) * s
}

/// Sum `parts` (each `n` elements, in rank order) into `out`: out = p0 + p1 + ... in order.
/// The one place the reduction order is defined; the MPI allreduce and the single-process
/// simulation of several ranks both use it.
pub fn sum_in_rank_order(parts: &[&[f32]], out: &mut [f32]) {
    out.copy_from_slice(parts[0]);
    for p in &parts[1..] {
        for (o, &v) in out.iter_mut().zip(p.iter()) {
            *o += v;
        }
    }
}

pub mod report;

/// Run `f` with the job's communicator: MPI when started by an MPI launcher, otherwise a
/// single process. On a multi-rank job an error or a panic on any rank prints that rank's
/// message and aborts the whole job (exit status non-zero, no rank left waiting).
pub fn run_with_comm(f: impl FnOnce(&mut dyn Comm) -> crate::Result<()>) -> crate::Result<()> {
    if !mpi::launched_by_mpi() {
        return f(&mut single::SingleComm::new());
    }
    let mut comm = mpi::MpiComm::init()
        .ok_or_else(|| crate::Error::Backend("MPI could not be initialised (was it already?)".into()))?;
    let (rank, size) = (comm.rank(), comm.size());
    if size > 1 {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            eprintln!("loft: rank {rank} panicked; aborting the job");
            use ::mpi::traits::Communicator;
            ::mpi::topology::SimpleCommunicator::world().abort(101);
        }));
    }
    match f(&mut comm) {
        Ok(()) => Ok(()),
        Err(e) if size > 1 => {
            eprintln!("loft: error (rank {rank} of {size}): {e}");
            comm.abort(1)
        }
        Err(e) => Err(e),
    }
}

/// Test hook: `LOFT_INJECT_FAILURE=RANK:ROUND[:panic]` makes that rank fail at the start of
/// that round (with an error, or a panic), to test that the job ends cleanly.
pub fn injected_failure(rank: usize, round: usize) -> crate::Result<()> {
    let Ok(spec) = std::env::var("LOFT_INJECT_FAILURE") else {
        return Ok(());
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (Some(r), Some(t)) = (
        parts.first().and_then(|s| s.parse::<usize>().ok()),
        parts.get(1).and_then(|s| s.parse::<usize>().ok()),
    ) else {
        return Err(crate::Error::config(format!(
            "LOFT_INJECT_FAILURE='{spec}' is not RANK:ROUND[:panic]"
        )));
    };
    if r == rank && t == round {
        if parts.get(2) == Some(&"panic") {
            panic!("injected panic on rank {rank} in round {round}");
        }
        return Err(crate::Error::config(format!(
            "injected failure on rank {rank} in round {round}"
        )));
    }
    Ok(())
}
