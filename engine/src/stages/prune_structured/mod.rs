//! The structured half of the `prune` stage (`pattern: heads | neurons | structured`): whole
//! attention heads (in key/value groups) and FFN neurons are scored, the weakest cut out of the
//! tensors and the config ([`crate::family::shrink`], [`crate::family::LayerWidths`]), and the
//! model is smaller and faster with no sparse kernel.
//!
//! An iterative schedule of `steps` raises the removed share linearly; every step rescores the
//! model as the last recovery fine-tune left it. Shares are of the structures the stage started
//! with, so rounding is per step against the same base and never drifts. The report lists, per
//! layer, the structures kept (their original indices) and their normalised score range.
//!
//! LoRAPrune (`importance: "lora"`) runs the whole schedule on LoRA adapters over the frozen base:
//! scores come from the adapters and their gradients, the recovery fine-tunes train only the
//! adapters (and the task head). Each cut first folds the adapters into the base, so the cut
//! applies to `W + BA` and no trained update is lost, then fresh adapters go on the smaller base;
//! the last ones are merged at the end, leaving a plain dense model.

mod importance;
mod report;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;

pub use importance::Importance;
pub use report::{LayerReport, StructuredReport, TargetReport};

use super::lora::{attach_adapters, merge_attached, LoraSettings, LoraTargets};
use super::{TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::{shrink, LayerWidths, ModuleMap, StructuredCut};
use crate::params::ParamStore;
use crate::pipeline::StageContext;
use crate::prune::structured::{
    normalised, select, unit_scores, Quota, Selection, Structure, StructuredScope,
};
use crate::prune::MaskSet;
use report::{layer_reports, parameter_count, pattern_name, scope_name, LastScores};

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
    /// LoRAPrune's adapters (`importance: "lora"`), which also carry the recovery.
    pub lora: Option<LoraSettings>,
}

/// Per (structure, layer): the original indices still present, in current order.
type Survivors = BTreeMap<(Structure, usize), Vec<usize>>;

/// What the schedule has done so far: the units the stage started with, those still standing, each
/// layer's last scores, and notes on targets `min_keep` cut short.
struct Tally {
    start: BTreeMap<(Structure, usize), usize>,
    survivors: Survivors,
    last_scores: BTreeMap<(Structure, usize), LastScores>,
    notes: BTreeMap<Structure, String>,
}

impl Tally {
    fn new(start: BTreeMap<(Structure, usize), usize>) -> Self {
        let survivors = start
            .iter()
            .map(|(&key, &n)| (key, (0..n).collect()))
            .collect();
        Self {
            start,
            survivors,
            last_scores: BTreeMap::new(),
            notes: BTreeMap::new(),
        }
    }

    /// Records one scoring of `structure` and what `selection` removes; returns the layers' cuts
    /// (current indices) for [`shrink`].
    fn record(
        &mut self,
        structure: Structure,
        scores: &BTreeMap<usize, Vec<f64>>,
        mut selection: Selection,
    ) -> Vec<(usize, Vec<usize>)> {
        let mut cuts = Vec::new();
        for (layer, s) in normalised(scores) {
            let removed = selection.remove.remove(&layer).unwrap_or_default();
            let removed_set: BTreeSet<usize> = removed.iter().copied().collect();
            self.last_scores.insert(
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
            let kept = self.survivors.entry((structure, layer)).or_default();
            let mut position = 0;
            kept.retain(|_| {
                let keep = !removed_set.contains(&position);
                position += 1;
                keep
            });
            cuts.push((layer, removed));
        }
        cuts
    }
}
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
        if let Some(lora) = &self.lora {
            lora.resolve(model).map_err(|e| match e {
                EngineError::InvalidSetting(m) => {
                    EngineError::InvalidSetting(m.replacen("finetune:", "prune (lora):", 1))
                }
                other => other,
            })?;
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
        let mut tally = Tally::new(units(&map, model)?);
        let parameters_before = parameter_count(&model.store);
        let seed = ctx.seed ^ ctx.index as u64;
        let mut adapters = self.attach(model, seed)?;
        let adapted = adapters.as_ref().map(|t| t.adapted.clone());
        let trainable_parameters = model
            .store
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>();
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
                let quota = self.quota(structure, share, &tally.start, &tally.survivors);
                let selection = select(&scores, structure, self.scope, &quota, self.min_keep)?;
                if selection.shortfall > 0 {
                    let note = format!(
                        "min_keep kept {} {} the target would have removed at step {k}",
                        selection.shortfall,
                        structure.noun()
                    );
                    ctx.warn(format!("prune: {note}"));
                    tally.notes.insert(structure, note);
                }
                for (layer, removed) in tally.record(structure, &scores, selection) {
                    match structure {
                        Structure::Heads => cut.heads.insert(layer, removed),
                        Structure::Neurons => cut.neurons.insert(layer, removed),
                    };
                }
            }
            // The cut applies to W + BA: adapters are folded in first, fresh ones follow.
            self.merge(model, adapters.take())?;
            apply_cut(model, &model.modules()?, &cut)?;
            adapters = self.attach(model, seed.wrapping_add(u64::from(k)))?;
            if let Some(recover) = &self.recover {
                trainer.train(model, recover, ctx)?;
            }
        }
        self.merge(model, adapters.take())?;
        let parameters_after = parameter_count(&model.store);
        let report = StructuredReport {
            pattern: pattern_name(&self.structures).into(),
            importance: self.importance.name().into(),
            scope: scope_name(self.scope).into(),
            steps: self.steps,
            recovered: self.recover.is_some(),
            targets: self.targets(&map, &tally.start, &tally.survivors, &tally.notes),
            parameters_before,
            parameters_after,
            bytes_before: parameters_before * 4,
            bytes_after: parameters_after * 4,
            layers: layer_reports(&tally.start, &tally.survivors, &tally.last_scores),
        };
        let mut report =
            serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))?;
        if let (Some(lora), Some(adapted)) = (&self.lora, adapted) {
            report["lora"] = serde_json::json!({
                "rank": lora.rank,
                "alpha": lora.alpha,
                "target_modules": adapted,
                // Adapters and task head at the first scoring; later steps have fewer.
                "trainable_parameters": trainable_parameters,
                "smoothing": importance::LORA_SMOOTHING,
            });
        }
        Ok(report)
    }

    /// For LoRAPrune, adapters on the frozen base (`seed` draws their `A`).
    fn attach(&self, model: &mut WorkingModel, seed: u64) -> Result<Option<LoraTargets>> {
        self.lora
            .as_ref()
            .map(|lora| attach_adapters(model, lora, seed))
            .transpose()
    }

    /// Folds `adapters` into the base, leaving a plain dense model.
    fn merge(&self, model: &mut WorkingModel, adapters: Option<LoraTargets>) -> Result<()> {
        match (&self.lora, adapters) {
            (Some(lora), Some(targets)) => merge_attached(model, lora, &targets),
            _ => Ok(()),
        }
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
}

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
pub(crate) fn apply_cut(
    model: &mut WorkingModel,
    map: &ModuleMap,
    cut: &StructuredCut,
) -> Result<()> {
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
    let mut shrunk = model.derived(ParamStore::from_tensors(tensors, |_| true)?, config);
    if let Some(masks) = masks {
        shrunk.set_masks(masks);
    }
    *model = shrunk;
    Ok(())
}

#[cfg(test)]
mod tests;
