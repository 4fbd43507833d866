//! What the structured prune reports: per structure the requested and achieved shares, per layer
//! the structures kept (original indices) and their normalised score range.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{StructuredPrune, Survivors};
use crate::family::ModuleMap;
use crate::params::ParamStore;
use crate::prune::structured::{Structure, StructuredScope};

/// What the structured stage reports.
#[derive(Clone, Debug, Serialize)]
pub struct StructuredReport {
    /// `heads`, `neurons` or `structured`.
    pub pattern: String,
    /// `l1`, `l2`, `taylor` or `activation`.
    pub importance: String,
    /// The threshold scope.
    pub scope: String,
    /// Increments run.
    pub steps: u32,
    /// Whether each increment was followed by a recovery fine-tune.
    pub recovered: bool,
    /// Per structure: what was asked, what was removed and why they differ.
    pub targets: Vec<TargetReport>,
    /// Parameters before and after.
    pub parameters_before: usize,
    /// Parameters after.
    pub parameters_after: usize,
    /// f32 bytes of the parameters before (the engine's in-memory size; a padded export of uneven
    /// BERT layers is larger on disk).
    pub bytes_before: usize,
    /// f32 bytes of the parameters after.
    pub bytes_after: usize,
    /// Per layer and structure, what was kept.
    pub layers: Vec<LayerReport>,
}

/// One structure's target and result.
#[derive(Clone, Debug, Serialize)]
pub struct TargetReport {
    /// `heads` or `neurons`.
    pub structure: String,
    /// The share asked for.
    pub requested_share: f64,
    /// The share removed (of the units the stage started with).
    pub achieved_share: f64,
    /// Units before (heads count query heads; they go in key/value groups of `group_size`).
    pub before: usize,
    /// Units after.
    pub after: usize,
    /// Query heads per removable unit (1 for neurons and for attention without GQA).
    pub group_size: usize,
    /// Why achieved and requested differ, when they do.
    pub note: Option<String>,
}

/// What one layer kept of one structure.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The layer.
    pub layer: usize,
    /// `heads` or `neurons`.
    pub structure: String,
    /// Units before the stage.
    pub before: usize,
    /// Original indices of the units kept (key/value groups for heads).
    pub kept: Vec<usize>,
    /// Lowest and highest normalised score (1 = the layer's mean) among the kept units at the
    /// last scoring.
    pub kept_score_range: Option<(f64, f64)>,
    /// Highest normalised score among the units removed at the last scoring.
    pub removed_score_max: Option<f64>,
}

impl StructuredPrune {
    pub(super) fn targets(
        &self,
        map: &ModuleMap,
        start: &BTreeMap<(Structure, usize), usize>,
        survivors: &Survivors,
        notes: &BTreeMap<Structure, String>,
    ) -> Vec<TargetReport> {
        self.structures
            .iter()
            .map(|&structure| {
                let group = match structure {
                    Structure::Heads => map.kv_groups.max(1),
                    Structure::Neurons => 1,
                };
                let before: usize = start
                    .iter()
                    .filter(|((s, _), _)| *s == structure)
                    .map(|(_, n)| n)
                    .sum();
                let after: usize = survivors
                    .iter()
                    .filter(|((s, _), _)| *s == structure)
                    .map(|(_, kept)| kept.len())
                    .sum();
                let achieved = 1.0 - after as f64 / before.max(1) as f64;
                let unit = match (structure, group) {
                    (Structure::Heads, g) if g > 1 => format!("key/value groups of {g} heads"),
                    (s, _) => format!("whole {}", s.noun()),
                };
                let rounding = match self.scope {
                    StructuredScope::PerLayer | StructuredScope::Uniform => "in every layer",
                    _ => "over the model",
                };
                let note = notes.get(&structure).cloned().or_else(|| {
                    ((achieved - self.sparsity).abs() > 1e-9).then(|| {
                        format!(
                            "{:.2}% requested, {:.2}% removed: the target is rounded to {unit} \
                             {rounding}",
                            self.sparsity * 100.0,
                            achieved * 100.0,
                        )
                    })
                });
                TargetReport {
                    structure: structure.noun().into(),
                    requested_share: self.sparsity,
                    achieved_share: achieved,
                    before: before * group,
                    after: after * group,
                    group_size: group,
                    note,
                }
            })
            .collect()
    }
}

pub(super) fn parameter_count(store: &ParamStore) -> usize {
    store.tensors().iter().map(|(_, t)| t.elem_count()).sum()
}

pub(super) fn pattern_name(structures: &[Structure]) -> &'static str {
    match structures {
        [Structure::Heads] => "heads",
        [Structure::Neurons] => "neurons",
        _ => "structured",
    }
}

/// The spec's name of a scope.
pub fn scope_name(scope: StructuredScope) -> &'static str {
    match scope {
        StructuredScope::Global => "global",
        StructuredScope::PerLayer => "per_layer",
        StructuredScope::LayerAdaptive => "layer_adaptive",
        StructuredScope::Uniform => "uniform",
    }
}

/// One layer's normalised scores at the last scoring: the kept units', and the best removed.
pub(super) struct LastScores {
    pub(super) kept: Vec<f64>,
    pub(super) removed_max: Option<f64>,
}

pub(super) fn layer_reports(
    start: &BTreeMap<(Structure, usize), usize>,
    survivors: &Survivors,
    last_scores: &BTreeMap<(Structure, usize), LastScores>,
) -> Vec<LayerReport> {
    survivors
        .iter()
        .map(|(&(structure, layer), kept)| {
            let scores = last_scores.get(&(structure, layer));
            let range = scores.and_then(|s| {
                s.kept.iter().fold(None, |acc: Option<(f64, f64)>, &v| {
                    Some(acc.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))))
                })
            });
            LayerReport {
                layer,
                structure: structure.noun().into(),
                before: start.get(&(structure, layer)).copied().unwrap_or(0),
                kept: kept.clone(),
                kept_score_range: range,
                removed_score_max: scores.and_then(|s| s.removed_max),
            }
        })
        .collect()
}
