//! The one error type of loft: every failure a user can cause ends as one readable line.

use std::path::PathBuf;

/// Every error loft reports. Messages are single lines that name the file or value at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A data or checkpoint file exists but its content is wrong (bad magic, truncated, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A flag or configuration value is out of range or inconsistent.
    #[error("{0}")]
    Config(String),
    /// Tensor shapes that must agree do not.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A backend (device) failure.
    #[error("backend: {0}")]
    Backend(String),
}

/// Result with loft's error type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    /// A content error in the file at `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// A bad configuration value.
    pub fn config(msg: impl Into<String>) -> Self {
        Error::Config(msg.into())
    }
}
