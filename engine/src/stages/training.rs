//! The [`Trainer`] of a [`Session`]: the engine's trainer on the job's data with the request's
//! objective and frozen models, pruning masks re-applied after every optimizer step and progress
//! forwarded as pipeline events.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::Var;

use super::model::WorkingModel;
use super::session::{Session, TaskData};
use super::{
    LossCurve, MixedPrecision, ModelRole, TrainRequest, TrainSettings, TrainSummary, Trainer,
    VocabularyReport,
};
use crate::data::{Batch, Example};
use crate::error::{EngineError, Result};
use crate::family::ModuleRole;
use crate::models::TaskModel;
use crate::objective::{Objective, ObjectiveTask, TaskLoss};
use crate::pipeline::{Event, StageContext};
use crate::prune::{compile_glob, MaskSet};
use crate::spec::TaskType;
use crate::task::{evaluate_model, TaskScores};
use crate::train::hooks::{EarlyStopping, Progress, TrainHooks};
use crate::train::trainer::{StopReason, TrainConfig, Trainer as LoopTrainer};
use crate::train::{
    AdamW, AdamWConfig, ClipConfig, Decay, GradientObserver, LossScaleReport, ParamGroupConfig,
    ScheduleConfig, TrainTask,
};

/// How often a stage's training writes a checkpoint to resume from: a crashed or reclaimed job
/// loses at most this much training. A MiniLM checkpoint (weights and AdamW moments) is ~270 MB.
const CHECKPOINT_EVERY_SECS: f64 = 300.0;

impl Trainer for Session {
    fn load_named_model(&self, reference: &str, role: ModelRole) -> Result<WorkingModel> {
        Session::load_named_model(self, reference, role)
    }

    fn train_with(
        &self,
        model: &mut WorkingModel,
        settings: &TrainSettings,
        request: TrainRequest<'_>,
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
        let trained = model.store.trainable_vars();
        let trainable_parameters = trained.iter().map(|(_, v)| v.elem_count()).sum();
        // AdamW keeps two moments per element, and backward one gradient.
        let optimizer_and_gradient_bytes = trained
            .iter()
            .map(|(_, v)| 3 * v.elem_count() * v.dtype().size_in_bytes())
            .sum();
        let started = std::time::Instant::now();
        let outcome = self.train_unfrozen(model, settings, request, ctx);
        let seconds = started.elapsed().as_secs_f64();
        // Frozen weights become variables again so a later stage can train them.
        model.store.set_trainable(is_frozen, true)?;
        let run = outcome?;
        if run.stop == StopReason::Cancelled {
            return Err(EngineError::Cancelled);
        }
        Ok(TrainSummary {
            steps: run.steps,
            trainable_parameters,
            optimizer_and_gradient_bytes,
            mean_step_seconds: seconds / run.steps.max(1) as f64,
            peak_rss_bytes: crate::report::peak_memory_bytes(),
            final_loss: run.final_loss,
            stopped_early: run.stop == StopReason::EarlyStopped,
            unmatched_freeze_globs,
            loss_curves: run.loss_curves,
            teacher_cache: run.teacher_cache,
            loss_scale: run.loss_scale,
        })
    }

    fn observe_gradients(
        &self,
        model: &WorkingModel,
        batches: usize,
        batch_size: usize,
        objective: Option<&dyn Objective>,
        observer: &mut dyn GradientObserver,
    ) -> Result<usize> {
        let built = self.build_model(model, true)?;
        let task = ObjectiveTask::new(&*built, Vec::new(), objective.unwrap_or(&TaskLoss));
        let vars = model.store.trainable_vars();
        let (train, _) = self.splits();
        let mut seen = 0;
        for chunk in train.chunks(batch_size.max(1)).take(batches) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let batch = Batch::collate(&refs, self.encoder.pad_id(), &self.device)?;
            let grads = task.loss(&batch, None)?.backward()?;
            observer.observe(&vars, &grads)?;
            seen += 1;
        }
        Ok(seen)
    }

    fn trim_vocabulary(&self, model: &mut WorkingModel) -> Result<VocabularyReport> {
        let files = self.tokenizer_files(model)?;
        let used = self.data_token_ids(model)?;
        super::vocabulary::trim_model(model, &files, &used)
    }
}

/// What [`Session::train_unfrozen`] did.
struct RunOutcome {
    steps: u64,
    final_loss: Option<f64>,
    stop: StopReason,
    loss_curves: BTreeMap<String, LossCurve>,
    teacher_cache: Option<crate::objective::TeacherCacheReport>,
    loss_scale: Option<LossScaleReport>,
}

impl Session {
    fn train_unfrozen(
        &self,
        model: &WorkingModel,
        settings: &TrainSettings,
        request: TrainRequest<'_>,
        ctx: &StageContext,
    ) -> Result<RunOutcome> {
        // Only a stage's own objective has parts worth a curve each; the plain task loss is
        // `train.loss` already.
        let log_terms = request.objective.is_some();
        let objective = request.objective.unwrap_or(&TaskLoss);
        if objective.frozen_models() > request.frozen.len() {
            return Err(EngineError::InvalidSetting(format!(
                "objective {} reads {} frozen models, {} given",
                objective.name(),
                objective.frozen_models(),
                request.frozen.len()
            )));
        }
        let factory = match settings.mixed_precision {
            Some(mode) => model.linear_factory().with_compute_dtype(mode.dtype()),
            None => model.linear_factory(),
        };
        let built = self.build_model_with(model, true, &factory)?;
        let frozen = request
            .frozen
            .iter()
            .map(|m| self.build_model(m, false))
            .collect::<Result<Vec<_>>>()?;
        let higher_is_better = matches!(self.data, TaskData::Classification(_));
        // Runs are numbered in the order the stage starts them, which a re-run repeats.
        let run = self.train_runs.get();
        self.train_runs.set(run + 1);
        let config = TrainConfig {
            epochs: u64::from(settings.epochs),
            batch_size: settings.batch_size as usize,
            optimizer: AdamWConfig {
                lr: settings.learning_rate,
                weight_decay: settings.weight_decay,
                groups: head_groups(model, settings.head_learning_rate)?,
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
            checkpoint_dir: ctx
                .work_dir
                .as_ref()
                .map(|dir| dir.join(format!("train-{run}"))),
            checkpoint_every_secs: Some(CHECKPOINT_EVERY_SECS),
            loss_scaling: settings
                .mixed_precision
                .and_then(MixedPrecision::loss_scaling),
            ..TrainConfig::default()
        };
        let mut vars = model.store.trainable_vars();
        for (name, var) in objective.trainable() {
            // Checkpoints and parameter groups key variables by name.
            if model.store.contains(&name) || vars.iter().any(|(n, _)| *n == name) {
                return Err(EngineError::InvalidSetting(format!(
                    "objective {} names its parameter {name:?} like another parameter",
                    objective.name()
                )));
            }
            vars.push((name, var));
        }
        let mut optimizer = AdamW::new(vars, config.optimizer.clone())?;
        let trainer = LoopTrainer::new(
            config,
            self.device.clone(),
            self.encoder.pad_id(),
            ctx.cancel,
        )?;
        let (train, validation) = self.splits();
        let mut hooks = StageHooks {
            session: self,
            built: &*built,
            masks: model.masks(),
            store: model,
            validation,
            gradients: request.gradients,
            ctx,
            terms: log_terms.then(|| TermLog::new(settings.log_every_steps)),
        };
        let task = ObjectiveTask::new(&*built, frozen.iter().map(|m| &**m).collect(), objective);
        let task = match settings.teacher_cache_bytes {
            Some(budget) => task.with_teacher_cache(budget),
            None => task,
        };
        let task = if settings.gradient_checkpointing {
            task.with_recomputation()?
        } else {
            task
        };
        let report = trainer.run(&task, &mut optimizer, train, &mut hooks)?;
        Ok(RunOutcome {
            steps: report.steps,
            final_loss: report.final_loss,
            stop: report.stop_reason,
            loss_curves: hooks.terms.map(|t| t.curves).unwrap_or_default(),
            teacher_cache: task.teacher_cache_report(),
            loss_scale: report.loss_scale,
        })
    }

    pub(super) fn splits(&self) -> (&[Example], &[Example]) {
        match &self.data {
            TaskData::Classification(d) => (&d.train, &d.validation),
            TaskData::LanguageModeling(c) => (&c.train, &c.validation),
        }
    }
}

/// Rows per evaluation batch: language-model rows are long sequences.
pub(super) fn eval_batch_size(task: TaskType) -> usize {
    match task {
        TaskType::TextClassification => 32,
        TaskType::LanguageModeling => 4,
    }
}

/// The task head's parameters trained at `head_learning_rate`: every module the family maps as
/// the task head.
fn head_groups(model: &WorkingModel, head_lr: Option<f64>) -> Result<Vec<ParamGroupConfig>> {
    let Some(lr) = head_lr else {
        return Ok(Vec::new());
    };
    Ok(model
        .modules()?
        .with_role(ModuleRole::TaskHead)
        .map(|m| ParamGroupConfig {
            pattern: format!("{}.*", m.path),
            lr,
            weight_decay: None,
        })
        .collect())
}

/// The loss terms of a run: averaged over every `every` steps, sent with that step's progress
/// and kept as curves for the stage report.
struct TermLog {
    every: u64,
    /// Per term: the sum of its step means since the last report, and how many steps.
    pending: BTreeMap<String, (f64, u64)>,
    curves: BTreeMap<String, LossCurve>,
}

impl TermLog {
    fn new(every: u64) -> Self {
        Self {
            every: every.max(1),
            pending: BTreeMap::new(),
            curves: BTreeMap::new(),
        }
    }

    /// Adds a step's terms; at a logging step (every `every`, and the run's last) returns the
    /// means since the last one and extends the curves with them.
    fn add(&mut self, p: &Progress) -> Vec<(String, f64)> {
        for (name, value) in &p.loss_terms {
            let entry = self.pending.entry(name.clone()).or_default();
            entry.0 += value;
            entry.1 += 1;
        }
        let due = p.step.is_multiple_of(self.every) || p.step == p.total_steps;
        if !due {
            return Vec::new();
        }
        let means: Vec<(String, f64)> = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(name, (sum, n))| (name, sum / n.max(1) as f64))
            .collect();
        for (name, mean) in &means {
            let curve = self.curves.entry(name.clone()).or_default();
            curve.steps.push(p.step);
            curve.values.push(*mean);
        }
        means
    }
}

/// Masks after each step, progress events, gradients to the request's observer, the loss terms,
/// and the validation metric for early stopping.
struct StageHooks<'a, 'g> {
    session: &'a Session,
    built: &'a dyn TaskModel,
    masks: Option<&'a MaskSet>,
    store: &'a WorkingModel,
    validation: &'a [Example],
    gradients: Option<&'g mut (dyn GradientObserver + 'g)>,
    ctx: &'a StageContext<'a>,
    terms: Option<TermLog>,
}

impl TrainHooks for StageHooks<'_, '_> {
    fn on_progress(&mut self, p: &Progress) {
        let loss_terms = self
            .terms
            .as_mut()
            .map(|log| log.add(p))
            .unwrap_or_default();
        (self.ctx.progress)(Event::Progress {
            index: self.ctx.index,
            step: p.step,
            total_steps: p.total_steps,
            loss: Some(p.loss),
            learning_rate: Some(p.learning_rate),
            samples_per_s: Some(p.samples_per_sec),
            eta_s: Some(p.eta_seconds),
            loss_terms,
        });
    }

    fn after_backward(&mut self, vars: &[(String, Var)], grads: &GradStore) -> Result<()> {
        match self.gradients.as_mut() {
            Some(observer) => observer.observe(vars, grads),
            None => Ok(()),
        }
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
        let session = self.session;
        let batch = eval_batch_size(self.built.task());
        let scores = evaluate_model(
            self.built,
            self.validation,
            batch,
            session.encoder.pad_id(),
            &session.device,
            session.labels().len(),
        )?;
        Ok(Some(match scores {
            TaskScores::Classification(m) => m.accuracy,
            TaskScores::LanguageModeling(nll, _) => nll,
        }))
    }
}
