//! The dense linear layer: a weight matrix and an optional bias.

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{DenseParts, LinearKind, LinearLayer};

/// `y = x Wᵀ + b` with `W` of shape `(out_features, in_features)`, as in PyTorch's `nn.Linear`.
#[derive(Clone, Debug)]
pub struct DenseLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// `Wᵀ` made contiguous, built on the first CPU forward pass of a frozen weight.
    ///
    /// gemm wants the weight column-major when it packs it: from PyTorch's `(out, in)` row-major
    /// layout it gathers one scalar at a time, which profiled at 17% of MiniLM's batch-1 forward.
    /// A frozen weight (inference, a teacher, a LoRA base) never changes, so it is transposed once;
    /// the cost is a second copy of the weight while the layer lives. Trainable weights change
    /// every step and keep the strided path.
    transposed: Arc<OnceLock<Tensor>>,
    /// Mixed precision: the product computed in this dtype (bf16) from the stored (f32, master)
    /// weight and the input cast to it, the output cast back to the input's dtype. The casts are
    /// autograd nodes, so the master weight gets its gradient in f32.
    compute_dtype: Option<DType>,
}

impl DenseLinear {
    /// Wraps existing tensors.
    ///
    /// # Errors
    /// Fails when `weight` is not 2-D or `bias` does not match its first dimension.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, _) = weight.dims2()?;
        if let Some(b) = &bias {
            if b.dims1()? != out_features {
                candle_core::bail!("bias of {} for a weight of {:?}", b.dims1()?, weight.dims());
            }
        }
        Ok(Self {
            weight,
            bias,
            transposed: Arc::default(),
            compute_dtype: None,
        })
    }

    /// The same layer computing its product in `dtype` (mixed precision), as PyTorch's autocast
    /// runs `nn.Linear` in bf16 from f32 weights.
    pub fn with_compute_dtype(mut self, dtype: DType) -> Self {
        self.compute_dtype = Some(dtype);
        self
    }

    /// Reads `weight` (and `bias`) under `vb`.
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        // A weight the checkpoint lacks (a new task head, a tiny test model) is drawn like Hugging
        // Face's `initializer_range` default; zeros would make every unit identical and unlearnable.
        let weight_init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let weight = vb.get_with_hints((out_features, in_features), "weight", weight_init)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_features, "bias", candle_nn::Init::Const(0.0))?)
        } else {
            None
        };
        Self::new(weight, bias)
    }
}

impl DenseLinear {
    /// What the fused CPU node multiplies for this layer: f32, or bf16 under mixed precision
    /// where the CPU has AVX-512 BF16 (`ops::bf16_gemm`). `None` for other compute dtypes and
    /// CPUs, which take the casting path (a CPU job never gets there: `MixedPrecision::
    /// check_device` refuses it first).
    fn cpu_products(&self) -> Option<crate::ops::Products> {
        match self.compute_dtype {
            None => Some(crate::ops::Products::F32),
            Some(DType::BF16) if crate::ops::bf16_gemm::available() => {
                Some(crate::ops::Products::Bf16)
            }
            Some(_) => None,
        }
    }

    /// `Wᵀ`: the cached contiguous copy for a frozen weight on the CPU, else a strided view.
    fn weight_t(&self) -> Result<Tensor> {
        if self.weight.track_op() || !self.weight.device().is_cpu() {
            return self.weight.t();
        }
        if let Some(t) = self.transposed.get() {
            return Ok(t.clone());
        }
        let t = self.weight.t()?.contiguous()?;
        Ok(self.transposed.get_or_init(|| t).clone())
    }
}

impl DenseLinear {
    /// `x Wᵀ + b` through candle's ops (`weight_t` is `Wᵀ`): the path of devices and dtypes our
    /// fused kernel does not take.
    fn composed(&self, x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_features, leading)) = dims.split_last() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let rows: usize = leading.iter().product();
        let y2 = x.reshape((rows, in_features))?.matmul(weight_t)?;
        let y2 = match bias {
            Some(b) => y2.broadcast_add(b)?,
            None => y2,
        };
        let mut out_dims = leading.to_vec();
        out_dims.push(self.out_features());
        y2.reshape(out_dims)
    }
}

impl LinearLayer for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One 2-D GEMM over all rows beats a batched matmul with a broadcast weight. One autograd
        // node with a hand-written backward (and the bias added inside the GEMM): a trained weight
        // as it is, a frozen one through its contiguous transposed copy. Under CPU mixed precision
        // the same node multiplies bf16 roundings (`ops::Products::Bf16`).
        let fused = match self.cpu_products() {
            Some(products) if self.weight.track_op() => {
                crate::ops::linear(x, &self.weight, self.bias.as_ref(), false, products)?
            }
            Some(products) if self.weight.device().is_cpu() => {
                crate::ops::linear(x, &self.weight_t()?, self.bias.as_ref(), true, products)?
            }
            _ => None,
        };
        if let Some(y) = fused {
            return Ok(y);
        }
        if let Some(dtype) = self.compute_dtype.filter(|&d| d != x.dtype()) {
            // Mixed precision elsewhere (CUDA): input, weight and bias cast to `dtype`, the output
            // cast back.
            let bias = self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?;
            let weight_t = self.weight.to_dtype(dtype)?.t()?;
            return self
                .composed(&x.to_dtype(dtype)?, &weight_t, bias.as_ref())?
                .to_dtype(x.dtype());
        }
        self.composed(x, &self.weight_t()?, self.bias.as_ref())
    }

    fn weight(&self) -> Option<&Tensor> {
        Some(&self.weight)
    }

    fn trained_dense_parts(&self) -> Option<DenseParts<'_>> {
        // A frozen layer runs on its transposed copy, and mixed precision off the CPU casts.
        let products = self.cpu_products()?;
        (self.weight.track_op() && self.weight.device().is_cpu()).then_some(DenseParts {
            weight: &self.weight,
            bias: self.bias.as_ref(),
            products,
        })
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn in_features(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    fn out_features(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }

    fn kind(&self) -> LinearKind {
        LinearKind::Dense
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn batched_forward_matches_per_row_and_has_gradients() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 4, &dev).unwrap()).unwrap();
        let layer = DenseLinear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())).unwrap();
        let x = Tensor::randn(0f32, 1., (2, 5, 3), &dev).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 4]);
        let row = x.get(1).unwrap().get(2).unwrap().unsqueeze(0).unwrap();
        let expected = row
            .matmul(&w.t().unwrap())
            .unwrap()
            .squeeze(0)
            .unwrap()
            .add(&b)
            .unwrap();
        let diff = (y.get(1).unwrap().get(2).unwrap() - expected)
            .unwrap()
            .abs()
            .unwrap();
        assert!(diff.max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let gb = grads.get(&b).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(gb, vec![10.0; 4], "each output sums over 10 rows");
        assert!(
            grads
                .get(&w)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
        assert_eq!(layer.in_features(), 3);
        assert!(DenseLinear::new(
            w.as_tensor().clone(),
            Some(Tensor::zeros(3, DType::F32, &dev).unwrap())
        )
        .is_err());
    }

    /// Largest |a − b| over the largest |a|.
    fn relative_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale = a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale
    }

    #[test]
    fn mixed_precision_computes_in_bf16_and_trains_the_f32_weight() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 16), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 8, &dev).unwrap()).unwrap();
        let full = DenseLinear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())).unwrap();
        let mixed = full.clone().with_compute_dtype(DType::BF16);
        let x = Tensor::randn(0f32, 1., (3, 5, 16), &dev).unwrap();
        let (y_full, y_mixed) = (full.forward(&x).unwrap(), mixed.forward(&x).unwrap());
        assert_eq!(
            y_mixed.dtype(),
            DType::F32,
            "the output keeps the input's dtype"
        );
        assert_eq!(y_mixed.dims(), y_full.dims());
        // bf16 keeps 8 significant bits: a relative error near 2⁻⁸ per operand, not zero.
        let err = relative_diff(&y_full, &y_mixed);
        assert!(err > 0.0 && err < 2e-2, "{err}");
        let g_full = y_full.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g_mixed = y_mixed
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&w, &b] {
            let (a, m) = (g_full.get(var).unwrap(), g_mixed.get(var).unwrap());
            assert_eq!(m.dtype(), DType::F32, "the master weight's gradient is f32");
            let err = relative_diff(a, m);
            assert!(err < 3e-2, "{err}");
        }
        // An input already in the compute dtype passes through unchanged in kind.
        let x16 = x.to_dtype(DType::BF16).unwrap();
        let w16 = DenseLinear::new(w.as_tensor().to_dtype(DType::BF16).unwrap(), None)
            .unwrap()
            .with_compute_dtype(DType::BF16);
        assert_eq!(w16.forward(&x16).unwrap().dtype(), DType::BF16);
    }
}
