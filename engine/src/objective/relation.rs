//! Relation knowledge: the student learns how the teacher relates the samples of a batch to each
//! other, not the teacher's vectors themselves (relational KD, Park et al. 2019; contrastive
//! representation distillation, Tian et al. 2020). Each sample is one pooled vector of the last
//! hidden states.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::feature::pool;
use super::{Objective, ObjectiveInput};
use crate::models::Outputs;

/// How the batch's relations are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RelationLoss {
    /// Mean squared difference of the two cosine-similarity matrices.
    #[default]
    Mse,
    /// KL divergence from each teacher row to the student's, rows softened at the temperature,
    /// a sample's similarity to itself left out.
    Kl,
    /// InfoNCE: each student vector must pick its own teacher vector among the batch's, by
    /// cosine similarity at the temperature.
    Infonce,
}

/// Which vector stands for a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mask-weighted mean of the last hidden states.
    #[default]
    Mean,
    /// The first token's last hidden state (`[CLS]`).
    Cls,
}

/// Rows scaled to unit length.
fn normalized(x: &Tensor) -> Result<Tensor> {
    let norms = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-8f32, f32::MAX)?;
    x.broadcast_div(&norms)
}

/// A large negative number on the diagonal of an `n × n` matrix, zero elsewhere: masks a
/// sample's similarity to itself out of a softmax.
fn diagonal_mask(n: usize, device: &Device) -> Result<Tensor> {
    Tensor::eye(n, DType::F32, device)? * -1e4
}

/// Relation distillation over the batch's pooled last hidden states; the teacher is the first
/// frozen model.
#[derive(Debug)]
pub struct RelationKd {
    loss: RelationLoss,
    pooling: Pooling,
    temperature: f64,
    /// InfoNCE compares student and teacher vectors directly: a `(teacher width, student width)`
    /// projection when the widths differ.
    projection: Option<Var>,
}

impl RelationKd {
    /// Relation knowledge by `loss` at `temperature` (of `kl` and `infonce`); `widths` is
    /// `(student, teacher)` hidden size.
    ///
    /// # Errors
    /// A temperature that is not positive, or InfoNCE between different widths without
    /// `projection`.
    pub fn new(
        loss: RelationLoss,
        pooling: Pooling,
        temperature: f64,
        widths: (usize, usize),
        projection: bool,
        device: &Device,
    ) -> Result<Self> {
        if !(temperature > 0.0 && temperature.is_finite()) {
            candle_core::bail!("the relation temperature must be positive, got {temperature}");
        }
        let (student, teacher) = widths;
        let projection = match loss {
            RelationLoss::Infonce if student != teacher => {
                if !projection {
                    candle_core::bail!(
                        "the student's hidden states are {student} wide and the teacher's \
                         {teacher}: InfoNCE needs feature.projection"
                    );
                }
                let eye = Tensor::eye(teacher.max(student), DType::F32, device)?
                    .narrow(0, 0, teacher)?
                    .narrow(1, 0, student)?;
                Some(Var::from_tensor(&eye)?)
            }
            _ => None,
        };
        Ok(Self {
            loss,
            pooling,
            temperature,
            projection,
        })
    }
}

impl Objective for RelationKd {
    fn name(&self) -> String {
        "relation".into()
    }

    fn model_outputs(&self) -> Outputs {
        Outputs {
            hidden_states: true,
            attentions: false,
        }
    }

    fn frozen_outputs(&self) -> Outputs {
        self.model_outputs()
    }

    fn frozen_models(&self) -> usize {
        1
    }

    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor> {
        let Some(teacher) = input.frozen.first() else {
            candle_core::bail!("relation distillation needs a teacher");
        };
        let (Some(s), Some(t)) = (
            input.output.hidden_states.last(),
            teacher.hidden_states.last(),
        ) else {
            candle_core::bail!("relation distillation needs the models' hidden states");
        };
        let mask = &input.batch.attention_mask;
        let mean = self.pooling == Pooling::Mean;
        let s = normalized(&pool(&s.to_dtype(DType::F32)?, mask, mean)?)?;
        let t = normalized(&pool(&t.to_dtype(DType::F32)?, mask, mean)?)?;
        let n = s.dim(0)?;
        let tau = self.temperature;
        match self.loss {
            RelationLoss::Mse => {
                let (ss, tt) = (s.matmul(&s.t()?)?, t.matmul(&t.t()?)?);
                (ss - tt)?.sqr()?.mean_all()
            }
            RelationLoss::Kl => {
                if n < 2 {
                    return Tensor::zeros((), DType::F32, s.device());
                }
                let off = diagonal_mask(n, s.device())?;
                let ss = ((s.matmul(&s.t()?)? / tau)? + &off)?;
                let tt = ((t.matmul(&t.t()?)? / tau)? + &off)?;
                let log_s = candle_nn::ops::log_softmax(&ss, D::Minus1)?;
                let log_t = candle_nn::ops::log_softmax(&tt, D::Minus1)?;
                (log_t.exp()? * (log_t - log_s)?)?
                    .sum(D::Minus1)?
                    .mean_all()
            }
            RelationLoss::Infonce => {
                let s = match &self.projection {
                    Some(w) => normalized(&s.matmul(&w.as_tensor().t()?)?)?,
                    None => s,
                };
                if s.dim(1)? != t.dim(1)? {
                    candle_core::bail!(
                        "InfoNCE compares student vectors {:?} with teacher vectors {:?}: the widths differ",
                        s.dims(),
                        t.dims()
                    );
                }
                let logits = (s.matmul(&t.t()?)? / tau)?;
                let own = Tensor::arange(0u32, n as u32, s.device())?;
                candle_nn::loss::cross_entropy(&logits, &own)
            }
        }
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.projection
            .iter()
            .map(|v| ("distill.relation_projection".to_owned(), v.clone()))
            .collect()
    }
}
