//! What the trainer reports and asks of its caller: progress, the post-step hook, validation,
//! and the early-stopping rule.

use serde::{Deserialize, Serialize};

use crate::data::Batch;
use crate::models::common::DropoutRng;
use crate::Result;

/// The model side of training: a loss for a batch.
pub trait TrainTask {
    /// The mean loss of `batch` as a scalar tensor. `dropout` is `Some` in training (dropout on,
    /// seeded per step so runs are reproducible) and `None` in evaluation.
    ///
    /// # Errors
    /// A forward-pass failure.
    fn loss(
        &self,
        batch: &Batch,
        dropout: Option<&DropoutRng>,
    ) -> candle_core::Result<candle_core::Tensor>;

    /// The loss of `batch` and the gradients of (at least) `vars` of the loss times `loss_scale`
    /// (1 but in f16 training, [`crate::train::loss_scale`]): [`Self::loss`] and its backward,
    /// unless the task computes them another way (activation recomputation). The loss returned
    /// is not scaled.
    ///
    /// # Errors
    /// A forward or backward failure.
    fn loss_and_gradients(
        &self,
        batch: &Batch,
        dropout: Option<&DropoutRng>,
        _vars: &[(String, candle_core::Var)],
        loss_scale: f64,
    ) -> candle_core::Result<(candle_core::Tensor, candle_core::backprop::GradStore)> {
        let loss = self.loss(batch, dropout)?;
        let grads = scaled(&loss, loss_scale)?.backward()?;
        Ok((loss, grads))
    }

    /// The mean unweighted value of each named part of the loss over the batches since the last
    /// call (`task`, `response`…), when the loss has parts; the trainer reports them with each
    /// step's progress.
    fn take_loss_terms(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

/// `loss * scale`, or `loss` itself at scale 1 (no extra node in the graph).
///
/// # Errors
/// A device error.
pub fn scaled(loss: &candle_core::Tensor, scale: f64) -> candle_core::Result<candle_core::Tensor> {
    if scale == 1.0 {
        Ok(loss.clone())
    } else {
        loss.affine(scale, 0.0)
    }
}

/// One progress report, sent after every optimizer step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done (1-based after the first step).
    pub step: u64,
    /// Optimizer steps the run will make (unless stopped early).
    pub total_steps: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Mean training loss over this step's micro-batches.
    pub loss: f64,
    /// The mean unweighted value of each part of the loss over this step's micro-batches, when
    /// the loss has named parts ([`TrainTask::take_loss_terms`]).
    pub loss_terms: Vec<(String, f64)>,
    /// Learning rate of the default parameter group for this step.
    pub learning_rate: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Training throughput over the run so far.
    pub samples_per_sec: f64,
    /// Estimated seconds left at the current throughput.
    pub eta_seconds: f64,
}

/// Callbacks from the training loop; every method has a do-nothing default.
pub trait TrainHooks {
    /// Called after every optimizer step.
    fn on_progress(&mut self, _progress: &Progress) {}

    /// Called right after each optimizer update, before progress is reported (pruning re-applies
    /// its masks here).
    ///
    /// # Errors
    /// An error stops training and is returned by the trainer.
    fn after_optimizer_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }

    /// Called after each micro-batch's backward pass with the trained variables and their
    /// gradients, before accumulation and clipping: a stage can accumulate per-parameter scores
    /// here (first-order Taylor importance `|w · ∂L/∂w|`).
    ///
    /// # Errors
    /// An error stops training and is returned by the trainer.
    fn after_backward(
        &mut self,
        _vars: &[(String, candle_core::Var)],
        _grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        Ok(())
    }

    /// Computes the validation metric (for early stopping), or `None` when there is nothing to
    /// validate on.
    ///
    /// # Errors
    /// An error stops training and is returned by the trainer.
    fn validate(&mut self, _step: u64) -> Result<Option<f64>> {
        Ok(None)
    }
}

/// Sees the gradients of every micro-batch of a training or scoring pass (see
/// [`TrainHooks::after_backward`]), e.g. to accumulate Taylor importance for structured pruning.
pub trait GradientObserver {
    /// Called with the trained variables and one micro-batch's gradients.
    ///
    /// # Errors
    /// An error stops the pass and is returned by it.
    fn observe(
        &mut self,
        vars: &[(String, candle_core::Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()>;
}

/// Looks at no gradient: for passes run only for what the forward pass records (calibration).
pub struct IgnoreGradients;

impl GradientObserver for IgnoreGradients {
    fn observe(
        &mut self,
        _: &[(String, candle_core::Var)],
        _: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        Ok(())
    }
}

/// Hooks that do nothing (no validation, no reporting).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl TrainHooks for NoHooks {}

/// Stop when the validation metric has not improved for `patience` validations.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EarlyStopping {
    /// Validations without improvement before stopping.
    pub patience: u32,
    /// Smallest change that counts as an improvement.
    #[serde(default)]
    pub min_delta: f64,
    /// `true` for accuracy-like metrics, `false` for losses.
    #[serde(default = "default_true")]
    pub higher_is_better: bool,
}

fn default_true() -> bool {
    true
}

impl EarlyStopping {
    /// Whether `metric` improves on `best`.
    pub fn improves(&self, metric: f64, best: Option<f64>) -> bool {
        match best {
            None => metric.is_finite(),
            Some(best) if self.higher_is_better => metric > best + self.min_delta,
            Some(best) => metric < best - self.min_delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn improvement_respects_direction_and_min_delta() {
        let acc = EarlyStopping {
            patience: 2,
            min_delta: 0.01,
            higher_is_better: true,
        };
        assert!(acc.improves(0.5, None));
        assert!(acc.improves(0.52, Some(0.5)));
        assert!(!acc.improves(0.505, Some(0.5)));
        let loss = EarlyStopping {
            patience: 2,
            min_delta: 0.0,
            higher_is_better: false,
        };
        assert!(loss.improves(0.4, Some(0.5)));
        assert!(!loss.improves(0.6, Some(0.5)));
        assert!(!loss.improves(f64::NAN, None));
    }
}
