//! The `tokenizer.*` metadata of an exported GGUF file, without which llama.cpp cannot tokenize.
//!
//! When the model came from a GGUF file, its `tokenizer.*` entries are copied unchanged (tokens,
//! scores, token types, merges, special token ids, chat template). Otherwise they are rebuilt from a
//! Hugging Face `tokenizer.json` the way llama.cpp's `convert_hf_to_gguf.py` does for byte-level BPE
//! vocabularies (`tokenizer.ggml.model = "gpt2"`): tokens by id, merges as `"left right"`, token type
//! 3 (control) for special added tokens, 4 (user-defined) for other added tokens, 1 otherwise; the
//! special token ids come from `tokenizer_config.json` beside it, and `chat_template.jinja` (or the
//! config's `chat_template`) is carried as `tokenizer.chat_template`. Other tokenizer models
//! (SentencePiece/Unigram, WordPiece) are reported as unsupported rather than written wrongly.
//! `tokenizer.ggml.pre` is not written for a rebuilt vocabulary: its name cannot be derived from
//! `tokenizer.json`, and llama.cpp then falls back to its default pre-tokenizer.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::error::{EngineError, Result};
use crate::loading::gguf::read_gguf_metadata;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The `tokenizer.*` entries for a GGUF export of the model at `model_path`: copied when it is a
/// GGUF file, else rebuilt from `tokenizer_json` when given.
///
/// # Errors
/// Fails when a file cannot be read or parsed, or the tokenizer is not byte-level BPE.
pub fn tokenizer_metadata(
    model_path: &Path,
    tokenizer_json: Option<&Path>,
) -> Result<Vec<(String, Value)>> {
    let is_gguf = model_path.is_file()
        && model_path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    match (is_gguf, tokenizer_json) {
        (true, _) => read_gguf_metadata(model_path, "tokenizer."),
        (false, Some(path)) => metadata_from_tokenizer_json(path),
        (false, None) => Ok(Vec::new()),
    }
}

/// Builds `tokenizer.*` entries from a Hugging Face `tokenizer.json` (byte-level BPE only).
///
/// # Errors
/// Fails when the file cannot be read or parsed, or its model is not BPE.
pub fn metadata_from_tokenizer_json(path: &Path) -> Result<Vec<(String, Value)>> {
    let json = read_json(path)?;
    let bad = |why: String| EngineError::Tokenizer(format!("{}: {why}", path.display()));
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(EngineError::Unsupported(format!(
            "{}: GGUF tokenizer metadata can be rebuilt only for byte-level BPE vocabularies",
            path.display()
        )));
    }
    let tokens = tokens_by_id(&json).map_err(bad)?;
    let merges = merges(&model["merges"]).map_err(bad)?;
    let mut entries = vec![
        string("tokenizer.ggml.model", "gpt2"),
        array(
            "tokenizer.ggml.tokens",
            tokens.iter().map(|(t, _)| Value::String(t.clone())),
        ),
        array(
            "tokenizer.ggml.token_type",
            tokens.iter().map(|(_, kind)| Value::I32(*kind)),
        ),
        array(
            "tokenizer.ggml.merges",
            merges.into_iter().map(Value::String),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(adds_special_tokens(&json)),
        ),
    ];
    let dir = path.parent().unwrap_or(Path::new("."));
    entries.extend(special_token_ids(dir, &tokens)?);
    if let Some(template) = chat_template(dir)? {
        entries.push(string("tokenizer.chat_template", &template));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngineError::json(path, e))
}

fn string(key: &str, value: &str) -> (String, Value) {
    (key.into(), Value::String(value.into()))
}

fn array(key: &str, values: impl Iterator<Item = Value>) -> (String, Value) {
    (key.into(), Value::Array(values.collect()))
}

/// Every token (the model's vocabulary and the added tokens) with its llama.cpp type, by id; ids
/// must be dense (0..n), as GGUF stores the vocabulary as a plain array.
fn tokens_by_id(json: &Json) -> std::result::Result<Vec<(String, i32)>, String> {
    let mut by_id: BTreeMap<u64, (String, i32)> = BTreeMap::new();
    let vocab = json["model"]["vocab"]
        .as_object()
        .ok_or("model.vocab is not an object")?;
    for (token, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format!("token {token:?} has no integer id"))?;
        by_id.insert(id, (token.clone(), NORMAL));
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            return Err("an added token lacks its id or content".into());
        };
        let kind = if added["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        by_id.insert(id, (content.to_string(), kind));
    }
    if let Some((gap, _)) = by_id.keys().enumerate().find(|(i, id)| *i as u64 != **id) {
        return Err(format!(
            "token ids are not contiguous: no token has id {gap}"
        ));
    }
    Ok(by_id.into_values().collect())
}

/// Merges as `"left right"` strings; tokenizer.json has them either so or as `[left, right]` pairs.
fn merges(merges: &Json) -> std::result::Result<Vec<String>, String> {
    let list = merges.as_array().ok_or("model.merges is not a list")?;
    list.iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match (
                pair.first().and_then(Json::as_str),
                pair.get(1).and_then(Json::as_str),
            ) {
                (Some(a), Some(b)) if pair.len() == 2 => Ok(format!("{a} {b}")),
                _ => Err(format!("malformed merge {m}")),
            },
            other => Err(format!("malformed merge {other}")),
        })
        .collect()
}

/// Whether the post-processor puts a special token before each single sequence (BOS).
fn adds_special_tokens(json: &Json) -> bool {
    let single = json["post_processor"]["single"].as_array();
    single
        .and_then(|items| items.first())
        .is_some_and(|first| first.get("SpecialToken").is_some())
}

/// `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` from `tokenizer_config.json`, when present.
fn special_token_ids(dir: &Path, tokens: &[(String, i32)]) -> Result<Vec<(String, Value)>> {
    let config_path = dir.join("tokenizer_config.json");
    if !config_path.is_file() {
        return Ok(Vec::new());
    }
    let config = read_json(&config_path)?;
    let roles = [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ];
    let mut ids = Vec::new();
    for (field, key) in roles {
        // A special token is written either as a string or as an object with a `content` field.
        let name = config[field]
            .as_str()
            .or_else(|| config[field]["content"].as_str());
        let id = name.and_then(|n| tokens.iter().position(|(t, _)| t == n));
        if let Some(id) = id {
            ids.push((key.to_string(), Value::U32(id as u32)));
        }
    }
    Ok(ids)
}

/// The chat template from `chat_template.jinja` or `tokenizer_config.json`'s `chat_template`.
fn chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?;
        return Ok(Some(text));
    }
    let config_path = dir.join("tokenizer_config.json");
    if !config_path.is_file() {
        return Ok(None);
    }
    Ok(read_json(&config_path)?["chat_template"]
        .as_str()
        .map(str::to_owned))
}
