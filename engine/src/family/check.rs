//! Checking a checkpoint before any work is done: does its config name a family the engine runs,
//! is the config consistent, and do the tensors have the shapes it implies? The service calls this
//! when a model is registered, so a bad upload is refused at once, naming the field or tensor.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde_json::Value;

use super::{supported_list, ModelFamily, FAMILIES};

/// Why a checkpoint was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointProblem {
    /// The config names no family the engine runs (or none at all).
    Unsupported(String),
    /// The config itself is inconsistent or lacks a field.
    InvalidConfig(String),
    /// A tensor disagrees with the config.
    Mismatch(String),
}

impl fmt::Display for CheckpointProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported(m) | Self::InvalidConfig(m) | Self::Mismatch(m) => f.write_str(m),
        }
    }
}

/// The family a config names: its `model_type`, else the first class in `architectures`
/// (`BertForSequenceClassification`).
///
/// # Errors
/// [`CheckpointProblem::Unsupported`] naming what the config says and the supported families.
pub fn family_from_config(config: &Value) -> Result<&'static dyn ModelFamily, CheckpointProblem> {
    if let Some(model_type) = config.get("model_type").and_then(Value::as_str) {
        return FAMILIES
            .iter()
            .copied()
            .find(|f| f.model_types().contains(&model_type))
            .ok_or_else(|| {
                CheckpointProblem::Unsupported(format!(
                    "model_type '{model_type}' is not supported; supported: {}",
                    supported_list()
                ))
            });
    }
    let class = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            CheckpointProblem::Unsupported(format!(
                "config.json names no architecture: it has neither `model_type` nor \
                 `architectures`; supported model_type values: {}",
                supported_list()
            ))
        })?;
    FAMILIES
        .iter()
        .copied()
        .find(|f| f.names_architecture(class))
        .ok_or_else(|| {
            CheckpointProblem::Unsupported(format!(
                "architecture '{class}' is not supported; supported model_type values: {}",
                supported_list()
            ))
        })
}

/// Checks `config` and the tensors' shapes (name → shape) against each other.
///
/// # Errors
/// The first problem found: an unsupported family, an inconsistent config, a tensor whose shape
/// disagrees with the config, a missing tensor, or more layers than the config says.
pub fn check_checkpoint(
    config: &Value,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<&'static dyn ModelFamily, CheckpointProblem> {
    let family = family_from_config(config)?;
    family
        .check_config(config)
        .map_err(|e| CheckpointProblem::InvalidConfig(e.to_string()))?;
    let names: Vec<String> = shapes.keys().cloned().collect();
    let expected = family
        .expected_shapes(config, &names)
        .map_err(|e| CheckpointProblem::InvalidConfig(e.to_string()))?;
    for (name, shape) in &expected {
        match shapes.get(name) {
            Some(actual) if actual == shape => {}
            Some(actual) => {
                return Err(CheckpointProblem::Mismatch(format!(
                    "tensor '{name}' has shape {actual:?} but config.json implies {shape:?}"
                )))
            }
            None => {
                return Err(CheckpointProblem::Mismatch(format!(
                    "tensor '{name}' that config.json implies is missing"
                )))
            }
        }
    }
    let layers = config
        .get(family.layer_count_field())
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let found: BTreeSet<u64> = names
        .iter()
        .filter_map(|n| {
            let prefix = family
                .layer_prefixes()
                .iter()
                .find(|p| n.starts_with(**p))?;
            n[prefix.len()..].split('.').next()?.parse().ok()
        })
        .collect();
    if let Some(&last) = found.iter().next_back() {
        if last + 1 > layers {
            return Err(CheckpointProblem::Mismatch(format!(
                "the tensors have {} layers but config.json says {layers}",
                last + 1
            )));
        }
    }
    Ok(family)
}
