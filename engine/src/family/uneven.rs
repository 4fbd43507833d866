//! Layers of different widths after structured pruning, and the config that describes them.
//!
//! Inside the engine a structurally pruned layer is simply narrower (the models read widths from
//! the tensors). Formats differ in what they can say:
//! - transformers' `BertModel` (5.x) has one head count, tied to the head size, and one
//!   `intermediate_size` for all layers, and no longer honours `pruned_heads`. A BERT layer with
//!   fewer heads, or FFN widths that differ between layers, is therefore written **padded with
//!   zeros** back to the config's widths: a zero query/key/value head with zero biases and zero
//!   output columns adds exactly nothing, and neither does a zero FFN neuron (its output column
//!   is zero). The real widths go into the config under [`LAYER_WIDTHS_FIELD`], and reading the
//!   folder back cuts the padding off again, so the engine runs, measures and re-saves the
//!   narrow model. FFN widths equal in every layer need no padding: `intermediate_size` changes.
//! - transformers' `LlamaForCausalLM`, candle's and llama.cpp's GGUF readers need one shape for
//!   every layer: a Llama model is only pruned uniformly, and its config says the new head and
//!   neuron counts (with `head_dim` written out, since it no longer follows from them).

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::modules::{ModuleMap, ModuleRole};
use crate::error::{EngineError, Result};

/// The config field that records each layer's real widths when a folder stores them padded.
pub const LAYER_WIDTHS_FIELD: &str = "compressd_layer_widths";

/// The widths of every layer after structured pruning.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerWidths {
    /// Query heads per layer.
    pub attention_heads: Vec<usize>,
    /// Key/value heads per layer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_value_heads: Vec<usize>,
    /// FFN neurons per layer.
    pub intermediate_sizes: Vec<usize>,
}

impl LayerWidths {
    /// The widths the tensors of a model with `map` have now.
    ///
    /// # Errors
    /// A layer without a query or FFN input projection, or a width that is not whole heads.
    pub fn of(map: &ModuleMap, shapes: &BTreeMap<String, Vec<usize>>) -> Result<Self> {
        let rows = |role: ModuleRole, layer: usize| -> Result<usize> {
            let module = map.in_layer(layer, role).ok_or_else(|| {
                EngineError::InvalidModel(format!("layer {layer} has no {role:?} projection"))
            })?;
            let name = format!("{}.weight", module.path);
            shapes
                .get(&name)
                .and_then(|s| s.first().copied())
                .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))
        };
        let layers = map
            .with_role(ModuleRole::Query)
            .filter_map(|m| m.layer)
            .max()
            .map_or(0, |l| l + 1);
        let mut widths = Self::default();
        for layer in 0..layers {
            widths
                .attention_heads
                .push(rows(ModuleRole::Query, layer)? / map.head_dim.max(1));
            widths
                .key_value_heads
                .push(rows(ModuleRole::Key, layer)? / map.head_dim.max(1));
            widths
                .intermediate_sizes
                .push(rows(ModuleRole::FfnUp, layer)?);
        }
        Ok(widths)
    }

    /// The one value of `widths` when every layer has it.
    pub fn same(widths: &[usize]) -> Option<usize> {
        let first = *widths.first()?;
        widths.iter().all(|&w| w == first).then_some(first)
    }
}

/// The recorded real widths of a padded folder's config, if any.
///
/// # Errors
/// A malformed record.
pub fn recorded_widths(config: &Value) -> Result<Option<LayerWidths>> {
    match config.get(LAYER_WIDTHS_FIELD) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| {
            EngineError::InvalidModel(format!("config.json {LAYER_WIDTHS_FIELD}: {e}"))
        }),
    }
}

/// Pads each layer of a model whose config records [`LAYER_WIDTHS_FIELD`] with zero heads and
/// neurons up to the config's `num_attention_heads` and `intermediate_size` (see the module
/// docs); other models come back unchanged.
///
/// # Errors
/// A layer wider than the config's widths.
pub fn pad_to_config(
    map: &ModuleMap,
    config: &Value,
    tensors: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    if recorded_widths(config)?.is_none() {
        return Ok(tensors);
    }
    let (heads, neurons) = config_widths(config)?;
    resize(map, tensors, heads * map.head_dim, neurons, |t, dim, to| {
        let have = t.dim(dim)?;
        if have > to {
            return Err(EngineError::InvalidModel(format!(
                "a layer is {have} wide, more than the config's {to}"
            )));
        }
        Ok(t.pad_with_zeros(dim, 0, to - have)?)
    })
}

/// Cuts the zero padding of [`pad_to_config`] off again: each layer back to the widths its config
/// records. Tensors already that narrow (a quantized folder, stored unpadded) stay as they are.
///
/// # Errors
/// A malformed record.
pub fn cut_padding(
    map: &ModuleMap,
    config: &Value,
    tensors: Vec<(String, Tensor)>,
) -> Result<Vec<(String, Tensor)>> {
    let Some(widths) = recorded_widths(config)? else {
        return Ok(tensors);
    };
    tensors
        .into_iter()
        .map(|(name, t)| {
            let Some((role, layer)) = map.of_param(&name).and_then(|m| Some((m.role, m.layer?)))
            else {
                return Ok((name, t));
            };
            let heads = widths.attention_heads.get(layer).copied();
            let kv = widths.key_value_heads.get(layer).copied().or(heads);
            let neurons = widths.intermediate_sizes.get(layer).copied();
            let q = heads.map(|h| h * map.head_dim);
            let target = match (role, name.ends_with(".bias")) {
                (ModuleRole::Query, _) => q.map(|w| (0, w)),
                (ModuleRole::Key | ModuleRole::Value, _) => kv.map(|h| (0, h * map.head_dim)),
                (ModuleRole::AttentionOutput, false) => q.map(|w| (1, w)),
                (ModuleRole::FfnUp | ModuleRole::FfnGate, _) => neurons.map(|w| (0, w)),
                (ModuleRole::FfnDown, false) => neurons.map(|w| (1, w)),
                _ => None,
            };
            match target {
                Some((dim, width)) if t.dim(dim)? > width => {
                    Ok((name, t.narrow(dim, 0, width)?.contiguous()?))
                }
                _ => Ok((name, t)),
            }
        })
        .collect()
}

/// `num_attention_heads` and `intermediate_size` of a config.
fn config_widths(config: &Value) -> Result<(usize, usize)> {
    let field = |name: &str| {
        config
            .get(name)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| EngineError::InvalidModel(format!("config.json has no {name}")))
    };
    Ok((field("num_attention_heads")?, field("intermediate_size")?))
}

/// Applies `to_width(tensor, dim, width)` to every attention and FFN tensor of every layer, with
/// `q_width` rows (or columns) for attention and `neurons` for the FFN.
fn resize(
    map: &ModuleMap,
    tensors: Vec<(String, Tensor)>,
    q_width: usize,
    neurons: usize,
    to_width: impl Fn(&Tensor, usize, usize) -> Result<Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let kv_width = q_width / map.kv_groups.max(1);
    tensors
        .into_iter()
        .map(|(name, t)| {
            let Some(module) = map.of_param(&name).filter(|m| m.layer.is_some()) else {
                return Ok((name, t));
            };
            let is_bias = name.ends_with(".bias");
            let target = match module.role {
                ModuleRole::Query => Some((0, q_width)),
                ModuleRole::Key | ModuleRole::Value => Some((0, kv_width)),
                ModuleRole::AttentionOutput if !is_bias => Some((1, q_width)),
                ModuleRole::FfnUp | ModuleRole::FfnGate => Some((0, neurons)),
                ModuleRole::FfnDown if !is_bias => Some((1, neurons)),
                _ => None,
            };
            match target {
                Some((dim, width)) => {
                    let resized = to_width(&t, dim, width)
                        .map_err(|e| EngineError::InvalidModel(format!("{name}: {e}")))?;
                    Ok((name, resized))
                }
                None => Ok((name, t)),
            }
        })
        .collect()
}

/// A config for layers of `widths` in a format that allows uneven layers only through padding
/// (BERT): FFN widths equal in all layers become `intermediate_size`; anything uneven, and any
/// change of head count, is recorded under [`LAYER_WIDTHS_FIELD`] with `intermediate_size` the
/// widest layer's, and the folder is written padded.
///
/// # Errors
/// A config that is not a JSON object.
pub fn padded_config(config: &Value, widths: &LayerWidths) -> Result<Value> {
    let mut out = config.clone();
    let obj = out
        .as_object_mut()
        .ok_or_else(|| EngineError::InvalidModel("config.json is not an object".into()))?;
    let (heads, _) = config_widths(config)?;
    let neurons = widths.intermediate_sizes.iter().copied().max().unwrap_or(0);
    obj.insert("intermediate_size".into(), Value::from(neurons));
    let even_heads = LayerWidths::same(&widths.attention_heads) == Some(heads);
    let even_ffn = LayerWidths::same(&widths.intermediate_sizes).is_some();
    if even_heads && even_ffn {
        obj.remove(LAYER_WIDTHS_FIELD);
    } else {
        let record = LayerWidths {
            key_value_heads: Vec::new(),
            ..widths.clone()
        };
        obj.insert(
            LAYER_WIDTHS_FIELD.into(),
            serde_json::to_value(record).map_err(|e| EngineError::InvalidModel(e.to_string()))?,
        );
    }
    Ok(out)
}

/// A config for layers of `widths` in a format that needs one shape for all layers (Llama): the
/// head, key/value head and FFN counts set, `head_dim` written out.
///
/// # Errors
/// Layers of different widths, named with the scope that avoids them.
pub fn uniform_config(config: &Value, widths: &LayerWidths, head_dim: usize) -> Result<Value> {
    let uneven = |what: &str| {
        EngineError::InvalidSetting(format!(
            "this model's formats (transformers, GGUF) need the same {what} in every layer; \
             prune with scope uniform"
        ))
    };
    let heads = LayerWidths::same(&widths.attention_heads).ok_or_else(|| uneven("heads"))?;
    let kv = LayerWidths::same(&widths.key_value_heads).ok_or_else(|| uneven("heads"))?;
    let neurons =
        LayerWidths::same(&widths.intermediate_sizes).ok_or_else(|| uneven("FFN width"))?;
    let mut out = config.clone();
    let obj = out
        .as_object_mut()
        .ok_or_else(|| EngineError::InvalidModel("config.json is not an object".into()))?;
    obj.insert("num_attention_heads".into(), Value::from(heads));
    obj.insert("num_key_value_heads".into(), Value::from(kv));
    obj.insert("head_dim".into(), Value::from(head_dim));
    obj.insert("intermediate_size".into(), Value::from(neurons));
    Ok(out)
}
