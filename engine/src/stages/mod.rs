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
pub mod lora;
mod measure;
mod model;
pub mod prune;
mod prune_structured;
pub mod quantize;
mod saving;
mod session;
mod training;
mod vocabulary;

pub use finetune::{FinetuneStage, MixedPrecision, TrainSettings};
pub use model::WorkingModel;
pub use prune::PruneStage;
pub use quantize::QuantizeStage;
pub use saving::{DYNAMIC_METADATA_KEY, DYNAMIC_METADATA_VALUE};
pub use session::{run_job, Session};
pub use vocabulary::{TrimmedVocabulary, VocabularyReport};

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::objective::Objective;
use crate::pipeline::StageContext;
use crate::spec::{StageDescriptor, StageSpec};
use crate::train::GradientObserver;

/// Every stage the job spec knows, in pipeline order of usual use. One line adds a stage: its
/// parsing, checks, preconditions, dry-run estimate, JSON Schema and run all come from its file.
pub const STAGES: &[StageDescriptor] = &[
    StageDescriptor::of::<finetune::FinetuneSpec>(),
    StageDescriptor::of::<prune::PruneSpec>(),
    StageDescriptor::of::<quantize::QuantizeSpec>(),
    StageDescriptor::of::<distill::DistillSpec>(),
];

/// Training on the job's task, shared by fine-tuning and pruning recovery (and later QAT and
/// distillation). The implementation owns the data and the task; stages only say how to train and,
/// through a [`TrainRequest`], on which objective, beside which frozen models.
pub trait Trainer {
    /// Trains `model` on the task loss; see [`Trainer::train_with`].
    ///
    /// # Errors
    /// As [`Trainer::train_with`].
    fn train(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        ctx: &StageContext,
    ) -> Result<TrainSummary> {
        self.train_with(model, settings, TrainRequest::default(), ctx)
    }

    /// Trains `model` in place on `request`'s objective. Masks recorded in the model are
    /// re-applied after every optimizer step, so pruned weights stay zero. Progress goes to
    /// `ctx.progress`; `ctx.cancel` is polled between steps.
    ///
    /// # Errors
    /// Whatever training fails with, [`crate::EngineError::Cancelled`] included; an objective that
    /// reads more frozen models than the request gives.
    fn train_with(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        request: TrainRequest<'_>,
        ctx: &StageContext,
    ) -> Result<TrainSummary>;

    /// Runs up to `batches` batches of `batch_size` training rows forward and backward through
    /// `model` on `objective` (the task loss when `None`) without updating anything, handing each
    /// batch's gradients to `observer`: calibration for gradient-based importance. Returns the
    /// number of batches run.
    ///
    /// # Errors
    /// A forward or backward failure, or the observer's error.
    fn observe_gradients(
        &self,
        model: &WorkingModel,
        batches: usize,
        batch_size: usize,
        objective: Option<&dyn Objective>,
        observer: &mut dyn GradientObserver,
    ) -> Result<usize>;

    /// Trims `model`'s vocabulary to the tokens the task's data uses (every split, as tokenized
    /// for the job) and the special tokens; later forward passes and the saved tokenizer follow.
    ///
    /// # Errors
    /// A trainer without the job's data, or as [`vocabulary::trim_model`].
    fn trim_vocabulary(&self, model: &mut WorkingModel) -> Result<VocabularyReport> {
        let _ = model;
        Err(crate::EngineError::Unsupported(
            "vocabulary trimming needs the job's data".into(),
        ))
    }

    /// Loads a model a stage names (a `distill` stage's `teacher` or `student`: a registered
    /// model's local path from the run's inputs, else a path) built for the job's task, after
    /// checking that it reads the job's tokenizer and, for `role` [`ModelRole::Teacher`] on a
    /// classification task, that its head predicts the task's labels in the data's order.
    ///
    /// # Errors
    /// A model that cannot be read, another tokenizer or label set
    /// ([`crate::EngineError::InvalidSetting`]), or a trainer without the job's data.
    fn load_named_model(&self, reference: &str, role: ModelRole) -> Result<WorkingModel> {
        let _ = (reference, role);
        Err(crate::EngineError::Unsupported(
            "loading a named model needs the job's inputs".into(),
        ))
    }
}

/// What a model loaded by [`Trainer::load_named_model`] is for: a teacher must already predict
/// the task's labels; a student's head may be made anew.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelRole {
    /// A frozen model whose outputs are learned from.
    Teacher,
    /// A model that is trained.
    Student,
}

impl ModelRole {
    /// The spec field naming a model of this role.
    pub fn field(self) -> &'static str {
        match self {
            Self::Teacher => "teacher",
            Self::Student => "student",
        }
    }
}

/// What a training run optimises beyond the task loss.
#[derive(Default)]
pub struct TrainRequest<'a> {
    /// The loss; `None` means the model's task loss.
    pub objective: Option<&'a dyn Objective>,
    /// Frozen models run beside the trained one on every batch (teachers), in the order the
    /// objective reads their outputs.
    pub frozen: Vec<&'a WorkingModel>,
    /// Sees every micro-batch's gradients.
    pub gradients: Option<&'a mut dyn GradientObserver>,
}

/// What a training run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Elements of the variables the optimizer trained (after `freeze`).
    pub trainable_parameters: usize,
    /// Bytes of the state training keeps per trainable element: AdamW's two moments and the
    /// gradient, in the trainable tensors' dtype (computed, not measured).
    pub optimizer_and_gradient_bytes: usize,
    /// Wall time of the training run over its optimizer steps (in-training evaluations included).
    pub mean_step_seconds: f64,
    /// The process's peak resident memory at the end of the run, since the stage began (bytes;
    /// 0 where the platform does not say).
    pub peak_rss_bytes: u64,
    /// Training loss of the last logged step.
    pub final_loss: Option<f64>,
    /// Whether early stopping ended the run.
    pub stopped_early: bool,
    /// Parameter globs (`freeze`) that matched nothing.
    pub unmatched_freeze_globs: Vec<String>,
    /// Each part of a stage objective's loss over the run (`task`, `response`…), unweighted;
    /// empty when the run trained on the task loss alone.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub loss_curves: BTreeMap<String, LossCurve>,
    /// What keeping the teachers' outputs per example did (`cache_teacher`), when it was on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_cache: Option<crate::objective::TeacherCacheReport>,
    /// With f16 mixed precision: the steps skipped because their gradients overflowed (no
    /// update was made; they count in `steps`), and the loss scale the run ended with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::train::LossScaleReport>,
}

/// One loss term's values over a training run, each the mean over the steps since the previous
/// point.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LossCurve {
    /// The optimizer step each value was logged at.
    pub steps: Vec<u64>,
    /// The term's mean unweighted value up to that step.
    pub values: Vec<f64>,
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
