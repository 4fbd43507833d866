//! Model surgery that changes shapes: students made of chosen teacher layers, and layers shrunk
//! to fewer attention heads or FFN neurons. Both work on tensors by module role, so they serve
//! every family; the models read their widths from the tensors (see
//! [`crate::layers::LinearFactory::build`]), so the results load as they are.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;
use serde_json::Value;

use super::modules::{ModuleMap, ModuleRole};
use super::ModelFamily;
use crate::error::{EngineError, Result};

/// Keeps the layers `keep` of a model (in that order, renumbered from 0) and everything outside
/// the layer stack: a distillation student initialised from its teacher. The config's layer count
/// is set to `keep.len()`.
///
/// # Errors
/// An empty `keep`, a repeated layer, or one the model does not have.
pub fn drop_layers(
    family: &dyn ModelFamily,
    config: &Value,
    tensors: Vec<(String, Tensor)>,
    keep: &[usize],
) -> Result<(Value, Vec<(String, Tensor)>)> {
    let field = family.layer_count_field();
    let layers = config
        .get(field)
        .and_then(Value::as_u64)
        .ok_or_else(|| EngineError::InvalidModel(format!("config.json has no {field}")))?
        as usize;
    let mut seen = BTreeSet::new();
    if keep.is_empty() {
        return Err(EngineError::InvalidSetting(
            "a student needs at least one layer".into(),
        ));
    }
    for &layer in keep {
        if layer >= layers {
            return Err(EngineError::InvalidSetting(format!(
                "layer {layer} does not exist: the model has {layers} layers"
            )));
        }
        if !seen.insert(layer) {
            return Err(EngineError::InvalidSetting(format!(
                "layer {layer} is listed twice"
            )));
        }
    }
    let new_index: BTreeMap<usize, usize> = keep.iter().enumerate().map(|(i, &l)| (l, i)).collect();
    let mut kept = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        match split_layer(&name, family.layer_prefixes()) {
            Some((prefix, layer, rest)) => {
                if let Some(i) = new_index.get(&layer) {
                    kept.push((format!("{prefix}{i}.{rest}"), tensor));
                }
            }
            None => kept.push((name, tensor)),
        }
    }
    let mut config = config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert(field.to_owned(), Value::from(keep.len()));
    }
    Ok((config, kept))
}

/// `(prefix, layer, rest)` of a name inside the layer stack.
fn split_layer<'n>(
    name: &'n str,
    prefixes: &[&'static str],
) -> Option<(&'static str, usize, &'n str)> {
    prefixes.iter().find_map(|prefix| {
        let rest = name.strip_prefix(prefix)?;
        let (index, rest) = rest.split_once('.')?;
        Some((*prefix, index.parse().ok()?, rest))
    })
}

/// What structured pruning removes, per layer: key/value heads (a query head's group goes with
/// them; without grouped-query attention a head is a head) and FFN neurons, by index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StructuredCut {
    /// Layer → key/value head indices to remove.
    pub heads: BTreeMap<usize, Vec<usize>>,
    /// Layer → FFN neuron indices to remove.
    pub neurons: BTreeMap<usize, Vec<usize>>,
}

/// Removes the heads and neurons of `cut` from `tensors`: rows of the query, key, value and FFN
/// input projections (and their biases), columns of the attention and FFN output projections.
///
/// # Errors
/// An index past a layer's heads or neurons, or a cut that would leave a layer with none.
pub fn shrink(
    map: &ModuleMap,
    tensors: Vec<(String, Tensor)>,
    cut: &StructuredCut,
) -> Result<Vec<(String, Tensor)>> {
    tensors
        .into_iter()
        .map(|(name, tensor)| {
            let Some(module) = map.of_param(&name) else {
                return Ok((name, tensor));
            };
            let Some(layer) = module.layer else {
                return Ok((name, tensor));
            };
            let is_bias = name.ends_with(".bias");
            let heads = cut.heads.get(&layer);
            let neurons = cut.neurons.get(&layer);
            let q_unit = map.head_dim * map.kv_groups;
            let (removed, unit, axis) = match module.role {
                ModuleRole::Query => (heads, q_unit, 0),
                ModuleRole::Key | ModuleRole::Value => (heads, map.head_dim, 0),
                ModuleRole::AttentionOutput if !is_bias => (heads, q_unit, 1),
                ModuleRole::FfnUp | ModuleRole::FfnGate => (neurons, 1, 0),
                ModuleRole::FfnDown if !is_bias => (neurons, 1, 1),
                _ => (None, 1, 0),
            };
            match removed {
                Some(indices) if !indices.is_empty() => {
                    let axis = if is_bias { 0 } else { axis };
                    let shrunk = remove_units(&tensor, axis, unit, indices)
                        .map_err(|e| EngineError::InvalidSetting(format!("{name}: {e}")))?;
                    Ok((name, shrunk))
                }
                _ => Ok((name, tensor)),
            }
        })
        .collect()
}

/// Removes the `unit`-wide blocks `indices` along `axis`.
fn remove_units(tensor: &Tensor, axis: usize, unit: usize, indices: &[usize]) -> Result<Tensor> {
    let size = tensor.dim(axis)?;
    let units = size / unit.max(1);
    let removed: BTreeSet<usize> = indices.iter().copied().collect();
    if let Some(&bad) = removed.iter().find(|&&i| i >= units) {
        return Err(EngineError::InvalidSetting(format!(
            "unit {bad} does not exist: there are {units}"
        )));
    }
    if removed.len() >= units {
        return Err(EngineError::InvalidSetting(
            "the cut would remove every unit of the layer".into(),
        ));
    }
    let keep: Vec<u32> = (0..units)
        .filter(|u| !removed.contains(u))
        .flat_map(|u| (u * unit..(u + 1) * unit).map(|i| i as u32))
        .collect();
    let index = Tensor::from_vec(keep.clone(), keep.len(), tensor.device())?;
    Ok(tensor.detach().index_select(&index, axis)?.contiguous()?)
}
