//! The compression stages: one file per stage, one trait for all (STYLE.md rule 12).
//!
//! A stage transforms a [`WorkingModel`] in place and returns its own report as JSON; the pipeline
//! ([`crate::pipeline`]) saves, measures and judges the result. Fine-tuning and pruning recovery
//! share the trainer through [`Trainer`], so the stages themselves hold no training loop.
//!
//! Each stage file also holds its spec type, checks, preconditions and dry-run estimate
//! ([`crate::spec::StageKind`]); [`STAGES`] registers them, one line per stage.

pub mod distill;
pub mod finetune;
mod measure;
mod model;
pub mod prune;
pub mod quantize;
mod saving;
mod session;
mod training;

pub use finetune::{FinetuneStage, TrainSettings};
pub use model::WorkingModel;
pub use prune::PruneStage;
pub use quantize::QuantizeStage;
pub use session::{run_job, Session};

use serde::Serialize;

use crate::error::Result;
use crate::pipeline::StageContext;
use crate::spec::{StageDescriptor, StageSpec};

/// Every stage the job spec knows, in pipeline order of usual use. One line adds a stage: its
/// parsing, checks, preconditions, dry-run estimate, JSON Schema and run all come from its file.
pub const STAGES: &[StageDescriptor] = &[
    StageDescriptor::of::<finetune::FinetuneSpec>(),
    StageDescriptor::of::<prune::PruneSpec>(),
    StageDescriptor::of::<quantize::QuantizeSpec>(),
    StageDescriptor::of::<distill::DistillSpec>(),
];

/// Training on the job's task, shared by fine-tuning and pruning recovery (and later QAT and
/// distillation). The implementation owns the data and the task; stages only say how to train.
pub trait Trainer {
    /// Trains `model` in place. Masks recorded in the model are re-applied after every optimizer
    /// step, so pruned weights stay zero. Progress goes to `ctx.progress`; `ctx.cancel` is polled
    /// between steps.
    ///
    /// # Errors
    /// Whatever training fails with, [`crate::EngineError::Cancelled`] included.
    fn train(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        ctx: &StageContext,
    ) -> Result<TrainSummary>;
}

/// What a training run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Training loss of the last logged step.
    pub final_loss: Option<f64>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Parameter globs (`freeze`) that matched nothing.
    pub unmatched_freeze_globs: Vec<String>,
}

/// One compression stage.
pub trait Stage {
    /// The stage's `type` name.
    fn name(&self) -> &'static str;

    /// Checks that the stage can run on this model (before any work is done).
    ///
    /// # Errors
    /// [`crate::EngineError::InvalidSetting`] naming what does not fit (a layer, a glob, a state).
    fn validate(&self, model: &WorkingModel) -> Result<()>;

    /// Runs the stage on `model`, returning the stage's report.
    ///
    /// # Errors
    /// Whatever the stage fails with, [`crate::EngineError::Cancelled`] included.
    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value>;
}

/// Builds the stage a spec describes.
///
/// # Errors
/// [`crate::EngineError::Unsupported`] for a stage or option the engine does not implement.
pub fn build(spec: &StageSpec) -> Result<Box<dyn Stage>> {
    spec.build()
}
