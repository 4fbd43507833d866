//! What a stage may assume about the model it receives: a small summary checked and transformed
//! stage by stage at submission time, so a pipeline whose order cannot work is refused before any
//! training (replacing global ordering rules such as "nothing after quantize").

use serde::{Deserialize, Serialize};

use super::TaskType;

/// A linear module of the registered model, as the service records it when the model is uploaded
/// (model metadata `linear_modules`), so LoRA settings that cannot fit are refused at submission.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearModule {
    /// The module path (`encoder.layer.0.attention.self.query`), as stages name it.
    pub path: String,
    /// Rows of its weight.
    pub out_features: usize,
    /// Columns of its weight.
    pub in_features: usize,
    /// Whether LoRA adapts it when `target_modules` is left out (attention and FFN projections).
    pub default_lora_target: bool,
}

/// The model as it enters a stage, as far as the spec (and, at submission, the registered model)
/// tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelState {
    /// The task the model is trained and measured on.
    pub task: TaskType,
    /// The model's `model_type` (`bert`, `llama`), when known; `None` when only the spec is checked.
    pub family: Option<String>,
    /// The pipeline index of the stage that quantized the weights (post-training); `None` while
    /// they are in full precision.
    pub quantized_at: Option<usize>,
    /// Whether a stage has pruned weights (masks stay applied from then on).
    pub pruned: bool,
    /// The number of transformer layers, when known (from the registered model's config at
    /// submission; stages that change it, such as `distill`, update it).
    pub layers: Option<usize>,
    /// The linear modules and their shapes, when known (the registered model's, at submission);
    /// dropped after the first stage that is not a `finetune`, since it may change them.
    pub linear_modules: Option<Vec<LinearModule>>,
    /// Rows in the dataset's train split, when known (from the registered dataset at submission):
    /// stages that score or train on it refuse `Some(0)`.
    pub train_rows: Option<u64>,
}

/// A precondition the incoming model fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Precondition {
    /// The precondition's short name, e.g. `full-precision weights`.
    pub name: &'static str,
    /// The stage's field the failure is about (`student_layers`), reported at its JSON pointer;
    /// `None` reports it at the stage's `type`.
    pub field: Option<&'static str>,
    /// What is wrong and how to fix it, for a person.
    pub message: String,
}

impl ModelState {
    /// The input model of a job for `task`: full precision, not pruned, family unknown.
    pub fn input(task: TaskType) -> Self {
        Self {
            task,
            family: None,
            quantized_at: None,
            pruned: false,
            layers: None,
            linear_modules: None,
            train_rows: None,
        }
    }

    /// The precondition of every stage that trains, prunes or quantizes: weights in full precision.
    ///
    /// # Errors
    /// The failed precondition, naming the `quantize` stage that must move after `stage_type`.
    pub fn require_full_precision(&self, stage_type: &str) -> Result<(), Precondition> {
        match self.quantized_at {
            None => Ok(()),
            Some(q) => Err(Precondition {
                name: "full-precision weights",
                field: None,
                message: format!(
                    "`{stage_type}` cannot follow /pipeline/{q}, which leaves the weights quantized \
                     (a `quantize`, or a QLoRA `finetune` merged into its quantized base): quantized \
                     weights cannot be trained, pruned or re-quantized; move it before"
                ),
            }),
        }
    }
}
