//! Training objectives: what the trainer minimises, computed from the outputs of the model being
//! trained and of any frozen models run beside it (teachers).
//!
//! The task loss is one objective ([`TaskLoss`]); a weighted sum of objectives is another
//! ([`WeightedSum`]); distillation losses are more. An objective may own trainable parameters
//! (a projection between a student's and a teacher's hidden widths): the trainer optimises them
//! with the model's.

mod feature;
mod relation;
mod response;
mod teacher_cache;

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

pub use feature::{pool, AttentionKd, FeatureKd, FeatureLoss, Tokens};
pub use relation::{Pooling, RelationKd, RelationLoss};
pub use response::ResponseKd;
pub use teacher_cache::TeacherCacheReport;

use crate::data::Batch;
use crate::models::common::DropoutRng;
use crate::models::{Outputs, TaskModel, TaskOutput};
use crate::train::recompute::RecomputingForward;
use crate::train::TrainTask;

/// What an objective sees for one batch.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveInput<'a> {
    /// The batch.
    pub batch: &'a Batch,
    /// The trained model, for its task loss.
    pub model: &'a dyn TaskModel,
    /// The trained model's outputs (with dropout in training).
    pub output: &'a TaskOutput,
    /// Each frozen model's outputs on the same batch, without dropout, in the order given to the
    /// trainer.
    pub frozen: &'a [TaskOutput],
}

/// A loss to minimise.
pub trait Objective: Send + Sync {
    /// A short name for reports (`task`, `0.5·task + 0.5·kl`).
    fn name(&self) -> String;

    /// The optional outputs the trained model's forward pass must return.
    fn model_outputs(&self) -> Outputs {
        Outputs::LOGITS
    }

    /// The optional outputs each frozen model's forward pass must return.
    fn frozen_outputs(&self) -> Outputs {
        Outputs::LOGITS
    }

    /// How many frozen models the objective reads (checked before training starts).
    fn frozen_models(&self) -> usize {
        0
    }

    /// The scalar loss of one batch.
    ///
    /// # Errors
    /// Shape mismatches between the outputs, or missing frozen outputs.
    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor>;

    /// Parameters the objective owns and the trainer optimises with the model's, by name.
    fn trainable(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    /// The loss as named, weighted parts whose weighted sum is [`Objective::loss`], so each part
    /// can be logged on its own. By default the loss is one part under the objective's name.
    ///
    /// # Errors
    /// As [`Objective::loss`].
    fn terms(&self, input: &ObjectiveInput<'_>) -> Result<Vec<LossTerm>> {
        Ok(vec![LossTerm {
            name: self.name(),
            weight: 1.0,
            value: self.loss(input)?,
        }])
    }
}

/// One named part of an objective's loss.
#[derive(Clone, Debug)]
pub struct LossTerm {
    /// The part's name (`task`, `response`, `feature`, `relation`).
    pub name: String,
    /// The factor it enters the total with.
    pub weight: f64,
    /// Its unweighted scalar value.
    pub value: Tensor,
}

/// The model's own task loss (cross-entropy or next-token NLL).
#[derive(Clone, Copy, Debug, Default)]
pub struct TaskLoss;

impl Objective for TaskLoss {
    fn name(&self) -> String {
        "task".into()
    }

    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor> {
        input.model.task_loss(input.output, input.batch)
    }
}

/// `Σ weight · objective`.
pub struct WeightedSum {
    terms: Vec<(f64, Box<dyn Objective>)>,
}

impl WeightedSum {
    /// The sum of `terms`.
    pub fn new(terms: Vec<(f64, Box<dyn Objective>)>) -> Self {
        Self { terms }
    }
}

impl Objective for WeightedSum {
    fn name(&self) -> String {
        self.terms
            .iter()
            .map(|(w, o)| format!("{w}·{}", o.name()))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn model_outputs(&self) -> Outputs {
        self.terms
            .iter()
            .fold(Outputs::LOGITS, |acc, (_, o)| acc.union(o.model_outputs()))
    }

    fn frozen_outputs(&self) -> Outputs {
        self.terms
            .iter()
            .fold(Outputs::LOGITS, |acc, (_, o)| acc.union(o.frozen_outputs()))
    }

    fn frozen_models(&self) -> usize {
        self.terms
            .iter()
            .map(|(_, o)| o.frozen_models())
            .max()
            .unwrap_or(0)
    }

    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor> {
        weighted_total(&self.terms(input)?)
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.terms.iter().flat_map(|(_, o)| o.trainable()).collect()
    }

    fn terms(&self, input: &ObjectiveInput<'_>) -> Result<Vec<LossTerm>> {
        let mut parts = Vec::new();
        for (weight, objective) in &self.terms {
            for term in objective.terms(input)? {
                parts.push(LossTerm {
                    weight: term.weight * weight,
                    ..term
                });
            }
        }
        Ok(parts)
    }
}

/// `Σ weight · value` of `terms`.
fn weighted_total(terms: &[LossTerm]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for term in terms {
        let part = (&term.value * term.weight)?;
        total = Some(match total {
            Some(sum) => (sum + part)?,
            None => part,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("a weighted sum of no objectives".into()))
}

/// The trainer's view of an objective: runs the trained model (with dropout) and the frozen models
/// (without) on each batch and hands their outputs to the objective. It keeps the unweighted
/// value of each of the objective's terms until the trainer takes them
/// ([`TrainTask::take_loss_terms`]).
pub struct ObjectiveTask<'a> {
    model: &'a dyn TaskModel,
    frozen: Vec<&'a dyn TaskModel>,
    objective: &'a dyn Objective,
    /// Per term: the sum of its values since the last take, and how many there were.
    seen: Mutex<BTreeMap<String, (f64, usize)>>,
    /// The frozen models' outputs kept per example (`cache_teacher`), if asked for.
    cache: Option<Mutex<teacher_cache::TeacherCache>>,
    /// Whether training steps recompute the blocks in backward ([`crate::train::recompute`]).
    recompute: bool,
}

impl<'a> ObjectiveTask<'a> {
    /// Trains `model` on `objective`, running `frozen` beside it in the order the objective reads
    /// their outputs.
    pub fn new(
        model: &'a dyn TaskModel,
        frozen: Vec<&'a dyn TaskModel>,
        objective: &'a dyn Objective,
    ) -> Self {
        Self {
            model,
            frozen,
            objective,
            seen: Mutex::new(BTreeMap::new()),
            cache: None,
            recompute: false,
        }
    }

    /// Trains with activation recomputation (gradient checkpointing): each block's activations
    /// are dropped after the forward pass and computed again in backward.
    ///
    /// # Errors
    /// A model that cannot be run block by block, or an objective that reads attention maps.
    pub fn with_recomputation(mut self) -> crate::Result<Self> {
        if self.model.layered().is_none() {
            return Err(crate::EngineError::InvalidSetting(
                "gradient_checkpointing: this model cannot be run block by block".into(),
            ));
        }
        if self.objective.model_outputs().attentions {
            return Err(crate::EngineError::InvalidSetting(format!(
                "gradient_checkpointing: objective {} reads the trained model's attention maps, \
                 which recomputation does not keep",
                self.objective.name()
            )));
        }
        self.recompute = true;
        Ok(self)
    }

    /// Keeps the frozen models' outputs per example, up to `budget_bytes`, so that an example
    /// seen again (the next epoch) does not run them again.
    pub fn with_teacher_cache(mut self, budget_bytes: usize) -> Self {
        self.cache = Some(Mutex::new(teacher_cache::TeacherCache::new(budget_bytes)));
        self
    }

    /// What the teacher cache did, if there is one.
    pub fn teacher_cache_report(&self) -> Option<TeacherCacheReport> {
        self.cache
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).report())
    }
}

impl ObjectiveTask<'_> {
    /// The objective's loss of the trained model's `output` on `batch`, the frozen models run
    /// (or read from the cache) beside it.
    fn loss_of(&self, batch: &Batch, output: &TaskOutput) -> Result<Tensor> {
        let want = self.objective.frozen_outputs();
        let compute = |batch: &Batch| {
            self.frozen
                .iter()
                .map(|m| m.forward(batch, want, None).map(detached))
                .collect::<Result<Vec<_>>>()
        };
        let frozen = match &self.cache {
            Some(cache) if !self.frozen.is_empty() => cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .outputs(batch, compute)?,
            _ => compute(batch)?,
        };
        let terms = self.objective.terms(&ObjectiveInput {
            batch,
            model: self.model,
            output,
            frozen: &frozen,
        })?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for term in &terms {
            let value = term.value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let entry = seen.entry(term.name.clone()).or_default();
            entry.0 += value;
            entry.1 += 1;
        }
        weighted_total(&terms)
    }
}

impl TrainTask for ObjectiveTask<'_> {
    fn loss(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        let output = self
            .model
            .forward(batch, self.objective.model_outputs(), dropout)?;
        self.loss_of(batch, &output)
    }

    fn loss_and_gradients(
        &self,
        batch: &Batch,
        dropout: Option<&DropoutRng>,
        vars: &[(String, Var)],
        loss_scale: f64,
    ) -> Result<(Tensor, GradStore)> {
        let layered = match self.model.layered() {
            Some(layered) if self.recompute => layered,
            _ => {
                let loss = self.loss(batch, dropout)?;
                let grads = crate::train::hooks::scaled(&loss, loss_scale)?.backward()?;
                return Ok((loss, grads));
            }
        };
        let forward =
            RecomputingForward::run(layered, batch, self.objective.model_outputs(), dropout)?;
        let loss = self.loss_of(batch, forward.output())?;
        let value = loss.detach();
        let scaled = crate::train::hooks::scaled(&loss, loss_scale)?;
        drop(loss);
        let grads = forward.backward(batch, scaled, vars)?;
        Ok((value, grads))
    }

    fn take_loss_terms(&self) -> Vec<(String, f64)> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *seen)
            .into_iter()
            .map(|(name, (sum, n))| (name, sum / n.max(1) as f64))
            .collect()
    }
}

/// Cuts a frozen model's outputs from the graph, so backward never walks into it.
fn detached(out: TaskOutput) -> TaskOutput {
    TaskOutput {
        logits: out.logits.detach(),
        hidden_states: out.hidden_states.iter().map(Tensor::detach).collect(),
        attentions: out.attentions.iter().map(Tensor::detach).collect(),
    }
}

#[cfg(test)]
mod tests;
