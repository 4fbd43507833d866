//! The job spec (version 1): what a user asks compressd to do, as pure serde types.
//!
//! The same types serve the HTTP API (where `model` and `task.dataset` are registered ids) and
//! `compressd run` (where they are local paths). Parsing fills every default, so a stored spec
//! shows the settings the job really runs with; [`JobSpec::validate`] then checks ranges and
//! cross-field rules and returns every problem with the JSON pointer of the offending field.
//!
//! The stages themselves live one per file under [`crate::stages`]; [`crate::stages::STAGES`]
//! registers them, and everything here that lists stages derives from it.

mod check;
mod estimate;
mod model_state;
mod registry;
mod stage;
mod validate;
mod webhook;

pub use check::{Checker, MAX_BATCH_SIZE, MAX_EPOCHS};
pub use estimate::{Estimate, Workload};
pub use model_state::{LinearModule, ModelState, Precondition};
pub use registry::{Registry, StageDescriptor};
pub use stage::{StageKind, StageSpec};
pub use webhook::{WebhookEvent, WebhookSpec, MAX_WEBHOOKS};

pub use crate::stages::distill::DistillSpec;
pub use crate::stages::finetune::{EarlyStopping, FinetuneMethod, FinetuneSpec, GradClip, Recover};
pub use crate::stages::prune::{PruneLora, PruneMethod, PrunePattern, PruneScope, PruneSpec};
pub use crate::stages::quantize::spec::{QatActivations, QatSettings, QuantScheme, QuantizeSpec};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::stages::STAGES;

/// The `type` names of every registered stage, in pipeline order of usual use.
pub const STAGE_TYPES: &[&str] =
    &registry::type_names::<{ registry::count(STAGES, false) }>(STAGES, false);

/// The stage types whose engine exists. Others parse (the schema knows them) but are rejected by
/// [`JobSpec::validate`], so a job is refused up front rather than accepted and failed later.
pub const IMPLEMENTED_STAGES: &[&str] =
    &registry::type_names::<{ registry::count(STAGES, true) }>(STAGES, true);

/// The most stages one pipeline may have.
pub const MAX_STAGES: usize = 16;

/// A complete job description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A human label for the job (1 to 128 characters).
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// The input model: a registered model id (API) or a local folder or file (`compressd run`).
    pub model: String,
    /// What the model is trained and evaluated on.
    pub task: TaskSpec,
    /// The stages, run in order (1 to 16).
    #[schemars(length(min = 1, max = MAX_STAGES))]
    pub pipeline: Vec<StageSpec>,
    /// The quality bar the compressed model must keep; `null` means no bar.
    #[serde(default)]
    pub acceptance: Option<Acceptance>,
    /// Export formats of the final model.
    #[serde(default = "default_outputs")]
    pub outputs: Vec<OutputFormat>,
    /// Seed of every random choice (shuffling, dropout, initialisation), for reproducible runs.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Plan and check inputs without training or writing a model.
    #[serde(default)]
    pub dry_run: bool,
    /// Scheduling priority, higher first, in `-100..=100`.
    #[serde(default)]
    #[schemars(range(min = -100, max = 100))]
    pub priority: i32,
    /// Where to post signed notices of this job's events (Standard Webhooks), at most 8; the
    /// service answers the signing secret once, in the create response.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_WEBHOOKS))]
    pub webhooks: Vec<WebhookSpec>,
    /// Track the job as an MLflow run; `null` uses the server's `mlflow_tracking_uri` setting
    /// (no tracking when that is unset too).
    #[serde(default)]
    pub mlflow: Option<MlflowSpec>,
}

/// Where a job is tracked in MLflow. The engine only carries it: the service's worker logs the run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MlflowSpec {
    /// The MLflow tracking server (`http(s)://host[:port][/prefix]`); `null` means the server's
    /// `mlflow_tracking_uri` setting. The service refuses one that reaches a private address.
    #[serde(default)]
    pub tracking_uri: Option<String>,
    /// The experiment the run goes into, made when missing; `null` means the server's
    /// `mlflow_experiment` setting (default `compressd`).
    #[serde(default)]
    #[schemars(length(min = 1, max = 256))]
    pub experiment: Option<String>,
    /// Register the job's final model as a new version of this MLflow registered model (made
    /// when missing) when the job succeeds and its accuracy contract held (or it has none);
    /// `null` registers nothing. Needs a tracking server whose artifacts go through its proxy.
    #[serde(default)]
    #[schemars(length(min = 1, max = 256))]
    pub registered_model: Option<String>,
}

/// The task the model is trained and measured on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The kind of task.
    #[serde(rename = "type")]
    pub task_type: TaskType,
    /// The dataset: a registered dataset id (API) or a local file (`compressd run`).
    pub dataset: String,
    /// Field holding the text of a row.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// Field holding the label of a row; filled with `label` for classification, absent otherwise.
    #[serde(default)]
    pub label_field: Option<String>,
    /// Tokens per example; `null` means the model's limit.
    #[serde(default)]
    #[schemars(range(min = 1, max = 131_072))]
    pub max_length: Option<u32>,
    /// Cap on training examples (the first ones after the seeded shuffle); `null` means all.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_train_samples: Option<u64>,
    /// Cap on evaluation examples; `null` means all.
    #[serde(default)]
    #[schemars(range(min = 1))]
    pub max_eval_samples: Option<u64>,
}

/// Task kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskType {
    /// Labelled rows of text; the model gets a classification head.
    TextClassification,
    /// Plain text; the model predicts the next token.
    LanguageModeling,
}

/// How much quality the compressed model may lose against the input model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Acceptance {
    /// The metric compared before and after.
    pub metric: Metric,
    /// Largest absolute loss allowed (accuracy 0.90 → 0.89 is a drop of 0.01).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_drop: Option<f64>,
    /// Largest loss allowed relative to the baseline (0.02 = 2 %).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub max_relative_drop: Option<f64>,
}

/// Quality metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Share of correctly classified examples (classification).
    Accuracy,
    /// Unweighted mean of per-class F1 (classification).
    MacroF1,
    /// exp(mean next-token negative log-likelihood), lower is better (language modeling).
    Perplexity,
}

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// A Hugging Face style folder with `model.safetensors` and `config.json`.
    Safetensors,
    /// A llama.cpp GGUF file (decoder models).
    Gguf,
    /// The LoRA adapter of a pipeline that ends in `finetune` with `method: "lora"`, in PEFT's
    /// layout (`adapter/adapter_config.json`, `adapter/adapter_model.safetensors`) beside the
    /// merged model; it applies to the job's input model.
    Adapter,
    /// The quantized model also in the compressed-tensors layout (`compressed-tensors/`: config
    /// with `quantization_config`, `model.safetensors`, tokenizer), which Hugging Face transformers
    /// (with the `compressed-tensors` package) and vLLM load: int8 per channel (with int8 inputs
    /// per token when dynamic) and int4 per group. Needs a `quantize` stage with `int8` or `int4`.
    CompressedTensors,
}

/// One problem found in a spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// RFC 6901 JSON pointer of the offending field, e.g. `/pipeline/1/sparsity`.
    pub pointer: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl JobSpec {
    /// Fills the defaults that depend on other fields (the label field of a classification task).
    /// Call it after parsing and before storing or validating.
    pub fn fill_defaults(&mut self) {
        if self.task.task_type == TaskType::TextClassification && self.task.label_field.is_none() {
            self.task.label_field = Some(default_label_field());
        }
        for stage in &mut self.pipeline {
            if let Some(finetune) = stage.get_mut::<FinetuneSpec>() {
                finetune.fill_defaults();
            }
        }
    }

    /// Checks that every stage can run on `device` (settings some devices do not offer, such as
    /// bf16 mixed precision on a CPU): what a worker checks before the first stage, and before a
    /// dry run, since only the worker knows its device.
    ///
    /// # Errors
    /// [`crate::EngineError::InvalidSetting`] naming the first such setting by its JSON pointer.
    pub fn check_device(&self, device: &candle_core::Device) -> crate::Result<()> {
        for (index, stage) in self.pipeline.iter().enumerate() {
            stage.check_device(device).map_err(|e| match e {
                crate::EngineError::InvalidSetting(why) => {
                    crate::EngineError::InvalidSetting(format!("/pipeline/{index}/{why}"))
                }
                other => other,
            })?;
        }
        Ok(())
    }

    /// Checks ranges and cross-field rules, that every stage is implemented, and each stage's
    /// preconditions on the model it receives, starting from the input model of the task.
    ///
    /// Returns every problem found, in document order; an empty list means the spec is valid.
    pub fn validate(&self) -> Vec<Violation> {
        self.validate_from(&ModelState::input(self.task.task_type))
    }

    /// The models the stages name besides the input (a `distill` stage's `teacher` and
    /// `student`): `(JSON pointer, reference)` in pipeline order.
    pub fn named_models(&self) -> Vec<(String, String)> {
        let mut named = Vec::new();
        for (index, stage) in self.pipeline.iter().enumerate() {
            let Some(distill) = stage.get::<DistillSpec>() else {
                continue;
            };
            for (field, reference) in [("teacher", &distill.teacher), ("student", &distill.student)]
            {
                if let Some(reference) = reference {
                    named.push((format!("/pipeline/{index}/{field}"), reference.clone()));
                }
            }
        }
        named
    }

    /// As [`JobSpec::validate`], with what is known of the input model (its family, say).
    pub fn validate_from(&self, input: &ModelState) -> Vec<Violation> {
        validate::validate(self, input)
    }
}

fn default_outputs() -> Vec<OutputFormat> {
    vec![OutputFormat::Safetensors]
}
fn default_seed() -> u64 {
    42
}
fn default_text_field() -> String {
    "text".to_owned()
}
fn default_label_field() -> String {
    "label".to_owned()
}

#[cfg(test)]
mod tests;
