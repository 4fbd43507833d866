//! The compression stages a job pipeline is made of, as the job spec spells them.
//!
//! Every stage struct denies unknown fields and fills its defaults on parse, so a stored spec shows
//! the settings a job really ran with. Ranges are checked by [`super::JobSpec::validate`], not here:
//! serde reports only the first problem, validation reports them all.

use serde::{Deserialize, Deserializer, Serialize};

/// One step of a job pipeline, tagged by `type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StageSpec {
    /// Supervised fine-tuning of the whole model (or its unfrozen part) on the job's task.
    Finetune(FinetuneSpec),
    /// Weight pruning to a target sparsity, optionally with short recovery fine-tunes.
    Prune(PruneSpec),
    /// Post-training quantization of the linear layers, optionally with quantization-aware training.
    Quantize(QuantizeSpec),
    /// Knowledge distillation of the current model into a shallower student.
    Distill(DistillSpec),
}

/// The `type` names of every stage the schema knows, in pipeline order of usual use.
pub const STAGE_TYPES: &[&str] = &["finetune", "prune", "quantize", "distill"];

impl StageSpec {
    /// The stage's `type` tag.
    pub fn type_name(&self) -> &'static str {
        match self {
            StageSpec::Finetune(_) => "finetune",
            StageSpec::Prune(_) => "prune",
            StageSpec::Quantize(_) => "quantize",
            StageSpec::Distill(_) => "distill",
        }
    }

    /// Deserializes the body of a stage (the object without its `type` key) whose type is known.
    ///
    /// serde buffers internally tagged enums before picking the variant, which hides the path of an
    /// error inside a stage from path-tracking deserializers. Callers that need the exact field
    /// (the API's JSON pointers) read `type` first, remove it, and call this with their tracking
    /// deserializer.
    ///
    /// # Errors
    /// The deserializer's error when `stage_type` is not a known stage or the body does not match it.
    pub fn deserialize_typed<'de, D: Deserializer<'de>>(
        stage_type: &str,
        deserializer: D,
    ) -> Result<Self, D::Error> {
        use serde::de::Error;
        match stage_type {
            "finetune" => FinetuneSpec::deserialize(deserializer).map(StageSpec::Finetune),
            "prune" => PruneSpec::deserialize(deserializer).map(StageSpec::Prune),
            "quantize" => QuantizeSpec::deserialize(deserializer).map(StageSpec::Quantize),
            "distill" => DistillSpec::deserialize(deserializer).map(StageSpec::Distill),
            other => Err(D::Error::unknown_variant(other, STAGE_TYPES)),
        }
    }
}

/// Settings of a fine-tuning stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// Passes over the training split.
    #[serde(default = "default_finetune_epochs")]
    pub epochs: u32,
    /// Peak learning rate of the model body (AdamW).
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Learning rate of the freshly initialised task head; `null` means the body's rate.
    #[serde(default)]
    pub head_learning_rate: Option<f64>,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Share of the steps spent warming the learning rate up linearly from zero.
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    /// Globs over parameter names (`embeddings.*`) that stay frozen.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Gradient clipping by global norm; `null` disables it.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<GradClip>,
    /// Stop when the validation metric has not improved for `patience` evaluations; `null` disables it.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
}

/// Clip gradients so their global L2 norm is at most `max_norm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GradClip {
    /// The largest global gradient norm let through.
    pub max_norm: f64,
}

/// Early stopping on the validation metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without improvement tolerated before stopping.
    pub patience: u32,
}

/// Settings of a pruning stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneSpec {
    /// How weights are scored for removal.
    #[serde(default)]
    pub method: PruneMethod,
    /// Share of prunable weights set to zero at the end of the stage, in `(0, 0.95]`.
    pub sparsity: f64,
    /// Which weights may be removed together.
    #[serde(default)]
    pub pattern: PrunePattern,
    /// Whether the threshold is shared by all layers or set per layer.
    #[serde(default)]
    pub scope: PruneScope,
    /// Number of equal pruning increments that reach `sparsity` (iterative pruning).
    #[serde(default = "default_prune_steps")]
    pub steps: u32,
    /// Globs over parameter names never pruned; `null` means embeddings, norms and the task head.
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// A short fine-tune after each increment to recover accuracy; `null` skips it.
    #[serde(default)]
    pub recover: Option<Recover>,
}

/// Weight scoring for pruning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Smallest absolute value first.
    #[default]
    Magnitude,
}

/// Sparsity pattern.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrunePattern {
    /// Any weight may be removed.
    #[default]
    #[serde(rename = "unstructured")]
    Unstructured,
    /// Two of every four consecutive input weights are removed (sparsity must be 0.5).
    #[serde(rename = "2:4")]
    TwoFour,
}

/// Threshold scope for pruning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// One magnitude threshold over all prunable layers.
    #[default]
    Global,
    /// Each layer reaches `sparsity` on its own.
    Layer,
}

/// A recovery fine-tune after a pruning increment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recover {
    /// Passes over the training split per recovery.
    #[serde(default = "default_recover_epochs")]
    pub epochs: u32,
    /// Learning rate of the recovery fine-tune.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
}

/// Settings of a quantization stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSpec {
    /// Number format of the quantized weights.
    pub scheme: QuantScheme,
    /// Weights per scale for group-wise schemes (`int4`); `null` means the scheme's default.
    #[serde(default)]
    pub group_size: Option<u32>,
    /// Globs over parameter names kept in full precision; `null` means norms and the task head
    /// (embedding tables are quantized: they are most of a small model's size).
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// Quantization-aware training after quantizing; `null` means post-training quantization only.
    #[serde(default)]
    pub qat: Option<Recover>,
}

/// Quantized number formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantScheme {
    /// 8-bit symmetric, one scale per output channel.
    #[serde(rename = "int8")]
    Int8,
    /// 4-bit asymmetric, one scale and zero point per group.
    #[serde(rename = "int4")]
    Int4,
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
    /// GGML k-quant, 4-bit.
    #[serde(rename = "q4_k")]
    Q4K,
    /// GGML block format, 4-bit with a minimum, blocks of 32.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// GGML block format, 4-bit, blocks of 32.
    #[serde(rename = "q4_0")]
    Q4_0,
}

/// Settings of a distillation stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// Transformer layers of the student; `null` means half the teacher's, rounded up.
    #[serde(default)]
    pub student_layers: Option<u32>,
    /// Passes over the training split.
    #[serde(default = "default_finetune_epochs")]
    pub epochs: u32,
    /// Peak learning rate of the student.
    #[serde(default = "default_learning_rate")]
    pub learning_rate: f64,
    /// Softmax temperature applied to teacher and student logits.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the distillation loss; the task loss gets `1 - alpha`.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
}

fn default_finetune_epochs() -> u32 {
    3
}
fn default_recover_epochs() -> u32 {
    1
}
fn default_learning_rate() -> f64 {
    5e-5
}
fn default_batch_size() -> u32 {
    16
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_warmup_ratio() -> f64 {
    0.1
}
fn default_grad_clip() -> Option<GradClip> {
    Some(GradClip { max_norm: 1.0 })
}
fn default_prune_steps() -> u32 {
    1
}
fn default_temperature() -> f64 {
    2.0
}
fn default_alpha() -> f64 {
    0.5
}
