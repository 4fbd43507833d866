//! Trimming a model's vocabulary to the tokens its task uses (`vocabulary: "task"`).
//!
//! The model's vocabulary-indexed tables are cut ([`crate::family::trim_vocabulary`]) and its
//! tokenizer renumbered ([`crate::data::vocabulary`]); the model then carries a
//! [`TrimmedVocabulary`], which saving writes in place of the input's tokenizer files and which the
//! session follows by renumbering its tokenized data, so every later forward pass (evaluation,
//! later stages) sees the ids the shipped tokenizer produces.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Serialize;

use super::model::WorkingModel;
use crate::data::vocabulary::{rewrite_tokenizer_files, task_vocabulary, TokenizerFiles};
use crate::error::{EngineError, Result};
use crate::family::trim_vocabulary;
use crate::params::ParamStore;

/// A model's vocabulary after trimming.
#[derive(Debug, PartialEq, Eq)]
pub struct TrimmedVocabulary {
    /// The ids, in the job's input tokenizer, of the tokens kept: token `kept[i]` is now token `i`.
    pub kept: Vec<u32>,
    /// The renumbered tokenizer files, by name.
    pub files: TokenizerFiles,
}

impl TrimmedVocabulary {
    /// The renumbered `tokenizer.json`.
    ///
    /// # Errors
    /// Never for a vocabulary made by [`trim_model`]; a hand-made one without the file.
    pub fn tokenizer_json(&self) -> Result<&[u8]> {
        self.files
            .iter()
            .find(|(n, _)| n == "tokenizer.json")
            .map(|(_, b)| b.as_slice())
            .ok_or_else(|| {
                EngineError::InvalidModel("the trimmed vocabulary has no tokenizer.json".into())
            })
    }
}

/// What trimming did, for the stage's report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VocabularyReport {
    /// Tokens before.
    pub tokens_before: usize,
    /// Tokens kept: every token the task's data uses, plus the special tokens.
    pub tokens_kept: usize,
    /// Parameters before and after.
    pub parameters_before: usize,
    /// Parameters after.
    pub parameters_after: usize,
}

/// Trims `model` to the tokens in `used` (ids in the model's current vocabulary) plus its special
/// tokens. `files` are the model's current tokenizer files.
///
/// # Errors
/// A tokenizer that cannot be renumbered (BPE), a quantized or pruned embedding table, or a model
/// without `vocab_size`.
pub(super) fn trim_model(
    model: &mut WorkingModel,
    files: &[(String, Vec<u8>)],
    used: &BTreeSet<u32>,
) -> Result<VocabularyReport> {
    let json = files
        .iter()
        .find(|(n, _)| n == "tokenizer.json")
        .map(|(_, b)| b.as_slice())
        .ok_or_else(|| EngineError::InvalidModel("the model has no tokenizer.json".into()))?;
    let kept = task_vocabulary(json, used.iter().copied())?;
    let map = model.modules()?;
    let tokens_before = model
        .config
        .get("vocab_size")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_default() as usize;
    // Packed quantized tables and pruning masks are per row: cutting rows under them would leave
    // them describing another table.
    let vocabulary_tables: Vec<String> = model
        .weight_shapes()
        .into_iter()
        .filter(|(_, dims)| dims.first() == Some(&tokens_before))
        .map(|(n, _)| n)
        .collect();
    for name in &vocabulary_tables {
        if model
            .quantized()
            .is_some_and(|q| q.weights.contains_key(name))
        {
            return Err(EngineError::InvalidSetting(format!(
                "vocabulary: {name} is quantized; trim the vocabulary before quantizing"
            )));
        }
        if model.masks().is_some_and(|m| m.names().contains(name)) {
            return Err(EngineError::InvalidSetting(format!(
                "vocabulary: {name} is pruned; trim the vocabulary before pruning embeddings"
            )));
        }
    }
    let renumbered = rewrite_tokenizer_files(files, &kept)?;
    let parameters_before = model.store.parameter_count();
    let trainable: BTreeSet<String> = model
        .store
        .names()
        .into_iter()
        .filter(|n| model.store.get(n).is_some_and(|p| p.is_trainable()))
        .collect();
    let tensors = model
        .store
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    let (config, tensors) = trim_vocabulary(&map, &model.config, tensors, &kept)?;
    model.store = ParamStore::from_tensors(tensors, |n| trainable.contains(n))?;
    model.config = config;
    // Ids are relative to the job's input tokenizer, so trimming twice composes.
    let kept_in_input = match model.vocabulary() {
        Some(previous) => kept.iter().map(|&k| previous.kept[k as usize]).collect(),
        None => kept.clone(),
    };
    model.set_vocabulary(Some(Arc::new(TrimmedVocabulary {
        kept: kept_in_input,
        files: renumbered,
    })));
    Ok(VocabularyReport {
        tokens_before,
        tokens_kept: kept.len(),
        parameters_before,
        parameters_after: model.store.parameter_count(),
    })
}
