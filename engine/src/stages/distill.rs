//! The `distill` stage: knowledge distillation of the current model into a shallower student.
//!
//! The teacher is the model as it enters the stage (a deep copy, frozen); the student keeps
//! `student_layers` of its layers, chosen by `layer_init` ([`crate::family::drop_layers`]), and
//! trains on `alpha · response + (1 - alpha) · task`, the response term being the KL divergence
//! from the teacher's temperature-softened outputs ([`ResponseKd`]). The student replaces the model
//! for the rest of the pipeline. Feature and relation knowledge come with issue 12's next steps.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::finetune::{default_batch_size, default_finetune_epochs, default_learning_rate};
use super::{Stage, TrainRequest, TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::drop_layers;
use crate::objective::{Objective, ResponseKd, TaskLoss, WeightedSum};
use crate::params::ParamStore;
use crate::pipeline::StageContext;
use crate::spec::{
    Checker, Estimate, ModelState, Precondition, StageKind, TaskType, Workload, MAX_BATCH_SIZE,
    MAX_EPOCHS,
};

/// Settings of a distillation stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistillSpec {
    /// Transformer layers of the student; `null` means half the teacher's, rounded up.
    #[serde(default)]
    #[schemars(range(min = 1, max = 1000))]
    pub student_layers: Option<u32>,
    /// Which teacher layers initialise the student's: `every_other` (evenly spaced, ending with
    /// the last), `first`, `last`, or a list of layer indices (0-based, in order).
    #[serde(default)]
    pub layer_init: LayerInit,
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
    /// The student's vocabulary: `full` keeps the teacher's; `task` keeps only the tokens the
    /// task's data uses (every split, as tokenized for the job) plus the special tokens, cutting the
    /// embedding table and renumbering the tokenizer shipped with the model. For WordPiece and
    /// WordLevel tokenizers (BERT-style models); text outside the data's vocabulary then falls
    /// back to shorter pieces or `[UNK]`.
    #[serde(default)]
    pub vocabulary: VocabularyChoice,
}

/// Which tokens a student keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum VocabularyChoice {
    /// The teacher's whole vocabulary.
    #[default]
    Full,
    /// The tokens of the task's data and the special tokens.
    Task,
}

/// Which teacher layers a student starts from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum LayerInit {
    /// A rule over the teacher's layers.
    Rule(LayerRule),
    /// The teacher's layers to keep, in order.
    Layers(Vec<u32>),
}

/// The rules of [`LayerInit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayerRule {
    /// Evenly spaced, ending with the teacher's last layer (DistilBERT's choice).
    EveryOther,
    /// The teacher's first layers.
    First,
    /// The teacher's last layers.
    Last,
}

impl Default for LayerInit {
    fn default() -> Self {
        LayerInit::Rule(LayerRule::EveryOther)
    }
}

impl DistillSpec {
    /// The teacher layers the student keeps, for a teacher of `teacher_layers`.
    ///
    /// # Errors
    /// A student that is not smaller than the teacher, a list of the wrong length, or a layer the
    /// teacher does not have.
    pub fn student_layer_indices(&self, teacher_layers: usize) -> Result<Vec<usize>> {
        let wanted = match (&self.layer_init, self.student_layers) {
            (LayerInit::Layers(list), _) => list.len(),
            (_, Some(n)) => n as usize,
            (_, None) => teacher_layers.div_ceil(2),
        };
        if wanted == 0 || wanted >= teacher_layers {
            return Err(EngineError::InvalidSetting(format!(
                "distill: a student of {wanted} layers is not smaller than its {teacher_layers}-layer teacher"
            )));
        }
        let keep: Vec<usize> = match &self.layer_init {
            LayerInit::Layers(list) => {
                if self
                    .student_layers
                    .is_some_and(|n| n as usize != list.len())
                {
                    return Err(EngineError::InvalidSetting(format!(
                        "distill: layer_init lists {} layers but student_layers is {}",
                        list.len(),
                        self.student_layers.unwrap_or_default()
                    )));
                }
                list.iter().map(|&l| l as usize).collect()
            }
            LayerInit::Rule(LayerRule::First) => (0..wanted).collect(),
            LayerInit::Rule(LayerRule::Last) => (teacher_layers - wanted..teacher_layers).collect(),
            LayerInit::Rule(LayerRule::EveryOther) => (1..=wanted)
                .map(|i| i * teacher_layers / wanted - 1)
                .collect(),
        };
        if let Some(bad) = keep.iter().find(|&&l| l >= teacher_layers) {
            return Err(EngineError::InvalidSetting(format!(
                "distill: layer_init names layer {bad}; the teacher has layers 0 to {}",
                teacher_layers - 1
            )));
        }
        Ok(keep)
    }
}

fn default_temperature() -> f64 {
    2.0
}
fn default_alpha() -> f64 {
    0.5
}

impl StageKind for DistillSpec {
    const TYPE: &'static str = "distill";
    const IMPLEMENTED: bool = true;

    fn check(&self, c: &mut Checker, at: &str) {
        if let Some(layers) = self.student_layers {
            c.range_u32(layers, 1, 1000, &format!("{at}/student_layers"));
        }
        if let LayerInit::Layers(list) = &self.layer_init {
            c.check(!list.is_empty(), &format!("{at}/layer_init"), || {
                "must name at least one layer".to_owned()
            });
            let mut sorted = list.clone();
            sorted.sort_unstable();
            sorted.dedup();
            c.check(
                sorted.len() == list.len(),
                &format!("{at}/layer_init"),
                || "must not name a layer twice".to_owned(),
            );
            if let Some(n) = self.student_layers {
                c.check(
                    n as usize == list.len(),
                    &format!("{at}/layer_init"),
                    || format!("lists {} layers but student_layers is {n}", list.len()),
                );
            }
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

    /// A quantized or pruned teacher is fine: the student starts from its (dequantized) weights
    /// in full precision, and only the frozen teacher runs on the quantized kernels.
    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        let byte_level = model.task == TaskType::LanguageModeling
            || model.family.as_deref().is_some_and(|f| f != "bert");
        if self.vocabulary == VocabularyChoice::Task && byte_level {
            return Err(Precondition {
                name: "a WordPiece vocabulary",
                message: "vocabulary \"task\" trims WordPiece vocabularies (BERT-style \
                          classifiers); a language model's BPE merges need tokens its data may \
                          not use: leave vocabulary at \"full\""
                    .into(),
            });
        }
        Ok(())
    }

    /// The student is a new, dense model in full precision.
    fn transform(&self, model: &mut ModelState, _index: usize) {
        model.quantized_at = None;
        model.pruned = false;
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
        Ok(Box::new(DistillStage { spec: self.clone() }))
    }
}

/// The stage, built from its spec.
#[derive(Clone, Debug)]
pub struct DistillStage {
    spec: DistillSpec,
}

impl DistillStage {
    fn teacher_layers(model: &WorkingModel) -> Result<usize> {
        let field = model.family()?.layer_count_field();
        model
            .config
            .get(field)
            .and_then(serde_json::Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| EngineError::InvalidModel(format!("config.json has no {field}")))
    }
}

impl Stage for DistillStage {
    fn name(&self) -> &'static str {
        DistillSpec::TYPE
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        self.spec
            .student_layer_indices(Self::teacher_layers(model)?)
            .map(|_| ())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        let teacher_layers = Self::teacher_layers(model)?;
        let keep = self.spec.student_layer_indices(teacher_layers)?;
        let teacher = model.deep_clone()?;
        let tensors = model
            .store
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.detach()))
            .collect();
        let (config, tensors) = drop_layers(model.family()?, &model.config, tensors, &keep)?;
        // The student starts dense and in full precision: masks of a pruned teacher do not carry
        // over to new layers, and a quantized teacher's store holds its dequantized weights.
        *model = teacher.derived(ParamStore::from_tensors(tensors, |_| true)?, config);
        let alpha = self.spec.alpha;
        let objective = WeightedSum::new(vec![
            (1.0 - alpha, Box::new(TaskLoss) as Box<dyn Objective>),
            (
                alpha,
                Box::new(ResponseKd {
                    temperature: self.spec.temperature,
                }),
            ),
        ]);
        let settings = TrainSettings::for_distillation(&self.spec);
        let request = TrainRequest {
            objective: Some(&objective),
            frozen: vec![&teacher],
            gradients: None,
        };
        let summary = trainer.train_with(model, &settings, request, ctx)?;
        // After training: the teacher reads the job's ids, so the student keeps them until then.
        let vocabulary = match self.spec.vocabulary {
            VocabularyChoice::Task => Some(trainer.trim_vocabulary(model)?),
            VocabularyChoice::Full => None,
        };
        Ok(serde_json::json!({
            "teacher_layers": teacher_layers,
            "student_layers": keep.len(),
            "kept_teacher_layers": keep,
            "objective": objective.name(),
            "temperature": self.spec.temperature,
            "training": summary,
            "vocabulary": vocabulary,
        }))
    }
}
