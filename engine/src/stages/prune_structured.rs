//! The structured half of the `prune` stage (`pattern: heads | neurons | structured`): whole
//! attention heads (in key/value groups) and FFN neurons are scored, the weakest cut out of the
//! tensors and the config ([`crate::family::shrink`], [`crate::family::LayerWidths`]), and the
//! model is smaller and faster with no sparse kernel.
//!
//! An iterative schedule of `steps` raises the removed share linearly; every step rescores the
//! model as the last recovery fine-tune left it. Shares are of the structures the stage started
//! with, so rounding is per step against the same base and never drifts. The report lists, per
//! layer, the structures kept (their original indices) and their normalised score range.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{Tensor, Var};
use serde::Serialize;

use super::{TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::{shrink, LayerWidths, ModuleMap, ModuleRole, StructuredCut};
use crate::layers::InputRecorder;
use crate::params::ParamStore;
use crate::pipeline::StageContext;
use crate::prune::structured::{
    normalised, select, unit_scores, Quota, Structure, StructuredScope,
};
use crate::prune::MaskSet;
use crate::train::GradientObserver;

/// How structures are scored.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// Sum of absolute weights.
    #[default]
    L1,
    /// Euclidean norm of the weights.
    L2,
    /// Accumulated first-order Taylor saliency `|w · ∂L/∂w|` on calibration batches.
    Taylor,
    /// Wanda-style `|w| · ‖x‖` with input norms gathered on calibration batches.
    Activation,
}

impl Importance {
    fn needs_data(self) -> bool {
        matches!(self, Importance::Taylor | Importance::Activation)
    }
}

/// A structured pruning run, built from a prune spec.
#[derive(Clone, Debug)]
pub struct StructuredPrune {
    /// Heads, neurons or both.
    pub structures: Vec<Structure>,
    /// Scoring.
    pub importance: Importance,
    /// How the target spreads over layers.
    pub scope: StructuredScope,
    /// Share of each structure removed by the end of the stage.
    pub sparsity: f64,
    /// Increments.
    pub steps: u32,
    /// Fewest units any layer keeps; `None` refuses a target that would empty a layer.
    pub min_keep: Option<usize>,
    /// Training batches scored by taylor and activation importance.
    pub calibration_batches: usize,
    /// Rows per calibration batch.
    pub calibration_batch_size: usize,
    /// A fine-tune after every increment.
    pub recover: Option<TrainSettings>,
}

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

/// Per (structure, layer): the original indices still present, in current order.
type Survivors = BTreeMap<(Structure, usize), Vec<usize>>;

impl StructuredPrune {
    /// Checks what does not need the data: a quantized model, and a family whose formats need
    /// uniform layers under another scope.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] naming the problem.
    pub fn validate(&self, model: &WorkingModel) -> Result<()> {
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting(
                "prune: the model is already quantized; prune before quantizing".into(),
            ));
        }
        let family = model.family()?;
        if family.needs_uniform_layers() && self.scope != StructuredScope::Uniform {
            return Err(EngineError::InvalidSetting(format!(
                "prune: {} need the same heads and FFN width in every layer (transformers, GGUF); \
                 use scope uniform",
                family.description()
            )));
        }
        Ok(())
    }

    /// Runs the schedule on `model`.
    ///
    /// # Errors
    /// A target that would empty a layer without `min_keep`, importance that needs training data
    /// when none is there, or a training failure.
    pub fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        let map = model.modules()?;
        let start = units(&map, model)?;
        let mut survivors: Survivors = start
            .iter()
            .map(|(&key, &n)| (key, (0..n).collect()))
            .collect();
        let parameters_before = parameter_count(&model.store);
        let mut last_scores: BTreeMap<(Structure, usize), LastScores> = BTreeMap::new();
        let mut notes: BTreeMap<Structure, String> = BTreeMap::new();
        for k in 1..=self.steps {
            ctx.check_cancel()?;
            let share = self.sparsity * f64::from(k) / f64::from(self.steps);
            let map = model.modules()?;
            let element = self.element_importance(model, trainer)?;
            let mut cut = StructuredCut::default();
            for &structure in &self.structures {
                let scores = unit_scores(&map, structure, |name| Ok(element.get(name).cloned()))?;
                if scores.is_empty() {
                    return Err(EngineError::InvalidSetting(format!(
                        "prune: no {} could be scored (no weights or gradients reached them)",
                        structure.noun()
                    )));
                }
                let quota = self.quota(structure, share, &start, &survivors);
                let selection = select(&scores, structure, self.scope, &quota, self.min_keep)?;
                if selection.shortfall > 0 {
                    let note = format!(
                        "min_keep kept {} {} the target would have removed at step {k}",
                        selection.shortfall,
                        structure.noun()
                    );
                    ctx.warn(format!("prune: {note}"));
                    notes.insert(structure, note);
                }
                let norm = normalised(&scores);
                for (&layer, s) in &norm {
                    let removed = selection.remove.get(&layer).cloned().unwrap_or_default();
                    let removed_set: BTreeSet<usize> = removed.iter().copied().collect();
                    last_scores.insert(
                        (structure, layer),
                        LastScores {
                            kept: (0..s.len())
                                .filter(|i| !removed_set.contains(i))
                                .map(|i| s[i])
                                .collect(),
                            removed_max: removed.iter().map(|&i| s[i]).reduce(f64::max),
                        },
                    );
                    if removed.is_empty() {
                        continue;
                    }
                    let kept = survivors.entry((structure, layer)).or_default();
                    let mut position = 0;
                    kept.retain(|_| {
                        let keep = !removed_set.contains(&position);
                        position += 1;
                        keep
                    });
                    match structure {
                        Structure::Heads => cut.heads.insert(layer, removed),
                        Structure::Neurons => cut.neurons.insert(layer, removed),
                    };
                }
            }
            apply_cut(model, &map, &cut)?;
            if let Some(recover) = &self.recover {
                trainer.train(model, recover, ctx)?;
            }
        }
        let parameters_after = parameter_count(&model.store);
        let report = StructuredReport {
            pattern: pattern_name(&self.structures).into(),
            importance: format!("{:?}", self.importance).to_lowercase(),
            scope: scope_name(self.scope).into(),
            steps: self.steps,
            recovered: self.recover.is_some(),
            targets: self.targets(&map, &start, &survivors, &notes),
            parameters_before,
            parameters_after,
            bytes_before: parameters_before * 4,
            bytes_after: parameters_after * 4,
            layers: layer_reports(&start, &survivors, &last_scores),
        };
        serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }

    /// Units to remove at this step for `structure`: the share of the starting units, less what
    /// earlier steps removed.
    fn quota(
        &self,
        structure: Structure,
        share: f64,
        start: &BTreeMap<(Structure, usize), usize>,
        survivors: &Survivors,
    ) -> Quota {
        let layers: Vec<(usize, usize, usize)> = start
            .iter()
            .filter(|((s, _), _)| *s == structure)
            .map(|(&(_, layer), &n)| {
                let now = survivors.get(&(structure, layer)).map_or(n, Vec::len);
                (layer, n, now)
            })
            .collect();
        match self.scope {
            StructuredScope::Global | StructuredScope::LayerAdaptive => {
                let total: usize = layers.iter().map(|l| l.1).sum();
                let removed: usize = layers.iter().map(|l| l.1 - l.2).sum();
                let target = (share * total as f64).round() as usize;
                Quota::Total(target.saturating_sub(removed))
            }
            StructuredScope::PerLayer | StructuredScope::Uniform => Quota::PerLayer(
                layers
                    .iter()
                    .map(|&(layer, n, now)| {
                        let target = (share * n as f64).round() as usize;
                        (layer, target.saturating_sub(n - now))
                    })
                    .collect(),
            ),
        }
    }

    /// Each scored weight's element-wise importance, by parameter name.
    fn element_importance(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
    ) -> Result<BTreeMap<String, Tensor>> {
        let map = model.modules()?;
        let names: Vec<String> = map
            .iter()
            .filter(|m| m.layer.is_some() && SCORED_ROLES.contains(&m.role))
            .map(|m| format!("{}.weight", m.path))
            .collect();
        let mut out = BTreeMap::new();
        match self.importance {
            Importance::L1 => {
                for name in &names {
                    out.insert(name.clone(), stored_weight(model, name)?.abs()?);
                }
            }
            Importance::L2 => {
                // Squares summed per unit; the square root is monotone, so rankings are the norm's.
                for name in &names {
                    out.insert(name.clone(), stored_weight(model, name)?.sqr()?);
                }
            }
            Importance::Taylor => {
                let mut taylor = TaylorSaliency {
                    names: names.iter().cloned().collect(),
                    sums: BTreeMap::new(),
                };
                self.calibrate(model, trainer, &mut taylor)?;
                out = taylor.sums;
            }
            Importance::Activation => {
                let recorder = Arc::new(InputRecorder::new());
                model.set_input_recorder(Some(recorder.clone()));
                let ran = self.calibrate(model, trainer, &mut IgnoreGradients);
                model.set_input_recorder(None);
                ran?;
                for name in &names {
                    let path = name.trim_end_matches(".weight");
                    let norms = recorder.input_norms(path).ok_or_else(|| {
                        EngineError::InvalidModel(format!("no inputs reached {path}"))
                    })?;
                    let w = stored_weight(model, name)?;
                    let norms: Vec<f32> = norms.iter().map(|&v| v as f32).collect();
                    let norms = Tensor::from_vec(norms, (1, w.dim(1)?), w.device())?;
                    out.insert(name.clone(), w.abs()?.broadcast_mul(&norms)?);
                }
            }
        }
        Ok(out)
    }

    /// Runs the calibration batches through `observer`.
    fn calibrate(
        &self,
        model: &WorkingModel,
        trainer: &dyn Trainer,
        observer: &mut dyn GradientObserver,
    ) -> Result<()> {
        debug_assert!(self.importance.needs_data());
        let seen = trainer.observe_gradients(
            model,
            self.calibration_batches,
            self.calibration_batch_size,
            None,
            observer,
        )?;
        if seen == 0 {
            return Err(EngineError::InvalidSetting(format!(
                "prune: importance {:?} needs training data for its calibration batches, and \
                 the task's training split is empty; use l1 or l2",
                format!("{:?}", self.importance).to_lowercase()
            )));
        }
        Ok(())
    }

    fn targets(
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
                let note = notes.get(&structure).cloned().or_else(|| {
                    ((achieved - self.sparsity).abs() > 1e-9).then(|| {
                        format!(
                            "{:.1}% requested, {:.1}% removed: {} go whole ({} per unit){}",
                            self.sparsity * 100.0,
                            achieved * 100.0,
                            structure.noun(),
                            group,
                            match self.scope {
                                StructuredScope::PerLayer | StructuredScope::Uniform =>
                                    ", rounded to the nearest whole unit in every layer",
                                _ => ", rounded to the nearest whole unit over the model",
                            }
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

/// Weights that make up heads and neurons.
const SCORED_ROLES: &[ModuleRole] = &[
    ModuleRole::Query,
    ModuleRole::Key,
    ModuleRole::Value,
    ModuleRole::AttentionOutput,
    ModuleRole::FfnUp,
    ModuleRole::FfnGate,
    ModuleRole::FfnDown,
];

/// Per (structure, layer), the removable units a model has now: key/value groups and neurons.
fn units(map: &ModuleMap, model: &WorkingModel) -> Result<BTreeMap<(Structure, usize), usize>> {
    let shapes: BTreeMap<String, Vec<usize>> = model.weight_shapes().into_iter().collect();
    let widths = LayerWidths::of(map, &shapes)?;
    let mut out = BTreeMap::new();
    for (layer, &kv) in widths.key_value_heads.iter().enumerate() {
        out.insert((Structure::Heads, layer), kv);
    }
    for (layer, &n) in widths.intermediate_sizes.iter().enumerate() {
        out.insert((Structure::Neurons, layer), n);
    }
    Ok(out)
}

/// Cuts `cut` out of the model's tensors and masks, and sets its config to the new widths.
fn apply_cut(model: &mut WorkingModel, map: &ModuleMap, cut: &StructuredCut) -> Result<()> {
    if cut.heads.is_empty() && cut.neurons.is_empty() {
        return Ok(());
    }
    let tensors: Vec<(String, Tensor)> = model
        .store
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach()))
        .collect();
    let tensors = shrink(map, tensors, cut)?;
    let shapes: BTreeMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    let widths = LayerWidths::of(map, &shapes)?;
    let config = model
        .family()?
        .config_for_widths(&model.config, &widths, map)?;
    // Masks of an earlier unstructured prune lose the same rows and columns.
    let masks = match model.masks() {
        Some(masks) => {
            let list: Vec<(String, Tensor)> = masks
                .names()
                .into_iter()
                .filter_map(|n| masks.get(&n).map(|m| (n, m.clone())))
                .collect();
            Some(MaskSet::new(shrink(map, list, cut)?.into_iter().collect()))
        }
        None => None,
    };
    let mut shrunk = WorkingModel::new(ParamStore::from_tensors(tensors, |_| true)?, config);
    if let Some(masks) = masks {
        shrunk.set_masks(masks);
    }
    *model = shrunk;
    Ok(())
}

fn stored_weight(model: &WorkingModel, name: &str) -> Result<Tensor> {
    model
        .store
        .get(name)
        .map(|p| p.tensor().detach())
        .ok_or_else(|| EngineError::InvalidModel(format!("parameter {name} is missing")))
}

fn parameter_count(store: &ParamStore) -> usize {
    store.tensors().iter().map(|(_, t)| t.elem_count()).sum()
}

fn pattern_name(structures: &[Structure]) -> &'static str {
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
struct LastScores {
    kept: Vec<f64>,
    removed_max: Option<f64>,
}

fn layer_reports(
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

/// Accumulates `|w · ∂L/∂w|` of the named weights over calibration batches.
struct TaylorSaliency {
    names: BTreeSet<String>,
    sums: BTreeMap<String, Tensor>,
}

impl GradientObserver for TaylorSaliency {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        for (name, var) in vars.iter().filter(|(n, _)| self.names.contains(n)) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let saliency = (var.as_tensor().detach() * grad.detach())?.abs()?;
            let sum = match self.sums.remove(name) {
                Some(acc) => (acc + saliency)?,
                None => saliency,
            };
            self.sums.insert(name.clone(), sum);
        }
        Ok(())
    }
}

/// Calibration for activation importance only needs the forward passes.
struct IgnoreGradients;

impl GradientObserver for IgnoreGradients {
    fn observe(&mut self, _: &[(String, Var)], _: &candle_core::backprop::GradStore) -> Result<()> {
        Ok(())
    }
}
