//! Dry-run cost estimates: each stage prices itself from a [`Workload`] the caller fills in (the
//! service counts parameters from file sizes and rows from the dataset), without loading a tensor.
//!
//! The estimates are coarse on purpose (order of magnitude, for "will this fit, and is it minutes
//! or hours"): training costs the usual 6 × parameters × tokens floating-point operations,
//! inference 2 ×, on an assumed sustained CPU throughput.

use super::TaskSpec;

/// Sustained floating-point throughput assumed for estimates (a few CPU cores, f32).
pub const ASSUMED_FLOPS_PER_SECOND: f64 = 2.0e10;
/// Tokens per example when the spec leaves `max_length` to the model (BERT-style default).
pub const DEFAULT_TOKENS_PER_EXAMPLE: f64 = 128.0;
/// Share of rows in the training split (the rest is the test split).
pub const TRAIN_SHARE: f64 = 0.8;
/// Bytes of training state per parameter: weights, gradients and two AdamW moments, in f32.
pub const TRAINING_BYTES_PER_PARAM: f64 = 16.0;
/// Bytes of inference state per parameter (f32 weights plus a working copy).
pub const INFERENCE_BYTES_PER_PARAM: f64 = 8.0;

/// The numbers every stage estimate is built from.
#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    /// Parameters of the input model.
    pub parameters: f64,
    /// Tokens in one pass over the training split.
    pub train_tokens: f64,
    /// Tokens in one evaluation.
    pub eval_tokens: f64,
}

/// One stage's estimate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Wall time, seconds.
    pub seconds: f64,
    /// Peak resident memory, bytes.
    pub peak_bytes: f64,
}

impl Workload {
    /// The workload of `task` on a model of `parameters` and a dataset of `rows`: the train/test
    /// split, the sample caps and the tokens per example the task asks for.
    pub fn new(task: &TaskSpec, parameters: f64, rows: u64) -> Self {
        let tokens = task
            .max_length
            .map_or(DEFAULT_TOKENS_PER_EXAMPLE, f64::from);
        let cap = |n: f64, limit: Option<u64>| limit.map_or(n, |l| n.min(l as f64));
        let train = cap(rows as f64 * TRAIN_SHARE, task.max_train_samples);
        let eval = cap(rows as f64 * (1.0 - TRAIN_SHARE), task.max_eval_samples);
        Self {
            parameters,
            train_tokens: train * tokens,
            eval_tokens: eval * tokens,
        }
    }

    /// Training epochs: 6 flops per parameter per token, plus one evaluation per epoch.
    pub fn training_seconds(&self, epochs: f64) -> f64 {
        let flops = epochs
            * (6.0 * self.parameters * self.train_tokens
                + 2.0 * self.parameters * self.eval_tokens);
        flops / ASSUMED_FLOPS_PER_SECOND
    }

    /// One evaluation: 2 flops per parameter per token.
    pub fn evaluation_seconds(&self) -> f64 {
        2.0 * self.parameters * self.eval_tokens / ASSUMED_FLOPS_PER_SECOND
    }

    /// Peak memory while training (weights, gradients, two optimizer moments).
    pub fn training_peak_bytes(&self) -> f64 {
        self.parameters * TRAINING_BYTES_PER_PARAM
    }

    /// Peak memory while only running the model.
    pub fn inference_peak_bytes(&self) -> f64 {
        self.parameters * INFERENCE_BYTES_PER_PARAM
    }

    /// Training with activation recomputation (`gradient_checkpointing`): each block's forward
    /// pass runs twice, so 8 flops per parameter per token instead of 6.
    pub fn recomputed_training_seconds(&self, epochs: f64) -> f64 {
        let flops = epochs
            * (8.0 * self.parameters * self.train_tokens
                + 2.0 * self.parameters * self.eval_tokens);
        flops / ASSUMED_FLOPS_PER_SECOND
    }

    /// A stage that trains for `epochs`.
    pub fn training(&self, epochs: f64) -> Estimate {
        Estimate {
            seconds: self.training_seconds(epochs),
            peak_bytes: self.training_peak_bytes(),
        }
    }
}
