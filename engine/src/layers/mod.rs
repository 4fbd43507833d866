//! The pluggable linear layer: every projection of every model is an `Arc<dyn LinearLayer>`.
//!
//! Models never construct a concrete linear type and never match on a scheme (STYLE.md rule 11,
//! after mistral.rs's `QuantMethod`, kept small): they call [`LinearFactory::build`] with the module
//! path (`encoder.layer.0.attention.self.query`), and the factory's [`LinearPlan`] decides which
//! [`LinearKind`] that path gets. Compression stages (masked pruning, LoRA, fake-quant, quantized
//! inference) add variants here; models do not change.

mod block_avx2;
pub mod block_matmul;
mod dense;
mod fake_quant;
mod int8_amx;
mod int8_avx2;
pub mod int8_matmul;
mod int8_vnni;
#[cfg(test)]
mod kernel_tests;
mod lora;
mod observer;
mod quantized;
mod recording;
pub mod replay;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use globset::{Glob, GlobMatcher};

pub use dense::DenseLinear;
pub use fake_quant::{
    fake_quantize, fake_quantize_tokens, fake_quantize_with_scale, FakeQuantInputs, FakeQuantLinear,
};
pub use lora::LoraLinear;
pub use observer::{ActivationObservers, ObservedRange, OBSERVER_MOMENTUM};
pub use quantized::{KernelPath, QuantizedLinear};
pub use recording::{ActivationSample, InputRecorder, RecordingLinear, SampleLimits};

use crate::error::EngineError;
use crate::models::common::DropoutRng;

/// A trained dense layer's parts, for a model that fuses it with its neighbours
/// ([`LinearLayer::trained_dense_parts`]).
#[derive(Clone, Copy, Debug)]
pub struct DenseParts<'a> {
    /// `(out_features, in_features)`.
    pub weight: &'a Tensor,
    /// `(out_features)`, when the layer has one.
    pub bias: Option<&'a Tensor>,
    /// What its products multiply (bf16 under CPU mixed precision).
    pub products: crate::ops::Products,
}

/// A linear map `y = x Wᵀ + b` over the last dimension of `x`, in whatever form a scheme stores it.
pub trait LinearLayer: Send + Sync + Debug {
    /// Applies the layer to `x` of shape `(.., in_features)`, giving `(.., out_features)`.
    ///
    /// # Errors
    /// Fails when the last dimension of `x` is not `in_features` or the dtypes/devices disagree.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// As [`LinearLayer::forward`], in training when `rng` is given: a layer with a training-only
    /// part (a LoRA adapter's dropout) applies it then. Layers without one ignore `rng`.
    ///
    /// # Errors
    /// As [`LinearLayer::forward`].
    fn forward_t(&self, x: &Tensor, _rng: Option<&DropoutRng>) -> Result<Tensor> {
        self.forward(x)
    }

    /// The dense weight `(out_features, in_features)` when the variant keeps one (export, pruning).
    fn weight(&self) -> Option<&Tensor>;

    /// The weight `(out_features, in_features)`, bias and products when this layer computes
    /// exactly `x Wᵀ + b` on the CPU (f32 in and out) with a weight being trained, so that a model
    /// may stack it with its neighbours into one product (BERT's query, key and value). `None` for
    /// every other layer, which a caller then runs on its own.
    fn trained_dense_parts(&self) -> Option<DenseParts<'_>> {
        None
    }

    /// The bias `(out_features)`, if the layer has one.
    fn bias(&self) -> Option<&Tensor>;

    /// Size of the input's last dimension.
    fn in_features(&self) -> usize;

    /// Size of the output's last dimension.
    fn out_features(&self) -> usize;

    /// Which scheme this layer implements.
    fn kind(&self) -> LinearKind;
}

/// The schemes a linear layer can use; the factory is the only place that maps a kind to a type.
/// Pruning masks apply to any kind: they are kept beside the model and re-applied to the weights
/// after each optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LinearKind {
    /// A plain weight matrix and optional bias, trainable through the store's variables.
    #[default]
    Dense,
    /// Weight-only quantized, inference only ([`QuantizedLinear`]): runs on the packed weight a
    /// quantize stage stored, or quantizes the dense weight with this scheme when there is none.
    Quantized(crate::quant::QuantScheme),
    /// A base weight plus a trainable low-rank update `(alpha / rank) · B·A` ([`LoraLinear`]).
    Lora {
        /// The adapter's rank.
        rank: u32,
        /// The numerator of the update's scale.
        alpha: u32,
    },
    /// A LoRA adapter on a frozen base weight stored quantized with `base` and run on the quantized
    /// kernels, the input gradient passing through them (QLoRA, [`LoraLinear::load_quantized`]).
    QLora {
        /// The adapter's rank.
        rank: u32,
        /// The numerator of the update's scale.
        alpha: u32,
        /// The base weight's scheme.
        base: crate::quant::QuantScheme,
    },
    /// Weights quantized with `scheme` and dequantized in the forward pass (and inputs rounded to
    /// int8 as `inputs` says), trained through a straight-through estimator
    /// ([`FakeQuantLinear`]): quantization-aware training.
    FakeQuant {
        /// The scheme the weights will be stored with.
        scheme: crate::quant::QuantScheme,
        /// How inputs are rounded: not, per row (dynamic int8) or per tensor (static int8).
        inputs: FakeQuantInputs,
    },
}

/// Which [`LinearKind`] each module path gets: the first matching glob rule wins, else the default.
#[derive(Clone, Debug, Default)]
pub struct LinearPlan {
    rules: Vec<(GlobMatcher, LinearKind)>,
    default: LinearKind,
}

impl LinearPlan {
    /// A plan that makes every layer `kind`.
    pub fn uniform(kind: LinearKind) -> Self {
        Self {
            rules: Vec::new(),
            default: kind,
        }
    }

    /// Adds a rule: module paths matching the glob `pattern` (e.g. `encoder.layer.*.attention.*`) get
    /// `kind`. Earlier rules take precedence.
    ///
    /// # Errors
    /// Fails when `pattern` is not a valid glob.
    pub fn with_rule(mut self, pattern: &str, kind: LinearKind) -> crate::Result<Self> {
        let glob = Glob::new(pattern)
            .map_err(|e| EngineError::InvalidSetting(format!("layer pattern {pattern:?}: {e}")))?;
        self.rules.push((glob.compile_matcher(), kind));
        Ok(self)
    }

    /// Adds a rule that takes precedence over every earlier one (a later stage's choice).
    ///
    /// # Errors
    /// Fails when `pattern` is not a valid glob.
    pub fn overriding(mut self, pattern: &str, kind: LinearKind) -> crate::Result<Self> {
        let glob = Glob::new(pattern)
            .map_err(|e| EngineError::InvalidSetting(format!("layer pattern {pattern:?}: {e}")))?;
        self.rules.insert(0, (glob.compile_matcher(), kind));
        Ok(self)
    }

    /// The kind chosen for a module path.
    pub fn kind_for(&self, path: &str) -> LinearKind {
        self.rules
            .iter()
            .find(|(glob, _)| glob.is_match(path))
            .map_or(self.default, |(_, kind)| *kind)
    }
}

/// Quantized weights as a quantize stage stored them, by parameter name (`….weight`).
pub type PackedWeights = Arc<BTreeMap<String, Arc<crate::quant::QuantizedWeight>>>;

/// Builds every linear layer of a model; the one place that turns a [`LinearKind`] into a type.
#[derive(Clone, Debug, Default)]
pub struct LinearFactory {
    plan: LinearPlan,
    packed: PackedWeights,
    /// When set, every layer built records its inputs here (activation importance).
    recorder: Option<Arc<InputRecorder>>,
    /// The dropout probability LoRA layers apply to their adapter's input in training.
    lora_dropout: f64,
    /// Static int8: the calibrated input scale of each quantized module, by module path.
    input_scales: InputScales,
    /// QAT with per-tensor int8 inputs: the observed ranges the fake-quantized layers share.
    observers: Option<Arc<ActivationObservers>>,
    /// Mixed precision: the dtype dense layers compute their product in.
    compute_dtype: Option<DType>,
}

/// Calibrated input scales of statically quantized linear layers, by module path.
pub type InputScales = Arc<BTreeMap<String, f32>>;

impl LinearFactory {
    /// A factory following `plan`.
    pub fn new(plan: LinearPlan) -> Self {
        Self {
            plan,
            packed: PackedWeights::default(),
            recorder: None,
            lora_dropout: 0.0,
            input_scales: InputScales::default(),
            observers: None,
            compute_dtype: None,
        }
    }

    /// The same factory, building dense layers (and LoRA layers' dense bases) that compute their
    /// product in `dtype` from their f32 weights (mixed precision,
    /// [`DenseLinear::with_compute_dtype`]). Other kinds (QLoRA, quantized, fake-quantized)
    /// compute as they do.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }

    /// The same factory, building fake-quantized layers with per-tensor inputs that keep their
    /// ranges in `observers` (QAT for static int8).
    pub fn with_activation_observers(mut self, observers: Arc<ActivationObservers>) -> Self {
        self.observers = Some(observers);
        self
    }

    /// The same factory, building the quantized layers `scales` names with their inputs quantized
    /// with that fixed scale ([`QuantizedLinear::with_input_scale`]).
    pub fn with_input_scales(mut self, scales: InputScales) -> Self {
        self.input_scales = scales;
        self
    }

    /// The same factory, building LoRA layers that drop their adapter's input with probability `p`
    /// in training ([`LoraLinear::with_dropout`]).
    pub fn with_lora_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// The same factory, wrapping every layer so it records its inputs into `recorder`
    /// ([`RecordingLinear`]): calibration passes for activation importance.
    pub fn with_input_recorder(mut self, recorder: Arc<InputRecorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// The same factory, building quantized layers from `packed` where it holds their weight (the
    /// stored form, so nothing is quantized twice) instead of quantizing the dense weight.
    pub fn with_packed(mut self, packed: PackedWeights) -> Self {
        self.packed = packed;
        self
    }

    /// The plan this factory follows.
    pub fn plan(&self) -> &LinearPlan {
        &self.plan
    }

    /// Builds the layer at the module path of `vb` (its prefix, e.g.
    /// `encoder.layer.0.attention.self.query`), reading `weight` and, if `bias`, `bias` under it.
    ///
    /// `in_features` and `out_features` are the widths the config implies; a stored weight's own
    /// shape wins over them, so a physically shrunk layer (fewer heads or FFN neurons) loads. They
    /// size only a weight the store has to create. Models check that neighbouring layers agree.
    ///
    /// # Errors
    /// Fails when the weights are missing, a weight is not 2-D, or a bias does not match it.
    pub fn build(
        &self,
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Arc<dyn LinearLayer>> {
        let path = vb.prefix();
        let layer = self.build_kind(vb, in_features, out_features, bias)?;
        Ok(match &self.recorder {
            Some(recorder) => Arc::new(RecordingLinear::new(layer, path, recorder.clone())),
            None => layer,
        })
    }

    /// The layer the plan's kind for the module makes, unwrapped.
    fn build_kind(
        &self,
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Arc<dyn LinearLayer>> {
        let packed = self.packed.get(&format!("{}.weight", vb.prefix()));
        let (out_features, in_features) =
            if let (false, Some(weight)) = (vb.contains_tensor("weight"), packed) {
                // A QLoRA base held only in its quantized form: its own shape.
                match weight.dims()[..] {
                    [rows, cols] => (rows, cols),
                    ref dims => candle_core::bail!(
                        "{}.weight has shape {dims:?}; a linear weight is 2-D",
                        vb.prefix()
                    ),
                }
            } else if vb.contains_tensor("weight") {
                let stored = vb.get_unchecked("weight")?;
                stored.dims2().map_err(|_| {
                    candle_core::Error::Msg(format!(
                        "{}.weight has shape {:?}; a linear weight is 2-D",
                        vb.prefix(),
                        stored.dims()
                    ))
                })?
            } else {
                (out_features, in_features)
            };
        match (self.plan.kind_for(&vb.prefix()), packed) {
            (LinearKind::Dense, _) => {
                let layer = DenseLinear::load(vb, in_features, out_features, bias)?;
                Ok(Arc::new(match self.compute_dtype {
                    Some(dtype) => layer.with_compute_dtype(dtype),
                    None => layer,
                }))
            }
            (LinearKind::Quantized(_), Some(weight)) => {
                let weight = (**weight).clone();
                let bias = if bias {
                    Some(vb.get(out_features, "bias")?.detach())
                } else {
                    None
                };
                let layer = QuantizedLinear::new(weight, bias, vb.device())?;
                Ok(Arc::new(match self.input_scales.get(&vb.prefix()) {
                    Some(&scale) => layer.with_input_scale(scale, vb.device())?,
                    None => layer,
                }))
            }
            (LinearKind::Lora { rank, alpha }, _) => {
                let layer = LoraLinear::load(vb, in_features, out_features, bias, rank, alpha)?
                    .with_dropout(self.lora_dropout)?;
                Ok(Arc::new(match self.compute_dtype {
                    Some(dtype) => layer.with_base_compute_dtype(dtype)?,
                    None => layer,
                }))
            }
            (LinearKind::QLora { rank, alpha, base }, Some(weight)) => Ok(Arc::new(
                LoraLinear::on_packed(vb, (**weight).clone(), bias, rank, alpha, base)?
                    .with_dropout(self.lora_dropout)?,
            )),
            (LinearKind::QLora { rank, alpha, base }, None) => Ok(Arc::new(
                LoraLinear::load_quantized(vb, in_features, out_features, bias, rank, alpha, base)?
                    .with_dropout(self.lora_dropout)?,
            )),
            (LinearKind::FakeQuant { scheme, inputs }, _) => Ok(Arc::new(FakeQuantLinear::load(
                vb,
                in_features,
                out_features,
                bias,
                scheme,
                inputs,
                self.observers.clone(),
            )?)),
            (LinearKind::Quantized(scheme), None) => Ok(Arc::new(QuantizedLinear::load(
                vb,
                in_features,
                out_features,
                bias,
                scheme,
            )?)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_first_matching_rule_wins() {
        let plan = LinearPlan::uniform(LinearKind::Dense)
            .with_rule("encoder.layer.*.attention.self.*", LinearKind::Dense)
            .unwrap();
        assert_eq!(
            plan.kind_for("encoder.layer.3.attention.self.query"),
            LinearKind::Dense
        );
        assert_eq!(plan.kind_for("classifier"), LinearKind::Dense);
        assert!(LinearPlan::default()
            .with_rule("a[", LinearKind::Dense)
            .is_err());
    }
}
