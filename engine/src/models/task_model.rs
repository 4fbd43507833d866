//! The family-independent face of a model built for a task: what training objectives, the
//! trainer and evaluation see, so none of them matches on a model family.

use std::fmt::Debug;

use candle_core::{DType, Result, Tensor};

use super::bert::{BertForSequenceClassification, BertInput};
use super::common::DropoutRng;
use super::llama::LlamaForCausalLm;
use crate::data::Batch;
use crate::spec::TaskType;

/// Which optional outputs a forward pass returns besides the logits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    /// The embeddings' output followed by every layer's output.
    pub hidden_states: bool,
    /// Every layer's attention probabilities `(batch, heads, seq, seq)`.
    pub attentions: bool,
}

impl Outputs {
    /// Logits only.
    pub const LOGITS: Outputs = Outputs {
        hidden_states: false,
        attentions: false,
    };

    /// Everything either `self` or `other` asks for.
    pub fn union(self, other: Outputs) -> Outputs {
        Outputs {
            hidden_states: self.hidden_states || other.hidden_states,
            attentions: self.attentions || other.attentions,
        }
    }
}

/// What one forward pass of a [`TaskModel`] produced.
#[derive(Clone, Debug)]
pub struct TaskOutput {
    /// f32 logits: `(batch, num_labels)` for classification, `(batch, seq, vocab)` for language
    /// modelling.
    pub logits: Tensor,
    /// `num_layers + 1` tensors `(batch, seq, hidden)` when asked for ([`Outputs::hidden_states`]),
    /// else empty.
    pub hidden_states: Vec<Tensor>,
    /// `num_layers` tensors when asked for ([`Outputs::attentions`]), else empty.
    pub attentions: Vec<Tensor>,
}

/// A model built for a task by its [`crate::family::ModelFamily`].
pub trait TaskModel: Send + Sync + Debug {
    /// The task the model's head does.
    fn task(&self) -> TaskType;

    /// The number of transformer layers (blocks).
    fn num_layers(&self) -> usize;

    /// Runs the model on `batch`; dropout is active when `dropout` is given (training).
    ///
    /// # Errors
    /// A forward-pass failure (shapes, ids out of range, sequences too long).
    fn forward(
        &self,
        batch: &Batch,
        want: Outputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<TaskOutput>;

    /// The task's own loss of `out` on `batch` (cross-entropy, or next-token NLL), a scalar.
    ///
    /// # Errors
    /// Shape mismatches between the output and the batch's labels.
    fn task_loss(&self, out: &TaskOutput, batch: &Batch) -> Result<Tensor> {
        crate::task::task_loss(self.task(), out, batch)
    }

    /// The model as embeddings, blocks and head run one at a time, for activation recomputation;
    /// `None` when it cannot be split so.
    fn layered(&self) -> Option<&dyn LayeredModel> {
        None
    }
}

/// A model run piece by piece: embeddings, each block, then the head. Running [`Self::embed`],
/// every [`Self::block`] in order and [`Self::head`] computes what [`TaskModel::forward`] does and
/// draws dropout in the same order, so a block can be run again from its saved input with the
/// dropout state it first saw (gradient checkpointing, [`crate::train::recompute`]).
pub trait LayeredModel {
    /// The number of blocks.
    fn num_blocks(&self) -> usize;

    /// The embeddings' output `(batch, seq, hidden)`, the first block's input.
    ///
    /// # Errors
    /// Ids out of range, or sequences longer than the position table.
    fn embed(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> Result<Tensor>;

    /// The additive attention bias every block of this batch reads (padding, and the causal mask
    /// of a decoder), in `dtype`.
    ///
    /// # Errors
    /// A mask of the wrong shape.
    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor>;

    /// Block `index` applied to `x`.
    ///
    /// # Errors
    /// An index out of range or a shape mismatch.
    fn block(
        &self,
        index: usize,
        x: &Tensor,
        bias: &Tensor,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor>;

    /// The f32 logits from the last block's output.
    ///
    /// # Errors
    /// A shape mismatch.
    fn head(&self, last_hidden: &Tensor, dropout: Option<&DropoutRng>) -> Result<Tensor>;
}

/// Keeps the optional outputs that were asked for.
fn select(
    want: Outputs,
    hidden: Vec<Tensor>,
    attentions: Vec<Tensor>,
) -> (Vec<Tensor>, Vec<Tensor>) {
    (
        if want.hidden_states {
            hidden
        } else {
            Vec::new()
        },
        attentions,
    )
}

impl TaskModel for BertForSequenceClassification {
    fn task(&self) -> TaskType {
        TaskType::TextClassification
    }

    fn num_layers(&self) -> usize {
        self.bert().num_layers()
    }

    fn forward(
        &self,
        batch: &Batch,
        want: Outputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<TaskOutput> {
        let input = BertInput {
            input_ids: &batch.input_ids,
            token_type_ids: Some(&batch.token_type_ids),
            attention_mask: Some(&batch.attention_mask),
        };
        let out = self.forward_with(input, want, dropout)?;
        let (hidden_states, attentions) = select(want, out.hidden_states, out.attentions);
        Ok(TaskOutput {
            logits: out.logits.to_dtype(DType::F32)?,
            hidden_states,
            attentions,
        })
    }

    fn layered(&self) -> Option<&dyn LayeredModel> {
        Some(self)
    }
}

impl TaskModel for LlamaForCausalLm {
    fn task(&self) -> TaskType {
        TaskType::LanguageModeling
    }

    fn num_layers(&self) -> usize {
        LlamaForCausalLm::num_layers(self)
    }

    fn forward(
        &self,
        batch: &Batch,
        want: Outputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<TaskOutput> {
        let out =
            self.forward_with(&batch.input_ids, Some(&batch.attention_mask), want, dropout)?;
        let (hidden_states, attentions) = select(want, out.hidden_states, out.attentions);
        Ok(TaskOutput {
            logits: out.logits.to_dtype(DType::F32)?,
            hidden_states,
            attentions,
        })
    }

    fn layered(&self) -> Option<&dyn LayeredModel> {
        Some(self)
    }
}
