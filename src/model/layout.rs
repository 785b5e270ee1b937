//! The layout table: named tensors as (offset, len) views into one flat buffer.
//!
//! Parameters, gradients, momentum and masks share one layout, so the optimizer is one loop,
//! zeroing is one fill, and a rank's share of the model is a list of runs. BN running
//! statistics live in a second flat buffer with a layout of their own.

use serde::{Deserialize, Serialize};

/// Whether every LoFT worker holds a tensor whole, or only the slices of its inner filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Every worker holds a full copy (averaged at sync).
    Shared,
    /// Split by the inner filters of block `block` along dimension `axis` of the shape.
    Partitioned { block: usize, axis: usize },
}

/// One named tensor of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub len: usize,
    pub role: Role,
}

/// An ordered table of tensors packed back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub entries: Vec<Entry>,
    pub total: usize,
}

impl Layout {
    /// Append a tensor; returns its index.
    pub fn push(&mut self, name: impl Into<String>, shape: &[usize], role: Role) -> usize {
        let len = shape.iter().product();
        self.entries.push(Entry {
            name: name.into(),
            shape: shape.to_vec(),
            offset: self.total,
            len,
            role,
        });
        self.total += len;
        self.entries.len() - 1
    }

    /// The entry called `name`.
    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// Number of elements with the given sharing.
    pub fn count(&self, partitioned: bool) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.role, Role::Partitioned { .. }) == partitioned)
            .map(|e| e.len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_packed_back_to_back() {
        let mut l = Layout::default();
        let a = l.push("a", &[2, 3], Role::Shared);
        let b = l.push("b", &[4], Role::Partitioned { block: 1, axis: 0 });
        assert_eq!((l.entries[a].offset, l.entries[a].len), (0, 6));
        assert_eq!((l.entries[b].offset, l.entries[b].len), (6, 4));
        assert_eq!(l.total, 10);
        assert_eq!(l.count(false), 6);
        assert_eq!(l.count(true), 4);
        assert_eq!(l.find("b").unwrap().offset, 6);
        assert!(l.find("c").is_none());
    }
}
