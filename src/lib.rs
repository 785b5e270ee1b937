//! loft: LoFT (filter-wise distributed pre-training) for finding lottery tickets in residual networks.

pub mod backend;
pub mod bench;
pub mod data;
pub mod error;
pub mod model;
pub mod ops;
pub mod rng;

pub use error::{Error, Result};
