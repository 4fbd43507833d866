//! Tensor-level weight quantization: schemes, quantized tensors, their file layout and kernels.
//!
//! Three families of weight-only schemes:
//! - `int8`: per-channel (per output row) symmetric, one scale per row ([`int8`]);
//! - `int4`: group-wise asymmetric, one scale and one integer zero point per group of
//!   `group_size` (32, 64 or 128) consecutive input columns, two nibbles per byte ([`int4`]);
//! - `nf4`: 4-bit NormalFloat (QLoRA's format), one f32 `absmax` per block of 64 values ([`nf4`]);
//! - GGUF block types through candle's `QTensor` (`q8_0`, `q6_k`, `q5_k`, `q4_k`, `q4_0`, ...,
//!   [`gguf`]).
//!
//! Every tensor is seen as a matrix `[rows, cols]` where `cols` is its last dimension. A scheme that
//! cannot quantize a tensor (a GGUF block size or an int4 group that does not divide `cols`) does not
//! fail: [`quantize`] returns [`Quantized::Kept`] with the reason, and the caller keeps the tensor in
//! higher precision and reports it.

pub mod blocks;
pub mod gguf;
pub mod grid_search;
pub mod int4;
pub mod int8;
pub mod layout;
pub mod nf4;
mod parallel;
pub mod st_file;
pub mod stream;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

pub use int4::Int4Weight;
pub use int8::Int8Weight;
pub use nf4::Nf4Weight;

/// Group sizes accepted by the int4 scheme.
pub const INT4_GROUP_SIZES: [usize; 3] = [32, 64, 128];

/// A weight-only quantization scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantScheme {
    /// Per-output-row symmetric int8.
    Int8,
    /// Group-wise asymmetric int4 with this many input columns per group.
    Int4 {
        /// 32, 64 or 128.
        group_size: usize,
    },
    /// 4-bit NormalFloat, one `absmax` per block of 64 values.
    Nf4,
    /// A GGUF (llama.cpp) block type.
    Gguf(GgmlDType),
}

/// GGUF type names accepted in specs, with candle's dtype.
const GGUF_NAMES: [(&str, GgmlDType); 10] = [
    ("q8_0", GgmlDType::Q8_0),
    ("q6_k", GgmlDType::Q6K),
    ("q5_k", GgmlDType::Q5K),
    ("q5_0", GgmlDType::Q5_0),
    ("q5_1", GgmlDType::Q5_1),
    ("q4_k", GgmlDType::Q4K),
    ("q4_0", GgmlDType::Q4_0),
    ("q4_1", GgmlDType::Q4_1),
    ("q3_k", GgmlDType::Q3K),
    ("q2_k", GgmlDType::Q2K),
];

impl QuantScheme {
    /// Builds a scheme from a spec's `scheme` name and optional `group_size` (int4 only; default 128).
    ///
    /// # Errors
    /// Fails on an unknown name or a group size other than 32, 64 or 128.
    pub fn parse(name: &str, group_size: Option<usize>) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        match lower.as_str() {
            "int8" => Ok(Self::Int8),
            "int4" => {
                let group_size = group_size.unwrap_or(128);
                if !INT4_GROUP_SIZES.contains(&group_size) {
                    return Err(EngineError::InvalidSetting(format!(
                        "int4 group_size {group_size}: expected one of 32, 64, 128"
                    )));
                }
                Ok(Self::Int4 { group_size })
            }
            "nf4" => Ok(Self::Nf4),
            other => GGUF_NAMES
                .iter()
                .find(|(n, _)| *n == other)
                .map(|(_, dtype)| Self::Gguf(*dtype))
                .ok_or_else(|| {
                    let gguf: Vec<&str> = GGUF_NAMES.iter().map(|(n, _)| *n).collect();
                    EngineError::InvalidSetting(format!(
                        "unknown quantization scheme {name:?}: expected int8, int4, nf4 or a GGUF type ({})",
                        gguf.join(", ")
                    ))
                }),
        }
    }

    /// The number of consecutive elements of the last dimension the scheme quantizes together;
    /// the last dimension must be a multiple of it (1 for int8, which quantizes whole rows).
    pub fn block_size(&self) -> usize {
        match self {
            Self::Int8 => 1,
            Self::Int4 { group_size } => *group_size,
            Self::Nf4 => nf4::NF4_BLOCK,
            Self::Gguf(dtype) => dtype.block_size(),
        }
    }

    /// Why a tensor with this last dimension cannot be quantized with this scheme, if it cannot.
    pub fn unsupported_reason(&self, dims: &[usize]) -> Option<String> {
        let Some(&cols) = dims.last() else {
            return Some("a scalar has no row to quantize".to_string());
        };
        let block = self.block_size();
        (cols % block != 0).then(|| {
            format!("last dimension {cols} is not a multiple of the {self} block size {block}")
        })
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int8 => f.write_str("int8"),
            Self::Int4 { group_size } => write!(f, "int4-g{group_size}"),
            Self::Nf4 => f.write_str("nf4"),
            Self::Gguf(dtype) => {
                let name = GGUF_NAMES.iter().find(|(_, d)| d == dtype).map(|(n, _)| *n);
                f.write_str(name.unwrap_or("gguf"))
            }
        }
    }
}

impl FromStr for QuantScheme {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.strip_prefix("int4-g") {
            Some(group) => {
                let group = group
                    .parse()
                    .map_err(|_| EngineError::InvalidSetting(format!("bad int4 group in {s:?}")))?;
                Self::parse("int4", Some(group))
            }
            None => Self::parse(s, None),
        }
    }
}

/// A quantized weight matrix of any scheme.
#[derive(Clone, Debug)]
pub enum QuantizedWeight {
    /// Per-row symmetric int8.
    Int8(Int8Weight),
    /// Group-wise asymmetric int4.
    Int4(Int4Weight),
    /// 4-bit NormalFloat.
    Nf4(Nf4Weight),
    /// A GGUF block tensor (shared: the same blocks feed the kernel and the GGUF writer).
    Gguf(Arc<QTensor>),
}

impl QuantizedWeight {
    /// The scheme the weight was quantized with.
    pub fn scheme(&self) -> QuantScheme {
        match self {
            Self::Int8(_) => QuantScheme::Int8,
            Self::Int4(w) => QuantScheme::Int4 {
                group_size: w.group_size,
            },
            Self::Nf4(_) => QuantScheme::Nf4,
            Self::Gguf(q) => QuantScheme::Gguf(q.dtype()),
        }
    }

    /// The logical shape of the weight.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Self::Int8(w) => w.dims.clone(),
            Self::Int4(w) => w.dims.clone(),
            Self::Nf4(w) => w.dims.clone(),
            Self::Gguf(q) => q.shape().dims().to_vec(),
        }
    }

    /// Bytes the quantized weight takes (values, scales and zero points).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Int8(w) => w.storage_bytes(),
            Self::Int4(w) => w.storage_bytes(),
            Self::Nf4(w) => w.storage_bytes(),
            Self::Gguf(q) => q.storage_size_in_bytes(),
        }
    }

    /// The weight dequantized to an f32 tensor on `device`.
    ///
    /// # Errors
    /// Fails when the tensor cannot be built on the device.
    pub fn dequantize(&self, device: &Device) -> candle_core::Result<Tensor> {
        match self {
            Self::Int8(w) => Tensor::from_vec(w.dequantize(), w.dims.as_slice(), device),
            Self::Int4(w) => Tensor::from_vec(w.dequantize(), w.dims.as_slice(), device),
            Self::Nf4(w) => Tensor::from_vec(w.dequantize(), w.dims.as_slice(), device),
            Self::Gguf(q) => q.dequantize(device),
        }
    }
}

/// The outcome of quantizing one tensor.
#[derive(Clone, Debug)]
pub enum Quantized {
    /// The tensor was quantized.
    Weight(QuantizedWeight),
    /// The scheme cannot represent this tensor; it stays in higher precision.
    Kept {
        /// Why, in words (for the stage report).
        reason: String,
    },
}

/// Quantizes a tensor (any float dtype, any rank ≥ 1; rows are all dimensions but the last).
///
/// # Errors
/// Fails only on a tensor that cannot be read as f32; a shape the scheme cannot take is
/// [`Quantized::Kept`], not an error.
pub fn quantize(tensor: &Tensor, scheme: QuantScheme) -> Result<Quantized> {
    let dims = tensor.dims().to_vec();
    if let Some(reason) = scheme.unsupported_reason(&dims) {
        return Ok(Quantized::Kept { reason });
    }
    let values = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    quantize_values(&values, &dims, scheme)
}

/// A tensor quantized with the scheme, among several, whose dequantized values are closest to it.
#[derive(Clone, Debug)]
pub struct BestQuantization {
    /// The quantized weight (its scheme is the one chosen).
    pub weight: QuantizedWeight,
    /// Its dequantized values, in the tensor's dtype and on its device.
    pub values: Tensor,
}

/// Quantizes `tensor` with each of `schemes` and keeps the one with the least squared error (the
/// first on a tie; with a single scheme no error is computed). `None` when no scheme takes the
/// tensor's shape.
///
/// # Errors
/// Fails only on a tensor that cannot be read as f32.
pub fn quantize_least_error(
    tensor: &Tensor,
    schemes: &[QuantScheme],
) -> Result<Option<BestQuantization>> {
    let original = match schemes {
        [_, _, ..] => Some(tensor.to_dtype(DType::F32)?),
        _ => None,
    };
    let mut best: Option<(f64, BestQuantization)> = None;
    for &scheme in schemes {
        let Quantized::Weight(weight) = quantize(tensor, scheme)? else {
            continue;
        };
        let values = weight.dequantize(tensor.device())?;
        let error = match &original {
            Some(original) => (&values - original)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?,
            None => 0.0,
        };
        if best.as_ref().is_none_or(|(e, _)| error < *e) {
            let values = values.to_dtype(tensor.dtype())?;
            best = Some((error, BestQuantization { weight, values }));
        }
    }
    Ok(best.map(|(_, b)| b))
}

/// Quantizes row-major f32 values of shape `dims` (the streaming path calls this on mapped data).
///
/// # Errors
/// Fails when candle rejects a GGUF tensor it was asked to build.
pub fn quantize_values(values: &[f32], dims: &[usize], scheme: QuantScheme) -> Result<Quantized> {
    if let Some(reason) = scheme.unsupported_reason(dims) {
        return Ok(Quantized::Kept { reason });
    }
    let weight = match scheme {
        QuantScheme::Int8 => QuantizedWeight::Int8(Int8Weight::quantize(values, dims)),
        QuantScheme::Int4 { group_size } => {
            QuantizedWeight::Int4(Int4Weight::quantize(values, dims, group_size))
        }
        QuantScheme::Nf4 => QuantizedWeight::Nf4(Nf4Weight::quantize(values, dims)),
        QuantScheme::Gguf(dtype) => {
            QuantizedWeight::Gguf(Arc::new(gguf::quantize(values, dims, dtype)?))
        }
    };
    Ok(Quantized::Weight(weight))
}

/// Splits `dims` into `(rows, cols)`: cols is the last dimension, rows the product of the others.
pub(crate) fn rows_cols(dims: &[usize]) -> (usize, usize) {
    let cols = dims.last().copied().unwrap_or(1);
    let rows = dims[..dims.len().saturating_sub(1)].iter().product();
    (rows, cols)
}
