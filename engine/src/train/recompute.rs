//! Activation recomputation (gradient checkpointing): a training step that keeps, of each block's
//! activations, only its input, and runs the block again in backward.
//!
//! A plain step keeps every intermediate tensor of every block (attention scores and
//! probabilities, the FFN's wide activations, dropout masks) until backward, which grows with
//! layers × sequence² and is what makes long sequences and large models run out of memory. Here:
//!
//! 1. **Forward.** The embeddings and each block run in turn; each output that carries a gradient
//!    is copied into a fresh variable (backward needs the gradient with respect to it) and the
//!    piece's graph is dropped, so only `num_blocks + 1` hidden states stay. The dropout
//!    generator's state is saved before each piece. The head then runs on the last hidden state
//!    with its graph kept, and the objective reads the hidden states as those tensors.
//! 2. **Backward.** The loss's backward gives the head's parameter gradients and the gradient of
//!    the loss with respect to each hidden state the loss read; the loss's graph is then freed.
//!    From the last block down to the lowest one that trains (or feeds one that does): the block
//!    runs again from its saved input with the dropout state it first saw (so it draws the same
//!    masks), `sum(output · incoming gradient)` is backpropagated through it alone, its
//!    parameter gradients join the store and its input's gradient flows to the block before.
//!    The embeddings last, when they train. Every gradient passed on is detached, so no backward
//!    pass walks another's graph.
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
    hidden: Vec<Input>,
    /// The dropout state before the embeddings (`[0]`) and before block `i` (`[i + 1]`); `None`
    /// without dropout (evaluation).
    dropout_states: Vec<Option<ChaCha8Rng>>,
    bias: Tensor,
    output: TaskOutput,
}

/// A saved hidden state.
enum Input {
    /// It depends on trained parameters (it carried a gradient): backward needs the gradient
    /// with respect to it, and the pieces after it see an input that tracks one, as in a plain
    /// step (QAT observers tell training batches by it).
    Var(Var),
    /// Nothing at or before it trains.
    Plain(Tensor),
}

impl Input {
    /// Keeps a piece's output: its values copied into a fresh variable when it carried a gradient
    /// (the piece's graph is dropped with `output`), else as it is (it has no graph).
    fn keep(output: Tensor) -> Result<Self> {
        Ok(if output.track_op() {
            Input::Var(Var::from_tensor(&output)?)
        } else {
            Input::Plain(output)
        })
    }

    fn tensor(&self) -> &Tensor {
        match self {
            Input::Var(v) => v.as_tensor(),
            Input::Plain(t) => t,
        }
    }

    fn var(&self) -> Option<&Tensor> {
        match self {
            Input::Var(v) => Some(v.as_tensor()),
            Input::Plain(_) => None,
        }
    }
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
        let blocks = model.num_blocks();
        let mut dropout_states = Vec::with_capacity(blocks + 1);
        dropout_states.push(state());
        let embedded = model.embed(batch, dropout)?;
        let bias = model.attention_bias(batch, embedded.dtype())?;
        let mut hidden = vec![Input::keep(embedded)?];
        for index in 0..blocks {
            dropout_states.push(state());
            let next = model.block(index, hidden[index].tensor(), &bias, dropout)?;
            hidden.push(Input::keep(next)?);
        }
        let Some(last) = hidden.last().map(|h| h.tensor().clone()) else {
            candle_core::bail!("the model produced no hidden state");
        };
        let logits = model.head(&last, dropout)?;
        let output = TaskOutput {
            logits,
            hidden_states: if want.hidden_states {
                hidden.iter().map(|h| h.tensor().clone()).collect()
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
    /// blocks. `loss` is taken so that its graph (the head's, the objective's, often the largest
    /// tensors of a language model's step) is freed before the blocks rerun; keep
    /// `loss.detach()` to report it. Pieces below the lowest trained one are not rerun.
    ///
    /// # Errors
    /// A forward or backward failure while recomputing.
    pub fn backward(
        self,
        batch: &Batch,
        loss: Tensor,
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
        drop(loss);
        drop(output);
        let mut grads = GradStore::default();
        let _replaying = Replaying::begin();
        // What the loss reads of each hidden state directly (the last one: through the head).
        // Detached: on candle's composed ops a gradient can carry a graph of its own, which the
        // reruns' backward passes must not walk.
        let mut direct: Vec<Option<Tensor>> = hidden
            .iter()
            .map(|h| {
                h.var()
                    .and_then(|v| head_grads.remove(v))
                    .map(|g| g.detach())
            })
            .collect();
        let mut incoming = direct.pop().flatten();
        move_var_grads(head_grads, &mut grads, vars)?;
        for index in (0..model.num_blocks()).rev() {
            // The block's output carried no gradient: nothing at or below it trains.
            if hidden[index + 1].var().is_none() {
                return Ok(grads);
            }
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
            let recomputed = model.block(index, input.tensor(), &bias, dropout.as_ref())?;
            let mut block_grads = recomputed.mul(&upstream)?.sum_all()?.backward()?;
            let through = input
                .var()
                .and_then(|v| block_grads.remove(v))
                .map(|g| g.detach());
            move_var_grads(block_grads, &mut grads, vars)?;
            incoming = match (through, direct) {
                (Some(a), Some(b)) => Some(a.add(&b)?),
                (a, b) => a.or(b),
            };
        }
        if let (Some(_), Some(upstream)) = (hidden[0].var(), incoming) {
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
        let Some(grad) = from.remove(var.as_tensor()).map(|g| g.detach()) else {
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
