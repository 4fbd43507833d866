//! Validation of what users bring: model folders (safetensors, `config.json`, `tokenizer.json`),
//! single GGUF files, and datasets (JSONL, CSV, plain text).
//!
//! Every inspector here is *push-based*: it is fed the bytes of a file chunk by chunk while the
//! upload streams to object storage, so a multi-gigabyte upload is checked in the same single pass
//! that stores it and is never held in memory. Only small files (`config.json`,
//! `tokenizer.json`) and the bounded header of a GGUF file are buffered. A failed check is a
//! [`Rejection`]: a user error that the API answers with a 4xx, never a panic.

mod csv_rows;
pub mod dataset;
pub mod gguf;
mod lines;
pub mod model;
pub mod model_config;
pub mod safetensors;

use std::fmt;

pub use dataset::{DatasetFormat, DatasetInspector, DatasetOptions, DatasetSummary, RejectedRow};
pub use model::{ModelFormat, ModelInspector, ModelSummary};

/// Why an input was refused. It is user-facing: the message names the file and what is wrong
/// with it, and the API turns it into a 4xx problem whose `type` is [`Rejection::slug`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Stable, machine-readable reason (`invalid-safetensors`, `unsupported-architecture`, …).
    pub slug: &'static str,
    /// The file (or dataset line) the problem is in, when there is one.
    pub file: Option<String>,
    /// What is wrong, in words.
    pub message: String,
}

impl Rejection {
    /// A rejection not tied to one file.
    pub fn new(slug: &'static str, message: impl Into<String>) -> Self {
        Self {
            slug,
            file: None,
            message: message.into(),
        }
    }

    /// A rejection of one named file.
    pub fn in_file(slug: &'static str, file: &str, message: impl Into<String>) -> Self {
        Self {
            slug,
            file: Some(file.to_owned()),
            message: message.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.file {
            Some(file) => write!(f, "{file}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Rejection {}

/// Result of a validation step.
pub type Checked<T> = Result<T, Rejection>;
