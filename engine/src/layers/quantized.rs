//! The quantized linear layer: inference on real quantized kernels.
//!
//! int8 on the CPU runs our integer kernel ([`super::int8_matmul`]): i8 weights with one scale per
//! output channel against activations quantized to i8 per row, summed in i32. Elsewhere (CUDA), int8
//! runs on candle's Q8_0 blocks built from exactly the stored values. GGUF types run on candle's
//! `QMatMul` over their own blocks, and int4 on Q4_1 blocks built from exactly the stored values
//! (see [`crate::quant::int8`] and [`crate::quant::int4`]), so the latency measured is that of integer
//! weights, not of a dequantized copy. On the CPU the 32-value block types (q4_0, q4_1, q5_0, q5_1,
//! q8_0, and int4 as Q4_1) run on our own kernel ([`super::block_matmul`]): candle's is scalar code
//! for most of them. When a weight's row length does not suit candle's kernel (on CUDA: Q8_0 rows not
//! a multiple of 32; Q4_1/Q5_0/Q5_1 rows with an odd number of blocks), the layer computes with the
//! dequantized weight and says so through [`QuantizedLinear::kernel`].
//!
//! The weight is frozen: no gradient reaches it. An input that carries a gradient (a LoRA adapter
//! trained on a quantized base, QLoRA) gets one through [`QuantizedInputGrad`]: the forward runs the
//! same kernel, the backward multiplies the output gradient by the weight dequantized for that step
//! only (CPU; on other devices such an input is an error).

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::block_matmul::{self, PackedBlocks};
use super::int8_matmul::{self, Int8Kernel, PackedInt8};
use super::{LinearKind, LinearLayer};
use crate::quant::{gguf, quantize, QuantScheme, Quantized, QuantizedWeight};

/// How a [`QuantizedLinear`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Our int8 × int8 → i32 kernel on the CPU (AMX, AVX-512 VNNI, AVX2 or the portable fallback).
    Int8(Int8Kernel),
    /// Our kernel for 32-value GGML blocks × 8-bit activation blocks on the CPU (AVX2 or its
    /// portable fallback), with the blocks' type.
    Blocks(GgmlDType, Int8Kernel),
    /// candle's quantized matmul on GGML blocks.
    Quantized(GgmlDType),
    /// An f32 matmul on the dequantized weight (the row length does not suit the kernel).
    Dequantized,
    /// f32 matmuls on tiles of rows dequantized for the call only (nf4 on the CPU, which has no
    /// integer kernel): the dense weight never exists whole.
    DequantizedTiles,
}

/// A weight-only quantized `y = x Wᵀ + b`; the bias stays in f32.
#[derive(Clone, Debug)]
pub struct QuantizedLinear {
    /// Shared, so the backward op holds the layer without copying its weight.
    weight: Arc<QuantizedWeight>,
    compute: Compute,
    kernel: KernelPath,
    bias: Option<Tensor>,
    in_features: usize,
    out_features: usize,
    /// Static quantization: the calibrated scale every input row is quantized with on the int8
    /// kernel (`None`: each row's own, computed at run time).
    input_scale: Option<f32>,
}

impl QuantizedLinear {
    /// The same layer with its inputs quantized with the fixed `scale` (static W8A8). Our CPU
    /// int8 kernel takes the scale as it is. Elsewhere (CUDA) candle's quantized kernels would
    /// requantize the inputs per block of 32 with scales of their own, losing the static scheme,
    /// so the layer rounds its inputs to the static grid itself and multiplies them by the
    /// dequantized weight on `device`: the same products the int8 kernel sums, correct before
    /// fast.
    ///
    /// # Errors
    /// The weight cannot be dequantized onto `device`.
    pub fn with_input_scale(mut self, scale: f32, device: &Device) -> Result<Self> {
        if !matches!(self.compute, Compute::Int8(_)) {
            let dense = self.weight.dequantize(device)?;
            self.compute = Compute::Candle(QMatMul::Tensor(dense));
            self.kernel = KernelPath::Dequantized;
        }
        self.input_scale = Some(scale);
        Ok(self)
    }

    /// Builds the layer from a quantized weight on `device`.
    ///
    /// # Errors
    /// Fails when the weight is not 2-D, the bias does not match it, or the device cannot hold it.
    pub fn new(weight: QuantizedWeight, bias: Option<Tensor>, device: &Device) -> Result<Self> {
        let dims = weight.dims();
        let [out_features, in_features] = dims[..] else {
            candle_core::bail!("a quantized linear weight must be 2-D, got {dims:?}");
        };
        if let Some(b) = &bias {
            if b.dims1()? != out_features {
                candle_core::bail!("bias of {} for a weight of {dims:?}", b.dims1()?);
            }
        }
        let (compute, kernel) = kernel_for(&weight, device)?;
        Ok(Self {
            weight: Arc::new(weight),
            compute,
            kernel,
            bias,
            in_features,
            out_features,
            input_scale: None,
        })
    }

    /// Reads the dense `weight` (and `bias`) under `vb` and quantizes the weight with `scheme`.
    /// A weight the scheme cannot take keeps an f32 copy and the dequantized path.
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        scheme: QuantScheme,
    ) -> Result<Self> {
        let dense = vb.get((out_features, in_features), "weight")?.detach();
        let bias = if bias {
            Some(vb.get(out_features, "bias")?.detach())
        } else {
            None
        };
        let weight =
            match quantize(&dense, scheme).map_err(|e| candle_core::Error::Msg(e.to_string()))? {
                Quantized::Weight(w) => w,
                // F32 "blocks" of size 1 always fit; candle turns them into a plain matmul.
                Quantized::Kept { .. } => {
                    let values = dense
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let q = gguf::quantize(&values, &[out_features, in_features], GgmlDType::F32)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    QuantizedWeight::Gguf(Arc::new(q))
                }
            };
        Self::new(weight, bias, vb.device())
    }

    /// The quantized weight (for saving).
    pub fn quantized_weight(&self) -> &QuantizedWeight {
        &self.weight
    }

    /// Which kernel the forward pass uses.
    pub fn kernel(&self) -> KernelPath {
        self.kernel
    }
}

/// The prepared weight of a [`QuantizedLinear`], in the form its kernel reads.
#[derive(Clone, Debug)]
enum Compute {
    /// Packed for our int8 kernel.
    Int8(Arc<PackedInt8>),
    /// Unpacked for our block kernel.
    Blocks(Arc<PackedBlocks>, Int8Kernel),
    /// Tiles of rows dequantized per call (nf4).
    Tiles,
    /// candle's quantized (or, as a fallback, plain) matmul.
    Candle(QMatMul),
}

/// Picks the kernel for a weight and prepares its storage on `device`.
fn kernel_for(weight: &QuantizedWeight, device: &Device) -> Result<(Compute, KernelPath)> {
    if let (QuantizedWeight::Int8(w), Device::Cpu) = (weight, device) {
        if let Some(packed) = PackedInt8::pack(w) {
            let kernel = packed.kernel();
            return Ok((Compute::Int8(Arc::new(packed)), KernelPath::Int8(kernel)));
        }
    }
    if let (QuantizedWeight::Nf4(_), Device::Cpu) = (weight, device) {
        return Ok((Compute::Tiles, KernelPath::DequantizedTiles));
    }
    if let Device::Cpu = device {
        let blocks = match weight {
            QuantizedWeight::Int4(w) => Some((w.to_q4_1_bytes(), GgmlDType::Q4_1)),
            QuantizedWeight::Gguf(q) if PackedBlocks::supports(q.dtype()) => {
                Some((q.data()?.into_owned(), q.dtype()))
            }
            _ => None,
        };
        let dims = weight.dims();
        let packed = blocks
            .and_then(|(bytes, dtype)| PackedBlocks::from_ggml(&bytes, dtype, dims[0], dims[1]));
        if let Some(packed) = packed {
            let kernel = Int8Kernel::detect_blocks();
            let path = KernelPath::Blocks(packed.dtype(), kernel);
            return Ok((Compute::Blocks(Arc::new(packed), kernel), path));
        }
    }
    let (matmul, path) = candle_kernel_for(weight, device)?;
    Ok((Compute::Candle(matmul), path))
}

/// candle's kernel for a weight: its quantized matmul when the row length suits it.
fn candle_kernel_for(weight: &QuantizedWeight, device: &Device) -> Result<(QMatMul, KernelPath)> {
    let dims = weight.dims();
    let blocks = match weight {
        QuantizedWeight::Int8(w) => w.to_q8_0_bytes().map(|b| (b, GgmlDType::Q8_0)),
        QuantizedWeight::Int4(w) => Some((w.to_q4_1_bytes(), GgmlDType::Q4_1)),
        QuantizedWeight::Gguf(q) => Some((q.data()?.into_owned(), q.dtype())),
        QuantizedWeight::Nf4(_) => None,
    };
    let blocks = blocks.filter(|(_, dtype)| kernel_accepts(*dtype, dims[1]));
    match blocks {
        Some((bytes, dtype)) => {
            let q: QTensor = gguf::qtensor_from_bytes(&bytes, &dims, dtype, device)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok((
                QMatMul::from_arc(Arc::new(q))?,
                KernelPath::Quantized(dtype),
            ))
        }
        None => Ok((
            QMatMul::Tensor(weight.dequantize(device)?),
            KernelPath::Dequantized,
        )),
    }
}

/// `x` rounded to the int8 grid of `scale` and back (`clamp(round(x / scale), ±127) · scale`): the
/// values a static int8 kernel multiplies, on any device.
pub(super) fn round_to_static_grid(x: &Tensor, scale: f32) -> Result<Tensor> {
    let scale = f64::from(scale);
    (x / scale)?.round()?.clamp(-127f32, 127f32)? * scale
}

/// Whether candle's kernel for `dtype` takes rows of `cols` values: they must be whole blocks, and
/// the Q4_1/Q5_0/Q5_1 dot products also need an even number of blocks.
fn kernel_accepts(dtype: GgmlDType, cols: usize) -> bool {
    let block = dtype.block_size();
    let pairs = matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1);
    cols.is_multiple_of(block) && (!pairs || (cols / block).is_multiple_of(2))
}

impl LinearLayer for QuantizedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            if !x.device().is_cpu() {
                candle_core::bail!(
                    "a quantized linear layer passes input gradients on the CPU only (QLoRA); \
                     freeze the model or train before quantizing"
                );
            }
            let unbiased = Self {
                bias: None,
                ..self.clone()
            };
            let in_dtype = x.dtype();
            let y = x
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1(QuantizedInputGrad(unbiased))?;
            let y = match &self.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
                None => y,
            };
            return y.to_dtype(in_dtype);
        }
        let in_dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let y = match &self.compute {
            Compute::Int8(packed) => {
                let shape = (packed.in_features(), packed.out_features());
                return cpu_forward(&x, shape, self.bias.as_ref(), |values, bias| {
                    int8_matmul::matmul_with_input_scale(values, packed, bias, self.input_scale)
                })?
                .to_dtype(in_dtype);
            }
            Compute::Blocks(packed, kernel) => {
                let shape = (packed.in_features(), packed.out_features());
                return cpu_forward(&x, shape, self.bias.as_ref(), |values, bias| {
                    block_matmul::matmul(values, packed, bias, *kernel)
                })?
                .to_dtype(in_dtype);
            }
            Compute::Tiles => tiled_matmul(&x, &self.weight)?,
            Compute::Candle(matmul) => match self.input_scale {
                Some(scale) => matmul.forward(&round_to_static_grid(&x, scale)?)?,
                None => matmul.forward(&x)?,
            },
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(DType::F32)?)?,
            None => y,
        };
        y.to_dtype(in_dtype)
    }

    fn weight(&self) -> Option<&Tensor> {
        None
    }

    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    fn kind(&self) -> LinearKind {
        LinearKind::Quantized(self.weight.scheme())
    }
}

/// `x Wᵀ` of a bias-free [`QuantizedLinear`] as a candle op with a backward pass for `x`: the
/// forward runs the layer's kernel, the backward computes `dL/dx = dL/dy · W` with `W` dequantized
/// for the step (dequantize on the fly: nothing dense is kept between steps).
#[derive(Debug)]
struct QuantizedInputGrad(QuantizedLinear);

impl candle_core::CustomOp1 for QuantizedInputGrad {
    fn name(&self) -> &'static str {
        "compressd-quantized-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(values) = storage else {
            candle_core::bail!("{}: f32 inputs only", self.name());
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous inputs only", self.name());
        };
        // A fresh tensor carries no gradient, so this is the layer's inference path.
        let x = Tensor::from_slice(&values[start..end], layout.shape(), &Device::Cpu)?;
        let y = self.0.forward(&x)?;
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad_y.dims();
        let Some((&out_features, leading)) = dims.split_last() else {
            candle_core::bail!("{}: a scalar gradient", self.name());
        };
        let rows: usize = leading.iter().product();
        let mut in_dims = leading.to_vec();
        in_dims.push(self.0.in_features);
        let grad_y = grad_y.reshape((rows, out_features))?;
        let grad_x = match &*self.0.weight {
            QuantizedWeight::Nf4(w) => tiled_input_grad(&grad_y, w)?,
            weight => grad_y.matmul(&weight.dequantize(grad_y.device())?)?,
        };
        Ok(Some(grad_x.reshape(in_dims)?))
    }
}

/// Output features per dequantized tile: 256 rows of MiniLM's or SmolLM2's widest inputs (1,536)
/// are 1.5 MiB of f32, which stays in a core's L2-sized working set while the matmul reads it.
const TILE_ROWS: usize = 256;

/// `x Wᵀ` for a weight dequantized a tile of [`TILE_ROWS`] output rows at a time (x contiguous f32,
/// `(.., in_features)`).
fn tiled_matmul(x: &Tensor, weight: &QuantizedWeight) -> Result<Tensor> {
    let QuantizedWeight::Nf4(w) = weight else {
        candle_core::bail!("tiled matmul on a {} weight", weight.scheme());
    };
    let [out_features, in_features] = w.dims[..] else {
        candle_core::bail!("a quantized linear weight must be 2-D, got {:?}", w.dims);
    };
    let dims = x.dims();
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((rows, in_features))?;
    let mut tiles = Vec::with_capacity(out_features.div_ceil(TILE_ROWS));
    let mut buffer = vec![0f32; TILE_ROWS.min(out_features) * in_features];
    for first in (0..out_features).step_by(TILE_ROWS) {
        let n = TILE_ROWS.min(out_features - first);
        let values = &mut buffer[..n * in_features];
        w.dequantize_into(first * in_features, values);
        let tile = Tensor::from_slice(values, (n, in_features), x.device())?;
        tiles.push(x2.matmul(&tile.t()?)?);
    }
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Tensor::cat(&tiles, 1)?.reshape(out_dims)
}

/// `dL/dx = dL/dy · W` (`grad_y` `(rows, out_features)`) summed over tiles of [`TILE_ROWS`] rows
/// of `W` dequantized one at a time, so the backward, like the forward, never holds the whole
/// dense weight.
fn tiled_input_grad(grad_y: &Tensor, w: &crate::quant::Nf4Weight) -> Result<Tensor> {
    let [out_features, in_features] = w.dims[..] else {
        candle_core::bail!("a quantized linear weight must be 2-D, got {:?}", w.dims);
    };
    let mut buffer = vec![0f32; TILE_ROWS.min(out_features) * in_features];
    let mut sum: Option<Tensor> = None;
    for first in (0..out_features).step_by(TILE_ROWS) {
        let n = TILE_ROWS.min(out_features - first);
        let values = &mut buffer[..n * in_features];
        w.dequantize_into(first * in_features, values);
        let tile = Tensor::from_slice(values, (n, in_features), grad_y.device())?;
        let part = grad_y.narrow(1, first, n)?.contiguous()?.matmul(&tile)?;
        sum = Some(match sum {
            Some(acc) => (acc + part)?,
            None => part,
        });
    }
    sum.ok_or_else(|| candle_core::Error::Msg("an nf4 weight with no rows".into()))
}

/// Runs one of our CPU kernels (`run(x values, bias)`) on a contiguous f32 CPU tensor
/// `(.., in_features)`, giving `(.., out_features)`.
fn cpu_forward(
    x: &Tensor,
    (in_features, out_features): (usize, usize),
    bias: Option<&Tensor>,
    run: impl FnOnce(&[f32], Option<&[f32]>) -> Vec<f32>,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.last() != Some(&in_features) {
        candle_core::bail!("input of shape {dims:?} for a linear layer of {in_features} inputs");
    }
    let bias = bias
        .map(|b| b.to_dtype(DType::F32)?.to_vec1::<f32>())
        .transpose()?;
    let y = {
        let (storage, layout) = x.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("our integer kernels run on the CPU only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("our integer kernels need a contiguous input");
        };
        let values = &cpu.as_slice::<f32>()?[start..end];
        run(values, bias.as_deref())
    };
    let mut out_dims = dims.to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = out_features;
    }
    Tensor::from_vec(y, out_dims, x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{Int4Weight, Int8Weight, Nf4Weight};
    use candle_core::Var;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// The kernel output must equal an f32 matmul with the dequantized weight, up to the kernels'
    /// quantization of the activations (Q8_0/Q8_1/Q8_K: about 1/254 relative per block).
    #[test]
    fn kernels_agree_with_dequantized_weights() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (48, 256), &dev).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 256), &dev).unwrap();
        let weights = [
            QuantizedWeight::Int8(Int8Weight::quantize(&values, &[48, 256])),
            QuantizedWeight::Int4(Int4Weight::quantize(&values, &[48, 256], 64)),
            QuantizedWeight::Nf4(Nf4Weight::quantize(&values, &[48, 256])),
            QuantizedWeight::Gguf(Arc::new(
                gguf::quantize(&values, &[48, 256], GgmlDType::Q4K).unwrap(),
            )),
        ];
        for weight in weights {
            let layer = QuantizedLinear::new(weight.clone(), None, &dev).unwrap();
            assert!(
                layer.kernel() != KernelPath::Dequantized,
                "{:?}",
                weight.scheme()
            );
            let y = layer.forward(&x).unwrap();
            assert_eq!(y.dims(), &[2, 3, 48]);
            let reference = x
                .broadcast_matmul(&weight.dequantize(&dev).unwrap().t().unwrap())
                .unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = max_abs_diff(&y, &reference);
            assert!(
                err < 0.02 * scale,
                "{:?}: {err} vs scale {scale}",
                weight.scheme()
            );
        }
    }

    #[test]
    fn one_block_rows_run_on_our_kernel_and_pass_input_gradients() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
        let bias = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        // One block per row: candle's Q4_1/Q5_0 dot products need an even number of blocks, ours
        // takes any number.
        let x = Tensor::ones((1, 32), DType::F32, &dev).unwrap();
        let expected0: f32 = values[..32].iter().sum::<f32>() + 1.0;
        let mut layer = None;
        for (dtype, path) in [
            (
                GgmlDType::Q5_0,
                KernelPath::Blocks(GgmlDType::Q5_0, Int8Kernel::detect_blocks()),
            ),
            (
                GgmlDType::Q4_1,
                KernelPath::Blocks(GgmlDType::Q4_1, Int8Kernel::detect_blocks()),
            ),
        ] {
            let q = gguf::quantize(&values, &[2, 32], dtype).unwrap();
            let built =
                QuantizedLinear::new(QuantizedWeight::Gguf(Arc::new(q)), Some(bias.clone()), &dev)
                    .unwrap();
            assert_eq!(built.kernel(), path);
            let y = built.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            assert!(
                (y[0][0] - expected0).abs() < 0.2,
                "{dtype:?}: {} vs {expected0}",
                y[0][0]
            );
            layer = Some(built);
        }
        // A tracked input (QLoRA) gets the same outputs and the gradient of the dequantized weight.
        let layer = layer.unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        let y = layer.forward(tracked.as_tensor()).unwrap();
        let untracked = layer.forward(&x).unwrap();
        let same = (&y - &untracked).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(same.to_scalar::<f32>().unwrap(), 0.0);
        let grads = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let grad = grads.get(tracked.as_tensor()).expect("an input gradient");
        let dense = layer.quantized_weight().dequantize(&dev).unwrap();
        let expected = ((untracked * 2.0).unwrap().matmul(&dense)).unwrap();
        let diff = (grad - expected).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
    }

    /// nf4 computes on tiles of dequantized rows: several tiles (and a partial last one) give the
    /// dense weight's outputs and, for a tracked input (QLoRA), its input gradient.
    #[test]
    fn nf4_tiles_match_the_dequantized_weight_forward_and_backward() {
        let dev = Device::Cpu;
        let (out_features, in_features) = (TILE_ROWS * 2 + 44, 128);
        let w = Tensor::randn(0f32, 0.5, (out_features, in_features), &dev).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let weight =
            QuantizedWeight::Nf4(Nf4Weight::quantize(&values, &[out_features, in_features]));
        let bias = Tensor::randn(0f32, 1.0, out_features, &dev).unwrap();
        let layer = QuantizedLinear::new(weight, Some(bias.clone()), &dev).unwrap();
        assert_eq!(layer.kernel(), KernelPath::DequantizedTiles);
        assert_eq!(layer.kind(), LinearKind::Quantized(QuantScheme::Nf4));
        let dense = layer.quantized_weight().dequantize(&dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, in_features), &dev).unwrap();
        let expected = x
            .broadcast_matmul(&dense.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 3, out_features]);
        assert!(max_abs_diff(&y, &expected) < 1e-4);

        let tracked = Var::from_tensor(&x).unwrap();
        let y = layer.forward(tracked.as_tensor()).unwrap();
        assert!(max_abs_diff(&y, &expected) < 1e-4);
        let grads = y.sum_all().unwrap().backward().unwrap();
        let grad = grads.get(tracked.as_tensor()).expect("an input gradient");
        let ones = Tensor::ones((6, out_features), DType::F32, &dev).unwrap();
        let want = ones
            .matmul(&dense)
            .unwrap()
            .reshape((2, 3, in_features))
            .unwrap();
        assert!(max_abs_diff(grad, &want) < 1e-3);
    }

    /// Our int8 kernel takes any row length (20 is not a Q8_0 multiple) and checks the input width.
    #[test]
    fn int8_runs_on_the_integer_kernel_for_any_row_length() {
        let dev = Device::Cpu;
        let values: Vec<f32> = (0..40).map(|i| i as f32 / 40.0).collect();
        let weight = QuantizedWeight::Int8(Int8Weight::quantize(&values, &[2, 20]));
        let bias = Tensor::new(&[1f32, -1.0], &dev).unwrap();
        let layer = QuantizedLinear::new(weight, Some(bias), &dev).unwrap();
        assert!(matches!(layer.kernel(), KernelPath::Int8(_)));
        let x = Tensor::ones((3, 1, 20), DType::F32, &dev).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), &[3, 1, 2]);
        let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let expected = [
            values[..20].iter().sum::<f32>() + 1.0,
            values[20..].iter().sum::<f32>() - 1.0,
        ];
        for (got, want) in y.iter().zip(expected.iter().cycle()) {
            assert!((got - want).abs() < 0.05, "{got} vs {want}");
        }
        let wrong = Tensor::ones((1, 21), DType::F32, &dev).unwrap();
        assert!(layer.forward(&wrong).is_err());
    }

    /// Static scales off our int8 kernel (CUDA) take the dequantized path on rounded inputs: the
    /// same result as the int8 kernel with the scale, here forced on the CPU.
    #[test]
    fn static_scales_off_the_int8_kernel_round_inputs_to_the_same_grid() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.5, (40, 96), &dev).unwrap();
        let values = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let weight = QuantizedWeight::Int8(Int8Weight::quantize(&values, &[40, 96]));
        let bias = Tensor::randn(0f32, 0.1, 40, &dev).unwrap();
        // Inputs up to ±4, the scale clipping at ±2.54: saturation is exercised too.
        let x = Tensor::rand(0f32, 1.0, (3, 5, 96), &dev)
            .unwrap()
            .affine(8.0, -4.0)
            .unwrap();
        let scale = 0.02f32;
        let on_kernel = QuantizedLinear::new(weight.clone(), Some(bias.clone()), &dev)
            .unwrap()
            .with_input_scale(scale, &dev)
            .unwrap();
        assert!(matches!(on_kernel.kernel(), KernelPath::Int8(_)));
        let mut elsewhere = QuantizedLinear::new(weight, Some(bias), &dev).unwrap();
        // What `new` picks on a GPU: candle's Q8_0 kernel.
        let (matmul, path) = candle_kernel_for(&elsewhere.weight, &dev).unwrap();
        (elsewhere.compute, elsewhere.kernel) = (Compute::Candle(matmul), path);
        let elsewhere = elsewhere.with_input_scale(scale, &dev).unwrap();
        assert_eq!(elsewhere.kernel(), KernelPath::Dequantized);
        let a = on_kernel.forward(&x).unwrap();
        let b = elsewhere.forward(&x).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(
            diff < 1e-4,
            "int8 kernel vs dequantized static path: {diff}"
        );
        // And the rounding matters: unrounded inputs give a visibly different answer.
        let dequantized = elsewhere.weight.dequantize(&dev).unwrap();
        let unrounded = x.broadcast_matmul(&dequantized.t().unwrap()).unwrap();
        let unrounded = unrounded.broadcast_add(on_kernel.bias().unwrap()).unwrap();
        assert!(max_abs_diff(&a, &unrounded) > 1e-2);
    }
}
