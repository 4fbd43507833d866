//! The `finetune` stage: full fine-tuning on the job's task through the shared [`Trainer`].

use serde::Serialize;

use super::{Stage, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::pipeline::StageContext;
use crate::spec::{FinetuneSpec, Recover};

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
            grad_clip_norm: spec.grad_clip.as_ref().map(|c| c.max_norm),
            early_stopping_patience: spec.early_stopping.as_ref().map(|e| e.patience),
        }
    }

    /// A recovery fine-tune: the recover spec's epochs and rate, a `finetune` stage's defaults for
    /// the rest (batch 16, decay 0.01, 10% warmup, clip at norm 1, no early stopping).
    pub fn from_recover(spec: &Recover) -> Self {
        Self {
            epochs: spec.epochs,
            learning_rate: spec.learning_rate,
            head_learning_rate: None,
            batch_size: 16,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            freeze: Vec::new(),
            grad_clip_norm: Some(1.0),
            early_stopping_patience: None,
        }
    }
}

/// The stage.
#[derive(Clone, Debug)]
pub struct FinetuneStage {
    settings: TrainSettings,
}

impl FinetuneStage {
    /// Builds the stage from its spec.
    pub fn from_spec(spec: &FinetuneSpec) -> Self {
        Self {
            settings: TrainSettings::from_finetune(spec),
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
        Ok(())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        let summary = trainer.train(model, &self.settings, ctx)?;
        for glob in &summary.unmatched_freeze_globs {
            ctx.warn(format!(
                "finetune: freeze glob {glob:?} matches no parameter"
            ));
        }
        let report = serde_json::json!({ "settings": self.settings, "training": summary });
        Ok(report)
    }
}
