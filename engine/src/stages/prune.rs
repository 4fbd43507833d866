//! The `prune` stage, `method: magnitude`: unstructured (global or per-layer) or 2:4, one-shot or
//! iterative with a `recover` fine-tune after each increment.
//!
//! An iterative schedule of `steps` increments raises the target linearly (`sparsity · k / steps`)
//! — the seed practice is 10% per step. Each increment's masks include the earlier ones, and the
//! masks stay applied during recovery (the trainer re-applies them after every optimizer step). The
//! report gives the achieved sparsity per layer and overall and, for 2:4, verifies the pattern.
//! The stage's spec, checks, preconditions and dry-run estimate are here too.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::finetune::{Recover, MAX_LORA_ALPHA, MAX_LORA_RANK};
use super::lora::LoraSettings;
use super::{Stage, TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::FAMILIES;
use crate::pipeline::StageContext;
use crate::prune::structured::{Structure, StructuredScope};
use crate::prune::{
    magnitude_masks, select_targets, sparsity_report, verify_n_m, Exclusion, MagnitudeConfig,
    MaskSet, Pattern, Scope, SparsityReport, DEFAULT_EXCLUDED_ROLES, MAX_SPARSITY,
};
use crate::spec::{Checker, Estimate, ModelState, Precondition, StageKind, Workload};

use super::prune_structured::StructuredPrune;
pub use super::prune_structured::{Importance, LayerReport, StructuredReport, TargetReport};

/// Most pruning increments one stage may take.
const MAX_PRUNE_STEPS: u32 = 100;

/// Settings of a pruning stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneSpec {
    /// How weights are scored for removal.
    #[serde(default)]
    pub method: PruneMethod,
    /// Share of prunable weights set to zero at the end of the stage, in `(0, 0.95]`.
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = MAX_SPARSITY))]
    pub sparsity: f64,
    /// Which weights may be removed together.
    #[serde(default)]
    pub pattern: PrunePattern,
    /// Whether the threshold is shared by all layers or set per layer.
    #[serde(default)]
    pub scope: PruneScope,
    /// Number of equal pruning increments that reach `sparsity` (iterative pruning).
    #[serde(default = "default_prune_steps")]
    #[schemars(range(min = 1, max = MAX_PRUNE_STEPS))]
    pub steps: u32,
    /// Globs over parameter names never pruned; `null` means embeddings, norms and the task head.
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// A short fine-tune after each increment to recover accuracy; `null` skips it.
    #[serde(default)]
    pub recover: Option<Recover>,
    /// How heads and neurons are scored (structured patterns only; `null` means `l1`): `l1`/`l2`
    /// norms of their weights, `taylor` (|w·∂L/∂w| over calibration batches of training data),
    /// `activation` (Wanda-style |w|·‖x‖ with input norms from the calibration batches), `mask`
    /// (Michel et al. 2019: the loss change when the head or neuron is masked, to first order,
    /// |∂L/∂gate| = |Σ w·∂L/∂w| over its output-projection columns, per calibration batch) or
    /// `lora` (LoRAPrune: |(W + BA) ⊙ (∂L/∂B·A + B·∂L/∂A)| from adapters on the frozen base, which
    /// also run the recovery).
    #[serde(default)]
    pub importance: Option<Importance>,
    /// `importance: "lora"` only: the adapters the stage attaches to the frozen base for scoring
    /// and recovery; `null` means rank 8, alpha 16 on the attention and FFN projections.
    #[serde(default)]
    pub lora: Option<PruneLora>,
    /// Fewest heads (key/value groups) and neurons any layer keeps (structured patterns only);
    /// `null` refuses a target that would empty a layer.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub min_keep: Option<u32>,
    /// Training batches that taylor, activation and mask importance are computed on, per scoring.
    #[serde(default = "default_calibration_batches")]
    #[schemars(range(min = 1, max = MAX_CALIBRATION_BATCHES))]
    pub calibration_batches: u32,
}

/// The adapters of LoRAPrune (`importance: "lora"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneLora {
    /// The adapters' rank.
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = MAX_LORA_RANK))]
    pub rank: u32,
    /// The numerator of the update's scale `alpha / rank`.
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 1, max = MAX_LORA_ALPHA))]
    pub alpha: u32,
    /// Module-path globs that get adapters; `null` means the attention and FFN projections. Heads
    /// and neurons are scored from the adapted weights only.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
}

impl Default for PruneLora {
    fn default() -> Self {
        Self {
            rank: default_lora_rank(),
            alpha: default_lora_alpha(),
            target_modules: None,
        }
    }
}

fn default_lora_rank() -> u32 {
    8
}

fn default_lora_alpha() -> u32 {
    16
}

/// Weight scoring for pruning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Smallest absolute value first.
    #[default]
    Magnitude,
}

/// Sparsity pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PrunePattern {
    /// Any weight may be removed.
    #[default]
    #[serde(rename = "unstructured")]
    Unstructured,
    /// Two of every four consecutive input weights are removed (sparsity must be 0.5).
    #[serde(rename = "2:4")]
    TwoFour,
    /// Whole attention heads (in key/value groups) are cut out of the model.
    #[serde(rename = "heads")]
    Heads,
    /// Whole FFN neurons are cut out of the model.
    #[serde(rename = "neurons")]
    Neurons,
    /// Heads and FFN neurons, each to `sparsity`.
    #[serde(rename = "structured")]
    Structured,
}

impl PrunePattern {
    /// What a structured pattern removes; empty for unstructured and 2:4.
    pub fn structures(self) -> Vec<Structure> {
        match self {
            PrunePattern::Unstructured | PrunePattern::TwoFour => Vec::new(),
            PrunePattern::Heads => vec![Structure::Heads],
            PrunePattern::Neurons => vec![Structure::Neurons],
            PrunePattern::Structured => vec![Structure::Heads, Structure::Neurons],
        }
    }
}

/// Threshold scope for pruning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// One threshold over all prunable layers (structured: over scores normalised per layer).
    #[default]
    Global,
    /// Each layer reaches `sparsity` on its own (`layer` is accepted too).
    #[serde(rename = "per_layer", alias = "layer")]
    Layer,
    /// Structured only: each layer's share set by its score distribution (layers whose importance
    /// sits in few structures lose more), at least `min_keep` kept.
    LayerAdaptive,
    /// Structured only: the same count in every layer, for formats that need one shape (GGUF,
    /// transformers' Llama); the share is rounded to whole key/value groups and reported.
    Uniform,
}

impl PruneScope {
    fn structured(self) -> StructuredScope {
        match self {
            PruneScope::Global => StructuredScope::Global,
            PruneScope::Layer => StructuredScope::PerLayer,
            PruneScope::LayerAdaptive => StructuredScope::LayerAdaptive,
            PruneScope::Uniform => StructuredScope::Uniform,
        }
    }
}

fn default_prune_steps() -> u32 {
    1
}

fn default_calibration_batches() -> u32 {
    16
}

/// Most calibration batches one scoring may take.
const MAX_CALIBRATION_BATCHES: u32 = 10_000;

impl PruneSpec {
    /// The `lora` settings: only with `importance: "lora"`, ranks and globs in range.
    fn check_lora(&self, c: &mut Checker, at: &str) {
        let Some(lora) = &self.lora else { return };
        let pointer = format!("{at}/lora");
        c.check(self.importance == Some(Importance::Lora), &pointer, || {
            format!(
                "applies to `importance: \"lora\"` only; remove it for importance {:?}",
                self.importance.unwrap_or_default().name()
            )
        });
        c.range_u32(lora.rank, 1, MAX_LORA_RANK, &format!("{pointer}/rank"));
        c.range_u32(lora.alpha, 1, MAX_LORA_ALPHA, &format!("{pointer}/alpha"));
        if let Some(globs) = &lora.target_modules {
            let at = format!("{pointer}/target_modules");
            c.check(!globs.is_empty(), &at, || {
                "must name at least one module (or be null for the family's default)".into()
            });
            c.globs(globs, &at);
            for (i, glob) in globs.iter().enumerate() {
                if let Err(e) = globset::Glob::new(glob) {
                    c.fail(format!("{at}/{i}"), format!("not a valid glob: {e}"));
                }
            }
        }
    }
}

impl StageKind for PruneSpec {
    const TYPE: &'static str = "prune";

    fn check(&self, c: &mut Checker, at: &str) {
        let sparsity_at = format!("{at}/sparsity");
        c.check(
            self.sparsity > 0.0 && self.sparsity <= MAX_SPARSITY,
            &sparsity_at,
            || format!("must be in (0, {MAX_SPARSITY}], got {}", self.sparsity),
        );
        if self.pattern == PrunePattern::TwoFour {
            c.check(self.sparsity == 0.5, &sparsity_at, || {
                format!("must be 0.5 with pattern 2:4, got {}", self.sparsity)
            });
        }
        c.range_u32(self.steps, 1, MAX_PRUNE_STEPS, &format!("{at}/steps"));
        c.range_u32(
            self.calibration_batches,
            1,
            MAX_CALIBRATION_BATCHES,
            &format!("{at}/calibration_batches"),
        );
        if self.pattern.structures().is_empty() {
            let structured_only = "applies to the structured patterns (heads, neurons, structured)";
            c.check(
                self.importance.is_none(),
                &format!("{at}/importance"),
                || structured_only.to_string(),
            );
            c.check(self.min_keep.is_none(), &format!("{at}/min_keep"), || {
                structured_only.to_string()
            });
            c.check(
                matches!(self.scope, PruneScope::Global | PruneScope::Layer),
                &format!("{at}/scope"),
                || format!("{structured_only}; use global or per_layer"),
            );
        } else {
            c.check(self.exclude.is_none(), &format!("{at}/exclude"), || {
                "applies to unstructured and 2:4 pruning; structured pruning cuts heads and FFN \
                 neurons only"
                    .to_string()
            });
            if let Some(min_keep) = self.min_keep {
                c.check(min_keep >= 1, &format!("{at}/min_keep"), || {
                    "must be at least 1: a layer with no heads or neurons cannot run".to_string()
                });
            }
        }
        if let Some(exclude) = &self.exclude {
            c.globs(exclude, &format!("{at}/exclude"));
        }
        self.check_lora(c, at);
        if let Some(recover) = &self.recover {
            recover.check(c, &format!("{at}/recover"));
        }
    }

    /// Full-precision weights; for a structured pattern on a family whose formats need one shape in
    /// every layer (Llama), scope `uniform`.
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        model.require_full_precision(Self::TYPE)?;
        let importance = self.importance.unwrap_or_default();
        if !self.pattern.structures().is_empty()
            && importance.needs_data()
            && model.train_rows == Some(0)
        {
            return Err(Precondition {
                name: "training data",
                field: Some("importance"),
                message: format!(
                    "importance {:?} scores on calibration batches of the training split, and \
                     the dataset has no training rows; use l1 or l2, or a dataset with a train \
                     split",
                    importance.name()
                ),
            });
        }
        let family = model.family.as_deref().and_then(|model_type| {
            FAMILIES
                .iter()
                .find(|f| f.name() == model_type || f.model_types().contains(&model_type))
        });
        match family {
            Some(family)
                if family.needs_uniform_layers()
                    && !self.pattern.structures().is_empty()
                    && self.scope != PruneScope::Uniform =>
            {
                Err(Precondition {
                    name: "uniform layers",
                    field: Some("scope"),
                    message: format!(
                        "structured `prune` of {} must use scope uniform: their formats \
                         (transformers, GGUF) need the same heads and FFN width in every layer",
                        family.description()
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    fn transform(&self, model: &mut ModelState, _index: usize) {
        model.pruned = true;
    }

    /// One evaluation-sized pass per increment (scoring), plus the recovery fine-tunes; memory
    /// of training only when it recovers.
    fn estimate(&self, work: &Workload) -> Estimate {
        let recover_epochs = self.recover.as_ref().map_or(0.0, |r| f64::from(r.epochs));
        let steps = f64::from(self.steps.max(1));
        Estimate {
            seconds: steps * work.evaluation_seconds() + work.training_seconds(recover_epochs),
            peak_bytes: if recover_epochs > 0.0 {
                work.training_peak_bytes()
            } else {
                work.inference_peak_bytes()
            },
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(PruneStage::from_spec(self)?))
    }
}

/// The stage, built from its spec.
#[derive(Clone, Debug)]
pub struct PruneStage {
    config: MagnitudeConfig,
    steps: u32,
    exclude: Option<Vec<String>>,
    recover: Option<TrainSettings>,
    /// Set for the structured patterns, which the stage hands to [`StructuredPrune`].
    structured: Option<StructuredPrune>,
}

/// What the stage reports.
#[derive(Clone, Debug, Serialize)]
pub struct PruneReport {
    /// `unstructured` or `2:4`.
    pub pattern: String,
    /// The target sparsity.
    pub target_sparsity: f64,
    /// Increments run.
    pub steps: u32,
    /// Whether each increment was followed by a recovery fine-tune.
    pub recovered: bool,
    /// Zeros per pruned layer and overall.
    pub achieved: SparsityReport,
    /// For 2:4: whether every pruned layer has at most 2 non-zeros in every 4 weights.
    pub pattern_verified: Option<bool>,
}

impl PruneStage {
    /// Builds the stage from its spec.
    ///
    /// # Errors
    /// Fails when the sparsity is outside `[0, 0.95]` (unstructured) or not 0.5 (2:4).
    pub fn from_spec(spec: &PruneSpec) -> Result<Self> {
        let structures = spec.pattern.structures();
        let mut recover = spec.recover.as_ref().map(TrainSettings::from_recover);
        if spec.importance == Some(Importance::Lora) && !structures.is_empty() {
            // LoRA's recovery trains adapters, clipped as a LoRA fine-tune is by default.
            if let Some(recover) = &mut recover {
                recover.grad_clip_norm = Some(0.5);
            }
        }
        let structured = (!structures.is_empty()).then(|| StructuredPrune {
            structures,
            importance: spec.importance.unwrap_or_default(),
            scope: spec.scope.structured(),
            sparsity: spec.sparsity,
            steps: spec.steps.max(1),
            min_keep: spec.min_keep.map(|k| k.max(1) as usize),
            calibration_batches: spec.calibration_batches.max(1) as usize,
            calibration_batch_size: recover.as_ref().map_or(16, |r| r.batch_size as usize),
            recover: recover.clone(),
            lora: (spec.importance == Some(Importance::Lora)).then(|| {
                let lora = spec.lora.clone().unwrap_or_default();
                LoraSettings {
                    rank: lora.rank,
                    alpha: lora.alpha,
                    target_modules: lora.target_modules,
                    modules_to_save: None,
                    base_quantization: None,
                    requantize_merged: false,
                    dropout: 0.0,
                }
            }),
        });
        let pattern = match spec.pattern {
            PrunePattern::TwoFour => Pattern::NM { n: 2, m: 4 },
            _ => Pattern::Unstructured,
        };
        if pattern != Pattern::Unstructured && spec.sparsity != 0.5 {
            return Err(EngineError::InvalidSetting(format!(
                "prune: 2:4 means sparsity 0.5, got {}",
                spec.sparsity
            )));
        }
        let scope = match spec.scope {
            PruneScope::Layer => Scope::PerLayer,
            _ => Scope::Global,
        };
        let config = MagnitudeConfig {
            pattern,
            scope,
            sparsity: spec.sparsity,
            overrides: Vec::new(),
        };
        config.validate()?;
        Ok(Self {
            config,
            steps: spec.steps.max(1),
            exclude: spec.exclude.clone(),
            recover,
            structured,
        })
    }

    /// Adds per-layer sparsity overrides (name glob, sparsity), first match wins.
    ///
    /// # Errors
    /// Fails when an override is outside `[0, 0.95]` or its glob is invalid.
    pub fn with_overrides(mut self, overrides: Vec<(String, f64)>) -> Result<Self> {
        self.config.overrides = overrides;
        self.config.validate()?;
        Ok(self)
    }

    /// The names to prune; unmatched user globs become warnings when `ctx` is given.
    fn targets(&self, model: &WorkingModel, ctx: Option<&StageContext>) -> Result<Vec<String>> {
        let shapes = model.weight_shapes();
        let map = model.modules()?;
        let exclusion = match self.exclude.as_deref() {
            Some(globs) => Exclusion::Globs(globs),
            None => Exclusion::Roles(&map, DEFAULT_EXCLUDED_ROLES),
        };
        let targets = select_targets(
            shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            exclusion,
        )?;
        if let Some(ctx) = ctx {
            for glob in &targets.unmatched_globs {
                ctx.warn(format!("prune: exclude glob {glob:?} matches no parameter"));
            }
        }
        let names: Vec<String> = targets
            .names
            .into_iter()
            .filter(|n| map.is_linear_weight(n))
            .collect();
        if names.is_empty() {
            return Err(EngineError::InvalidSetting(
                "prune: no weight is left to prune after `exclude`".into(),
            ));
        }
        if let Pattern::NM { m, .. } = self.config.pattern {
            for (name, shape) in shapes.iter().filter(|(n, _)| names.contains(n)) {
                if shape.last().is_some_and(|w| w % m != 0) {
                    return Err(EngineError::InvalidSetting(format!(
                        "prune: {name} has input width {}, not a multiple of {m}, so 2:4 cannot apply; exclude it",
                        shape[1]
                    )));
                }
            }
        }
        Ok(names)
    }

    /// The target of increment `k` (1-based).
    fn step_sparsity(&self, k: u32) -> f64 {
        match self.config.pattern {
            Pattern::Unstructured => self.config.sparsity * f64::from(k) / f64::from(self.steps),
            Pattern::NM { .. } => self.config.sparsity,
        }
    }
}

impl Stage for PruneStage {
    fn name(&self) -> &'static str {
        "prune"
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        if let Some(structured) = &self.structured {
            return structured.validate(model);
        }
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting(
                "prune: the model is already quantized; prune before quantizing".into(),
            ));
        }
        self.targets(model, None).map(|_| ())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        if let Some(structured) = &self.structured {
            return structured.run(model, trainer, ctx);
        }
        self.validate(model)?;
        let names = self.targets(model, Some(ctx))?;
        // N:M is a fixed pattern: one increment reaches it, recovery still follows.
        let steps = if self.config.pattern == Pattern::Unstructured {
            self.steps
        } else {
            1
        };
        if steps != self.steps {
            ctx.warn(format!(
                "prune: 2:4 is applied in one step; `steps: {}` only repeats recovery once",
                self.steps
            ));
        }
        for k in 1..=steps {
            ctx.check_cancel()?;
            let weights = names
                .iter()
                .map(|n| {
                    Ok((
                        n.clone(),
                        model
                            .store
                            .get(n)
                            .map(|p| p.tensor().clone())
                            .ok_or_else(|| missing(n))?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            let config = MagnitudeConfig {
                sparsity: self.step_sparsity(k),
                ..self.config.clone()
            };
            let masks = merged(
                magnitude_masks(&weights, &config, model.masks())?,
                model.masks(),
            );
            masks.apply(&model.store)?;
            model.set_masks(masks);
            if let Some(recover) = &self.recover {
                trainer.train(model, recover, ctx)?;
            }
        }
        let achieved = sparsity_report(&model.store, &names)?;
        let pattern_verified = match self.config.pattern {
            Pattern::NM { n, m } => Some(all_follow_n_m(model, &names, n, m)?),
            Pattern::Unstructured => None,
        };
        let report = PruneReport {
            pattern: match self.config.pattern {
                Pattern::Unstructured => "unstructured".into(),
                Pattern::NM { n, m } => format!("{n}:{m}"),
            },
            target_sparsity: self.config.sparsity,
            steps,
            recovered: self.recover.is_some(),
            achieved,
            pattern_verified,
        };
        serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }
}

fn missing(name: &str) -> EngineError {
    EngineError::InvalidModel(format!("parameter {name} is missing"))
}

/// New masks plus earlier masks of layers this step did not touch (an earlier prune stage's).
fn merged(new: MaskSet, earlier: Option<&MaskSet>) -> MaskSet {
    let mut all = std::collections::BTreeMap::new();
    if let Some(earlier) = earlier {
        for name in earlier.names() {
            if let Some(mask) = earlier.get(&name) {
                all.insert(name, mask.clone());
            }
        }
    }
    for name in new.names() {
        if let Some(mask) = new.get(&name) {
            all.insert(name, mask.clone());
        }
    }
    MaskSet::new(all)
}

fn all_follow_n_m(model: &WorkingModel, names: &[String], n: usize, m: usize) -> Result<bool> {
    for name in names {
        let param = model.store.get(name).ok_or_else(|| missing(name))?;
        if !verify_n_m(param.tensor(), n, m)? {
            return Ok(false);
        }
    }
    Ok(true)
}
