//! Hugging Face model folders: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and `tokenizer.json`.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::{read_json, Checkpoint};
use crate::error::{EngineError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Reads a Hugging Face folder, converting float tensors to `dtype` on `device`.
///
/// # Errors
/// Fails when `config.json` or the weights are missing or malformed.
pub fn read_hf_folder(dir: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let config = read_json(&dir.join("config.json"))?;
    let mut tensors = Vec::new();
    for file in weight_files(dir)? {
        let path = dir.join(&file);
        let loaded = candle_core::safetensors::load(&path, device)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        for (name, tensor) in loaded {
            if tensor.dtype().is_float() {
                tensors.push((name, tensor.to_dtype(dtype)?));
            }
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(Checkpoint {
        config,
        tensors,
        tokenizer,
    })
}

/// The safetensors files of a folder: the shards named by the index, or the single file.
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join(SHARD_INDEX);
    if index.is_file() {
        let json = read_json(&index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                EngineError::InvalidModel(format!("{}: no weight_map object", index.display()))
            })?;
        let files: BTreeSet<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect();
        if let Some(bad) = files.iter().find(|f| f.contains('/') || f.contains("..")) {
            return Err(EngineError::InvalidModel(format!(
                "shard name {bad:?} leaves the model folder"
            )));
        }
        return Ok(files.into_iter().collect());
    }
    if dir.join(SINGLE_FILE).is_file() {
        return Ok(vec![SINGLE_FILE.to_string()]);
    }
    Err(EngineError::InvalidModel(format!(
        "{}: neither {SINGLE_FILE} nor {SHARD_INDEX}",
        dir.display()
    )))
}

/// Loads a `tokenizer.json` with its built-in padding turned off (MiniLM's pads every input to 128,
/// which would change mean-pooled embeddings); truncation is kept. Batches are padded per batch by
/// the data pipeline.
///
/// # Errors
/// Fails when the file is missing or malformed.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}
