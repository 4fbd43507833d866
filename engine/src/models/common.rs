//! Pieces shared by the model families: activations, embeddings, norms, dropout and attention masks.

use std::sync::Mutex;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::ops;

/// Hugging Face's initialisation for weights: normal with standard deviation 0.02.
pub(crate) const HF_WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Activation functions by their Hugging Face `hidden_act` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (erf), BERT's `gelu`.
    Gelu,
    /// Tanh-approximated GELU.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// ReLU.
    Relu,
    /// SiLU / swish, Llama's `silu`.
    #[serde(alias = "swish")]
    Silu,
}

impl Activation {
    /// Applies the activation.
    ///
    /// # Errors
    /// Fails only on unsupported dtypes.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => ops::gelu_erf(x),
            Activation::GeluNew => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

/// A lookup table `(num_embeddings, dim)`; differentiable through `index_select`.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// Reads `weight` under `vb`.
    ///
    /// # Errors
    /// Fails when the weight is missing or has the wrong shape.
    pub fn load(vb: VarBuilder, num_embeddings: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints((num_embeddings, dim), "weight", HF_WEIGHT_INIT)?,
        })
    }

    /// The table.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Looks up integer ids of any shape, appending the embedding dimension.
    ///
    /// # Errors
    /// Fails on an id outside the table.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(1)?);
        self.weight
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)
    }
}

/// Layer norm with weight and bias (`LayerNorm.weight`, `LayerNorm.bias` in BERT checkpoints).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` under `vb`.
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    /// Normalises over the last dimension.
    ///
    /// # Errors
    /// Fails when the last dimension does not match.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// RMS norm with a weight only (Llama's `input_layernorm`, `norm`, ...).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Reads `weight` under `vb`.
    ///
    /// # Errors
    /// Fails when the weight is missing or has the wrong shape.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
            eps,
        })
    }

    /// Normalises over the last dimension.
    ///
    /// # Errors
    /// Fails when the last dimension does not match.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, &self.weight, self.eps)
    }
}

/// The seeded source of dropout masks. Passing one to a forward pass turns dropout on (training);
/// passing none turns it off (evaluation). Its state can be saved and restored for exact resume.
#[derive(Debug)]
pub struct DropoutRng {
    rng: Mutex<ChaCha8Rng>,
}

impl DropoutRng {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self::from_state(ChaCha8Rng::seed_from_u64(seed))
    }

    /// A source continuing from a saved state.
    pub fn from_state(rng: ChaCha8Rng) -> Self {
        Self {
            rng: Mutex::new(rng),
        }
    }

    /// The current state, to save in a checkpoint.
    pub fn state(&self) -> ChaCha8Rng {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A fresh seed for a kernel that draws its own dropout mask (fused attention), taken from this
    /// generator so a restored state replays it.
    pub fn next_seed(&self) -> u64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).gen()
    }
}

/// Inverted dropout: zeroes elements with probability `p` and rescales the rest, only when `rng` is
/// given (training).
///
/// # Errors
/// Fails when `p` is not in `[0, 1)`.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&DropoutRng>) -> Result<Tensor> {
    let Some(rng) = rng else { return Ok(x.clone()) };
    if p == 0.0 {
        return Ok(x.clone());
    }
    // One seed per mask from the generator; the mask is a function of it (`ops::dropout_factors`),
    // the same on every device, and a restored generator state replays it.
    ops::dropout(x, p, rng.next_seed())
}

/// The additive value for masked attention positions: large and negative but finite in every dtype
/// (`f32::MIN` overflows to `-inf` in f16/bf16 and `-inf - -inf` gives NaN in softmax).
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => -1e4,
        _ => -1e9,
    }
}

/// Turns a `(batch, seq)` 0/1 padding mask (any numeric dtype) into an additive bias
/// `(batch, 1, 1, seq)` in `dtype`: 0 where attended, [`mask_value`] where padded.
///
/// # Errors
/// Fails when the mask is not 2-D.
pub fn padding_bias(attention_mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = attention_mask.dims2()?;
    let keep = attention_mask.to_dtype(DType::F32)?;
    let bias = ((keep - 1.0)? * -mask_value(dtype))?;
    bias.to_dtype(dtype)?.reshape((b, 1, 1, s))
}

/// Checks that the layer at `path` takes `expected` inputs: with widths read from the stored
/// tensors, a checkpoint whose tensors disagree with each other is refused naming the tensor.
///
/// # Errors
/// A message naming `path.weight`, its input width and the expected one.
pub fn expect_in_features(
    layer: &dyn crate::layers::LinearLayer,
    path: &str,
    expected: usize,
) -> Result<()> {
    if layer.in_features() != expected {
        candle_core::bail!(
            "{path}.weight has {} columns, but its input is {expected} wide",
            layer.in_features()
        );
    }
    Ok(())
}

/// Checks that the layer at `path` gives `expected` outputs (see [`expect_in_features`]).
///
/// # Errors
/// A message naming `path.weight`, its output width and the expected one.
pub fn expect_out_features(
    layer: &dyn crate::layers::LinearLayer,
    path: &str,
    expected: usize,
) -> Result<()> {
    if layer.out_features() != expected {
        candle_core::bail!(
            "{path}.weight has {} rows, but its output must be {expected} wide",
            layer.out_features()
        );
    }
    Ok(())
}
