//! The fake-quantized kind for quantization-aware training. In the forward pass each weight is
//! quantized with the stage's own scheme and dequantized again (exactly the values the exported
//! model will hold: int8 per channel, int4 per group, nf4, a GGUF block type), and optionally each
//! input row is rounded to int8 with its own scale, as the dynamic int8 kernel does at run time,
//! or the whole input with the layer's one observed scale ([`super::ActivationObservers`]), as the
//! static int8 kernel will. The backward pass treats the roundings as the identity (the
//! straight-through estimator), so the float weights keep training while the loss sees the
//! quantized ones; inputs clipped by a per-tensor range pass no gradient.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::{ActivationObservers, DenseLinear, LinearKind, LinearLayer};
use crate::quant::{quantize, QuantScheme, Quantized};

/// How a fake-quantized layer rounds its inputs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FakeQuantInputs {
    /// Inputs stay in float (weight-only quantization).
    #[default]
    Float,
    /// Each input row to int8 with its own scale (dynamic int8).
    Int8PerToken,
    /// The whole input to int8 with the layer's observed scale (static int8).
    Int8PerTensor,
}

/// `y = Q(x) Q(W)ᵀ + b`, with `∂Q/∂·` taken as the identity; `Q(x)` as `inputs` says.
#[derive(Clone, Debug)]
pub struct FakeQuantLinear {
    dense: DenseLinear,
    scheme: QuantScheme,
    inputs: FakeQuantInputs,
    /// `Int8PerTensor`: the shared observers and this layer's module path in them.
    observer: Option<(Arc<ActivationObservers>, String)>,
}

impl FakeQuantLinear {
    /// Reads `weight` (and `bias`) under `vb`. `Int8PerTensor` inputs need `observers`, where the
    /// layer's range is kept under its module path.
    ///
    /// # Errors
    /// A missing tensor, a weight shape `scheme` cannot store (the stage plans around those), or
    /// per-tensor inputs without observers.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        scheme: QuantScheme,
        inputs: FakeQuantInputs,
        observers: Option<Arc<ActivationObservers>>,
    ) -> Result<Self> {
        let prefix = vb.prefix();
        let dense = DenseLinear::load(vb, in_features, out_features, bias)?;
        let dims = [dense.out_features(), dense.in_features()];
        if let Some(reason) = scheme.unsupported_reason(&dims) {
            candle_core::bail!("{prefix}: cannot fake-quantize with {scheme}: {reason}");
        }
        let observer = match (inputs, observers) {
            (FakeQuantInputs::Int8PerTensor, Some(observers)) => Some((observers, prefix)),
            (FakeQuantInputs::Int8PerTensor, None) => {
                candle_core::bail!("{prefix}: per-tensor fake quantization needs observers")
            }
            _ => None,
        };
        Ok(Self {
            dense,
            scheme,
            inputs,
            observer,
        })
    }

    /// `x` rounded to int8 with this layer's observed scale. A training batch (one that carries a
    /// gradient) updates the range first; an evaluation batch, or a training batch's recomputation
    /// ([`super::replay`]), only reads it (an evaluation batch its own range before any training
    /// batch).
    fn fake_quantize_per_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let Some((observers, path)) = &self.observer else {
            candle_core::bail!("per-tensor fake quantization without observers");
        };
        let training = x.track_op() && !super::replay::is_replaying();
        let scale = match (training, observers.scale(path)) {
            (false, Some(scale)) => scale,
            (training, _) => {
                let absmax = x.detach().abs()?.max_all()?.to_scalar::<f32>()?;
                if training {
                    observers.observe(path, absmax)
                } else {
                    (absmax / 127.0).max(f32::MIN_POSITIVE)
                }
            }
        };
        fake_quantize_with_scale(x, scale)
    }
}

/// `w`'s values quantized with `scheme` and dequantized, its gradient passed straight through.
/// A shape the scheme cannot take is returned unchanged.
///
/// # Errors
/// A tensor that cannot be read as f32.
pub fn fake_quantize(w: &Tensor, scheme: QuantScheme) -> Result<Tensor> {
    let frozen = w.detach();
    let stored =
        match quantize(&frozen, scheme).map_err(|e| candle_core::Error::Msg(e.to_string()))? {
            Quantized::Weight(weight) => weight.dequantize(w.device())?.to_dtype(w.dtype())?,
            Quantized::Kept { .. } => return Ok(w.clone()),
        };
    straight_through(w, &frozen, stored)
}

/// Each row of `x` (its last dimension) rounded to int8 with scale `max |row| / 127`, as the
/// dynamic int8 kernel quantizes its inputs; the gradient passes straight through.
///
/// # Errors
/// A tensor of rank 0.
pub fn fake_quantize_tokens(x: &Tensor) -> Result<Tensor> {
    let frozen = x.detach();
    // An all-zero row has scale 0: dividing by a tiny floor keeps it zero instead of NaN.
    let scale = (frozen.abs()?.max_keepdim(candle_core::D::Minus1)? / 127.0)?.maximum(1e-30)?;
    let rounded = frozen
        .broadcast_div(&scale)?
        .round()?
        .clamp(-127f32, 127f32)?
        .broadcast_mul(&scale)?;
    straight_through(x, &frozen, rounded)
}

/// `x` rounded to int8 with the fixed `scale` (values beyond `127 · scale` saturate), as the static
/// int8 kernel quantizes its inputs. The gradient passes straight through where `x` is inside the
/// range and is zero where it saturated (the clipped STE).
///
/// # Errors
/// A tensor that cannot be read as f32.
pub fn fake_quantize_with_scale(x: &Tensor, scale: f32) -> Result<Tensor> {
    let frozen = x.detach();
    let rounded = super::quantized::round_to_static_grid(&frozen, scale)?;
    let inside = frozen
        .abs()?
        .le(127.0 * f64::from(scale))?
        .to_dtype(x.dtype())?;
    // Values: x·m + (q − x·m) = q. Gradient: m, zero where the input saturated.
    let passed = x.mul(&inside)?;
    let rest = (rounded - frozen.mul(&inside)?)?.detach();
    passed + rest
}

/// `x + (q - x)` with the difference cut from the graph: the values of `q`, the gradient of `x`.
fn straight_through(x: &Tensor, frozen: &Tensor, q: Tensor) -> Result<Tensor> {
    x + (q - frozen)?.detach()
}

impl LinearLayer for FakeQuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self
            .dense
            .weight()
            .ok_or_else(|| candle_core::Error::Msg("a dense layer without a weight".into()))?;
        let weight = fake_quantize(weight, self.scheme)?;
        let x = match self.inputs {
            FakeQuantInputs::Float => x.clone(),
            FakeQuantInputs::Int8PerToken => fake_quantize_tokens(x)?,
            FakeQuantInputs::Int8PerTensor => self.fake_quantize_per_tensor(x)?,
        };
        DenseLinear::new(weight, self.dense.bias().cloned())?.forward(&x)
    }

    fn weight(&self) -> Option<&Tensor> {
        self.dense.weight()
    }

    fn bias(&self) -> Option<&Tensor> {
        self.dense.bias()
    }

    fn in_features(&self) -> usize {
        self.dense.in_features()
    }

    fn out_features(&self) -> usize {
        self.dense.out_features()
    }

    fn kind(&self) -> LinearKind {
        LinearKind::FakeQuant {
            scheme: self.scheme,
            inputs: self.inputs,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn forward_sees_the_stored_grid_and_backward_passes_straight_through() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 64), &dev).unwrap()).unwrap();
        for scheme in [
            QuantScheme::Int8,
            QuantScheme::Int4 { group_size: 32 },
            QuantScheme::Nf4,
            QuantScheme::Gguf(candle_core::quantized::GgmlDType::Q4_0),
        ] {
            let fq = fake_quantize(w.as_tensor(), scheme).unwrap();
            // The same values the quantizer stores, dequantized.
            let Quantized::Weight(stored) = quantize(w.as_tensor(), scheme).unwrap() else {
                panic!("{scheme} takes a 5x64 weight");
            };
            let stored = stored.dequantize(&dev).unwrap();
            assert_eq!(max_abs_diff(&fq, &stored), 0.0, "{scheme}");
            assert!(max_abs_diff(&fq, w.as_tensor()) > 0.0, "{scheme} rounds");
            // Straight through: d(sum(x·fq))/dw = x, as for the float weight.
            let x = Tensor::randn(0f32, 1.0, (5, 64), &dev).unwrap();
            let grads = (fq * &x).unwrap().sum_all().unwrap().backward().unwrap();
            let g = grads.get(w.as_tensor()).unwrap();
            assert_eq!(max_abs_diff(g, &x), 0.0, "{scheme}");
        }
        let store = crate::params::ParamStore::new();
        store.set_init_missing(Some(1));
        let vb = store.var_builder(DType::F32, &dev);
        let err = FakeQuantLinear::load(
            vb,
            48,
            5,
            false,
            QuantScheme::Int4 { group_size: 32 },
            FakeQuantInputs::Float,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("cannot fake-quantize"), "{err}");
    }

    #[test]
    fn tokens_round_per_row_to_the_dynamic_kernels_grid() {
        let dev = Device::Cpu;
        let values = vec![
            1.0f32, -0.5, 0.25, 0.004, 0.0, 0.0, 0.0, 0.0, 100.0, 1.0, -3.0, 0.3,
        ];
        let x = Var::from_tensor(&Tensor::from_vec(values.clone(), (3, 4), &dev).unwrap()).unwrap();
        let q = fake_quantize_tokens(x.as_tensor()).unwrap();
        let got: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        for (row, (xs, qs)) in values.chunks(4).zip(got.chunks(4)).enumerate() {
            let (step, inverse) = crate::quant::int8::symmetric_scale(xs);
            for (x, q) in xs.iter().zip(qs) {
                let want = crate::quant::int8::round_clamped(x * inverse, 127.0) * step;
                assert!(
                    (q - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "row {row}: {q} vs {want}"
                );
            }
        }
        assert!(
            got[4..8].iter().all(|v| *v == 0.0),
            "a zero row stays zero: {got:?}"
        );
        let grads = q.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(g.iter().all(|v| *v == 1.0), "{g:?}");
    }

    #[test]
    fn a_fixed_scale_rounds_to_the_static_grid_and_saturated_inputs_pass_no_gradient() {
        let dev = Device::Cpu;
        let values = vec![0.5f32, -0.263, 2.0, -3.0, 0.0, 1.2];
        let x = Var::from_tensor(&Tensor::from_vec(values, (1, 6), &dev).unwrap()).unwrap();
        let q = fake_quantize_with_scale(x.as_tensor(), 0.01).unwrap();
        let got: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.5f32, -0.26, 1.27, -1.27, 0.0, 1.2];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        let grads = q.sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = grads
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
    }

    #[test]
    fn per_tensor_inputs_observe_training_batches_only() {
        let dev = Device::Cpu;
        let store = crate::params::ParamStore::new();
        store.set_init_missing(Some(3));
        let vb = store.var_builder(DType::F32, &dev);
        let observers = Arc::new(ActivationObservers::new(Some(2)));
        let layer = FakeQuantLinear::load(
            vb.pp("l"),
            8,
            4,
            true,
            QuantScheme::Int8,
            FakeQuantInputs::Int8PerTensor,
            Some(observers.clone()),
        )
        .unwrap();
        assert_eq!(
            layer.kind(),
            LinearKind::FakeQuant {
                scheme: QuantScheme::Int8,
                inputs: FakeQuantInputs::Int8PerTensor,
            }
        );
        // Before any training batch, evaluation uses the batch's own range and records nothing.
        let eval = Tensor::full(5f32, (2, 8), &dev).unwrap();
        layer.forward(&eval).unwrap();
        assert!(observers.ranges().is_empty());
        // A training batch (carrying a gradient) sets the range.
        let train = Var::from_tensor(&Tensor::full(2f32, (2, 8), &dev).unwrap()).unwrap();
        let y = layer.forward(train.as_tensor()).unwrap();
        assert_eq!(observers.ranges()["l"].absmax, 2.0);
        // Evaluation now saturates at the observed range: 5 reads as 2, so it equals the 2s.
        let y_eval = layer.forward(&eval).unwrap();
        assert_eq!(max_abs_diff(&y_eval, &y), 0.0);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(train.as_tensor()).is_some());
        let err = FakeQuantLinear::load(
            vb.pp("m"),
            8,
            4,
            false,
            QuantScheme::Int8,
            FakeQuantInputs::Int8PerTensor,
            None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("needs observers"), "{err}");
    }
}
