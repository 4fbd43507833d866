//! Feature knowledge: the student's hidden states pulled towards the teacher's on a map of layers
//! (FitNets, DistilBERT's cosine loss, TinyBERT's hidden-state and attention losses). When the
//! widths differ a learned linear projection maps the student's states to the teacher's width; it
//! is the objective's own parameter, trained with the student and never part of the saved model.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Objective, ObjectiveInput};
use crate::models::Outputs;

/// How two hidden-state vectors are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum FeatureLoss {
    /// Mean squared difference per element.
    #[default]
    Mse,
    /// `1 − cos(student, teacher)` per vector.
    Cosine,
}

/// Which vectors of a sequence are compared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Tokens {
    /// Every real (unpadded) token.
    #[default]
    All,
    /// The first token (`[CLS]` of an encoder).
    Cls,
    /// The mask-weighted mean of the real tokens.
    Mean,
}

/// One vector per sample from `(batch, seq, hidden)` states: the first token or the mean over
/// `mask` `(batch, seq)`.
///
/// # Errors
/// Shape mismatches.
pub fn pool(hidden: &Tensor, mask: &Tensor, mean: bool) -> Result<Tensor> {
    if !mean {
        return hidden.narrow(1, 0, 1)?.squeeze(1);
    }
    let mask = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
    let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
    let count = mask.sum(1)?.clamp(1f32, f32::MAX)?;
    sum.broadcast_div(&count)
}

/// `1 − cos` of the rows of two `(n, d)` matrices, `(n,)`.
fn cosine_distance(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dot = (a * b)?.sum(D::Minus1)?;
    let norms = (a.sqr()?.sum(D::Minus1)? * b.sqr()?.sum(D::Minus1)?)?
        .sqrt()?
        .clamp(1e-8f32, f32::MAX)?;
    1.0 - (dot / norms)?
}

/// Hidden-state (and optionally attention) matching between mapped student and teacher layers;
/// the teacher is the first frozen model. The loss is the mean over the mapped layers.
#[derive(Debug)]
pub struct FeatureKd {
    /// `(student layer, teacher layer)`, 0-based: the layer's output is matched.
    pairs: Vec<(usize, usize)>,
    loss: FeatureLoss,
    tokens: Tokens,
    /// One `(teacher width, student width)` matrix per pair when the widths differ.
    projections: Vec<Var>,
}

impl FeatureKd {
    /// Matches the outputs of `pairs` of layers; `widths` is `(student, teacher)` hidden size.
    /// With different widths and `projection`, each pair gets a learned projection starting as
    /// the truncated identity.
    ///
    /// # Errors
    /// No pairs, or different widths without `projection`.
    pub fn new(
        pairs: Vec<(usize, usize)>,
        loss: FeatureLoss,
        tokens: Tokens,
        widths: (usize, usize),
        projection: bool,
        device: &Device,
    ) -> Result<Self> {
        if pairs.is_empty() {
            candle_core::bail!("feature distillation needs at least one pair of layers");
        }
        let (student, teacher) = widths;
        let projections = if student == teacher {
            Vec::new()
        } else if !projection {
            candle_core::bail!(
                "the student's hidden states are {student} wide and the teacher's {teacher}: \
                 feature matching needs feature.projection"
            );
        } else {
            let eye = Tensor::eye(teacher.max(student), DType::F32, device)?
                .narrow(0, 0, teacher)?
                .narrow(1, 0, student)?;
            pairs
                .iter()
                .map(|_| Var::from_tensor(&eye))
                .collect::<Result<Vec<_>>>()?
        };
        Ok(Self {
            pairs,
            loss,
            tokens,
            projections,
        })
    }

    /// The loss of one pair of `(batch, seq, width)` states.
    fn pair_loss(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        mask: &Tensor,
        projection: Option<&Var>,
    ) -> Result<Tensor> {
        let student = match projection {
            Some(w) => student.broadcast_matmul(&w.as_tensor().t()?)?,
            None => student.clone(),
        };
        let width = teacher.dim(D::Minus1)?;
        if student.dim(D::Minus1)? != width {
            candle_core::bail!(
                "student hidden states {:?} and teacher hidden states {:?} differ in width",
                student.dims(),
                teacher.dims()
            );
        }
        // Rows to compare `(n, width)` and their weights `(n,)`.
        let (s, t, weights) = match self.tokens {
            Tokens::All => {
                let n = student.elem_count() / width;
                (
                    student.reshape((n, width))?,
                    teacher.reshape((n, width))?,
                    mask.to_dtype(DType::F32)?.flatten_all()?,
                )
            }
            Tokens::Cls | Tokens::Mean => {
                let mean = self.tokens == Tokens::Mean;
                let s = pool(&student, mask, mean)?;
                let rows = s.dim(0)?;
                (
                    s,
                    pool(teacher, mask, mean)?,
                    Tensor::ones(rows, DType::F32, student.device())?,
                )
            }
        };
        let per_row = match self.loss {
            FeatureLoss::Mse => ((s - t)?.sqr()?.sum(D::Minus1)? / width as f64)?,
            FeatureLoss::Cosine => cosine_distance(&s, &t)?,
        };
        let count = weights.sum_all()?.clamp(1f32, f32::MAX)?;
        (per_row * &weights)?.sum_all()?.broadcast_div(&count)
    }
}

impl Objective for FeatureKd {
    fn name(&self) -> String {
        "feature".into()
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
            candle_core::bail!("feature distillation needs a teacher");
        };
        let (student, teacher) = (&input.output.hidden_states, &teacher.hidden_states);
        let mut total: Option<Tensor> = None;
        for (i, &(s, t)) in self.pairs.iter().enumerate() {
            // hidden_states[0] is the embeddings' output; layer l's output is at l + 1.
            let (Some(sh), Some(th)) = (student.get(s + 1), teacher.get(t + 1)) else {
                candle_core::bail!(
                    "feature distillation maps student layer {s} to teacher layer {t}, but the \
                     student returned {} and the teacher {} hidden states",
                    student.len(),
                    teacher.len()
                );
            };
            let part =
                self.pair_loss(sh, th, &input.batch.attention_mask, self.projections.get(i))?;
            total = Some(match total {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        match total {
            Some(sum) => sum / self.pairs.len() as f64,
            None => candle_core::bail!("feature distillation has no pairs of layers"),
        }
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        self.projections
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("distill.feature_projection.{i}"), v.clone()))
            .collect()
    }
}

/// TinyBERT's attention knowledge: the student's attention probabilities of each mapped layer
/// pulled towards the teacher's, the squared difference summed over keys and averaged over heads
/// and real query positions, then over the mapped layers.
#[derive(Clone, Debug)]
pub struct AttentionKd {
    /// `(student layer, teacher layer)`, 0-based.
    pub pairs: Vec<(usize, usize)>,
}

impl Objective for AttentionKd {
    fn name(&self) -> String {
        "attention".into()
    }

    fn model_outputs(&self) -> Outputs {
        Outputs {
            hidden_states: false,
            attentions: true,
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
            candle_core::bail!("attention distillation needs a teacher");
        };
        let (student, teacher) = (&input.output.attentions, &teacher.attentions);
        // Real query positions `(batch, 1, seq)`, broadcast over heads.
        let queries = input
            .batch
            .attention_mask
            .to_dtype(DType::F32)?
            .unsqueeze(1)?;
        let mut total: Option<Tensor> = None;
        for &(s, t) in &self.pairs {
            let (Some(sa), Some(ta)) = (student.get(s), teacher.get(t)) else {
                candle_core::bail!(
                    "attention distillation maps student layer {s} to teacher layer {t}, but the \
                     student returned {} and the teacher {} attention maps",
                    student.len(),
                    teacher.len()
                );
            };
            if sa.dims() != ta.dims() {
                candle_core::bail!(
                    "student attention {:?} and teacher attention {:?} differ (head counts must agree)",
                    sa.dims(),
                    ta.dims()
                );
            }
            let heads = sa.dim(1)?;
            let per_query = (sa.to_dtype(DType::F32)? - ta.to_dtype(DType::F32)?)?
                .sqr()?
                .sum(D::Minus1)?;
            let weighted = per_query.broadcast_mul(&queries)?.sum_all()?;
            let count = (queries.sum_all()? * heads as f64)?.clamp(1f32, f32::MAX)?;
            let part = weighted.broadcast_div(&count)?;
            total = Some(match total {
                Some(sum) => (sum + part)?,
                None => part,
            });
        }
        match total {
            Some(sum) => sum / self.pairs.len().max(1) as f64,
            None => candle_core::bail!("attention distillation has no pairs of layers"),
        }
    }
}
