//! The fake-quantized kind for quantization-aware training: in the forward pass each weight row
//! is rounded to a symmetric `bits`-wide grid with its own scale (max |w| / (2^(bits-1) - 1), as
//! our int8 kernels store it); the backward pass treats the rounding as the identity (the
//! straight-through estimator), so the float weights keep training while the loss sees the
//! quantized ones.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::{DenseLinear, LinearKind, LinearLayer};
use crate::quant::int8::{f16_at_least, round_clamped};

/// `y = x Q(W)ᵀ + b`, with `∂Q(W)/∂W` taken as the identity.
#[derive(Clone, Debug)]
pub struct FakeQuantLinear {
    dense: DenseLinear,
    bits: u8,
}

impl FakeQuantLinear {
    /// Reads `weight` (and `bias`) under `vb`.
    ///
    /// # Errors
    /// A missing tensor, or `bits` outside 2..=8.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        bits: u8,
    ) -> Result<Self> {
        if !(2..=8).contains(&bits) {
            candle_core::bail!(
                "{}: fake quantization takes 2 to 8 bits, got {bits}",
                vb.prefix()
            );
        }
        Ok(Self {
            dense: DenseLinear::load(vb, in_features, out_features, bias)?,
            bits,
        })
    }
}

/// Rounds each row of `w` to its own symmetric grid, passing gradients straight through. The
/// grid is the one [`crate::quant::QuantScheme::Int8`] stores at 8 bits: scale `max |w| / levels`
/// rounded up to an f16, values rounded to the nearest level (ties to even).
///
/// # Errors
/// A tensor that is not 2-D.
pub fn fake_quantize_rows(w: &Tensor, bits: u8) -> Result<Tensor> {
    let levels = ((1u32 << (bits.clamp(2, 8) - 1)) - 1) as f32;
    let (rows, cols) = w.dims2()?;
    let frozen = w.detach();
    let values = frozen
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut grid = vec![0f32; values.len()];
    for (row, out) in values.chunks(cols.max(1)).zip(grid.chunks_mut(cols.max(1))) {
        let amax = row
            .iter()
            .fold(0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
        let scale = f16_at_least(amax / levels).to_f32();
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (x, y) in row.iter().zip(out) {
            *y = round_clamped(x * inverse, levels) * scale;
        }
    }
    let quantized = Tensor::from_vec(grid, (rows, cols), w.device())?.to_dtype(w.dtype())?;
    // w + (Q(w) - w) with the difference cut from the graph: values of Q(w), gradient of w.
    w + (quantized - &frozen)?.detach()
}

impl LinearLayer for FakeQuantLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self
            .dense
            .weight()
            .ok_or_else(|| candle_core::Error::Msg("a dense layer without a weight".into()))?;
        let quantized = fake_quantize_rows(weight, self.bits)?;
        DenseLinear::new(quantized, self.dense.bias().cloned())?.forward(x)
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
        LinearKind::FakeQuant { bits: self.bits }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::quant::{quantize, QuantScheme, Quantized};

    #[test]
    fn forward_sees_the_int8_grid_and_backward_passes_straight_through() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 16), &dev).unwrap()).unwrap();
        let fq = fake_quantize_rows(w.as_tensor(), 8).unwrap();
        // The same values our int8 quantizer stores, dequantized.
        let Quantized::Weight(int8) = quantize(w.as_tensor(), QuantScheme::Int8).unwrap() else {
            panic!("int8 takes a 5x16 weight");
        };
        let stored = int8.dequantize(&dev).unwrap();
        let diff = (&fq - &stored).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // Straight through: d(sum(x·fq))/dw = x, as for the float weight.
        let x = Tensor::randn(0f32, 1.0, (5, 16), &dev).unwrap();
        let grads = (fq * &x).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).unwrap();
        let diff = (g - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // A 2-bit grid has three levels per row.
        let two = fake_quantize_rows(w.as_tensor(), 2).unwrap();
        let row: Vec<f32> = two.get(0).unwrap().to_vec1().unwrap();
        let mut distinct: Vec<i64> = row.iter().map(|v| (v * 1e4).round() as i64).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() <= 3, "{distinct:?}");
        let store = crate::params::ParamStore::new();
        let vb = store.var_builder(DType::F32, &dev);
        assert!(FakeQuantLinear::load(vb, 16, 5, false, 9).is_err());
    }
}
