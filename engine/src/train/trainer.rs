//! The one training loop shared by fine-tuning, pruning recovery, QAT and distillation.
//!
//! Per optimizer step: `grad_accum_steps` micro-batches (forward with seeded dropout, backward,
//! accumulate), one clipping measurement, one fused AdamW update, the post-step hook, a progress
//! report, and, when due, validation (early stopping) and a checkpoint. The cancellation flag is
//! polled before every step; a cancelled run saves a checkpoint (when a folder is configured) so it
//! can be resumed.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Var};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::{epoch_order, Batch, Example};
use crate::models::common::DropoutRng;
use crate::train::best::BestWeights;
use crate::train::checkpoint::{self, TrainState};
use crate::train::hooks::{EarlyStopping, Progress, TrainHooks, TrainTask};
use crate::train::loss_scale::{self, LossScaler, LossScaling};
use crate::train::{
    clip, AdamW, AdamWConfig, ClipConfig, GradAccumulator, Gradients, Schedule, ScheduleConfig,
};
use crate::{EngineError, Result};

/// Settings of one training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: u64,
    /// Stop after this many optimizer steps, even mid-epoch.
    pub max_steps: Option<u64>,
    /// Rows per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum_steps: usize,
    /// Optimizer hyper-parameters and parameter groups.
    pub optimizer: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: ScheduleConfig,
    /// Gradient clipping.
    pub clip: ClipConfig,
    /// Validate every this many optimizer steps.
    pub eval_every_steps: Option<u64>,
    /// Validate at the end of every epoch.
    pub eval_each_epoch: bool,
    /// Stop when validation stops improving; the run then ends with the weights of the best
    /// validation (restored from an in-memory copy, see [`crate::train::best`]).
    pub early_stopping: Option<EarlyStopping>,
    /// Seed of shuffling and dropout.
    pub seed: u64,
    /// Checkpoint folder (resumed from when it holds a checkpoint).
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many optimizer steps (and always on cancellation).
    pub checkpoint_every_steps: Option<u64>,
    /// Checkpoint after the first step that ends at least this many seconds after the last
    /// checkpoint (or the start): bounds the work a crash loses whatever the step time.
    pub checkpoint_every_secs: Option<f64>,
    /// Dynamic loss scaling, for models whose products run in f16 ([`crate::train::loss_scale`]):
    /// steps whose gradients overflow are skipped.
    pub loss_scaling: Option<LossScaling>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 16,
            grad_accum_steps: 1,
            optimizer: AdamWConfig::default(),
            schedule: ScheduleConfig::default(),
            clip: ClipConfig {
                max_norm: Some(1.0),
                max_value: None,
            },
            eval_every_steps: None,
            eval_each_epoch: true,
            early_stopping: None,
            seed: 0,
            checkpoint_dir: None,
            checkpoint_every_steps: None,
            checkpoint_every_secs: None,
            loss_scaling: None,
        }
    }
}

impl TrainConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.grad_accum_steps == 0 {
            return Err(EngineError::InvalidSetting(
                "batch_size and grad_accum_steps must be at least 1".into(),
            ));
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return Err(EngineError::InvalidSetting(
                "epochs must be at least 1".into(),
            ));
        }
        if self
            .checkpoint_every_secs
            .is_some_and(|s| !(s.is_finite() && s > 0.0))
        {
            return Err(EngineError::InvalidSetting(
                "checkpoint_every_secs must be a positive number".into(),
            ));
        }
        if self.eval_every_steps == Some(0) || self.checkpoint_every_steps == Some(0) {
            return Err(EngineError::InvalidSetting(
                "step intervals must be at least 1".into(),
            ));
        }
        if let Some(scaling) = &self.loss_scaling {
            scaling.validate()?;
        }
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.clip.validate()
    }

    /// Optimizer steps for `examples` training rows.
    pub fn total_steps(&self, examples: usize) -> u64 {
        let micro = examples.div_ceil(self.batch_size) as u64;
        let per_epoch = micro.div_ceil(self.grad_accum_steps as u64);
        let planned = per_epoch * self.epochs;
        self.max_steps.map_or(
            planned,
            |m| if self.epochs == 0 { m } else { m.min(planned) },
        )
    }
}

/// Why the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All planned steps were made.
    Completed,
    /// Validation stopped improving.
    EarlyStopped,
    /// The cancellation flag was set.
    Cancelled,
}

/// The outcome of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Why training stopped.
    pub stop_reason: StopReason,
    /// Optimizer steps done (including those before a resume).
    pub steps: u64,
    /// Planned optimizer steps.
    pub total_steps: u64,
    /// Mean loss of the last step.
    pub final_loss: Option<f64>,
    /// Best validation metric and the step it was seen at.
    pub best_metric: Option<f64>,
    /// Step of the best validation metric.
    pub best_step: Option<u64>,
    /// Step whose weights the model ends with when early stopping restored the best ones (`None`
    /// when the last step's weights were kept).
    #[serde(default)]
    pub restored_best_step: Option<u64>,
    /// Whether the run continued from a checkpoint.
    pub resumed: bool,
    /// With loss scaling: the steps skipped because their gradients overflowed f16 (counted in
    /// `steps`, which is the data consumed), and the scale the run ended with.
    #[serde(default)]
    pub loss_scale: Option<LossScaleReport>,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
}

/// What loss scaling did over a run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleReport {
    /// Steps skipped for overflow (no update made).
    pub skipped_steps: u64,
    /// The scale at the end of the run.
    pub final_scale: f64,
}

/// Runs training.
pub struct Trainer<'a> {
    cfg: TrainConfig,
    device: Device,
    pad_id: u32,
    cancel: &'a AtomicBool,
    /// When the last checkpoint was written (or the trainer made), for `checkpoint_every_secs`.
    last_checkpoint: Cell<Instant>,
}

impl<'a> Trainer<'a> {
    /// A trainer that builds batches on `device`, padding with `pad_id`, and stops when `cancel`
    /// becomes true.
    ///
    /// # Errors
    /// An invalid config.
    pub fn new(
        cfg: TrainConfig,
        device: Device,
        pad_id: u32,
        cancel: &'a AtomicBool,
    ) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            device,
            pad_id,
            cancel,
            last_checkpoint: Cell::new(Instant::now()),
        })
    }

    /// Trains the variables of `optimizer` on `train` with `task`'s loss.
    ///
    /// # Errors
    /// No training rows, a forward/backward failure, a hook error or a checkpoint I/O error.
    pub fn run(
        &self,
        task: &dyn TrainTask,
        optimizer: &mut AdamW,
        train: &[Example],
        hooks: &mut dyn TrainHooks,
    ) -> Result<TrainReport> {
        if train.is_empty() {
            return Err(EngineError::InvalidSetting("no training examples".into()));
        }
        let started = Instant::now();
        let total_steps = self.cfg.total_steps(train.len());
        let schedule = self.cfg.schedule.build(total_steps);
        let (mut state, resumed) = self.initial_state(optimizer)?;
        let first_step = state.step;
        let mut samples = 0usize;
        let mut accumulator = GradAccumulator::new();
        // Fetched once: the optimizer's order is the accumulator's order.
        let vars = optimizer.vars();
        let mut last_loss = None;
        let mut order = epoch_order(train.len(), self.cfg.seed, state.epoch);
        let mut best = BestWeights::default();
        let stop_reason = loop {
            if let Some(ended) = state.ended {
                break ended;
            }
            if state.step >= total_steps {
                break StopReason::Completed;
            }
            if self.cancel.load(Ordering::Relaxed) {
                self.save_checkpoint(optimizer, &state)?;
                break StopReason::Cancelled;
            }
            let mut ctx = StepContext {
                train,
                order: &order,
                vars: &vars,
                accumulator: &mut accumulator,
            };
            let stats =
                self.optimizer_step(task, optimizer, &mut ctx, &mut state, &schedule, hooks)?;
            samples += stats.rows;
            last_loss = Some(stats.loss);
            let epoch_done = state.batch_in_epoch * self.cfg.batch_size >= train.len();
            if epoch_done {
                state.epoch += 1;
                state.batch_in_epoch = 0;
                order = epoch_order(train.len(), self.cfg.seed, state.epoch);
            }
            let elapsed = started.elapsed().as_secs_f64().max(1e-9);
            let steps_done = (state.step - first_step) as f64;
            hooks.on_progress(&Progress {
                step: state.step,
                total_steps,
                epoch: state.epoch,
                loss: stats.loss,
                loss_terms: task.take_loss_terms(),
                learning_rate: optimizer.base_lr(schedule.factor(state.step - 1)),
                grad_norm: stats.grad_norm,
                samples_per_sec: samples as f64 / elapsed,
                eta_seconds: elapsed / steps_done * (total_steps - state.step) as f64,
            });
            if self.validate_and_checkpoint(optimizer, &mut state, epoch_done, hooks)? {
                break StopReason::EarlyStopped;
            }
            if self.cfg.early_stopping.is_some() && state.best_step == Some(state.step) {
                best.capture(&vars, state.step)?;
            }
        };
        let restored_best_step = match self.cfg.early_stopping {
            Some(_) if state.ended.is_none() && state.best_step != Some(state.step) => {
                best.restore(&vars)?
            }
            _ => None,
        };
        if let Some(step) = restored_best_step {
            tracing::info!(target: "engine.train", step, "restored the best validation weights");
        }
        // The final checkpoint holds the run's final weights (the best ones when restored), so a
        // run resumed after it ends at once with exactly those.
        if stop_reason != StopReason::Cancelled && self.cfg.checkpoint_dir.is_some() {
            state.ended = Some(stop_reason);
            self.save_checkpoint(optimizer, &state)?;
        }
        Ok(TrainReport {
            stop_reason,
            steps: state.step,
            total_steps,
            final_loss: last_loss,
            best_metric: state.best_metric,
            best_step: state.best_step,
            restored_best_step,
            resumed,
            loss_scale: state.loss_scaler.map(|s| LossScaleReport {
                skipped_steps: s.skipped_steps,
                final_scale: s.scale,
            }),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

/// Borrowed inputs of one optimizer step.
struct StepContext<'d> {
    train: &'d [Example],
    order: &'d [usize],
    vars: &'d [(String, Var)],
    accumulator: &'d mut GradAccumulator,
}

/// What one optimizer step measured.
struct StepStats {
    loss: f64,
    rows: usize,
    grad_norm: f64,
}

impl Trainer<'_> {
    fn initial_state(&self, optimizer: &mut AdamW) -> Result<(TrainState, bool)> {
        if let Some(dir) = &self.cfg.checkpoint_dir {
            if checkpoint::exists(dir) {
                let mut state = checkpoint::load(dir, optimizer)?;
                // The scale a checkpoint reached when this run scales its loss, a fresh one when
                // the checkpoint had none, and none when this run does not scale.
                state.loss_scaler = self
                    .cfg
                    .loss_scaling
                    .map(|c| state.loss_scaler.unwrap_or_else(|| LossScaler::new(&c)));
                tracing::info!(target: "engine.train", step = state.step, dir = %dir.display(), "resuming from checkpoint");
                return Ok((state, true));
            }
        }
        let state = TrainState {
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            rng: ChaCha8Rng::seed_from_u64(self.cfg.seed),
            best_metric: None,
            best_step: None,
            evals_without_improvement: 0,
            ended: None,
            loss_scaler: self.cfg.loss_scaling.as_ref().map(LossScaler::new),
        };
        Ok((state, false))
    }

    /// Runs the micro-batches of one optimizer step and applies the update.
    fn optimizer_step(
        &self,
        task: &dyn TrainTask,
        optimizer: &mut AdamW,
        ctx: &mut StepContext<'_>,
        state: &mut TrainState,
        schedule: &Schedule,
        hooks: &mut dyn TrainHooks,
    ) -> Result<StepStats> {
        let bs = self.cfg.batch_size;
        let accumulate = self.cfg.grad_accum_steps > 1;
        ctx.accumulator.clear();
        let (mut single, mut loss_sum, mut rows, mut micro) = (None, 0f64, 0usize, 0usize);
        let loss_scale = state.loss_scaler.map_or(1.0, |s| s.scale);
        let mut overflowed = false;
        while micro < self.cfg.grad_accum_steps && state.batch_in_epoch * bs < ctx.train.len() {
            let start = state.batch_in_epoch * bs;
            let end = (start + bs).min(ctx.train.len());
            let examples: Vec<&Example> = ctx.order[start..end]
                .iter()
                .map(|&i| &ctx.train[i])
                .collect();
            let batch = Batch::collate(&examples, self.pad_id, &self.device)?;
            let dropout = DropoutRng::new(state.rng.next_u64());
            let (loss, mut grads) =
                task.loss_and_gradients(&batch, Some(&dropout), ctx.vars, loss_scale)?;
            loss_sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if state.loss_scaler.is_some() {
                // Divided back before any hook or the optimizer sees them; an overflowed
                // micro-batch spoils the whole step, whose remaining micro-batches still run so
                // the data order stays that of a run without overflow. (With accumulation, the
                // micro-batches before the overflowed one have already been shown to
                // `after_backward`: their gradients are finite and right, only unused.)
                overflowed |= !loss_scale::unscale(&mut grads, ctx.vars, loss_scale)?;
            }
            if !overflowed {
                hooks.after_backward(ctx.vars, &grads)?;
                if accumulate {
                    ctx.accumulator.add(ctx.vars, &grads)?;
                } else {
                    single = Some(grads);
                }
            }
            state.batch_in_epoch += 1;
            rows += examples.len();
            micro += 1;
        }
        let loss = loss_sum / micro.max(1) as f64;
        if let (Some(scaler), Some(scaling)) = (state.loss_scaler.as_mut(), &self.cfg.loss_scaling)
        {
            if overflowed {
                // Skipped: no update, so neither the weights nor AdamW's moments and step count
                // change; the schedule moves on with the data, as PyTorch's does.
                scaler.record_overflow(scaling)?;
                tracing::debug!(target: "engine.train", step = state.step, scale = scaler.scale, "f16 overflow: step skipped");
                state.step += 1;
                return Ok(StepStats {
                    loss,
                    rows,
                    grad_norm: f64::INFINITY,
                });
            }
            scaler.record_good_step(scaling);
        }
        let grads = match &single {
            Some(store) => Gradients::Store(store),
            None => Gradients::Accumulated(ctx.accumulator),
        };
        let outcome = clip::measure(ctx.vars, grads, &self.cfg.clip)?;
        optimizer.step(grads, schedule.factor(state.step), outcome.transform)?;
        state.step += 1;
        hooks.after_optimizer_step(state.step)?;
        Ok(StepStats {
            loss,
            rows,
            grad_norm: outcome.pre_clip_norm,
        })
    }

    /// Runs the validation and checkpoint that are due after a step; returns whether to stop early.
    fn validate_and_checkpoint(
        &self,
        optimizer: &AdamW,
        state: &mut TrainState,
        epoch_done: bool,
        hooks: &mut dyn TrainHooks,
    ) -> Result<bool> {
        let eval_due = self
            .cfg
            .eval_every_steps
            .is_some_and(|n| state.step.is_multiple_of(n))
            || (epoch_done && self.cfg.eval_each_epoch);
        let stop = eval_due && self.validate(state, hooks)?;
        let steps_due = self
            .cfg
            .checkpoint_every_steps
            .is_some_and(|n| state.step.is_multiple_of(n));
        let time_due = self
            .cfg
            .checkpoint_every_secs
            .is_some_and(|s| self.last_checkpoint.get().elapsed().as_secs_f64() >= s);
        if stop || steps_due || time_due {
            self.save_checkpoint(optimizer, state)?;
        }
        Ok(stop)
    }

    /// Validates and updates the early-stopping state; returns whether to stop.
    fn validate(&self, state: &mut TrainState, hooks: &mut dyn TrainHooks) -> Result<bool> {
        let Some(metric) = hooks.validate(state.step)? else {
            return Ok(false);
        };
        tracing::info!(target: "engine.train", step = state.step, metric, "validation");
        let rule = self.cfg.early_stopping.unwrap_or(EarlyStopping {
            patience: u32::MAX,
            min_delta: 0.0,
            higher_is_better: true,
        });
        if rule.improves(metric, state.best_metric) {
            state.best_metric = Some(metric);
            state.best_step = Some(state.step);
            state.evals_without_improvement = 0;
            return Ok(false);
        }
        state.evals_without_improvement += 1;
        Ok(self.cfg.early_stopping.is_some() && state.evals_without_improvement >= rule.patience)
    }

    fn save_checkpoint(&self, optimizer: &AdamW, state: &TrainState) -> Result<()> {
        self.last_checkpoint.set(Instant::now());
        match &self.cfg.checkpoint_dir {
            Some(dir) => checkpoint::save(dir, optimizer, state),
            None => Ok(()),
        }
    }
}
