//! The `quantize` stage, `method: ptq`: weight-only post-training quantization of linear layers;
//! `method: dynamic`: int8 weights on the linear layers only, with their inputs quantized to int8
//! per token at run time (the int8 × int8 kernel, [`crate::layers::int8_matmul`]); `method: qat`:
//! quantization-aware training first, then the weights stored as `ptq` stores them.
//!
//! The stage decides which weights are quantized (2-D `*.weight` not matched by `exclude`, whose
//! row length the scheme takes), quantizes each once and records the packed weights and the linear
//! plan in the model, so every later build of the model runs those layers on quantized kernels
//! ([`crate::layers::QuantizedLinear`]) over the same packed weights, and saving writes them as
//! they are. Weights the
//! scheme cannot take stay in full precision and are listed in the stage report, with a warning.
//!
//! QAT trains the model with every planned linear layer fake-quantized
//! ([`crate::layers::FakeQuantLinear`]: the scheme's own quantizer in the forward pass, the
//! straight-through estimator in the backward pass) and the planned embedding tables already
//! quantized and frozen, so the loss sees exactly the values the stored model will hold.
//! The stage's spec, checks, preconditions and dry-run estimate are in [`spec`].

pub mod calibration;
pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use serde::Serialize;

pub use spec::{Fallback, QatActivations, QatSettings, QuantizeMethod, QuantizeSpec};

use calibration::{CalibrationMethod, LayerCalibration};

use super::finetune::DEFAULT_LOG_EVERY_STEPS;
use super::{Stage, TrainRequest, TrainSettings, TrainSummary, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::ModuleRole;
use crate::layers::{
    ActivationObservers, FakeQuantInputs, InputRecorder, LinearKind, ObservedRange, SampleLimits,
};
use crate::objective::{Objective, ResponseKd, TaskLoss, WeightedSum};
use crate::params::Param;
use crate::pipeline::StageContext;
use crate::prune::{select_targets, Exclusion};
use crate::quant::{quantize, quantize_least_error, QuantScheme, Quantized, QuantizedWeight};
use crate::train::IgnoreGradients;

/// The stage, built from its spec.
#[derive(Clone, Debug)]
pub struct QuantizeStage {
    scheme: QuantScheme,
    exclude: Option<Vec<String>>,
    method: QuantizeMethod,
    /// `method: qat`: how to train.
    qat: QatSettings,
    /// `method: static`: how the input ranges are calibrated and which layers fall back.
    calibration: StaticSettings,
}

/// How a static quantization calibrates.
#[derive(Clone, Debug)]
struct StaticSettings {
    method: CalibrationMethod,
    batches: usize,
    percentile: f64,
    fallback: Option<Fallback>,
}

/// Rows per calibration batch.
const CALIBRATION_BATCH_SIZE: usize = 16;

/// What a static quantization's calibration found.
#[derive(Clone, Debug, Serialize)]
pub struct StaticCalibration {
    /// How the input ranges were chosen.
    pub method: CalibrationMethod,
    /// `calibration: "percentile"`: the percentile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub percentile: Option<f64>,
    /// Calibration batches asked for.
    pub batches_requested: usize,
    /// Calibration batches run (fewer when the training split is smaller).
    pub batches_run: usize,
    /// Each linear module's calibration, by module path.
    pub layers: BTreeMap<String, LayerCalibration>,
    /// The modules kept in full precision by `fallback`, largest output error first.
    pub kept_full_precision: Vec<String>,
}

/// What the stage reports.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    /// `ptq`, `dynamic` or `qat`.
    pub method: String,
    /// How the inputs of the quantized linear layers are quantized when they run.
    pub activations: String,
    /// The scheme's name.
    pub scheme: String,
    /// Weights quantized.
    pub quantized: Vec<String>,
    /// Weights not stored with the stage's scheme, with the reason: kept in full precision, or
    /// stored with the type the reason names (a fallback where the scheme's blocks do not divide
    /// the rows, or the output matrix's type).
    pub kept_full_precision: BTreeMap<String, String>,
    /// Scalars in quantized weights.
    pub quantized_parameters: usize,
    /// Each quantized weight's relative error `‖Q(W) − W‖ / ‖W‖` (Frobenius), against the
    /// weight as it was when stored (after QAT's training, for `qat`).
    pub quantization_error: BTreeMap<String, f64>,
    /// `qat`: the settings trained with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qat: Option<QatSettings>,
    /// `qat`: what the training run did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainSummary>,
    /// `static`: each layer's calibrated input range, its errors and the fallbacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<StaticCalibration>,
    /// `qat` with `int8_per_tensor` activations: each layer's input range as its observer left
    /// it (the static scale is `absmax / 127`), the batches it saw and whether it froze.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_ranges: Option<BTreeMap<String, ObservedRange>>,
}

impl QuantizeStage {
    /// Builds the stage from its spec.
    ///
    /// # Errors
    /// Fails for a bad group size, or activations quantized on a scheme other than int8.
    pub fn from_spec(spec: &QuantizeSpec) -> Result<Self> {
        let scheme = QuantScheme::parse(&spec.scheme.name(), spec.group_size.map(|g| g as usize))?;
        let qat = spec.qat.clone().unwrap_or_default();
        let int8_activations = spec.method == QuantizeMethod::Dynamic
            || (spec.method == QuantizeMethod::Qat && qat.activations != QatActivations::None);
        if int8_activations && scheme != QuantScheme::Int8 {
            return Err(EngineError::InvalidSetting(format!(
                "quantize: int8 activations run on the int8 × int8 kernel, not {scheme}"
            )));
        }
        if spec.method == QuantizeMethod::Static && scheme != QuantScheme::Int8 {
            return Err(EngineError::InvalidSetting(format!(
                "quantize: static quantization is int8, not {scheme}"
            )));
        }
        let calibration = StaticSettings {
            method: spec.calibration.unwrap_or_default(),
            batches: spec
                .calibration_batches
                .unwrap_or(spec::DEFAULT_CALIBRATION_BATCHES) as usize,
            percentile: spec.percentile.unwrap_or(spec::DEFAULT_PERCENTILE),
            fallback: spec.fallback.clone(),
        };
        Ok(Self {
            scheme,
            exclude: spec.exclude.clone(),
            method: spec.method,
            qat,
            calibration,
        })
    }

    /// Static int8: runs the calibration batches through the float model, recording each planned
    /// layer's inputs, and chooses each one's input range; the `fallback` rule marks the layers
    /// of largest output error to keep in full precision.
    fn calibrate(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        candidates: &BTreeMap<String, Vec<QuantScheme>>,
    ) -> Result<StaticCalibration> {
        let settings = &self.calibration;
        let recorder = Arc::new(InputRecorder::with_samples(SampleLimits {
            values_per_input: 16_384,
            max_values: 262_144,
            max_rows: 128,
        }));
        model.set_input_recorder(Some(recorder.clone()));
        let ran = trainer.observe_gradients(
            model,
            settings.batches,
            CALIBRATION_BATCH_SIZE,
            None,
            &mut IgnoreGradients,
        );
        model.set_input_recorder(None);
        let ran = ran?;
        if ran == 0 {
            return Err(EngineError::InvalidSetting(
                "quantize: static calibration runs training batches, and the task's training \
                 split is empty; use \"dynamic\""
                    .into(),
            ));
        }
        let mut layers = BTreeMap::new();
        for name in candidates.keys() {
            let module = name.strip_suffix(".weight").unwrap_or(name).to_string();
            let sample = recorder.sample(&module).ok_or_else(|| {
                EngineError::InvalidModel(format!(
                    "quantize: no calibration input reached {module}"
                ))
            })?;
            let weight = model
                .store
                .get(name)
                .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))?
                .tensor()
                .clone();
            let Quantized::Weight(int8) = quantize(&weight, QuantScheme::Int8)? else {
                continue;
            };
            let dequantized = int8.dequantize(weight.device())?;
            let clip = match settings.method {
                CalibrationMethod::Mse => {
                    calibration::output_mse_clip(&sample, &weight, &dequantized)?
                }
                method => calibration::choose_clip(&sample, method, settings.percentile),
            };
            let scale = clip / 127.0;
            let output_error = calibration::output_error(&sample, scale, &weight, &dequantized)?;
            layers.insert(
                module,
                LayerCalibration {
                    absmax: sample.absmax,
                    clip,
                    scale,
                    input_error: calibration::input_error(&sample, scale),
                    output_error,
                    kept_full_precision: false,
                },
            );
        }
        let mut by_error: Vec<(&String, f64)> =
            layers.iter().map(|(m, l)| (m, l.output_error)).collect();
        by_error.sort_by(|a, b| b.1.total_cmp(&a.1));
        let kept: Vec<String> = match &settings.fallback {
            Some(Fallback {
                share: Some(share), ..
            }) => {
                let count = (share * by_error.len() as f64).ceil() as usize;
                by_error
                    .iter()
                    .take(count)
                    .map(|(m, _)| (*m).clone())
                    .collect()
            }
            Some(Fallback {
                max_output_error: Some(limit),
                ..
            }) => by_error
                .iter()
                .filter(|(_, e)| e > limit)
                .map(|(m, _)| (*m).clone())
                .collect(),
            _ => Vec::new(),
        };
        for module in &kept {
            if let Some(layer) = layers.get_mut(module) {
                layer.kept_full_precision = true;
            }
        }
        Ok(StaticCalibration {
            method: settings.method,
            percentile: (settings.method == CalibrationMethod::Percentile)
                .then_some(settings.percentile),
            batches_requested: settings.batches,
            batches_run: ran,
            layers,
            kept_full_precision: kept,
        })
    }

    /// Whether the stored model quantizes its linear layers' inputs to int8 per token.
    fn dynamic(&self) -> bool {
        match self.method {
            QuantizeMethod::Dynamic => true,
            QuantizeMethod::Qat => self.qat.activations == QatActivations::Int8PerToken,
            QuantizeMethod::Ptq | QuantizeMethod::Static => false,
        }
    }

    /// How QAT's fake-quantized layers round their inputs.
    fn qat_inputs(&self) -> FakeQuantInputs {
        match self.qat.activations {
            QatActivations::None => FakeQuantInputs::Float,
            QatActivations::Int8PerToken => FakeQuantInputs::Int8PerToken,
            QatActivations::Int8PerTensor => FakeQuantInputs::Int8PerTensor,
        }
    }

    /// QAT: trains `model` with every planned linear weight fake-quantized with its first
    /// candidate (which `candidates` keeps alone, so the stored scheme is the trained one) and the
    /// planned tables (embeddings) quantized now and frozen. Returns the training summary, the
    /// tables, packed, and with per-tensor inputs the observed ranges; `candidates` is left with
    /// the linear weights.
    fn train_quantization_aware(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
        candidates: &mut BTreeMap<String, Vec<QuantScheme>>,
    ) -> Result<QatOutcome> {
        let qat = &self.qat;
        let map = model.modules()?;
        // The float model as it entered the stage, before anything is rounded.
        let teacher = qat
            .distill_from_float
            .then(|| model.deep_clone())
            .transpose()?;
        let (mut linear, tables): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(candidates)
            .into_iter()
            .partition(|(name, _)| map.is_linear_weight(name));
        // Tables are looked up, not multiplied, so they cannot be fake-quantized in a layer: they
        // are quantized now and frozen (Param::Frozen), and the layers train around them.
        let tables = store_quantized(model, &tables)?;
        let found = model.plan().clone();
        for (name, schemes) in &mut linear {
            schemes.truncate(1);
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let kind = LinearKind::FakeQuant {
                scheme: schemes[0],
                inputs: self.qat_inputs(),
            };
            model.set_linear_kind(module, kind)?;
        }
        let observers = (self.qat_inputs() == FakeQuantInputs::Int8PerTensor).then(|| {
            Arc::new(ActivationObservers::new(
                qat.freeze_observers_after.map(u64::from),
            ))
        });
        model.set_activation_observers(observers.clone());
        let settings = qat_train_settings(qat);
        let trained = match &teacher {
            Some(teacher) => {
                let response = ResponseKd {
                    temperature: qat.temperature,
                    top_k: None,
                };
                let terms: Vec<(f64, Box<dyn Objective>)> =
                    vec![(1.0, Box::new(TaskLoss)), (1.0, Box::new(response))];
                let objective = WeightedSum::new(terms);
                let request = TrainRequest {
                    objective: Some(&objective),
                    frozen: vec![teacher],
                    gradients: None,
                };
                trainer.train_with(model, &settings, request, ctx)
            }
            None => trainer.train(model, &settings, ctx),
        };
        model.set_plan(found);
        model.set_activation_observers(None);
        let summary = trained?;
        for glob in &summary.unmatched_freeze_globs {
            ctx.warn(format!(
                "quantize: qat: freeze glob {glob:?} matches no parameter"
            ));
        }
        *candidates = linear;
        Ok(QatOutcome {
            summary,
            tables,
            observed: observers.map(|o| o.ranges()),
        })
    }

    /// The weights this stage quantizes, each with its candidate schemes (the stage's, a fallback,
    /// or the output matrix's type; several candidates are decided by measured error when the
    /// weight is quantized), and the notes for weights not stored with the stage's scheme (kept in
    /// full precision, or stored with the type the note names).
    fn plan(&self, model: &WorkingModel, ctx: Option<&StageContext>) -> Result<Plan> {
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
        if let (Some(ctx), Some(_)) = (ctx, &self.exclude) {
            for glob in &targets.unmatched_globs {
                ctx.warn(format!(
                    "quantize: exclude glob {glob:?} matches no parameter"
                ));
            }
        }
        let output = map.output_matrix.clone();
        let mut chosen = BTreeMap::new();
        let mut notes = BTreeMap::new();
        // Dynamic quantization is of the linear layers (their inputs are what it quantizes per
        // token); embedding tables keep their precision, as under PyTorch's `quantize_dynamic`.
        let names = targets.names.into_iter().filter(|name| {
            !matches!(
                self.method,
                QuantizeMethod::Dynamic | QuantizeMethod::Static
            ) || map.is_linear_weight(name)
        });
        for name in names {
            let dims = shapes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            if output.as_deref() == Some(name.as_str()) {
                let to = output_scheme(self.scheme, &dims).filter(|to| *to != self.scheme);
                if let Some(to) = to {
                    notes.insert(
                        name.clone(),
                        format!(
                            "the output matrix is stored as {to}, as llama.cpp does under every \
                             type but q8_0: the logits are the most sensitive to its error"
                        ),
                    );
                    chosen.insert(name, vec![to]);
                    continue;
                }
            }
            let Some(reason) = self.scheme.unsupported_reason(&dims) else {
                chosen.insert(name, vec![self.scheme]);
                continue;
            };
            let usable: Vec<QuantScheme> = fallbacks(self.scheme)
                .into_iter()
                .filter(|f| f.unsupported_reason(&dims).is_none())
                .collect();
            match usable.as_slice() {
                [] => {
                    notes.insert(name, reason);
                }
                [only] => {
                    notes.insert(name.clone(), format!("{reason}; stored as {only} instead"));
                    chosen.insert(name, usable);
                }
                _ => {
                    // `run` adds which of the candidates was chosen.
                    notes.insert(name.clone(), reason);
                    chosen.insert(name, usable);
                }
            }
        }
        Ok((chosen, notes))
    }
}

/// How the inputs of the layers a stage quantizes run (on the CPU; on CUDA candle's kernels
/// quantize them to 8-bit blocks of 32).
fn activations_note(scheme: QuantScheme, dynamic: bool) -> &'static str {
    match (scheme, dynamic) {
        (_, true) => "int8 per token, computed at run time (dynamic)",
        (QuantScheme::Int8, false) => "int8 per token at run time (the int8 kernel)",
        _ => "int8 per block of 32 at run time (the block kernels)",
    }
}

/// Each weight to quantize with its candidate schemes, and the notes on weights not stored with
/// the stage's scheme.
type Plan = (BTreeMap<String, Vec<QuantScheme>>, BTreeMap<String, String>);

/// The module roles quantization leaves alone when a spec gives no `exclude`: norms and the task
/// head. Embedding tables are quantized too: they are most of a small model's size.
const DEFAULT_EXCLUDED_ROLES: &[ModuleRole] = &[ModuleRole::Norm, ModuleRole::TaskHead];

/// The types to store a weight in when a k-quant's 256-wide super-blocks do not divide its rows,
/// in order of preference on a tie (smallest first).
///
/// llama.cpp falls back to a single type (q5_0 for q4_k). For q4_k we also try q4_1, which is
/// smaller (5.0 bits per weight against 5.5), and keep whichever has the smaller squared error: on
/// ordinary weights that is q5_0, as in llama.cpp; on weights that already sit on a Q4_1 grid (a
/// Q4_1 GGUF dequantized for the pipeline) q4_1 finds the grid again with no error at all
/// ([`crate::quant::grid_search`]), where q5_0 would add a second rounding on top of the first.
fn fallbacks(scheme: QuantScheme) -> Vec<QuantScheme> {
    let QuantScheme::Gguf(dtype) = scheme else {
        return Vec::new();
    };
    let to: &[GgmlDType] = match dtype {
        GgmlDType::Q2K | GgmlDType::Q3K => &[GgmlDType::Q4_0],
        GgmlDType::Q4K => &[GgmlDType::Q4_1, GgmlDType::Q5_0],
        GgmlDType::Q5K => &[GgmlDType::Q5_1],
        GgmlDType::Q6K => &[GgmlDType::Q8_0],
        _ => &[],
    };
    to.iter().map(|&d| QuantScheme::Gguf(d)).collect()
}

/// llama.cpp's type for the output matrix under a GGUF scheme: q6_k, or q8_0 where 256-wide
/// super-blocks do not divide its rows; none (the stage's own type) under q8_0, and for int8/int4.
fn output_scheme(scheme: QuantScheme, dims: &[usize]) -> Option<QuantScheme> {
    let QuantScheme::Gguf(dtype) = scheme else {
        return None;
    };
    if dtype == GgmlDType::Q8_0 {
        return None;
    }
    let q6_k = QuantScheme::Gguf(GgmlDType::Q6K);
    let q8_0 = QuantScheme::Gguf(GgmlDType::Q8_0);
    [q6_k, q8_0]
        .into_iter()
        .find(|s| s.unsupported_reason(dims).is_none())
}

/// What QAT's training leaves behind.
struct QatOutcome {
    summary: TrainSummary,
    /// The embedding tables, quantized before training.
    tables: Stored,
    /// With per-tensor int8 inputs: each layer's observed input range.
    observed: Option<BTreeMap<String, ObservedRange>>,
}

/// The settings QAT trains with.
fn qat_train_settings(qat: &QatSettings) -> TrainSettings {
    TrainSettings {
        epochs: qat.epochs,
        learning_rate: qat.learning_rate,
        head_learning_rate: qat.head_learning_rate,
        batch_size: qat.batch_size,
        weight_decay: qat.weight_decay,
        warmup_ratio: qat.warmup_ratio,
        freeze: qat.freeze.clone(),
        grad_clip_norm: qat.effective_grad_clip().map(|c| c.max_norm),
        early_stopping_patience: qat.early_stopping.as_ref().map(|e| e.patience),
        log_every_steps: DEFAULT_LOG_EVERY_STEPS,
        teacher_cache_bytes: None,
        gradient_checkpointing: false,
        mixed_precision: None,
    }
}

/// Quantized weights, packed, with each one's relative error against the values it replaced.
#[derive(Default)]
struct Stored {
    weights: BTreeMap<String, Arc<QuantizedWeight>>,
    errors: BTreeMap<String, f64>,
}

impl Stored {
    fn extend(&mut self, other: Stored) {
        self.weights.extend(other.weights);
        self.errors.extend(other.errors);
    }
}

/// Quantizes each planned weight with the candidate of least squared error (the first on a tie)
/// and replaces its values by the quantized-then-dequantized ones, so whatever reads the store
/// (embedding lookups, export) sees exactly the stored quantized weights. Returns each quantized
/// weight, packed, with its relative error.
fn store_quantized(
    model: &WorkingModel,
    candidates: &BTreeMap<String, Vec<QuantScheme>>,
) -> Result<Stored> {
    let mut stored = Stored::default();
    for (name, schemes) in candidates {
        let param = model
            .store
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))?;
        if let Some(best) = quantize_least_error(param.tensor(), schemes)? {
            let original = param.tensor().to_dtype(candle_core::DType::F32)?;
            let values = best.values.to_dtype(candle_core::DType::F32)?;
            let error = super::lora::relative_error(&values, &original)?;
            stored.errors.insert(name.clone(), error);
            stored.weights.insert(name.clone(), Arc::new(best.weight));
            model.store.insert(name.clone(), Param::Frozen(best.values));
        }
    }
    Ok(stored)
}

impl Stage for QuantizeStage {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting(
                "quantize: the model is already quantized".into(),
            ));
        }
        self.plan(model, None).map(|_| ())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        let (mut candidates, mut kept) = self.plan(model, Some(ctx))?;
        let mut stored = Stored::default();
        let mut training = None;
        let mut observed = None;
        if self.method == QuantizeMethod::Qat {
            let QatOutcome {
                summary,
                tables,
                observed: ranges,
            } = self.train_quantization_aware(model, trainer, ctx, &mut candidates)?;
            training = Some(summary);
            stored = tables;
            observed = ranges;
        }
        let mut calibrated = None;
        if self.method == QuantizeMethod::Static {
            let calibration = self.calibrate(model, trainer, &candidates)?;
            for module in &calibration.kept_full_precision {
                let name = format!("{module}.weight");
                candidates.remove(&name);
                let error = calibration.layers[module].output_error;
                kept.insert(
                    name,
                    format!(
                        "fallback: static int8 output error {error:.4} on the calibration rows"
                    ),
                );
            }
            calibrated = Some(calibration);
        }
        stored.extend(store_quantized(model, &candidates)?);
        let Stored {
            weights: chosen,
            errors,
        } = stored;
        for (name, weight) in &chosen {
            let scheme = weight.scheme();
            let tried = candidates.get(name).map_or(&[][..], Vec::as_slice);
            if let (Some(note), true) = (kept.get_mut(name), tried.len() > 1) {
                let tried: Vec<String> = tried.iter().map(ToString::to_string).collect();
                note.push_str(&format!(
                    "; stored as {scheme} instead, the one of {} with the least squared error",
                    tried.join(", ")
                ));
            }
        }
        for (name, reason) in &kept {
            ctx.warn(format!("quantize: {name}: {reason}"));
        }
        let shapes = model.weight_shapes();
        let quantized_parameters = shapes
            .iter()
            .filter(|(n, _)| chosen.contains_key(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let quantized: Vec<String> = chosen.keys().cloned().collect();
        model.set_quantized(self.scheme, chosen)?;
        if self.dynamic() {
            model.mark_dynamic();
        }
        if let Some(calibration) = &calibrated {
            let scales = calibration
                .layers
                .iter()
                .filter(|(_, layer)| !layer.kept_full_precision)
                .filter(|(module, _)| quantized.contains(&format!("{module}.weight")))
                .map(|(module, layer)| (module.clone(), layer.scale))
                .collect();
            model.set_input_scales(scales);
        }
        if let Some(ranges) = &observed {
            let scales = ranges
                .iter()
                .filter(|(module, _)| quantized.contains(&format!("{module}.weight")))
                .map(|(module, range)| (module.clone(), range.scale()))
                .collect();
            model.set_input_scales(scales);
        }
        let qat = (self.method == QuantizeMethod::Qat).then(|| self.qat.clone());
        let report = QuantizeReport {
            method: self.method.name().to_string(),
            activations: if self.method == QuantizeMethod::Static {
                "int8 per tensor, one calibrated scale per layer (static)".to_string()
            } else if observed.is_some() {
                "int8 per tensor, one scale per layer observed in training (static)".to_string()
            } else {
                activations_note(self.scheme, self.dynamic()).to_string()
            },
            scheme: self.scheme.to_string(),
            quantized,
            kept_full_precision: kept,
            quantized_parameters,
            quantization_error: errors,
            qat,
            training,
            calibration: calibrated,
            observed_ranges: observed,
        };
        serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamStore;
    use candle_core::{DType, Device, Tensor};

    fn q(dtype: GgmlDType) -> QuantScheme {
        QuantScheme::Gguf(dtype)
    }

    #[test]
    fn the_output_matrix_follows_llama_cpp() {
        let q4_k = q(GgmlDType::Q4K);
        assert_eq!(output_scheme(q4_k, &[100, 512]), Some(q(GgmlDType::Q6K)));
        assert_eq!(output_scheme(q4_k, &[100, 576]), Some(q(GgmlDType::Q8_0)));
        assert_eq!(output_scheme(q(GgmlDType::Q8_0), &[100, 576]), None);
        assert_eq!(
            output_scheme(q(GgmlDType::Q6K), &[100, 512]),
            Some(q(GgmlDType::Q6K))
        );
        assert_eq!(output_scheme(QuantScheme::Int8, &[100, 576]), None);
        assert_eq!(output_scheme(q4_k, &[100, 48]), None, "no type fits 48");
    }

    #[test]
    fn the_plan_notes_only_weights_not_stored_with_the_stage_scheme() -> Result<()> {
        let device = Device::Cpu;
        let zeros = |rows: usize, cols: usize| Tensor::zeros((rows, cols), DType::F32, &device);
        let store = ParamStore::from_tensors(
            [
                ("model.embed_tokens.weight".to_owned(), zeros(16, 512)?),
                (
                    "model.layers.0.mlp.up_proj.weight".to_owned(),
                    zeros(8, 512)?,
                ),
                (
                    "model.layers.0.mlp.down_proj.weight".to_owned(),
                    zeros(8, 96)?,
                ),
            ],
            |_| false,
        )?;
        let config = serde_json::json!({"model_type": "llama", "vocab_size": 16,
            "hidden_size": 512, "num_hidden_layers": 1, "num_attention_heads": 8,
            "intermediate_size": 8, "max_position_embeddings": 32, "tie_word_embeddings": true});
        let model = WorkingModel::new(store, config);
        let plan = |dtype| {
            let stage = QuantizeStage {
                scheme: q(dtype),
                exclude: None,
                method: QuantizeMethod::Ptq,
                qat: QatSettings::default(),
                calibration: StaticSettings {
                    method: CalibrationMethod::Mse,
                    batches: 1,
                    percentile: 99.99,
                    fallback: None,
                },
            };
            stage.plan(&model, None)
        };
        let (chosen, notes) = plan(GgmlDType::Q4K)?;
        assert_eq!(chosen["model.embed_tokens.weight"], [q(GgmlDType::Q6K)]);
        assert_eq!(
            chosen["model.layers.0.mlp.up_proj.weight"],
            [q(GgmlDType::Q4K)]
        );
        let fallbacks = [q(GgmlDType::Q4_1), q(GgmlDType::Q5_0)];
        assert_eq!(chosen["model.layers.0.mlp.down_proj.weight"], fallbacks);
        let noted: Vec<&str> = notes.keys().map(String::as_str).collect();
        assert_eq!(
            noted,
            [
                "model.embed_tokens.weight",
                "model.layers.0.mlp.down_proj.weight"
            ]
        );
        let (chosen, notes) = plan(GgmlDType::Q6K)?;
        assert_eq!(chosen["model.embed_tokens.weight"], [q(GgmlDType::Q6K)]);
        assert!(
            !notes.contains_key("model.embed_tokens.weight"),
            "q6_k is the stage's own type: {notes:?}"
        );
        Ok(())
    }

    #[test]
    fn the_q4_k_fallback_is_the_candidate_with_least_error() -> Result<()> {
        let device = Device::Cpu;
        // A weight already on a Q4_1 grid (levels 3..=12 of d = 0.01 from -0.05) and an ordinary one.
        let grid: Vec<f32> = (0..64 * 64)
            .map(|i| (3 + (i * 7919) % 10) as f32 * 0.01 - 0.05)
            .collect();
        let ordinary: Vec<f32> = (0..64 * 64)
            .map(|i| (((i * 7919) % 1000) as f32 / 1000.0 - 0.5).powi(3))
            .collect();
        let store = ParamStore::from_tensors(
            [
                (
                    "grid.weight".to_owned(),
                    Tensor::from_vec(grid, (64, 64), &device)?,
                ),
                (
                    "plain.weight".to_owned(),
                    Tensor::from_vec(ordinary, (64, 64), &device)?,
                ),
            ],
            |_| false,
        )?;
        let model = WorkingModel::new(store, serde_json::json!({}));
        let candidates: BTreeMap<String, Vec<QuantScheme>> = ["grid.weight", "plain.weight"]
            .iter()
            .map(|n| (n.to_string(), fallbacks(q(GgmlDType::Q4K))))
            .collect();
        let chosen = store_quantized(&model, &candidates)?;
        assert_eq!(chosen.weights["grid.weight"].scheme(), q(GgmlDType::Q4_1));
        assert_eq!(chosen.weights["plain.weight"].scheme(), q(GgmlDType::Q5_0));
        // Found again up to the f16 rounding of the grid's step.
        assert!(chosen.errors["grid.weight"] < 1e-3, "{:?}", chosen.errors);
        assert!(chosen.errors["plain.weight"] > 0.01, "{:?}", chosen.errors);
        Ok(())
    }
}
