//! Hugging Face folders: `config.json`, `model.safetensors` and the tokenizer files, loadable by
//! transformers' `from_pretrained` and by candle-transformers when written with the family's names
//! ([`export_transformers_folder`]).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::transformers::HfArchitecture;
use crate::error::{EngineError, Result};

/// Tokenizer and vocabulary files copied next to the weights when present in the source folder.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
];

/// Writes `config` as `config.json`, `tensors` as `model.safetensors` (names unchanged, made
/// contiguous) and copies the tokenizer files found in `tokenizer_dir`.
///
/// # Errors
/// Fails on I/O errors or tensors safetensors cannot store.
pub fn export_hf_folder(
    dir: &Path,
    config: &Value,
    tensors: &[(String, Tensor)],
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let config_path = dir.join("config.json");
    let text =
        serde_json::to_string_pretty(config).map_err(|e| EngineError::json(&config_path, e))?;
    std::fs::write(&config_path, text).map_err(|e| EngineError::io(&config_path, e))?;
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
    if let Some(source) = tokenizer_dir {
        for name in TOKENIZER_FILES {
            let from = source.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|e| EngineError::io(&from, e))?;
            }
        }
    }
    Ok(())
}

/// Writes a dense model as a folder transformers loads as `arch` (see [`HfArchitecture`]): the
/// config with the class's fields, the tensors (engine names) under transformers' names, and the
/// tokenizer files found in `tokenizer_dir`.
///
/// # Errors
/// Fails when `config` is not a config of the family, or on I/O errors.
pub fn export_transformers_folder(
    dir: &Path,
    arch: HfArchitecture,
    config: &Value,
    tensors: Vec<(String, Tensor)>,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    let config = arch.export_config(config)?;
    export_hf_folder(dir, &config, &arch.export_names(tensors), tokenizer_dir)
}
