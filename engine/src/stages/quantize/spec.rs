//! The `quantize` stage's spec: its fields and defaults, checks, preconditions and estimate.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::QuantizeStage;
use crate::error::Result;
use crate::spec::{
    Checker, Estimate, ModelState, Precondition, StageKind, Workload, MAX_BATCH_SIZE, MAX_EPOCHS,
};
use crate::stages::finetune::{EarlyStopping, GradClip};
pub use crate::stages::quantize::calibration::CalibrationMethod;
use crate::stages::Stage;

/// Group sizes `int4` takes.
const INT4_GROUP_SIZES: &[u32] = &[32, 64, 128];

/// Settings of a quantization stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSpec {
    /// How the model is quantized: `ptq` quantizes the weights only, after training; `dynamic`
    /// quantizes the linear layers' weights to int8 and their inputs to int8 per token at run time
    /// (`scheme`: `int8`); `qat` first trains with the linear weights fake-quantized with `scheme`
    /// in the forward pass and a straight-through estimator in the backward pass (settings in
    /// `qat`), then stores them quantized like `ptq`.
    #[serde(default)]
    pub method: QuantizeMethod,
    /// Number format of the quantized weights.
    pub scheme: QuantScheme,
    /// Weights per scale for group-wise schemes (`int4`: 32, 64 or 128); `null` means the
    /// scheme's default.
    #[serde(default)]
    #[schemars(extend("enum" = [32, 64, 128, null]))]
    pub group_size: Option<u32>,
    /// Globs over parameter names kept in full precision; `null` means norms and the task head
    /// (embedding tables are quantized: they are most of a small model's size).
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// `method: "qat"` only: how to train; `null` takes every default.
    #[serde(default)]
    pub qat: Option<QatSettings>,
    /// `method: "static"` only: training batches (of 16 rows) whose inputs calibrate each layer's
    /// input range; fewer run when the training split is smaller (the report says how many).
    /// `null` means 8.
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_CALIBRATION_BATCHES))]
    pub calibration_batches: Option<u32>,
    /// `method: "static"` only: how each layer's input range is chosen: `minmax` (the largest |x|),
    /// `percentile` (of |x|), or `mse` (the clip of least squared error); `null` means `mse`.
    #[serde(default)]
    pub calibration: Option<CalibrationMethod>,
    /// `calibration: "percentile"` only: the percentile of |x| (90 to 100); `null` means 99.99.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 90, "maximum" = 100))]
    pub percentile: Option<f64>,
    /// `method: "static"` only: layers kept in full precision, those whose int8 output error on
    /// the calibration rows is largest; `null` keeps none.
    #[serde(default)]
    pub fallback: Option<Fallback>,
}

/// Which statically quantized layers stay in full precision: set one of the two.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    /// This share of the layers (rounded up), those of largest output error.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0, "exclusiveMaximum" = 1))]
    pub share: Option<f64>,
    /// Every layer whose relative output error is above this.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_output_error: Option<f64>,
}

/// The most calibration batches a static quantization runs.
pub const MAX_CALIBRATION_BATCHES: u32 = 1024;
/// Calibration batches when the spec gives none.
pub const DEFAULT_CALIBRATION_BATCHES: u32 = 8;
/// The percentile of `calibration: "percentile"` when the spec gives none.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// Quantization-aware training: the fine-tune settings, plus what is fake-quantized and whether
/// the float model teaches the fake-quantized one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QatSettings {
    /// Passes over the training split.
    #[serde(default = "default_qat_epochs")]
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub epochs: u32,
    /// Peak learning rate of the model body (AdamW); smaller than a fine-tune's, as the model
    /// is already trained.
    #[serde(default = "default_qat_learning_rate")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub learning_rate: f64,
    /// Learning rate of the task head; `null` means the body's rate.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub head_learning_rate: Option<f64>,
    /// Examples per optimizer step.
    #[serde(default = "default_qat_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1))]
    pub weight_decay: f64,
    /// Share of the steps spent warming the learning rate up linearly from zero.
    #[serde(default = "default_qat_warmup_ratio")]
    #[schemars(extend("minimum" = 0, "exclusiveMaximum" = 1))]
    pub warmup_ratio: f64,
    /// Globs over parameter names (`embeddings.*`) that stay frozen.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Gradient clipping by global norm; `null` disables it. Absent, it is `max_norm` 1.0.
    // Absent and `null` differ (as in `finetune`), and no object default goes into the schema:
    // generated clients cannot take one.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::stages::finetune::present"
    )]
    #[schemars(with = "Option<GradClip>")]
    pub grad_clip: Option<Option<GradClip>>,
    /// Stop when the validation metric (of the fake-quantized model) has not improved for
    /// `patience` evaluations; `null` disables it.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// `int8_per_token` also rounds each linear layer's input rows to int8 in training, as the
    /// dynamic int8 kernel does at run time, and leaves the model dynamically quantized;
    /// `int8_per_tensor` rounds each layer's whole input with one scale, observed in training (a
    /// moving average of the batches' largest |x|), and leaves the model statically quantized
    /// with those scales (W8A8 static). Both need `scheme` `int8`. `none` fake-quantizes the
    /// weights only.
    #[serde(default)]
    pub activations: QatActivations,
    /// `activations: "int8_per_tensor"` only: the observed input ranges stop updating after this
    /// many training batches, so the remaining steps train against the scales the stored model
    /// keeps; `null` updates them to the end.
    #[serde(default)]
    #[schemars(range(min = 1, max = MAX_OBSERVER_BATCHES))]
    pub freeze_observers_after: Option<u32>,
    /// Train against the float model's softened outputs too (response distillation from the
    /// model as it entered the stage, weight 1 beside the task loss weight 1).
    #[serde(default)]
    pub distill_from_float: bool,
    /// The softmax temperature of `distill_from_float`.
    #[serde(default = "default_qat_temperature")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 100))]
    pub temperature: f64,
}

impl Default for QatSettings {
    fn default() -> Self {
        // Every field has a serde default; an empty object gives them all.
        serde_json::from_value(serde_json::json!({})).unwrap_or_else(|_| unreachable!())
    }
}

/// What quantization-aware training fake-quantizes beside the weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum QatActivations {
    /// Weights only.
    #[default]
    None,
    /// Each linear layer's input rows rounded to int8 with their own scale (dynamic int8).
    Int8PerToken,
    /// Each linear layer's input rounded to int8 with one observed scale per layer (static int8).
    Int8PerTensor,
}

/// The largest `freeze_observers_after`.
pub const MAX_OBSERVER_BATCHES: u32 = 1_000_000;

impl QatActivations {
    /// The name the spec uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Int8PerToken => "int8_per_token",
            Self::Int8PerTensor => "int8_per_tensor",
        }
    }
}

fn default_qat_epochs() -> u32 {
    1
}
fn default_qat_learning_rate() -> f64 {
    2e-5
}
fn default_qat_batch_size() -> u32 {
    16
}
fn default_qat_warmup_ratio() -> f64 {
    0.1
}
fn default_qat_temperature() -> f64 {
    2.0
}

impl QatSettings {
    /// The clipping QAT runs with: the spec's, else `max_norm` 1.0.
    pub fn effective_grad_clip(&self) -> Option<GradClip> {
        match &self.grad_clip {
            Some(clip) => clip.clone(),
            None => Some(GradClip { max_norm: 1.0 }),
        }
    }

    fn check(&self, c: &mut Checker, at: &str, scheme: QuantScheme) {
        c.range_u32(self.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
        c.learning_rate(self.learning_rate, &format!("{at}/learning_rate"));
        if let Some(rate) = self.head_learning_rate {
            c.learning_rate(rate, &format!("{at}/head_learning_rate"));
        }
        c.range_u32(
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
            &format!("{at}/batch_size"),
        );
        c.unit_interval(self.weight_decay, &format!("{at}/weight_decay"), false);
        c.unit_interval(self.warmup_ratio, &format!("{at}/warmup_ratio"), true);
        c.globs(&self.freeze, &format!("{at}/freeze"));
        if let Some(clip) = &self.effective_grad_clip() {
            c.check(
                clip.max_norm > 0.0 && clip.max_norm.is_finite(),
                &format!("{at}/grad_clip/max_norm"),
                || format!("must be positive, got {}", clip.max_norm),
            );
        }
        if let Some(stop) = &self.early_stopping {
            let pointer = format!("{at}/early_stopping/patience");
            c.range_u32(stop.patience, 1, MAX_EPOCHS, &pointer);
        }
        c.check(
            self.temperature > 0.0 && self.temperature <= 100.0,
            &format!("{at}/temperature"),
            || format!("must be in (0, 100], got {}", self.temperature),
        );
        c.check(
            self.activations == QatActivations::None || scheme == QuantScheme::Int8,
            &format!("{at}/activations"),
            || {
                format!(
                    "{} runs on the int8 × int8 kernel: scheme must be \"int8\", got \"{}\" (whose layers quantize their inputs per block at run time)",
                    self.activations.name(),
                    scheme.name()
                )
            },
        );
        if let Some(batches) = self.freeze_observers_after {
            let pointer = format!("{at}/freeze_observers_after");
            c.check(
                self.activations == QatActivations::Int8PerTensor,
                &pointer,
                || {
                    format!(
                        "observers exist with `activations: \"int8_per_tensor\"` only, got \"{}\"",
                        self.activations.name()
                    )
                },
            );
            c.range_u32(batches, 1, MAX_OBSERVER_BATCHES, &pointer);
        }
    }
}

/// How a quantize stage treats activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum QuantizeMethod {
    /// Post-training quantization of the weights, embeddings included.
    #[default]
    #[serde(rename = "ptq")]
    Ptq,
    /// Quantization-aware training, then the weights stored quantized as `ptq` stores them.
    #[serde(rename = "qat")]
    Qat,
    /// int8 linear weights per channel, inputs quantized to int8 with one scale per layer
    /// calibrated beforehand (W8A8 static).
    #[serde(rename = "static")]
    Static,
    /// int8 linear weights per channel, inputs quantized to int8 per token at run time.
    #[serde(rename = "dynamic")]
    Dynamic,
}

/// Quantized number formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum QuantScheme {
    /// 8-bit symmetric, one scale per output channel.
    #[serde(rename = "int8")]
    Int8,
    /// 4-bit asymmetric, one scale and zero point per group.
    #[serde(rename = "int4")]
    Int4,
    /// 4-bit NormalFloat (QLoRA's format), one absmax per block of 64.
    #[serde(rename = "nf4")]
    Nf4,
    /// GGML block format, 8-bit, blocks of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGML k-quant, 6-bit.
    #[serde(rename = "q6_k")]
    Q6K,
    /// GGML k-quant, 5-bit.
    #[serde(rename = "q5_k")]
    Q5K,
    /// GGML block format, 5-bit, blocks of 32.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// GGML block format, 5-bit with a minimum, blocks of 32.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// GGML k-quant, 4-bit.
    #[serde(rename = "q4_k")]
    Q4K,
    /// GGML block format, 4-bit with a minimum, blocks of 32.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// GGML block format, 4-bit, blocks of 32.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// GGML k-quant, 3-bit.
    #[serde(rename = "q3_k")]
    Q3K,
    /// GGML k-quant, 2-bit.
    #[serde(rename = "q2_k")]
    Q2K,
}

impl QuantizeSpec {
    /// The static-only fields: set only with `method: "static"`, in range.
    fn check_static(&self, c: &mut Checker, at: &str) {
        let is_static = self.method == QuantizeMethod::Static;
        let fields = [
            ("calibration_batches", self.calibration_batches.is_some()),
            ("calibration", self.calibration.is_some()),
            ("percentile", self.percentile.is_some()),
            ("fallback", self.fallback.is_some()),
        ];
        for (field, set) in fields {
            c.check(!set || is_static, &format!("{at}/{field}"), || {
                format!(
                    "applies to `method: \"static\"` only; remove it for \"{}\"",
                    self.method.name()
                )
            });
        }
        if let Some(batches) = self.calibration_batches {
            let pointer = format!("{at}/calibration_batches");
            c.range_u32(batches, 1, MAX_CALIBRATION_BATCHES, &pointer);
        }
        if let Some(percentile) = self.percentile {
            c.check(
                percentile > 90.0 && percentile <= 100.0,
                &format!("{at}/percentile"),
                || format!("must be in (90, 100], got {percentile}"),
            );
            c.check(
                self.calibration == Some(CalibrationMethod::Percentile),
                &format!("{at}/percentile"),
                || "applies to `calibration: \"percentile\"` only".to_string(),
            );
        }
        if let Some(fallback) = &self.fallback {
            let pointer = format!("{at}/fallback");
            match (fallback.share, fallback.max_output_error) {
                (Some(share), None) => c.check(
                    share > 0.0 && share < 1.0,
                    &format!("{pointer}/share"),
                    || format!("must be in (0, 1), got {share}"),
                ),
                (None, Some(error)) => c.check(
                    error > 0.0 && error.is_finite(),
                    &format!("{pointer}/max_output_error"),
                    || format!("must be positive, got {error}"),
                ),
                _ => c.fail(pointer, "set exactly one of `share` and `max_output_error`"),
            }
        }
    }
}

impl QuantizeMethod {
    /// The method's name as the spec spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ptq => "ptq",
            Self::Dynamic => "dynamic",
            Self::Qat => "qat",
            Self::Static => "static",
        }
    }
}

impl QuantScheme {
    /// The scheme's name as the spec spells it (`int8`, `q4_k`…).
    pub fn name(self) -> String {
        // The serde rename is the one spelling; a unit enum always serializes to a string.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{self:?}"),
        }
    }
}

impl StageKind for QuantizeSpec {
    const TYPE: &'static str = "quantize";

    fn check(&self, c: &mut Checker, at: &str) {
        if matches!(
            self.method,
            QuantizeMethod::Dynamic | QuantizeMethod::Static
        ) {
            c.check(self.scheme == QuantScheme::Int8, &format!("{at}/scheme"), || {
                format!(
                    "method \"{}\" quantizes weights and activations to int8: scheme must be \"int8\", got \"{}\"",
                    self.method.name(),
                    self.scheme.name()
                )
            });
        }
        self.check_static(c, at);
        if let Some(group) = self.group_size {
            let pointer = format!("{at}/group_size");
            if self.scheme == QuantScheme::Int4 {
                c.check(INT4_GROUP_SIZES.contains(&group), &pointer, || {
                    format!("must be one of {INT4_GROUP_SIZES:?}, got {group}")
                });
            } else {
                c.fail(pointer, "only int4 takes a group size (the other schemes have fixed blocks or per-channel scales)");
            }
        }
        if let Some(exclude) = &self.exclude {
            c.globs(exclude, &format!("{at}/exclude"));
        }
        if let Some(qat) = &self.qat {
            c.check(
                self.method == QuantizeMethod::Qat,
                &format!("{at}/qat"),
                || {
                    format!(
                        "applies to `method: \"qat\"` only; remove it for \"{}\"",
                        self.method.name()
                    )
                },
            );
            qat.check(c, &format!("{at}/qat"), self.scheme);
        }
    }

    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        model.require_full_precision(Self::TYPE)?;
        let needs = match self.method {
            QuantizeMethod::Qat => Some("quantization-aware training trains"),
            QuantizeMethod::Static => Some("static quantization calibrates"),
            QuantizeMethod::Ptq | QuantizeMethod::Dynamic => None,
        };
        if let (Some(what), Some(0)) = (needs, model.train_rows) {
            return Err(Precondition {
                name: "training data",
                field: Some("method"),
                message: format!(
                    "{what} on the task's training split, and the dataset has no training rows; \
                     use \"ptq\" or \"dynamic\", or a dataset with a train split"
                ),
            });
        }
        Ok(())
    }

    fn transform(&self, model: &mut ModelState, index: usize) {
        model.quantized_at.get_or_insert(index);
    }

    /// About one evaluation's work (reading every weight), in inference memory; QAT trains too
    /// (a teacher forward on top with `distill_from_float`).
    fn estimate(&self, work: &Workload) -> Estimate {
        let quantize = Estimate {
            seconds: work.evaluation_seconds(),
            peak_bytes: work.inference_peak_bytes(),
        };
        if self.method == QuantizeMethod::Static {
            // A few calibration batches, forward and backward: about two evaluations' work, in
            // training memory.
            return Estimate {
                seconds: 3.0 * quantize.seconds,
                peak_bytes: work.training_peak_bytes().max(quantize.peak_bytes),
            };
        }
        if self.method != QuantizeMethod::Qat {
            return quantize;
        }
        let qat = self.qat.clone().unwrap_or_default();
        let training = work.training(f64::from(qat.epochs));
        let teacher = if qat.distill_from_float { 1.33 } else { 1.0 };
        Estimate {
            seconds: quantize.seconds + training.seconds * teacher,
            peak_bytes: training.peak_bytes.max(quantize.peak_bytes),
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(QuantizeStage::from_spec(self)?))
    }
}
