//! The engine's one error type.
//!
//! Numeric code (layers, ops, model forward passes) returns `candle_core::Result`, because candle's
//! traits (`CustomOp*`, `Module`) fix that type; everything that touches files, configs or user choices
//! returns [`EngineError`], which wraps candle's error with `#[from]`.

use std::path::PathBuf;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor operation failed (shape mismatch, unsupported dtype, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A JSON document (config.json, index, metadata) is malformed or lacks a field.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },

    /// A tokenizer could not be loaded or failed on an input.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A model configuration or checkpoint is inconsistent or unsupported.
    #[error("invalid model: {0}")]
    InvalidModel(String),

    /// A user-supplied setting (device name, option value, ...) is invalid.
    #[error("invalid setting: {0}")]
    InvalidSetting(String),

    /// The operation is not available in this build or for this layer variant.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A dataset or corpus row is malformed (`line` counts from 1; 0 when not line-based).
    #[error("{path}:{line}: {message}")]
    Data {
        /// The data file.
        path: PathBuf,
        /// The 1-based line (row) number.
        line: usize,
        /// What is wrong with the row.
        message: String,
    },
    /// The run was stopped through its cancel flag; what finished before is kept.
    #[error("cancelled")]
    Cancelled,
}

impl EngineError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Wraps a JSON error with the file it came from.
    pub fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.into(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
