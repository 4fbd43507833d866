//! Reading models from disk: Hugging Face folders (config.json, single or sharded safetensors,
//! tokenizer.json) and GGUF files (dequantized, llama.cpp names mapped to Hugging Face names).
//!
//! Both produce a [`Checkpoint`]: the config as JSON and the named tensors, ready to become a
//! [`ParamStore`] that models are built from.

pub mod gguf;
mod hf;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::de::DeserializeOwned;

pub use gguf::read_gguf;
pub use hf::{load_tokenizer, read_hf_folder};

use crate::error::{EngineError, Result};
use crate::params::ParamStore;

/// A model read from disk: its configuration and its tensors under Hugging Face names.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// The `config.json` contents (for GGUF, built from the metadata).
    pub config: serde_json::Value,
    /// Float tensors by name (integer buffers such as `position_ids` are dropped).
    pub tensors: Vec<(String, Tensor)>,
    /// The tokenizer file next to the weights, if there is one.
    pub tokenizer: Option<PathBuf>,
}

impl Checkpoint {
    /// The configuration parsed as a model family's config type.
    ///
    /// # Errors
    /// Fails when a required field is missing or has the wrong type.
    pub fn parse_config<C: DeserializeOwned>(&self) -> Result<C> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))
    }

    /// The `model_type` field (`bert`, `llama`, ...), if present.
    pub fn model_type(&self) -> Option<&str> {
        self.config.get("model_type").and_then(|v| v.as_str())
    }

    /// Moves the tensors into a store; names for which `trainable` is true become variables.
    ///
    /// # Errors
    /// Fails when a tensor cannot become a variable.
    pub fn into_store(self, trainable: impl Fn(&str) -> bool) -> Result<ParamStore> {
        Ok(ParamStore::from_tensors(self.tensors, trainable)?)
    }
}

/// Reads a JSON file.
fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::json(path, e))
}
