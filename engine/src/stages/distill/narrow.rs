//! A narrower student: every layer keeps `attention_heads` attention heads and `intermediate_size`
//! FFN neurons of the teacher's, the units whose weights weigh least (the sum of the absolute
//! values of their rows and columns, as structured pruning's magnitude importance) cut first.
//! The cut is structured pruning's ([`crate::family::shrink`]), so the student is a plain model of
//! the family with smaller widths. The hidden size stays the teacher's.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::Serialize;

use super::super::prune_structured::apply_cut;
use super::super::WorkingModel;
use crate::error::{EngineError, Result};
use crate::family::{LayerWidths, StructuredCut};
use crate::prune::structured::{select, unit_scores, Quota, Structure, StructuredScope};

/// The widths a student is cut to, per layer; `None` keeps the teacher's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Widths {
    /// Attention (query) heads.
    pub attention_heads: Option<usize>,
    /// FFN neurons.
    pub intermediate_size: Option<usize>,
}

/// What narrowing did, for the stage report.
#[derive(Clone, Debug, Serialize)]
pub struct NarrowReport {
    /// Attention heads per layer, before and after.
    pub attention_heads: (usize, usize),
    /// FFN neurons per layer, before and after.
    pub intermediate_size: (usize, usize),
    /// How the kept units were chosen.
    pub order: &'static str,
}

/// Cuts `model` (a student fresh from the teacher's layers) to `widths`.
///
/// # Errors
/// A width that is not smaller than the model's (or not a whole number of key/value groups), or
/// a model whose layers differ in width.
pub fn narrow(model: &mut WorkingModel, widths: Widths) -> Result<Option<NarrowReport>> {
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
    let magnitudes: BTreeMap<String, Tensor> = model
        .store
        .tensors()
        .into_iter()
        .filter(|(name, _)| map.is_linear_weight(name))
        .map(|(name, t)| -> Result<(String, Tensor)> { Ok((name, t.detach().abs()?)) })
        .collect::<Result<_>>()?;
    let mut cut = StructuredCut::default();
    let layers = now.key_value_heads.len();
    if let Some(wanted) = widths.attention_heads {
        if wanted >= heads || wanted % groups != 0 {
            return Err(EngineError::InvalidSetting(format!(
                "distill: attention_heads {wanted} must be fewer than the teacher's {heads} and a \
                 multiple of its {groups} query heads per key/value head"
            )));
        }
        let remove = kv_heads - wanted / groups;
        cut.heads = chosen(&magnitudes, &map, Structure::Heads, layers, remove)?;
    }
    if let Some(wanted) = widths.intermediate_size {
        if wanted >= neurons {
            return Err(EngineError::InvalidSetting(format!(
                "distill: intermediate_size {wanted} must be smaller than the teacher's {neurons}"
            )));
        }
        cut.neurons = chosen(
            &magnitudes,
            &map,
            Structure::Neurons,
            layers,
            neurons - wanted,
        )?;
    }
    apply_cut(model, &map, &cut)?;
    Ok(Some(NarrowReport {
        attention_heads: (heads, widths.attention_heads.unwrap_or(heads)),
        intermediate_size: (neurons, widths.intermediate_size.unwrap_or(neurons)),
        order: "weight magnitude",
    }))
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
