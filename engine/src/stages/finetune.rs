//! The `finetune` stage: full fine-tuning on the job's task through the shared [`Trainer`], or
//! LoRA on a frozen base (`method: "lora"`, run by [`super::lora`]).
//!
//! Its spec (and the `recover` fine-tune other stages embed), checks, preconditions and dry-run
//! estimate are here too; [`super::STAGES`] registers it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::lora::LoraSettings;
use super::{Stage, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::pipeline::StageContext;
use crate::spec::{
    Checker, Estimate, ModelState, Precondition, StageKind, Workload, MAX_BATCH_SIZE, MAX_EPOCHS,
};

/// Settings of a fine-tuning stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FinetuneSpec {
    /// `full` trains every weight not frozen; `lora` freezes the base and trains low-rank adapters
    /// on `target_modules` (plus `modules_to_save` in full), then merges them into the base.
    #[serde(default)]
    pub method: FinetuneMethod,
    /// LoRA: the adapters' rank (at most the smaller side of every target matrix).
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = MAX_LORA_RANK))]
    pub rank: u32,
    /// LoRA: the numerator of the update's scale `alpha / rank` (PEFT's `lora_alpha`).
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 1, max = MAX_LORA_ALPHA))]
    pub alpha: u32,
    /// LoRA: the probability of dropping an element of an adapter's input in training (PEFT's
    /// `lora_dropout`); the base and evaluation see the whole input.
    #[serde(default)]
    #[schemars(extend("minimum" = 0, "exclusiveMaximum" = 1))]
    pub dropout: f64,
    /// LoRA: globs over module paths (`encoder.layer.*.attention.self.query`) that get adapters;
    /// `null` means the family's attention (query, key, value, output) and FFN projections.
    #[serde(default)]
    pub target_modules: Option<Vec<String>>,
    /// LoRA: globs over module paths trained in full beside the adapters and saved with them;
    /// `null` means the task head (the classifier; nothing for a language model, whose `lm_head`
    /// stays frozen).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// QLoRA: the frozen base of the adapted modules quantized with this scheme and held only
    /// quantized while the adapters train, its matmuls on the quantized kernels (`nf4`, QLoRA's
    /// 4-bit NormalFloat in blocks of 64; `int4` in groups of 32; `int8`; or a GGUF type). The update is merged into the
    /// dequantized base (f32: the merged model computes what was trained); the report gives how far
    /// requantizing the merged weights with the same scheme would move the layers' outputs, and
    /// `requantize_merged` does it. `null` keeps the base in f32.
    #[serde(default)]
    pub base_quantization: Option<crate::spec::QuantScheme>,
    /// QLoRA only: requantize the merged weights with `base_quantization` (dequantize → merge →
    /// requantize), so the model leaves the stage quantized like its base and stages that need
    /// full precision cannot follow. Off by default: an update smaller than the scheme's step is
    /// largely rounded away (SmolLM2, int4: held-out perplexity 31 merged in f32, 73 requantized).
    #[serde(default)]
    pub requantize_merged: bool,
    /// Passes over the training split.
    #[serde(default = "default_finetune_epochs")]
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub epochs: u32,
    /// Peak learning rate of the model body (AdamW).
    #[serde(default = "default_learning_rate")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub learning_rate: f64,
    /// Learning rate of the freshly initialised task head; `null` means the body's rate.
    #[serde(default)]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub head_learning_rate: Option<f64>,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
    /// AdamW decoupled weight decay (not applied to biases and norms).
    #[serde(default = "default_weight_decay")]
    #[schemars(range(min = 0, max = 1))]
    pub weight_decay: f64,
    /// Share of the steps spent warming the learning rate up linearly from zero.
    #[serde(default = "default_warmup_ratio")]
    #[schemars(extend("minimum" = 0, "exclusiveMaximum" = 1))]
    pub warmup_ratio: f64,
    /// Globs over parameter names (`embeddings.*`) that stay frozen.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Gradient clipping by global norm; `null` disables it. Absent, it is `max_norm` 1.0 for
    /// `full` and 0.5 for `lora` (filled in when the job is stored).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    #[schemars(with = "Option<GradClip>")]
    pub grad_clip: Option<Option<GradClip>>,
    /// Stop when the validation metric has not improved for `patience` evaluations; `null` disables it.
    #[serde(default)]
    pub early_stopping: Option<EarlyStopping>,
    /// Activation recomputation: keep only each transformer block's input during the forward
    /// pass and run the block again in backward. A step's activation memory then grows with the
    /// number of layers times one hidden state instead of every block's intermediates (attention
    /// scores grow with the square of the sequence), for about a third more step time. Same
    /// gradients, same dropout masks. The dry-run estimate prices the time, not the memory saved.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Mixed-precision training: `bf16` or `f16` computes the dense linear layers' products in
    /// that type from the f32 weights, which stay the master copy the optimizer updates (as
    /// PyTorch's autocast does for linear layers; attention's matmuls stay f32 here); norms,
    /// softmax and the loss stay f32. `f16` adds dynamic loss scaling: the loss is multiplied by
    /// a scale (65536 at first) so small gradients do not vanish in f16, a step whose gradients
    /// overflow is skipped and the scale halved, and the scale doubles after 2000 steps without
    /// overflow; the report counts the skipped steps. Prefer `bf16` where the GPU has it (Ampere
    /// and later): same speed, no scaling. On a CPU worker, `bf16` runs where the CPU has
    /// AVX-512 BF16 (the products' operands rounded to bf16 as they are packed, activations and
    /// gradients kept f32) and `f16` never: a CPU worker without the instructions fails the job
    /// at its start. With LoRA the frozen base's product runs in the low precision and the
    /// adapters in f32; a QLoRA base runs on its quantized kernels as without it. `null` (the
    /// default) trains in f32.
    #[serde(default)]
    pub mixed_precision: Option<MixedPrecision>,
}

/// A mixed-precision training mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MixedPrecision {
    /// bfloat16: f32's exponent range, so no loss scaling is needed.
    Bf16,
    /// IEEE half precision: 3 more bits of mantissa than bf16 but a range of 6e-8 to 65504, so
    /// the loss is scaled dynamically.
    F16,
}

impl MixedPrecision {
    /// The dtype the products are computed in.
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Self::Bf16 => candle_core::DType::BF16,
            Self::F16 => candle_core::DType::F16,
        }
    }

    /// The loss scaling this mode trains with.
    pub fn loss_scaling(self) -> Option<crate::train::LossScaling> {
        match self {
            Self::Bf16 => None,
            Self::F16 => Some(crate::train::LossScaling::default()),
        }
    }

    /// The name a spec uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Refuses mixed precision on a device that would run it slower than f32: on the CPU, f16
    /// always and bf16 without AVX-512 BF16 (the engine's bf16 kernel, `ops::bf16_gemm`).
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] at `mixed_precision` for those.
    pub fn check_device(mode: Option<Self>, device: &candle_core::Device) -> Result<()> {
        match mode {
            Some(Self::Bf16) if !device.is_cuda() && !crate::ops::bf16_gemm::available() => {
                Err(EngineError::InvalidSetting(
                    "mixed_precision: bf16 training on the CPU needs AVX-512 BF16 (Zen 4, Sapphire \
                     Rapids and later), which this worker's CPU lacks; without it bf16 would be \
                     slower than f32 (set mixed_precision to null, or run the job on a GPU worker \
                     or a CPU that has it)"
                        .into(),
                ))
            }
            Some(Self::F16) if !device.is_cuda() => Err(EngineError::InvalidSetting(
                "mixed_precision: f16 training is offered on CUDA devices only; this worker runs \
                 on the CPU, where the engine has no f16 kernels and f16 would be slower than f32 \
                 (set mixed_precision to null or bf16, or run the job on a GPU worker)"
                    .into(),
            )),
            _ => Ok(()),
        }
    }
}

/// How a `finetune` stage trains.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinetuneMethod {
    /// Every weight not frozen.
    #[default]
    Full,
    /// Low-rank adapters on a frozen base (Hu et al. 2021), merged into it at the end.
    Lora,
}

/// The largest LoRA rank accepted (adapters are low-rank; larger ones are full fine-tuning).
pub const MAX_LORA_RANK: u32 = 1024;
/// The largest LoRA alpha accepted.
pub const MAX_LORA_ALPHA: u32 = 65_536;

/// A field that is present: `null` becomes `Some(None)`, so an absent field (`None`, filled with
/// the method's default) differs from an explicit `null` (off).
pub(crate) fn present<'de, D, T>(
    deserializer: D,
) -> std::result::Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

/// Clip gradients so their global L2 norm is at most `max_norm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GradClip {
    /// The largest global gradient norm let through.
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub max_norm: f64,
}

/// Early stopping on the validation metric.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Evaluations without improvement tolerated before stopping.
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub patience: u32,
}

/// A short fine-tune inside another stage (after a pruning increment, or quantization-aware).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recover {
    /// Passes over the training split per recovery.
    #[serde(default = "default_recover_epochs")]
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub epochs: u32,
    /// Learning rate of the recovery fine-tune.
    #[serde(default = "default_learning_rate")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub learning_rate: f64,
    /// Examples per optimizer step of the recovery.
    // A large decoder's recovery on a CPU needs smaller steps than the default 16.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
}

impl Recover {
    /// Checks the recovery settings under `at`.
    pub fn check(&self, c: &mut Checker, at: &str) {
        c.range_u32(self.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
        c.learning_rate(self.learning_rate, &format!("{at}/learning_rate"));
        c.range_u32(
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
            &format!("{at}/batch_size"),
        );
    }
}

pub(crate) fn default_finetune_epochs() -> u32 {
    3
}
fn default_recover_epochs() -> u32 {
    1
}
pub(crate) fn default_learning_rate() -> f64 {
    5e-5
}
pub(crate) fn default_batch_size() -> u32 {
    16
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_warmup_ratio() -> f64 {
    0.1
}
fn default_lora_rank() -> u32 {
    8
}
fn default_lora_alpha() -> u32 {
    16
}

impl FinetuneSpec {
    /// The clipping the stage runs with: the spec's, else max_norm 1.0 for full fine-tuning and
    /// 0.5 for LoRA (the adapters' updates are small and spiky early on).
    pub fn effective_grad_clip(&self) -> Option<GradClip> {
        match &self.grad_clip {
            Some(clip) => clip.clone(),
            None => Some(GradClip {
                max_norm: match self.method {
                    FinetuneMethod::Full => 1.0,
                    FinetuneMethod::Lora => 0.5,
                },
            }),
        }
    }

    /// LoRA's fields: ranges, and module globs only where the method reads them.
    fn check_lora(&self, c: &mut Checker, at: &str) {
        c.range_u32(self.rank, 1, MAX_LORA_RANK, &format!("{at}/rank"));
        c.range_u32(self.alpha, 1, MAX_LORA_ALPHA, &format!("{at}/alpha"));
        c.unit_interval(self.dropout, &format!("{at}/dropout"), true);
        c.check(
            self.method == FinetuneMethod::Lora || self.dropout == 0.0,
            &format!("{at}/dropout"),
            || {
                "applies to `method: \"lora\"` only (the model's own dropout is in its config)"
                    .into()
            },
        );
        let fields = [
            ("target_modules", &self.target_modules),
            ("modules_to_save", &self.modules_to_save),
        ];
        for (field, globs) in fields {
            let Some(globs) = globs else { continue };
            let pointer = format!("{at}/{field}");
            c.check(self.method == FinetuneMethod::Lora, &pointer, || {
                format!(
                    "applies to `method: \"lora\"` only; remove it for {:?}",
                    self.method
                )
            });
            c.check(
                field != "target_modules" || !globs.is_empty(),
                &pointer,
                || "must name at least one module (or be null for the family's default)".into(),
            );
            c.globs(globs, &pointer);
            for (i, glob) in globs.iter().enumerate() {
                if let Err(e) = globset::Glob::new(glob) {
                    c.fail(format!("{pointer}/{i}"), format!("not a valid glob: {e}"));
                }
            }
        }
    }

    /// `base_quantization` belongs to LoRA, `requantize_merged` to a quantized base.
    fn check_base_quantization(&self, c: &mut Checker, at: &str) {
        c.check(
            !self.requantize_merged || self.base_quantization.is_some(),
            &format!("{at}/requantize_merged"),
            || "applies to a quantized base only (set `base_quantization`)".to_owned(),
        );
        if let Some(scheme) = self.base_quantization {
            c.check(
                self.method == FinetuneMethod::Lora,
                &format!("{at}/base_quantization"),
                || {
                    format!(
                        "{} applies to `method: \"lora\"` only (QLoRA)",
                        scheme.name()
                    )
                },
            );
        }
    }

    /// Writes the method's defaults into fields left out, so a stored spec shows what runs.
    pub fn fill_defaults(&mut self) {
        if self.grad_clip.is_none() {
            self.grad_clip = Some(self.effective_grad_clip());
        }
    }
}

impl StageKind for FinetuneSpec {
    const TYPE: &'static str = "finetune";

    fn check_device(&self, device: &candle_core::Device) -> Result<()> {
        MixedPrecision::check_device(self.mixed_precision, device)
    }

    fn check(&self, c: &mut Checker, at: &str) {
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
        self.check_lora(c, at);
        self.check_base_quantization(c, at);
        if let Some(clip) = &self.effective_grad_clip() {
            c.check(
                clip.max_norm > 0.0,
                &format!("{at}/grad_clip/max_norm"),
                || format!("must be positive, got {}", clip.max_norm),
            );
        }
        if let Some(stop) = &self.early_stopping {
            let pointer = format!("{at}/early_stopping/patience");
            c.range_u32(stop.patience, 1, MAX_EPOCHS, &pointer);
        }
    }

    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        if let (Some(at), Some(scheme)) = (model.quantized_at, self.base_quantization) {
            return Err(Precondition {
                name: "full-precision base",
                field: Some("base_quantization"),
                message: format!(
                    "the model is already quantized by the `quantize` at /pipeline/{at}; QLoRA \
                     quantizes the full-precision base with {} itself: remove that stage or move \
                     it after this one",
                    scheme.name()
                ),
            });
        }
        model.require_full_precision(Self::TYPE)?;
        match (&model.linear_modules, self.method) {
            (Some(modules), FinetuneMethod::Lora) => super::lora::check_fit(self, modules),
            _ => Ok(()),
        }
    }

    fn fits_task(&self) -> bool {
        true
    }

    /// A QLoRA merge that requantizes leaves the model quantized.
    fn transform(&self, model: &mut ModelState, index: usize) {
        if self.base_quantization.is_some() && self.requantize_merged {
            model.quantized_at.get_or_insert(index);
        }
    }

    fn estimate(&self, work: &Workload) -> Estimate {
        let epochs = f64::from(self.epochs);
        Estimate {
            seconds: if self.gradient_checkpointing {
                work.recomputed_training_seconds(epochs)
            } else {
                work.training_seconds(epochs)
            },
            ..work.training(epochs)
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(FinetuneStage::from_spec(self)))
    }
}

/// How often a training run reports its loss's parts unless its stage says otherwise.
pub const DEFAULT_LOG_EVERY_STEPS: u64 = 10;

/// How to train: the settings of a `finetune` stage, or of a `recover` fine-tune with defaults.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainSettings {
    /// Passes over the training split.
    pub epochs: u32,
    /// Peak learning rate of the body.
    pub learning_rate: f64,
    /// Peak learning rate of the task head (`None`: the body's).
    pub head_learning_rate: Option<f64>,
    /// Examples per optimizer step.
    pub batch_size: u32,
    /// AdamW decoupled weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// Share of steps warming the learning rate up.
    pub warmup_ratio: f64,
    /// Parameter globs kept frozen.
    pub freeze: Vec<String>,
    /// Global gradient-norm clip.
    pub grad_clip_norm: Option<f64>,
    /// Early-stopping patience in evaluations (`None`: off).
    pub early_stopping_patience: Option<u32>,
    /// Report the loss's parts (of a multi-part objective) every this many optimizer steps.
    pub log_every_steps: u64,
    /// Keep the frozen models' (teachers') outputs per example up to this many bytes, so later
    /// epochs do not run them again (`None`: run them on every batch).
    pub teacher_cache_bytes: Option<usize>,
    /// Recompute each block's activations in backward instead of keeping them
    /// ([`crate::train::recompute`]).
    pub gradient_checkpointing: bool,
    /// Compute the dense layers' products in this mode's dtype from f32 master weights.
    pub mixed_precision: Option<MixedPrecision>,
}

impl TrainSettings {
    /// The settings a `finetune` spec asks for.
    pub fn from_finetune(spec: &FinetuneSpec) -> Self {
        Self {
            epochs: spec.epochs,
            learning_rate: spec.learning_rate,
            head_learning_rate: spec.head_learning_rate,
            batch_size: spec.batch_size,
            weight_decay: spec.weight_decay,
            warmup_ratio: spec.warmup_ratio,
            freeze: spec.freeze.clone(),
            grad_clip_norm: spec.effective_grad_clip().map(|c| c.max_norm),
            early_stopping_patience: spec.early_stopping.as_ref().map(|e| e.patience),
            log_every_steps: DEFAULT_LOG_EVERY_STEPS,
            teacher_cache_bytes: None,
            gradient_checkpointing: spec.gradient_checkpointing,
            mixed_precision: spec.mixed_precision,
        }
    }

    /// A recovery fine-tune: the recover spec's epochs, rate and batch size, a `finetune` stage's
    /// defaults for the rest (decay 0.01, 10% warmup, clip at norm 1, no early stopping).
    pub fn from_recover(spec: &Recover) -> Self {
        Self {
            epochs: spec.epochs,
            learning_rate: spec.learning_rate,
            head_learning_rate: None,
            batch_size: spec.batch_size,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            freeze: Vec::new(),
            grad_clip_norm: Some(1.0),
            early_stopping_patience: None,
            log_every_steps: DEFAULT_LOG_EVERY_STEPS,
            teacher_cache_bytes: None,
            gradient_checkpointing: false,
            mixed_precision: None,
        }
    }

    /// The settings a `distill` stage trains its student with: the finetune defaults for what
    /// its spec does not set.
    pub fn for_distillation(spec: &super::distill::DistillSpec) -> Self {
        Self {
            epochs: spec.epochs,
            learning_rate: spec.learning_rate,
            batch_size: spec.batch_size,
            log_every_steps: u64::from(spec.log_every_steps),
            teacher_cache_bytes: spec
                .cache_teacher
                .then(|| spec.cache_teacher_max_mib as usize * 1024 * 1024),
            gradient_checkpointing: spec.gradient_checkpointing,
            mixed_precision: spec.mixed_precision,
            ..Self::from_recover(&Recover {
                epochs: spec.epochs,
                learning_rate: spec.learning_rate,
                batch_size: spec.batch_size,
            })
        }
    }
}

/// The stage.
#[derive(Clone, Debug)]
pub struct FinetuneStage {
    settings: TrainSettings,
    /// The adapters to train, for `method: "lora"`.
    lora: Option<LoraSettings>,
}

impl FinetuneStage {
    /// Builds the stage from its spec.
    pub fn from_spec(spec: &FinetuneSpec) -> Self {
        let lora = (spec.method == FinetuneMethod::Lora).then(|| LoraSettings {
            rank: spec.rank,
            alpha: spec.alpha,
            dropout: spec.dropout,
            target_modules: spec.target_modules.clone(),
            modules_to_save: spec.modules_to_save.clone(),
            base_quantization: spec.base_quantization.map(|s| s.name()),
            requantize_merged: spec.requantize_merged,
        });
        Self {
            settings: TrainSettings::from_finetune(spec),
            lora,
        }
    }
}

impl Stage for FinetuneStage {
    fn name(&self) -> &'static str {
        "finetune"
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting(
                "finetune: the model's weights are quantized (post-training); fine-tune before quantizing".into(),
            ));
        }
        if let Some(lora) = &self.lora {
            lora.resolve(model)?;
        }
        Ok(())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        if let Some(lora) = &self.lora {
            return super::lora::run(lora, &self.settings, model, trainer, ctx);
        }
        let summary = trainer.train(model, &self.settings, ctx)?;
        for glob in &summary.unmatched_freeze_globs {
            ctx.warn(format!(
                "finetune: freeze glob {glob:?} matches no parameter"
            ));
        }
        // The same footprint fields a LoRA fine-tune reports, so the two compare side by side.
        let total_parameters = model.store.parameter_count();
        let report = serde_json::json!({
            "method": "full",
            "trainable_parameters": summary.trainable_parameters,
            "total_parameters": total_parameters,
            "trainable_share":
                summary.trainable_parameters as f64 / total_parameters.max(1) as f64,
            "settings": self.settings,
            "training": summary,
        });
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_trains_in_batches_of_16_unless_it_says_otherwise() {
        let plain: Recover = serde_json::from_value(serde_json::json!({"epochs": 1})).unwrap();
        assert_eq!(TrainSettings::from_recover(&plain).batch_size, 16);
        let small: Recover =
            serde_json::from_value(serde_json::json!({"epochs": 2, "batch_size": 4})).unwrap();
        let settings = TrainSettings::from_recover(&small);
        assert_eq!((settings.epochs, settings.batch_size), (2, 4));
    }

    #[test]
    fn recomputation_prices_a_third_more_training_and_the_same_memory() {
        let work = Workload {
            parameters: 1e7,
            train_tokens: 1e6,
            eval_tokens: 0.0,
        };
        let spec = |checkpointing: bool| -> FinetuneSpec {
            serde_json::from_value(serde_json::json!({"gradient_checkpointing": checkpointing}))
                .unwrap()
        };
        let (plain, recomputing) = (spec(false).estimate(&work), spec(true).estimate(&work));
        assert!((recomputing.seconds / plain.seconds - 8.0 / 6.0).abs() < 1e-9);
        assert_eq!(recomputing.peak_bytes, plain.peak_bytes);
    }
}
