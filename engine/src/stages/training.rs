//! The [`Trainer`] of a [`Session`]: the engine's trainer on the job's task, with pruning masks
//! re-applied after every optimizer step and progress forwarded as pipeline events.

use super::model::WorkingModel;
use super::session::{BuiltModel, Session, TaskData};
use super::{TrainSettings, TrainSummary, Trainer};
use crate::data::Example;
use crate::error::{EngineError, Result};
use crate::pipeline::{Event, StageContext};
use crate::prune::{compile_glob, MaskSet};
use crate::task::{evaluate_classifier, evaluate_lm, CausalLmTask, SequenceClassificationTask};
use crate::train::hooks::{EarlyStopping, Progress, TrainHooks};
use crate::train::trainer::{StopReason, TrainConfig, Trainer as LoopTrainer};
use crate::train::{AdamW, AdamWConfig, ClipConfig, Decay, ParamGroupConfig, ScheduleConfig};

/// Parameter globs of the task heads, trained at `head_learning_rate`.
const HEAD_GLOBS: &[&str] = &["classifier.*", "lm_head.*"];

impl Trainer for Session {
    fn train(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        ctx: &StageContext,
    ) -> Result<TrainSummary> {
        let freeze = settings
            .freeze
            .iter()
            .map(|g| compile_glob(g))
            .collect::<Result<Vec<_>>>()?;
        let names = model.store.names();
        let unmatched_freeze_globs = settings
            .freeze
            .iter()
            .zip(&freeze)
            .filter(|(_, m)| !names.iter().any(|n| m.is_match(n)))
            .map(|(g, _)| g.clone())
            .collect();
        let is_frozen = |name: &str| freeze.iter().any(|m| m.is_match(name));
        model.store.set_trainable(is_frozen, false)?;
        let outcome = self.train_unfrozen(model, settings, ctx);
        // Frozen weights become variables again so a later stage can train them.
        model.store.set_trainable(is_frozen, true)?;
        let (steps, final_loss, stop) = outcome?;
        if stop == StopReason::Cancelled {
            return Err(EngineError::Cancelled);
        }
        Ok(TrainSummary {
            steps,
            final_loss,
            stopped_early: stop == StopReason::EarlyStopped,
            unmatched_freeze_globs,
        })
    }
}

impl Session {
    fn train_unfrozen(
        &self,
        model: &WorkingModel,
        settings: &TrainSettings,
        ctx: &StageContext,
    ) -> Result<(u64, Option<f64>, StopReason)> {
        let built = self.build_model(model, true)?;
        let higher_is_better = matches!(self.data, TaskData::Classification(_));
        let config = TrainConfig {
            epochs: u64::from(settings.epochs),
            batch_size: settings.batch_size as usize,
            optimizer: AdamWConfig {
                lr: settings.learning_rate,
                weight_decay: settings.weight_decay,
                groups: head_groups(settings.head_learning_rate),
                ..AdamWConfig::default()
            },
            schedule: ScheduleConfig {
                decay: Decay::Linear,
                warmup_steps: None,
                warmup_ratio: Some(settings.warmup_ratio),
            },
            clip: ClipConfig {
                max_norm: settings.grad_clip_norm,
                max_value: None,
            },
            eval_each_epoch: settings.early_stopping_patience.is_some(),
            early_stopping: settings
                .early_stopping_patience
                .map(|patience| EarlyStopping {
                    patience,
                    min_delta: 0.0,
                    higher_is_better,
                }),
            seed: self.spec.seed.wrapping_add(ctx.index as u64),
            ..TrainConfig::default()
        };
        let mut optimizer = AdamW::new(model.store.trainable_vars(), config.optimizer.clone())?;
        let trainer = LoopTrainer::new(
            config,
            self.device.clone(),
            self.encoder.pad_id(),
            ctx.cancel,
        )?;
        let (train, validation) = self.splits();
        let mut hooks = StageHooks {
            session: self,
            built: &built,
            masks: model.masks(),
            store: model,
            validation,
            ctx,
        };
        let report = match &built {
            BuiltModel::Classifier(m) => trainer.run(
                &SequenceClassificationTask { model: m },
                &mut optimizer,
                train,
                &mut hooks,
            )?,
            BuiltModel::Decoder(m) => trainer.run(
                &CausalLmTask { model: m },
                &mut optimizer,
                train,
                &mut hooks,
            )?,
        };
        Ok((report.steps, report.final_loss, report.stop_reason))
    }

    fn splits(&self) -> (&[Example], &[Example]) {
        match &self.data {
            TaskData::Classification(d) => (&d.train, &d.validation),
            TaskData::LanguageModeling(c) => (&c.train, &c.validation),
        }
    }
}

fn head_groups(head_lr: Option<f64>) -> Vec<ParamGroupConfig> {
    let Some(lr) = head_lr else { return Vec::new() };
    HEAD_GLOBS
        .iter()
        .map(|g| ParamGroupConfig {
            pattern: (*g).to_string(),
            lr,
            weight_decay: None,
        })
        .collect()
}

/// Masks after each step, progress events, and the validation metric for early stopping.
struct StageHooks<'a> {
    session: &'a Session,
    built: &'a BuiltModel,
    masks: Option<&'a MaskSet>,
    store: &'a WorkingModel,
    validation: &'a [Example],
    ctx: &'a StageContext<'a>,
}

impl TrainHooks for StageHooks<'_> {
    fn on_progress(&mut self, p: &Progress) {
        (self.ctx.progress)(Event::Progress {
            index: self.ctx.index,
            step: p.step,
            total_steps: p.total_steps,
            loss: Some(p.loss),
            learning_rate: Some(p.learning_rate),
            samples_per_s: Some(p.samples_per_sec),
            eta_s: Some(p.eta_seconds),
        });
    }

    fn after_optimizer_step(&mut self, _step: u64) -> Result<()> {
        match self.masks {
            Some(masks) => masks.apply(&self.store.store),
            None => Ok(()),
        }
    }

    fn validate(&mut self, _step: u64) -> Result<Option<f64>> {
        if self.validation.is_empty() {
            return Ok(None);
        }
        let pad = self.session.encoder.pad_id();
        let device = &self.session.device;
        let metric = match (self.built, &self.session.data) {
            (BuiltModel::Classifier(m), TaskData::Classification(d)) => {
                let task = SequenceClassificationTask { model: m };
                evaluate_classifier(&task, self.validation, 32, pad, device, d.labels.len())?
                    .accuracy
            }
            (BuiltModel::Decoder(m), _) => {
                evaluate_lm(&CausalLmTask { model: m }, self.validation, 4, pad, device)?.0
            }
            _ => return Ok(None),
        };
        Ok(Some(metric))
    }
}
