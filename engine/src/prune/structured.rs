//! Structured pruning's arithmetic: what each attention head (key/value group) and FFN neuron is
//! worth, and which to remove for a target under a threshold scope.
//!
//! Importance is summed element by element over a structure's weights: the rows of its query, key
//! and value projections (and FFN up/gate projections) and the columns of its output projection.
//! The element value is `|w|` (l1), `w²` (l2, square-rooted after summing), the accumulated
//! `|w · ∂L/∂w|` (first-order Taylor) or `|w| · ‖x‖` with `x` the input feature the weight reads
//! (Wanda-style activation). A query head's unit is its key/value group: under grouped-query
//! attention a key/value head can only go with all the query heads that share it.
//!
//! Scores are normalised per layer (divided by the layer's mean) before layers are compared, so a
//! layer whose weights are simply larger is not spared for that alone.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::family::{ModuleMap, ModuleRole};

/// What a structured cut removes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Structure {
    /// Attention heads, in whole key/value groups.
    Heads,
    /// FFN intermediate neurons.
    Neurons,
}

impl Structure {
    /// The plural noun for messages and reports.
    pub fn noun(self) -> &'static str {
        match self {
            Structure::Heads => "heads",
            Structure::Neurons => "neurons",
        }
    }
}

/// How a target is spread over layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StructuredScope {
    /// The lowest normalised scores across all layers.
    Global,
    /// The same share in every layer.
    PerLayer,
    /// Each layer gives up its least important structures up to a shared share of its own
    /// importance mass: layers whose importance sits in a few structures lose more.
    LayerAdaptive,
    /// The same count in every layer (formats that need one shape for all layers).
    Uniform,
}

/// How many units to remove now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Quota {
    /// In all layers together (global and layer-adaptive scopes).
    Total(usize),
    /// Layer → count (per-layer and uniform scopes).
    PerLayer(BTreeMap<usize, usize>),
}

/// What [`select`] chose.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Layer → unit indices (in the layer's current order) to remove.
    pub remove: BTreeMap<usize, Vec<usize>>,
    /// Units the quota asked for that `min_keep` kept.
    pub shortfall: usize,
}

/// Per layer, the importance of each unit of `structure`: the sum of `element(weight name)` over
/// the unit's rows and columns. `element` returns the element-wise importance tensor of a weight
/// (same shape), or `None` to leave the weight out (it then adds nothing).
///
/// # Errors
/// A tensor that does not split into the layer's units, or `element`'s error.
pub fn unit_scores(
    map: &ModuleMap,
    structure: Structure,
    mut element: impl FnMut(&str) -> Result<Option<Tensor>>,
) -> Result<BTreeMap<usize, Vec<f64>>> {
    let q_unit = map.head_dim * map.kv_groups;
    // (role, rows or columns, unit width) of the weights that make up one unit.
    let parts: &[(ModuleRole, Axis, usize)] = match structure {
        Structure::Heads => &[
            (ModuleRole::Query, Axis::Rows, q_unit),
            (ModuleRole::Key, Axis::Rows, map.head_dim),
            (ModuleRole::Value, Axis::Rows, map.head_dim),
            (ModuleRole::AttentionOutput, Axis::Columns, q_unit),
        ],
        Structure::Neurons => &[
            (ModuleRole::FfnUp, Axis::Rows, 1),
            (ModuleRole::FfnGate, Axis::Rows, 1),
            (ModuleRole::FfnDown, Axis::Columns, 1),
        ],
    };
    let anchor = parts[0].0;
    let mut scores = BTreeMap::new();
    for module in map.with_role(anchor) {
        let Some(layer) = module.layer else { continue };
        let mut layer_scores: Option<Vec<f64>> = None;
        for &(role, axis, unit) in parts {
            let Some(part) = map.in_layer(layer, role) else {
                continue;
            };
            let name = format!("{}.weight", part.path);
            let Some(values) = element(&name)? else {
                continue;
            };
            let sums = axis_sums(&values, axis)?;
            if unit == 0 || sums.len() % unit != 0 {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: {} {} do not split into units of {unit}",
                    sums.len(),
                    axis.noun()
                )));
            }
            let units: Vec<f64> = sums.chunks(unit).map(|c| c.iter().sum()).collect();
            match &mut layer_scores {
                None => layer_scores = Some(units),
                Some(acc) if acc.len() == units.len() => {
                    acc.iter_mut().zip(units).for_each(|(a, u)| *a += u);
                }
                Some(acc) => {
                    return Err(EngineError::InvalidModel(format!(
                        "{name} has {} {} where layer {layer} has {}",
                        units.len(),
                        structure.noun(),
                        acc.len()
                    )))
                }
            }
        }
        if let Some(s) = layer_scores {
            scores.insert(layer, s);
        }
    }
    Ok(scores)
}

#[derive(Clone, Copy, Debug)]
enum Axis {
    Rows,
    Columns,
}

impl Axis {
    fn noun(self) -> &'static str {
        match self {
            Axis::Rows => "rows",
            Axis::Columns => "columns",
        }
    }
}

/// Each row's (or column's) sum of a 2-D tensor, in f64.
fn axis_sums(values: &Tensor, axis: Axis) -> Result<Vec<f64>> {
    let dim = match axis {
        Axis::Rows => 1,
        Axis::Columns => 0,
    };
    let sums = values
        .to_dtype(candle_core::DType::F32)?
        .sum(dim)?
        .to_vec1::<f32>()?;
    Ok(sums.into_iter().map(f64::from).collect())
}

/// Scores divided by their layer's mean (a layer of zeros stays zeros).
pub fn normalised(scores: &BTreeMap<usize, Vec<f64>>) -> BTreeMap<usize, Vec<f64>> {
    scores
        .iter()
        .map(|(&layer, s)| {
            let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
            let scale = if mean > 0.0 { 1.0 / mean } else { 0.0 };
            (layer, s.iter().map(|v| v * scale).collect())
        })
        .collect()
}

/// Chooses the units to remove from `scores` (raw, per layer) under `scope` and `quota`, keeping at
/// least `min_keep` units per layer. Without `min_keep` a quota that would empty a layer is refused;
/// with it, the units `min_keep` saves are left standing (global and layer-adaptive scopes take
/// the next candidates elsewhere instead) and any remaining gap is the selection's `shortfall`.
///
/// # Errors
/// A quota that empties a layer without `min_keep`.
pub fn select(
    scores: &BTreeMap<usize, Vec<f64>>,
    structure: Structure,
    scope: StructuredScope,
    quota: &Quota,
    min_keep: Option<usize>,
) -> Result<Selection> {
    let floor = min_keep.unwrap_or(1).max(1);
    let norm = normalised(scores);
    let mut remove: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut shortfall = 0;
    let emptied = |layer: usize| {
        EngineError::InvalidSetting(format!(
            "pruning would remove every one of layer {layer}'s {}; lower the sparsity or set \
             min_keep to keep some in every layer",
            structure.noun()
        ))
    };
    match quota {
        Quota::PerLayer(counts) => {
            for (&layer, s) in &norm {
                let wanted = counts.get(&layer).copied().unwrap_or(0);
                let allowed = s.len().saturating_sub(floor);
                if wanted > allowed && min_keep.is_none() && wanted >= s.len() {
                    return Err(emptied(layer));
                }
                let take = wanted.min(allowed);
                shortfall += wanted - take;
                let order = ascending(s);
                if take > 0 {
                    remove.insert(layer, sorted(order[..take].to_vec()));
                }
            }
        }
        Quota::Total(total) => {
            // Every unit's key: its normalised score (global), or the share of its layer's
            // importance mass at and below it (layer-adaptive).
            let mut candidates: Vec<(f64, usize, usize)> = Vec::new();
            for (&layer, s) in &norm {
                let order = ascending(s);
                let mass: f64 = s.iter().sum();
                let mut below = 0.0;
                for i in order {
                    let key = match scope {
                        StructuredScope::LayerAdaptive => {
                            below += s[i];
                            if mass > 0.0 {
                                below / mass
                            } else {
                                0.0
                            }
                        }
                        _ => s[i],
                    };
                    candidates.push((key, layer, i));
                }
            }
            candidates.sort_by(|a, b| a.0.total_cmp(&b.0).then((a.1, a.2).cmp(&(b.1, b.2))));
            let mut left: BTreeMap<usize, usize> =
                norm.iter().map(|(&l, s)| (l, s.len())).collect();
            let mut taken = 0;
            for (_, layer, i) in candidates {
                if taken == *total {
                    break;
                }
                let remaining = left.get(&layer).copied().unwrap_or(0);
                if remaining <= floor {
                    if min_keep.is_none() && remaining == 1 {
                        return Err(emptied(layer));
                    }
                    continue;
                }
                left.insert(layer, remaining - 1);
                remove.entry(layer).or_default().push(i);
                taken += 1;
            }
            shortfall = total - taken;
            for units in remove.values_mut() {
                units.sort_unstable();
            }
        }
    }
    Ok(Selection { remove, shortfall })
}

/// Indices of `s` from the smallest value up (ties by index).
fn ascending(s: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&a, &b| s[a].total_cmp(&s[b]).then(a.cmp(&b)));
    order
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(layers: &[&[f64]]) -> BTreeMap<usize, Vec<f64>> {
        layers
            .iter()
            .enumerate()
            .map(|(l, s)| (l, s.to_vec()))
            .collect()
    }

    #[test]
    fn global_compares_normalised_scores() -> Result<()> {
        // Layer 1's weights are ten times larger; normalised, its smallest unit is the weakest.
        let s = scores(&[&[1.0, 2.0, 3.0], &[10.0, 50.0, 60.0]]);
        let sel = select(
            &s,
            Structure::Heads,
            StructuredScope::Global,
            &Quota::Total(2),
            None,
        )?;
        assert_eq!(sel.remove, BTreeMap::from([(0, vec![0]), (1, vec![0])]));
        assert_eq!(sel.shortfall, 0);
        Ok(())
    }

    #[test]
    fn layer_adaptive_prunes_layers_with_concentrated_importance_more() -> Result<()> {
        // Layer 0 is flat; layer 1 keeps nearly all its mass in one unit.
        let s = scores(&[&[1.0, 1.0, 1.0, 1.0], &[0.1, 0.1, 0.1, 10.0]]);
        let sel = select(
            &s,
            Structure::Neurons,
            StructuredScope::LayerAdaptive,
            &Quota::Total(3),
            None,
        )?;
        assert_eq!(sel.remove, BTreeMap::from([(1, vec![0, 1, 2])]));
        Ok(())
    }

    #[test]
    fn per_layer_quota_that_empties_a_layer_needs_min_keep() {
        let s = scores(&[&[1.0, 2.0], &[3.0, 4.0]]);
        let quota = Quota::PerLayer(BTreeMap::from([(0, 2), (1, 2)]));
        let err = select(
            &s,
            Structure::Heads,
            StructuredScope::PerLayer,
            &quota,
            None,
        );
        assert!(
            matches!(&err, Err(EngineError::InvalidSetting(m)) if m.contains("every one of layer 0's heads")),
            "{err:?}"
        );
        let sel = select(
            &s,
            Structure::Heads,
            StructuredScope::PerLayer,
            &quota,
            Some(1),
        )
        .unwrap();
        assert_eq!(sel.remove, BTreeMap::from([(0, vec![0]), (1, vec![0])]));
        assert_eq!(sel.shortfall, 2);
    }

    #[test]
    fn global_quota_that_empties_a_layer_is_refused_or_moved_by_min_keep() {
        let s = scores(&[&[1.0, 1.0], &[1.0, 9.0, 9.0, 9.0]]);
        let err = select(
            &s,
            Structure::Heads,
            StructuredScope::Global,
            &Quota::Total(3),
            None,
        );
        assert!(
            matches!(err, Err(EngineError::InvalidSetting(_))),
            "{err:?}"
        );
        let sel = select(
            &s,
            Structure::Heads,
            StructuredScope::Global,
            &Quota::Total(3),
            Some(1),
        )
        .unwrap();
        // Layer 0 keeps one unit; the third removal moves to layer 1's next weakest.
        assert_eq!(sel.remove, BTreeMap::from([(0, vec![0]), (1, vec![0, 1])]));
        assert_eq!(sel.shortfall, 0);
    }

    #[test]
    fn normalising_divides_by_the_layer_mean() {
        let n = normalised(&scores(&[&[1.0, 3.0], &[0.0, 0.0]]));
        assert_eq!(n[&0], vec![0.5, 1.5]);
        assert_eq!(n[&1], vec![0.0, 0.0]);
    }
}
