//! Activation recomputation (gradient checkpointing): a training step that keeps, of each block's
//! activations, only its input, and runs the block again in backward.
//!
//! A plain step keeps every intermediate tensor of every block (attention scores and
//! probabilities, the FFN's wide activations, dropout masks) until backward, which grows with
//! layers × sequence² and is what makes long sequences and large models run out of memory. Here:
//!
//! 1. **Forward.** The embeddings and each block run in turn; each output is copied into a fresh
//!    variable and the block's graph is dropped, so only `num_blocks + 1` hidden states stay. The
//!    dropout generator's state is saved before each piece. The head then runs on the last hidden
//!    state with its graph kept, and the objective reads the hidden states as those variables.
//! 2. **Backward.** The loss's backward gives the head's parameter gradients and the gradient of
//!    the loss with respect to each hidden state the loss read. Then, from the last block to the
//!    first: the block runs again from its saved input with the dropout state it first saw (so it
//!    draws the same masks), `sum(output · incoming gradient)` is backpropagated through it alone,
//!    its parameter gradients join the store and its input's gradient flows to the block before.
//!    The embeddings last.
//!
//! candle's custom ops return only their inputs' gradients, not parameters', so the recomputation
//! is driven here, piece by piece, instead of as one op in the graph. It costs about one more
//! forward pass per step. Layers with forward side effects (activation observers, recorders) see
//! the second run marked as a replay ([`crate::layers::replay`]) and do not apply them twice.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use crate::data::Batch;
use crate::layers::replay::Replaying;
use crate::models::common::DropoutRng;
use crate::models::{LayeredModel, Outputs, TaskOutput};

/// A forward pass that kept only each block's input: its output, and what backward needs to
/// recompute the blocks.
pub struct RecomputingForward<'m> {
    model: &'m dyn LayeredModel,
    /// The embeddings' output, then each block's output: block `i` reads `hidden[i]`, the head
    /// `hidden[num_blocks]`.
    hidden: Vec<Var>,
    /// The dropout state before the embeddings (`[0]`) and before block `i` (`[i + 1]`); `None`
    /// without dropout (evaluation).
    dropout_states: Vec<Option<ChaCha8Rng>>,
    bias: Tensor,
    output: TaskOutput,
}

impl<'m> RecomputingForward<'m> {
    /// Runs `model` on `batch`, keeping each block's input only. Attention maps cannot be asked
    /// for (they are per-block activations, the memory this saves).
    ///
    /// # Errors
    /// A forward failure, or `want.attentions`.
    pub fn run(
        model: &'m dyn LayeredModel,
        batch: &Batch,
        want: Outputs,
        dropout: Option<&DropoutRng>,
    ) -> Result<Self> {
        if want.attentions {
            candle_core::bail!(
                "gradient checkpointing cannot return attention maps: an objective that reads \
                 them needs every block's activations kept"
            );
        }
        let state = || dropout.map(DropoutRng::state);
        let mut dropout_states = Vec::with_capacity(model.num_blocks() + 1);
        dropout_states.push(state());
        let embedded = model.embed(batch, dropout)?;
        let bias = model.attention_bias(batch, embedded.dtype())?;
        // `from_tensor` copies the values into a new variable: the graph behind them is dropped.
        let mut hidden = vec![Var::from_tensor(&embedded)?];
        drop(embedded);
        for index in 0..model.num_blocks() {
            dropout_states.push(state());
            let next = model.block(index, hidden[index].as_tensor(), &bias, dropout)?;
            hidden.push(Var::from_tensor(&next)?);
        }
        let last = hidden.last().map(Var::as_tensor).cloned();
        let Some(last) = last else {
            candle_core::bail!("the model produced no hidden state");
        };
        let logits = model.head(&last, dropout)?;
        let output = TaskOutput {
            logits,
            hidden_states: if want.hidden_states {
                hidden.iter().map(|v| v.as_tensor().clone()).collect()
            } else {
                Vec::new()
            },
            attentions: Vec::new(),
        };
        Ok(Self {
            model,
            hidden,
            dropout_states,
            bias,
            output,
        })
    }

    /// The logits (and hidden states, when asked for) to compute the loss from.
    pub fn output(&self) -> &TaskOutput {
        &self.output
    }

    /// The gradients of `loss` (computed from [`Self::output`]) with respect to `vars`, the
    /// blocks' and embeddings' parameters included. Only `vars` are kept: backward also gives
    /// gradients for constants (dropout masks, the bias), which would otherwise pile up over the
    /// blocks.
    ///
    /// # Errors
    /// A forward or backward failure while recomputing.
    pub fn backward(
        self,
        batch: &Batch,
        loss: &Tensor,
        vars: &[(String, Var)],
    ) -> Result<GradStore> {
        let Self {
            model,
            hidden,
            dropout_states,
            bias,
            output,
        } = self;
        let mut head_grads = loss.backward()?;
        // The head's graph (with the objective's) is the only one kept: free it once walked.
        drop(output);
        let mut grads = GradStore::default();
        let _replaying = Replaying::begin();
        // What the loss reads of each hidden state directly (the last one: through the head).
        let mut direct: Vec<Option<Tensor>> = hidden
            .iter()
            .map(|h| head_grads.remove(h.as_tensor()))
            .collect();
        let mut incoming = direct.pop().flatten();
        move_var_grads(head_grads, &mut grads, vars)?;
        for index in (0..model.num_blocks()).rev() {
            let input = &hidden[index];
            let direct = direct[index].take();
            let Some(upstream) = incoming.take() else {
                // Nothing after this block reaches the loss: only what reads its input directly.
                incoming = direct;
                continue;
            };
            let dropout = dropout_states[index + 1]
                .clone()
                .map(DropoutRng::from_state);
            let recomputed = model.block(index, input.as_tensor(), &bias, dropout.as_ref())?;
            let mut block_grads = recomputed.mul(&upstream)?.sum_all()?.backward()?;
            let through = block_grads.remove(input.as_tensor());
            move_var_grads(block_grads, &mut grads, vars)?;
            incoming = match (through, direct) {
                (Some(a), Some(b)) => Some(a.add(&b)?),
                (a, b) => a.or(b),
            };
        }
        if let Some(upstream) = incoming {
            let dropout = dropout_states[0].clone().map(DropoutRng::from_state);
            let embedded = model.embed(batch, dropout.as_ref())?;
            let embed_grads = embedded.mul(&upstream)?.sum_all()?.backward()?;
            move_var_grads(embed_grads, &mut grads, vars)?;
        }
        Ok(grads)
    }
}

/// Moves the gradients of `vars` from `from` into `into`, adding to what is there (a weight used in
/// two pieces, such as tied embeddings).
fn move_var_grads(mut from: GradStore, into: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
    for (_, var) in vars {
        let Some(grad) = from.remove(var.as_tensor()) else {
            continue;
        };
        let total = match into.remove(var.as_tensor()) {
            Some(before) => before.add(&grad)?,
            None => grad,
        };
        into.insert(var.as_tensor(), total);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
