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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::Tensor;

    use super::*;

    #[test]
    fn reads_sharded_folders_and_drops_integer_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::ones(4, DType::F32, &dev).unwrap();
        let ids = Tensor::arange(0i64, 4, &dev).unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("a.weight", a), ("ids", ids)]),
            dir.path().join("s1.safetensors"),
        )
        .unwrap();
        candle_core::safetensors::save(
            &HashMap::from([("b.bias", b)]),
            dir.path().join("s2.safetensors"),
        )
        .unwrap();
        let index = serde_json::json!({"weight_map": {"a.weight": "s1.safetensors", "ids": "s1.safetensors", "b.bias": "s2.safetensors"}});
        std::fs::write(dir.path().join(SHARD_INDEX), index.to_string()).unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();

        let checkpoint = read_hf_folder(dir.path(), DType::F32, &dev).unwrap();
        let names: Vec<&str> = checkpoint.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a.weight", "b.bias"]);
        assert_eq!(checkpoint.model_type(), Some("bert"));
        assert!(checkpoint.tokenizer.is_none());

        let bad = serde_json::json!({"weight_map": {"a.weight": "../elsewhere.safetensors"}});
        std::fs::write(dir.path().join(SHARD_INDEX), bad.to_string()).unwrap();
        assert!(matches!(
            read_hf_folder(dir.path(), DType::F32, &dev),
            Err(EngineError::InvalidModel(_))
        ));
        assert!(read_hf_folder(&dir.path().join("missing"), DType::F32, &dev).is_err());
    }
}
