//! Graceful stops: SIGTERM, SIGUSR1 or SIGINT asks a run to finish the step in progress,
//! write a checkpoint and exit with [`crate::checkpoint::EXIT_STOPPED`] (75).
//!
//! Slurm sends SIGTERM at a time limit or preemption, or any signal chosen with
//! `--signal=B:USR1@SECONDS` before it; OpenMPI's `mpirun` forwards SIGUSR1 to every rank (it
//! answers SIGTERM by killing the job, so under `mpirun` send SIGUSR1). A second SIGTERM or
//! SIGINT ends the process at once (exit 143 or 130). Under MPI the ranks agree on stopping
//! at the end of a round, so they all write the same checkpoint.

use crate::{Error, Result};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Set to the number of the first stop signal received (0: none yet).
#[derive(Clone, Debug, Default)]
pub struct StopFlag(Arc<AtomicUsize>);

impl StopFlag {
    /// A flag no signal sets (library use and tests).
    pub fn never() -> Self {
        StopFlag::default()
    }

    /// Route SIGTERM, SIGUSR1 and SIGINT to a new flag.
    pub fn install() -> Result<Self> {
        let flag = StopFlag::default();
        let err = |e: std::io::Error| Error::Backend(format!("installing the signal handlers: {e}"));
        let set = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for (sig, code) in [(SIGTERM, 143), (SIGINT, 130)] {
            // first: a second signal of this kind exits at once
            signal_hook::flag::register_conditional_shutdown(sig, code, set.clone()).map_err(err)?;
        }
        for sig in [SIGTERM, SIGUSR1, SIGINT] {
            signal_hook::flag::register(sig, set.clone()).map_err(err)?;
            signal_hook::flag::register_usize(sig, flag.0.clone(), sig as usize).map_err(err)?;
        }
        Ok(flag)
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.0.load(Ordering::Relaxed) != 0
    }

    /// Name of the signal received, for messages.
    pub fn signal_name(&self) -> &'static str {
        match self.0.load(Ordering::Relaxed) as i32 {
            SIGTERM => "SIGTERM",
            SIGUSR1 => "SIGUSR1",
            SIGINT => "SIGINT",
            0 => "no signal",
            _ => "a signal",
        }
    }
}
