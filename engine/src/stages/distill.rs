//! The `distill` stage: knowledge distillation of the current model into a shallower student.
//!
//! The teacher is the model as it enters the stage (a deep copy, frozen) or the model `teacher`
//! names; the student is the model `student` names, or keeps `student_layers` of the teacher's
//! layers, chosen by `layer_init` ([`crate::family::drop_layers`]), and
//! trains on `Σ weight · term` over the task loss and the three kinds of knowledge: response
//! ([`ResponseKd`]), feature ([`FeatureKd`], [`AttentionKd`]) and relation ([`RelationKd`]). Each
//! term is reported on its own every `log_every_steps` steps and as a curve in the stage report.
//! The student replaces the model for the rest of the pipeline. The spec is in [`spec`].

mod narrow;
pub mod spec;

use candle_core::Device;

pub use spec::{
    DistillSpec, FeatureSpec, LayerInit, LayerRule, LossWeights, RelationSpec, VocabularyChoice,
};

use super::{ModelRole, Stage, TrainRequest, TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::drop_layers;
use crate::objective::{
    AttentionKd, FeatureKd, Objective, RelationKd, ResponseKd, TaskLoss, WeightedSum,
};
use crate::params::ParamStore;
use crate::pipeline::StageContext;
use crate::spec::StageKind;

/// The stage, built from its spec.
#[derive(Clone, Debug)]
pub struct DistillStage {
    spec: DistillSpec,
}

/// A config's whole-number field.
fn config_usize(config: &serde_json::Value, field: &str) -> Result<usize> {
    config
        .get(field)
        .and_then(serde_json::Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| EngineError::InvalidModel(format!("config.json has no {field}")))
}

/// The number of weights of `model`.
fn parameters(model: &WorkingModel) -> usize {
    model
        .store
        .tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum()
}

impl DistillStage {
    fn teacher_layers(model: &WorkingModel) -> Result<usize> {
        config_usize(&model.config, model.family()?.layer_count_field())
    }

    /// The weighted sum of the terms with a positive weight, for a student of `student_layers`
    /// layers; `widths` is `(student, teacher)` hidden size.
    fn objective(
        &self,
        student_layers: usize,
        teacher_layers: usize,
        widths: (usize, usize),
        device: &Device,
    ) -> Result<WeightedSum> {
        let spec = &self.spec;
        let weights = &spec.weights;
        let mut terms: Vec<(f64, Box<dyn Objective>)> = Vec::new();
        if weights.task > 0.0 {
            terms.push((weights.task, Box::new(TaskLoss)));
        }
        if weights.response > 0.0 {
            let response = ResponseKd {
                temperature: spec.temperature,
                top_k: spec.top_k.map(|k| k as usize),
            };
            terms.push((weights.response, Box::new(response)));
        }
        if weights.feature > 0.0 {
            let pairs = spec.feature_layer_pairs(student_layers, teacher_layers)?;
            let feature = FeatureKd::new(
                pairs.clone(),
                spec.feature.loss,
                spec.feature.tokens,
                widths,
                spec.feature.projection,
                device,
            )
            .map_err(|e| EngineError::InvalidSetting(format!("distill: {e}")))?;
            terms.push((weights.feature, Box::new(feature)));
            if spec.feature.attention {
                terms.push((weights.feature, Box::new(AttentionKd { pairs })));
            }
        }
        if weights.relation > 0.0 {
            let relation = RelationKd::new(
                spec.relation.loss,
                spec.relation.pooling,
                spec.relation.temperature,
                widths,
                spec.feature.projection,
                device,
            )
            .map_err(|e| EngineError::InvalidSetting(format!("distill: {e}")))?;
            terms.push((weights.relation, Box::new(relation)));
        }
        if terms.is_empty() {
            return Err(EngineError::InvalidSetting(
                "distill: every weight is zero".into(),
            ));
        }
        Ok(WeightedSum::new(terms))
    }
}

impl Stage for DistillStage {
    fn name(&self) -> &'static str {
        DistillSpec::TYPE
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        // A named teacher or student is checked once loaded: the incoming model is not the
        // teacher then.
        if self.spec.teacher.is_some() || self.spec.student.is_some() {
            return Ok(());
        }
        let teacher_layers = Self::teacher_layers(model)?;
        let keep = self.spec.student_layer_indices(teacher_layers)?;
        if self.spec.weights.feature > 0.0 {
            self.spec.feature_layer_pairs(keep.len(), teacher_layers)?;
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
        let teacher = match &self.spec.teacher {
            Some(reference) => trainer.load_named_model(reference, ModelRole::Teacher)?,
            None => model.deep_clone()?,
        };
        let teacher_layers = Self::teacher_layers(&teacher)?;
        let device = teacher
            .store
            .tensors()
            .first()
            .map_or(Device::Cpu, |(_, t)| t.device().clone());
        let mut narrowed = None;
        let (student, keep) = match &self.spec.student {
            Some(reference) => {
                let student = trainer.load_named_model(reference, ModelRole::Student)?;
                let (ours, theirs) = (parameters(&student), parameters(&teacher));
                if ours >= theirs {
                    return Err(EngineError::InvalidSetting(format!(
                        "distill: student: {ours} parameters is not smaller than the teacher's {theirs}"
                    )));
                }
                (student, None)
            }
            None => {
                let keep = self.spec.student_layer_indices(teacher_layers)?;
                let tensors: Vec<_> = teacher
                    .store
                    .tensors()
                    .into_iter()
                    .map(|(n, t)| (n, t.detach()))
                    .collect();
                let (config, tensors) =
                    drop_layers(teacher.family()?, &teacher.config, tensors, &keep)?;
                // The student starts dense and in full precision: masks of a pruned teacher do
                // not carry over to new layers, and a quantized teacher's store holds its
                // dequantized weights.
                let mut student =
                    teacher.derived(ParamStore::from_tensors(tensors, |_| true)?, config);
                let widths = narrow::Widths {
                    attention_heads: self.spec.attention_heads.map(|h| h as usize),
                    intermediate_size: self.spec.intermediate_size.map(|n| n as usize),
                    hidden_size: self.spec.hidden_size.map(|n| n as usize),
                };
                narrowed = narrow::narrow(
                    &mut student,
                    widths,
                    self.spec.narrow_importance,
                    trainer,
                    self.spec.batch_size as usize,
                )?;
                (student, Some(keep))
            }
        };
        let student_layers = Self::teacher_layers(&student)?;
        if self.spec.weights.feature > 0.0 {
            self.spec
                .feature_layer_pairs(student_layers, teacher_layers)?;
        }
        let widths = (
            config_usize(&student.config, "hidden_size")?,
            config_usize(&teacher.config, "hidden_size")?,
        );
        *model = student;
        let objective = self.objective(student_layers, teacher_layers, widths, &device)?;
        let settings = TrainSettings::for_distillation(&self.spec);
        // With the task loss alone (an ablation's baseline) the teacher need not run at all.
        let frozen = if objective.frozen_models() > 0 {
            vec![&teacher]
        } else {
            Vec::new()
        };
        let request = TrainRequest {
            objective: Some(&objective),
            frozen,
            gradients: None,
        };
        let summary = trainer.train_with(model, &settings, request, ctx)?;
        // After training: the teacher reads the job's ids, so the student keeps them until then.
        let vocabulary = match self.spec.vocabulary {
            VocabularyChoice::Task => Some(trainer.trim_vocabulary(model)?),
            VocabularyChoice::Full => None,
        };
        let layer_map = (self.spec.weights.feature > 0.0)
            .then(|| {
                self.spec
                    .feature_layer_pairs(student_layers, teacher_layers)
            })
            .transpose()?;
        Ok(serde_json::json!({
            "teacher": self.spec.teacher,
            "student": self.spec.student,
            "teacher_layers": teacher_layers,
            "student_layers": student_layers,
            "kept_teacher_layers": keep,
            "narrowed": narrowed,
            "objective": objective.name(),
            "weights": self.spec.weights,
            "temperature": self.spec.temperature,
            "layer_map": layer_map,
            "training": summary,
            "vocabulary": vocabulary,
        }))
    }
}
