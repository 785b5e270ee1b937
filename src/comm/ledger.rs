//! The ledger: exact payload bytes sent and received by this rank, per purpose and collective.
//!
//! Conventions (one f32 = 4 bytes; a rank never counts bytes to or from itself):
//! - allreduce of n elements (loft's deterministic two-phase algorithm, see `comm`): rank r
//!   owns chunk r (n_r elements); it sends `(n - n_r) + (S-1) n_r` elements and receives the same;
//! - allgather(v) with counts c: rank r sends `(S-1) c_r` and receives `sum(c) - c_r`;
//! - broadcast of n from the root: the root sends `(S-1) n`, every other rank receives n.

use serde::Serialize;
use std::collections::BTreeMap;

/// Collective kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Allreduce,
    Allgather,
    Broadcast,
    PointToPoint,
}

/// What the bytes were moved for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    /// LoFT model re-assembly (shared parameters and slices).
    Sync,
    /// Data-parallel gradient averaging.
    Gradients,
    /// Metrics and checks (losses, accuracy counts, partition hashes).
    Metrics,
    /// Checkpoint bookkeeping (gathering every rank's ledger for rank 0 to save). Not
    /// restored on resume, so it counts what this process did.
    Control,
}

/// Totals of one (purpose, kind).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub calls: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// Per-rank record of every collective.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ledger {
    pub entries: BTreeMap<(Purpose, Kind), Tally>,
}

impl Ledger {
    /// Record one collective.
    pub fn record(&mut self, purpose: Purpose, kind: Kind, sent: u64, received: u64) {
        let t = self.entries.entry((purpose, kind)).or_default();
        t.calls += 1;
        t.bytes_sent += sent;
        t.bytes_received += received;
    }

    /// Totals of one purpose over all kinds.
    pub fn purpose_total(&self, purpose: Purpose) -> Tally {
        let mut out = Tally::default();
        for ((p, _), t) in &self.entries {
            if *p == purpose {
                out.calls += t.calls;
                out.bytes_sent += t.bytes_sent;
                out.bytes_received += t.bytes_received;
            }
        }
        out
    }

    /// Totals over everything.
    pub fn total(&self) -> Tally {
        let mut out = Tally::default();
        for t in self.entries.values() {
            out.calls += t.calls;
            out.bytes_sent += t.bytes_sent;
            out.bytes_received += t.bytes_received;
        }
        out
    }

    /// As JSON: a list of {purpose, kind, calls, bytes_sent, bytes_received}.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.entries
                .iter()
                .map(|((p, k), t)| {
                    serde_json::json!({ "purpose": p, "kind": k, "calls": t.calls,
                        "bytes_sent": t.bytes_sent, "bytes_received": t.bytes_received })
                })
                .collect(),
        )
    }
}
