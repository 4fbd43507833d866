//! Adapters between models and the trainer: the task losses for a [`Batch`], the trainer's view
//! of any [`TaskModel`] ([`ModelTask`]), and evaluation loops over examples.
//!
//! Classification uses cross-entropy on the head's logits. Causal language modelling predicts token
//! `t + 1` from positions `..= t` (labels shifted by one), and padding positions are masked out of
//! both the loss and the token count.

use candle_core::{DType, Device, Tensor, D};

use crate::data::{Batch, Example};
use crate::eval::{classification_metrics, perplexity, ClassificationMetrics};
use crate::models::bert::{BertForSequenceClassification, BertInput};
use crate::models::common::DropoutRng;
use crate::models::llama::LlamaForCausalLm;
use crate::models::{Outputs, TaskModel, TaskOutput};
use crate::spec::TaskType;
use crate::train::TrainTask;
use crate::{EngineError, Result};

/// The task's own loss of a forward pass: cross-entropy of the class logits for classification,
/// mean next-token NLL over unpadded targets for language modelling.
///
/// # Errors
/// Shape mismatches between the logits and the batch's labels.
pub fn task_loss(task: TaskType, out: &TaskOutput, batch: &Batch) -> candle_core::Result<Tensor> {
    match task {
        TaskType::TextClassification => candle_nn::loss::cross_entropy(&out.logits, &batch.labels),
        TaskType::LanguageModeling => {
            let (sum, count) = shifted_nll(&out.logits, &batch.labels, &batch.attention_mask)?;
            sum.broadcast_div(&count.clamp(1f32, f32::MAX)?)
        }
    }
}

/// Trains any [`TaskModel`] on its task loss.
#[derive(Clone, Copy, Debug)]
pub struct ModelTask<'m> {
    /// The model being trained.
    pub model: &'m dyn TaskModel,
}

impl TrainTask for ModelTask<'_> {
    fn loss(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> candle_core::Result<Tensor> {
        let out = self.model.forward(batch, Outputs::LOGITS, dropout)?;
        self.model.task_loss(&out, batch)
    }
}

/// Task metrics of a model on examples: accuracy and macro-F1 for classification, mean NLL and
/// perplexity for language modelling.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskScores {
    /// Classification metrics.
    Classification(ClassificationMetrics),
    /// `(mean NLL, perplexity)`.
    LanguageModeling(f64, f64),
}

/// Evaluates `model` on `examples` (no dropout) with the metric of its task.
///
/// # Errors
/// No examples, examples without labels (classification), or a forward failure.
pub fn evaluate_model(
    model: &dyn TaskModel,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    num_labels: usize,
) -> Result<TaskScores> {
    match model.task() {
        TaskType::TextClassification => {
            let logits = |batch: &Batch| Ok(model.forward(batch, Outputs::LOGITS, None)?.logits);
            classify(logits, examples, batch_size, pad_id, device, num_labels)
                .map(TaskScores::Classification)
        }
        TaskType::LanguageModeling => {
            let nll = |batch: &Batch| {
                let out = model.forward(batch, Outputs::LOGITS, None)?;
                shifted_nll(&out.logits, &batch.labels, &batch.attention_mask)
            };
            let (mean, ppl) = mean_nll(nll, examples, batch_size, pad_id, device)?;
            Ok(TaskScores::LanguageModeling(mean, ppl))
        }
    }
}

/// Trains a BERT-style classifier with cross-entropy.
#[derive(Clone, Copy, Debug)]
pub struct SequenceClassificationTask<'m> {
    /// The model being trained.
    pub model: &'m BertForSequenceClassification,
}

impl SequenceClassificationTask<'_> {
    /// `(batch, num_labels)` logits in f32.
    ///
    /// # Errors
    /// A forward-pass failure.
    pub fn logits(
        &self,
        batch: &Batch,
        dropout: Option<&DropoutRng>,
    ) -> candle_core::Result<Tensor> {
        let input = BertInput {
            input_ids: &batch.input_ids,
            token_type_ids: Some(&batch.token_type_ids),
            attention_mask: Some(&batch.attention_mask),
        };
        self.model
            .forward(input, dropout)?
            .logits
            .to_dtype(DType::F32)
    }
}

impl TrainTask for SequenceClassificationTask<'_> {
    fn loss(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> candle_core::Result<Tensor> {
        ModelTask { model: self.model }.loss(batch, dropout)
    }
}

/// Trains a Llama-style decoder on next-token prediction.
#[derive(Clone, Copy, Debug)]
pub struct CausalLmTask<'m> {
    /// The model being trained.
    pub model: &'m LlamaForCausalLm,
}

impl CausalLmTask<'_> {
    /// Summed negative log-likelihood of the next tokens and how many tokens were predicted.
    ///
    /// # Errors
    /// A forward-pass failure or a batch shorter than two tokens.
    pub fn nll_sum(
        &self,
        batch: &Batch,
        dropout: Option<&DropoutRng>,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let logits = self
            .model
            .forward(&batch.input_ids, Some(&batch.attention_mask), dropout)?
            .logits;
        shifted_nll(&logits, &batch.labels, &batch.attention_mask)
    }
}

impl TrainTask for CausalLmTask<'_> {
    fn loss(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> candle_core::Result<Tensor> {
        ModelTask { model: self.model }.loss(batch, dropout)
    }
}

/// Sum of `-log p(label[t+1] | ..t)` over unmasked targets, and the number of such targets.
///
/// # Errors
/// Shape mismatches or sequences shorter than two tokens.
pub fn shifted_nll(
    logits: &Tensor,
    labels: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let (_, seq, _) = logits.dims3()?;
    if seq < 2 {
        candle_core::bail!("causal LM loss needs at least two tokens per row, got {seq}");
    }
    let logits = logits.narrow(1, 0, seq - 1)?.to_dtype(DType::F32)?;
    let targets = labels.narrow(1, 1, seq - 1)?.contiguous()?;
    let keep = mask.narrow(1, 1, seq - 1)?.to_dtype(DType::F32)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    let sum = (picked * &keep)?.sum_all()?.neg()?;
    Ok((sum, keep.sum_all()?))
}

/// Predicted classes and metrics of a classifier on `examples` (no dropout).
///
/// # Errors
/// No examples, examples without labels, or a forward failure.
pub fn evaluate_classifier(
    task: &SequenceClassificationTask<'_>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    num_labels: usize,
) -> Result<ClassificationMetrics> {
    let logits = |batch: &Batch| task.logits(batch, None);
    classify(logits, examples, batch_size, pad_id, device, num_labels)
}

/// Predicts every example's class with `logits` and scores the predictions.
fn classify(
    logits: impl Fn(&Batch) -> candle_core::Result<Tensor>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
    num_labels: usize,
) -> Result<ClassificationMetrics> {
    let mut predictions = Vec::with_capacity(examples.len());
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::collate(&refs, pad_id, device)?;
        let logits = logits(&batch)?;
        predictions.extend(
            logits
                .argmax(D::Minus1)?
                .to_dtype(DType::U32)?
                .to_vec1::<u32>()?,
        );
    }
    let labels = examples
        .iter()
        .map(|e| {
            e.label
                .ok_or_else(|| EngineError::InvalidSetting("example without a label".into()))
        })
        .collect::<Result<Vec<u32>>>()?;
    classification_metrics(&predictions, &labels, num_labels)
}

/// Mean next-token NLL and perplexity of a causal LM on `examples` (no dropout).
///
/// # Errors
/// No examples or a forward failure.
pub fn evaluate_lm(
    task: &CausalLmTask<'_>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<(f64, f64)> {
    mean_nll(
        |b| task.nll_sum(b, None),
        examples,
        batch_size,
        pad_id,
        device,
    )
}

/// Mean next-token NLL (and perplexity) over every example, `nll_sum` giving a batch's summed NLL
/// and target count.
fn mean_nll(
    nll_sum: impl Fn(&Batch) -> candle_core::Result<(Tensor, Tensor)>,
    examples: &[Example],
    batch_size: usize,
    pad_id: u32,
    device: &Device,
) -> Result<(f64, f64)> {
    let (mut nll, mut tokens) = (0f64, 0f64);
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::collate(&refs, pad_id, device)?;
        let (sum, count) = nll_sum(&batch)?;
        nll += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        tokens += count.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    if tokens == 0.0 {
        return Err(EngineError::InvalidSetting("no tokens to evaluate".into()));
    }
    let mean = nll / tokens;
    Ok((mean, perplexity(mean)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifted_nll_matches_hand_computation_and_masks_padding() {
        let dev = Device::Cpu;
        // One row, three positions, vocab 2. Uniform logits → each prediction costs ln 2.
        let logits = Tensor::zeros((1, 3, 2), DType::F32, &dev).unwrap();
        let labels = Tensor::new(&[[0u32, 1, 0]], &dev).unwrap();
        let full = Tensor::new(&[[1u32, 1, 1]], &dev).unwrap();
        let (sum, count) = shifted_nll(&logits, &labels, &full).unwrap();
        assert!((sum.to_scalar::<f32>().unwrap() - 2.0 * 2f32.ln()).abs() < 1e-6);
        assert_eq!(count.to_scalar::<f32>().unwrap(), 2.0);
        let padded = Tensor::new(&[[1u32, 1, 0]], &dev).unwrap();
        let (sum, count) = shifted_nll(&logits, &labels, &padded).unwrap();
        assert!((sum.to_scalar::<f32>().unwrap() - 2f32.ln()).abs() < 1e-6);
        assert_eq!(count.to_scalar::<f32>().unwrap(), 1.0);
    }
}
