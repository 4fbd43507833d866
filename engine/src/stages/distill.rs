//! The `distill` stage: knowledge distillation of the current model into a shallower student.
//!
//! The schema knows it and its spec is checked, so clients can write it today; the engine does not
//! run it yet, so a job with it is refused at submission ([`StageKind::IMPLEMENTED`]).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::finetune::{default_batch_size, default_finetune_epochs, default_learning_rate};
use super::Stage;
use crate::error::{EngineError, Result};
use crate::spec::{
    Checker, Estimate, ModelState, Precondition, StageKind, Workload, MAX_BATCH_SIZE, MAX_EPOCHS,
};

/// Settings of a distillation stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// Transformer layers of the student; `null` means half the teacher's, rounded up.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub student_layers: Option<u32>,
    /// Passes over the training split.
    #[serde(default = "default_finetune_epochs")]
    #[schemars(range(min = 1, max = MAX_EPOCHS))]
    pub epochs: u32,
    /// Peak learning rate of the student.
    #[serde(default = "default_learning_rate")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 1))]
    pub learning_rate: f64,
    /// Softmax temperature applied to teacher and student logits.
    #[serde(default = "default_temperature")]
    #[schemars(extend("exclusiveMinimum" = 0, "maximum" = 100))]
    pub temperature: f64,
    /// Weight of the distillation loss; the task loss gets `1 - alpha`.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0, max = 1))]
    pub alpha: f64,
    /// Examples per optimizer step.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = MAX_BATCH_SIZE))]
    pub batch_size: u32,
}

fn default_temperature() -> f64 {
    2.0
}
fn default_alpha() -> f64 {
    0.5
}

impl StageKind for DistillSpec {
    const TYPE: &'static str = "distill";
    const IMPLEMENTED: bool = false;

    fn check(&self, c: &mut Checker, at: &str) {
        if let Some(layers) = self.student_layers {
            c.range_u32(layers, 1, 1000, &format!("{at}/student_layers"));
        }
        c.range_u32(self.epochs, 1, MAX_EPOCHS, &format!("{at}/epochs"));
        c.learning_rate(self.learning_rate, &format!("{at}/learning_rate"));
        c.check(
            self.temperature > 0.0 && self.temperature <= 100.0,
            &format!("{at}/temperature"),
            || format!("must be in (0, 100], got {}", self.temperature),
        );
        c.unit_interval(self.alpha, &format!("{at}/alpha"), false);
        c.range_u32(
            self.batch_size,
            1,
            MAX_BATCH_SIZE,
            &format!("{at}/batch_size"),
        );
    }

    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        model.require_full_precision(Self::TYPE)
    }

    /// A distillation step runs the teacher forward too: about 8 flops per parameter per token
    /// instead of 6, and half as much memory again.
    fn estimate(&self, work: &Workload) -> Estimate {
        Estimate {
            seconds: work.training_seconds(f64::from(self.epochs)) * 8.0 / 6.0,
            peak_bytes: work.training_peak_bytes() * 1.5,
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Err(EngineError::Unsupported(
            "stage `distill` is not implemented".into(),
        ))
    }
}
