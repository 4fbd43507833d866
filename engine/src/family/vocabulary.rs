//! Vocabulary trimming: the token embedding (and a decoder's output matrix) cut to the tokens a
//! task uses.
//!
//! For a small encoder the embedding table is most of the model (MiniLM-L6: 11.7M of 22.7M
//! parameters), and a classifier trained on one domain's text only ever looks up a fraction of its
//! rows. Token `kept[i]` of the old vocabulary becomes token `i`: the rows are gathered in that
//! order, so a model fed the renumbered ids computes exactly what it did on the old ones. The
//! tokenizer is renumbered the same way by [`crate::data::vocabulary`].

use candle_core::Tensor;
use serde_json::Value;

use super::{ModuleMap, ModuleRole};
use crate::error::{EngineError, Result};

/// Cuts every vocabulary-indexed table to the rows `kept` (old ids, each once) and sets the config's
/// `vocab_size`. A table is vocabulary-indexed when it is an embedding or the output matrix and its
/// first dimension is `vocab_size` (position and token-type tables are not).
///
/// # Errors
/// A config without `vocab_size`, an empty or repeated `kept`, an id past the vocabulary, or no
/// table of the vocabulary's size.
pub fn trim_vocabulary(
    map: &ModuleMap,
    config: &Value,
    tensors: Vec<(String, Tensor)>,
    kept: &[u32],
) -> Result<(Value, Vec<(String, Tensor)>)> {
    let vocab_size = config
        .get("vocab_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| EngineError::InvalidModel("config.json has no vocab_size".into()))?
        as usize;
    check_kept(kept, vocab_size)?;
    let is_table = |name: &str, tensor: &Tensor| {
        let vocabulary_role = matches!(
            map.role_of(name),
            Some(ModuleRole::Embedding | ModuleRole::TaskHead)
        ) || map.output_matrix.as_deref() == Some(name);
        vocabulary_role && tensor.dims().first() == Some(&vocab_size)
    };
    let mut found = false;
    let mut index: Option<Tensor> = None;
    let mut trimmed = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !is_table(&name, &tensor) {
            trimmed.push((name, tensor));
            continue;
        }
        found = true;
        let rows = match &index {
            Some(rows) if rows.device().same_device(tensor.device()) => rows.clone(),
            _ => {
                let rows = Tensor::from_slice(kept, kept.len(), tensor.device())?;
                index = Some(rows.clone());
                rows
            }
        };
        let cut = tensor.index_select(&rows, 0)?;
        trimmed.push((name, cut));
    }
    if !found {
        return Err(EngineError::InvalidModel(format!(
            "no embedding table has vocab_size ({vocab_size}) rows"
        )));
    }
    let mut config = config.clone();
    config["vocab_size"] = Value::from(kept.len());
    Ok((config, trimmed))
}

fn check_kept(kept: &[u32], vocab_size: usize) -> Result<()> {
    if kept.is_empty() {
        return Err(EngineError::InvalidSetting(
            "a trimmed vocabulary needs at least one token".into(),
        ));
    }
    let mut seen = vec![false; vocab_size];
    for &id in kept {
        let slot = seen.get_mut(id as usize).ok_or_else(|| {
            EngineError::InvalidSetting(format!(
                "token id {id} is past the vocabulary ({vocab_size} tokens)"
            ))
        })?;
        if std::mem::replace(slot, true) {
            return Err(EngineError::InvalidSetting(format!(
                "token id {id} is kept twice"
            )));
        }
    }
    Ok(())
}

/// `old → new` id lookup for `kept` over a vocabulary of `vocab_size` (`None` for dropped ids).
pub fn renumbering(kept: &[u32], vocab_size: usize) -> Vec<Option<u32>> {
    let mut new_ids = vec![None; vocab_size];
    for (new, &old) in kept.iter().enumerate() {
        if let Some(slot) = new_ids.get_mut(old as usize) {
            *slot = Some(new as u32);
        }
    }
    new_ids
}
