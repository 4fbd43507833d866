//! Hugging Face folders: `config.json`, `model.safetensors` and the tokenizer files, loadable by
//! transformers' `from_pretrained` and by candle-transformers.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::{json, Value};

use crate::error::{EngineError, Result};
use crate::models::bert::BertConfig;

/// Tokenizer and vocabulary files copied next to the weights when present in the source folder.
const TOKENIZER_FILES: &[&str] = &[
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

/// Renames a BERT classifier's tensors to the layout of transformers' `BertForSequenceClassification`:
/// encoder and pooler under `bert.`, the head as `classifier.*`. (Loading a checkpoint whose encoder
/// lacks the prefix makes transformers prefix every key, the head's too, and re-initialise the head.)
pub fn bert_classifier_tensor_names(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            if name.starts_with("bert.") || name.starts_with("classifier.") {
                (name, t)
            } else {
                (format!("bert.{name}"), t)
            }
        })
        .collect()
}

/// Exports a BERT sequence classifier: the config gains the fields transformers and
/// candle-transformers require (`model_type`, `architectures`, `id2label`/`label2id`, defaults for
/// `initializer_range` and `pad_token_id`), the tensors get `BertForSequenceClassification` names.
///
/// # Errors
/// Fails on I/O errors.
pub fn export_bert_folder(
    dir: &Path,
    config: &BertConfig,
    tensors: Vec<(String, Tensor)>,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    let mut json =
        serde_json::to_value(config).map_err(|e| EngineError::json(dir.join("config.json"), e))?;
    let defaults = json!({
        "model_type": "bert",
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    });
    if let (Some(obj), Some(defaults)) = (json.as_object_mut(), defaults.as_object()) {
        for (key, value) in defaults {
            obj.entry(key.clone()).or_insert_with(|| value.clone());
        }
        obj.insert(
            "architectures".into(),
            json!(["BertForSequenceClassification"]),
        );
    }
    export_hf_folder(
        dir,
        &json,
        &bert_classifier_tensor_names(tensors),
        tokenizer_dir,
    )
}
