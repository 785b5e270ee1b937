//! loft: LoFT (filter-wise distributed pre-training) for finding lottery tickets in residual networks.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod data;
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod experiment;
pub mod export;
pub mod info;
pub mod inspect;
pub mod loft;
pub mod model;
pub mod ops;
pub mod progress;
pub mod resume;
pub mod rng;
pub mod rundir;
pub mod schedule;
pub mod stop;
pub mod theory;
pub mod ticket;
pub mod train;

pub use error::{Error, Result};
