//! A narrower student: every layer keeps `attention_heads` attention heads and `intermediate_size`
//! FFN neurons of the teacher's, the least important cut first, scored as structured pruning
//! scores them (`narrow_importance`): by weight magnitude (`l1`, `l2`), or on calibration batches
//! of the task's training data by first-order Taylor saliency (`taylor`) or input norms times
//! weights (`activation`), computed on the student fresh from the teacher's layers.
//! The cut is structured pruning's ([`crate::family::shrink`]), so the student is a plain model of
//! the family with smaller widths.
//!
//! A narrower `hidden_size` cuts channels of the residual stream: the same channels from every
//! tensor that reads or writes it (embedding columns, norm gains, the input columns of the
//! attention and FFN projections and the task head, the output rows of the attention and FFN
//! output projections, the pooler both ways). The head size stays the teacher's, because
//! transformers' BERT and every Llama reader derive it from `hidden_size / num_attention_heads`:
//! the student has `hidden_size / head_dim` heads (`attention_heads`, if given, must agree). The
//! channels kept are those of most weight magnitude over all those tensors, each tensor's
//! contribution scaled to a mean of one so that a large embedding table does not decide alone.
//! Norms then normalise over fewer channels, so the student starts further from the teacher than
//! a layer cut alone leaves it; distillation trains that away.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use super::super::prune_structured::apply_cut;
use super::super::WorkingModel;
use crate::error::{EngineError, Result};
use crate::family::{LayerWidths, ModuleMap, ModuleRole, StructuredCut};
use crate::params::ParamStore;
use crate::prune::structured::{select, unit_scores, Quota, Structure, StructuredScope};
use crate::stages::prune_structured::{Importance, StructuredPrune};
use crate::stages::Trainer;

/// Training batches `taylor` and `activation` importance score a student's units on.
const NARROW_CALIBRATION_BATCHES: usize = 8;

/// The widths a student is cut to, per layer; `None` keeps the teacher's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Widths {
    /// Attention (query) heads.
    pub attention_heads: Option<usize>,
    /// FFN neurons.
    pub intermediate_size: Option<usize>,
    /// Channels of the residual stream.
    pub hidden_size: Option<usize>,
}

/// What narrowing did, for the stage report.
#[derive(Clone, Debug, Serialize)]
pub struct NarrowReport {
    /// Attention heads per layer, before and after.
    pub attention_heads: (usize, usize),
    /// FFN neurons per layer, before and after.
    pub intermediate_size: (usize, usize),
    /// The hidden size, before and after.
    pub hidden_size: (usize, usize),
    /// How the kept units were chosen.
    pub order: &'static str,
}

/// Cuts `model` (a student fresh from the teacher's layers) to `widths`, heads and neurons ranked
/// by `importance` (calibrated through `trainer` on `calibration_batches` batches of
/// `batch_size` when it needs data).
///
/// # Errors
/// A width that is not smaller than the model's (or not a whole number of key/value groups), a
/// model whose layers differ in width, or importance that needs training data when there is none.
pub fn narrow(
    model: &mut WorkingModel,
    widths: Widths,
    importance: Importance,
    trainer: &dyn Trainer,
    batch_size: usize,
) -> Result<Option<NarrowReport>> {
    if widths == Widths::default() {
        return Ok(None);
    }
    let map = model.modules()?;
    let shapes: BTreeMap<String, Vec<usize>> = model.weight_shapes().into_iter().collect();
    let now = LayerWidths::of(&map, &shapes)?;
    let uniform = |sizes: &[usize], what: &str| {
        LayerWidths::same(sizes).ok_or_else(|| {
            EngineError::InvalidSetting(format!(
                "distill: the teacher's layers differ in {what}; a narrower student needs one width"
            ))
        })
    };
    let groups = map.kv_groups.max(1);
    let kv_heads = uniform(&now.key_value_heads, "attention heads")?;
    let neurons = uniform(&now.intermediate_sizes, "intermediate size")?;
    let heads = kv_heads * groups;
    let hidden_now = config_usize(&model.config, "hidden_size")?;
    let mut widths = widths;
    if let Some(hidden) = widths.hidden_size {
        let head_dim = map.head_dim.max(1);
        if hidden >= hidden_now || hidden % head_dim != 0 {
            return Err(EngineError::InvalidSetting(format!(
                "distill: hidden_size {hidden} must be smaller than the teacher's {hidden_now} and \
                 a multiple of its head size {head_dim} (the student keeps the head size and has \
                 hidden_size / {head_dim} heads)"
            )));
        }
        let derived = hidden / head_dim;
        if derived > heads || derived % groups != 0 {
            return Err(EngineError::InvalidSetting(format!(
                "distill: hidden_size {hidden} means {derived} heads of the teacher's size \
                 {head_dim}: that must be at most the teacher's {heads} heads and a multiple of \
                 its {groups} query heads per key/value head"
            )));
        }
        match widths.attention_heads {
            Some(wanted) if wanted != derived => {
                return Err(EngineError::InvalidSetting(format!(
                    "distill: attention_heads {wanted} does not fit hidden_size {hidden}: with the \
                     teacher's head size {head_dim} the student has {derived} heads"
                )));
            }
            _ if derived < heads => widths.attention_heads = Some(derived),
            _ => {}
        }
    }
    if let Some(wanted) = widths.attention_heads {
        if wanted >= heads || wanted % groups != 0 {
            return Err(EngineError::InvalidSetting(format!(
                "distill: attention_heads {wanted} must be fewer than the teacher's {heads} and a \
                 multiple of its {groups} query heads per key/value head"
            )));
        }
    }
    if let Some(wanted) = widths.intermediate_size {
        if wanted >= neurons {
            return Err(EngineError::InvalidSetting(format!(
                "distill: intermediate_size {wanted} must be smaller than the teacher's {neurons}"
            )));
        }
    }
    let cuts_units = widths.attention_heads.is_some() || widths.intermediate_size.is_some();
    let scores: BTreeMap<String, Tensor> = if cuts_units {
        let scorer = StructuredPrune {
            structures: Vec::new(),
            importance,
            scope: StructuredScope::Uniform,
            sparsity: 0.0,
            steps: 1,
            min_keep: None,
            calibration_batches: NARROW_CALIBRATION_BATCHES,
            calibration_batch_size: batch_size.max(1),
            recover: None,
            lora: None,
        };
        scorer.element_importance(model, trainer)?
    } else {
        BTreeMap::new()
    };
    let mut cut = StructuredCut::default();
    let layers = now.key_value_heads.len();
    if let Some(wanted) = widths.attention_heads {
        let remove = kv_heads - wanted / groups;
        cut.heads = chosen(&scores, &map, Structure::Heads, layers, remove)?;
    }
    if let Some(wanted) = widths.intermediate_size {
        cut.neurons = chosen(&scores, &map, Structure::Neurons, layers, neurons - wanted)?;
    }
    apply_cut(model, &map, &cut)?;
    if let Some(hidden) = widths.hidden_size {
        cut_hidden(model, hidden_now, hidden)?;
    }
    Ok(Some(NarrowReport {
        attention_heads: (heads, widths.attention_heads.unwrap_or(heads)),
        intermediate_size: (neurons, widths.intermediate_size.unwrap_or(neurons)),
        hidden_size: (hidden_now, widths.hidden_size.unwrap_or(hidden_now)),
        order: importance.name(),
    }))
}

fn config_usize(config: &serde_json::Value, field: &str) -> Result<usize> {
    config
        .get(field)
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| EngineError::InvalidModel(format!("config.json has no {field}")))
}

/// The axes of a parameter that run along the residual stream, by the role of its module.
fn hidden_axes(map: &ModuleMap, name: &str) -> &'static [usize] {
    let Some(module) = map.of_param(name) else {
        return &[];
    };
    let is_bias = name.ends_with(".bias");
    match module.role {
        ModuleRole::Embedding => &[1],
        ModuleRole::Norm => &[0],
        ModuleRole::Query
        | ModuleRole::Key
        | ModuleRole::Value
        | ModuleRole::FfnUp
        | ModuleRole::FfnGate
        | ModuleRole::TaskHead => {
            if is_bias {
                &[]
            } else {
                &[1]
            }
        }
        ModuleRole::AttentionOutput | ModuleRole::FfnDown => &[0],
        ModuleRole::Pooler => {
            if is_bias {
                &[0]
            } else {
                &[0, 1]
            }
        }
    }
}

/// Keeps the `hidden` residual channels (of `now`) of most weight magnitude in every tensor that
/// carries them, and writes the new width (and the head count it implies) into the config.
fn cut_hidden(model: &mut WorkingModel, now: usize, hidden: usize) -> Result<()> {
    let map = model.modules()?;
    let tensors: Vec<(String, Tensor)> = model
        .store
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    let mut score = vec![0f64; now];
    for (name, tensor) in &tensors {
        // A tensor of no known module (a checkpoint's extra head, say) cannot be told to carry
        // the hidden size or not; cutting around it would leave the student inconsistent.
        if map.of_param(name).is_none() && tensor.dims().contains(&now) {
            return Err(EngineError::InvalidModel(format!(
                "distill: hidden_size: {name} {:?} belongs to no module this family knows and may                  carry the hidden size {now}; a narrower hidden size cannot be cut around it",
                tensor.dims()
            )));
        }
        for &axis in hidden_axes(&map, name) {
            if tensor.dim(axis)? != now {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: dimension {axis} is {}, not the hidden size {now}",
                    tensor.dim(axis)?
                )));
            }
            let along = tensor.abs()?.transpose(0, axis)?.contiguous()?;
            let per_channel = along
                .reshape((now, along.elem_count() / now))?
                .sum(1)?
                .to_dtype(candle_core::DType::F64)?
                .to_vec1::<f64>()?;
            let mean = per_channel.iter().sum::<f64>() / now as f64;
            if mean > 0.0 {
                for (s, v) in score.iter_mut().zip(&per_channel) {
                    *s += v / mean;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..now).collect();
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    let mut keep: Vec<u32> = order[..hidden].iter().map(|&c| c as u32).collect();
    keep.sort_unstable();
    let device = tensors
        .first()
        .map_or(candle_core::Device::Cpu, |(_, t)| t.device().clone());
    let index = Tensor::from_vec(keep, hidden, &device)?;
    let cut: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, mut tensor)| -> Result<(String, Tensor)> {
            for &axis in hidden_axes(&map, &name) {
                tensor = tensor.index_select(&index, axis)?.contiguous()?;
            }
            Ok((name, tensor))
        })
        .collect::<Result<_>>()?;
    let shapes: BTreeMap<String, Vec<usize>> = cut
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let widths = LayerWidths::of(&map, &shapes)?;
    let mut config = model.config.clone();
    if let Some(obj) = config.as_object_mut() {
        obj.insert("hidden_size".into(), hidden.into());
        if let Some(&heads) = widths.attention_heads.first() {
            obj.insert("num_attention_heads".into(), heads.into());
        }
    }
    let config = model.family()?.config_for_widths(&config, &widths, &map)?;
    *model = model.derived(ParamStore::from_tensors(cut, |_| true)?, config);
    Ok(())
}

/// Per layer, the `remove` units of `structure` of least magnitude.
fn chosen(
    magnitudes: &BTreeMap<String, Tensor>,
    map: &crate::family::ModuleMap,
    structure: Structure,
    layers: usize,
    remove: usize,
) -> Result<BTreeMap<usize, Vec<usize>>> {
    let scores = unit_scores(map, structure, |name| Ok(magnitudes.get(name).cloned()))?;
    let quota = Quota::PerLayer((0..layers).map(|layer| (layer, remove)).collect());
    Ok(select(&scores, structure, StructuredScope::Uniform, &quota, None)?.remove)
}
