//! The safetensors layout of quantized models, written and read without loading whole files.
//!
//! A quantized model is one ordinary safetensors file. A weight `<name>` quantized with
//! - `int8` becomes `<name>.qweight` (I8, `[rows, cols]`) and `<name>.scales` (F16, `[rows]`);
//! - `int4` becomes `<name>.qweight` (U8, `[rows, cols / 2]`, the even column in the low nibble),
//!   `<name>.scales` (F16, `[rows, cols / group]`) and `<name>.zeros` (U8, same shape, 0..=15);
//! - `nf4` becomes `<name>.qweight` (U8, `[rows, cols / 2]`, level indices, the even column in the
//!   low nibble) and `<name>.absmax` (F32, `[rows, cols / 64]`);
//! - a GGUF type becomes `<name>.qweight` (U8, `[bytes]`): llama.cpp's block bytes, unchanged.
//!
//! Rows are all dimensions but the last. Tensors that were not quantized keep their name and dtype.
//! The header's `__metadata__` has a key `quantization` whose value is JSON:
//! `{"format": "compressd.quant.v1", "tensors": {"<name>": {"scheme": "int8" | "int4-g64" | "nf4" | "q4_k" | ..,
//! "shape": [..]}}}`; other metadata keys pass through.
//!

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::f16;
use serde::{Deserialize, Serialize};

use super::nf4::NF4_BLOCK;
use super::st_file::{EntryPlan, SafetensorsFile, SafetensorsWriter};
use super::{gguf, rows_cols, Int4Weight, Int8Weight, Nf4Weight, QuantScheme, QuantizedWeight};
use crate::error::{EngineError, Result};

/// The metadata key holding the quantization description.
pub const METADATA_KEY: &str = "quantization";
/// The format tag inside that description.
pub const FORMAT: &str = "compressd.quant.v1";

/// One tensor of a file: dense, or quantized (stored as several entries).
#[derive(Clone, Debug)]
pub enum StoredTensor {
    /// Kept as is.
    Dense(Tensor),
    /// Stored as `.qweight`/`.scales`/`.zeros` entries.
    Quantized(QuantizedWeight),
}

/// The `quantization` metadata document.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct QuantMetadata {
    /// Always [`FORMAT`].
    pub format: String,
    /// Quantized weights by name.
    pub tensors: BTreeMap<String, QuantEntry>,
}

/// How one weight was quantized.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct QuantEntry {
    /// The scheme's name as [`QuantScheme`] displays it.
    pub scheme: String,
    /// The weight's logical shape.
    pub shape: Vec<usize>,
}

/// The entries a weight of shape `dims` quantized with `scheme` is stored as, in file order.
pub fn quantized_entries(name: &str, dims: &[usize], scheme: QuantScheme) -> Vec<EntryPlan> {
    let (rows, cols) = rows_cols(dims);
    let entry = |suffix: &str, dtype: &str, shape: Vec<usize>, elem_bytes: usize| EntryPlan {
        name: format!("{name}.{suffix}"),
        dtype: dtype.to_string(),
        bytes: shape.iter().product::<usize>() * elem_bytes,
        shape,
    };
    match scheme {
        QuantScheme::Int8 => vec![
            entry("qweight", "I8", vec![rows, cols], 1),
            entry("scales", "F16", vec![rows], 2),
        ],
        QuantScheme::Int4 { group_size } => {
            let groups = vec![rows, cols / group_size];
            vec![
                entry("qweight", "U8", vec![rows, cols / 2], 1),
                entry("scales", "F16", groups.clone(), 2),
                entry("zeros", "U8", groups, 1),
            ]
        }
        QuantScheme::Nf4 => vec![
            entry("qweight", "U8", vec![rows, cols / 2], 1),
            entry("absmax", "F32", vec![rows, cols / NF4_BLOCK], 4),
        ],
        QuantScheme::Gguf(dtype) => {
            let bytes = rows * cols / dtype.block_size() * dtype.type_size();
            vec![entry("qweight", "U8", vec![bytes], 1)]
        }
    }
}

/// The data of a quantized weight's entries, in the order of [`quantized_entries`].
///
/// # Errors
/// Fails when a GGUF tensor's bytes cannot be read back from its device.
pub fn quantized_bytes(weight: &QuantizedWeight) -> Result<Vec<Cow<'_, [u8]>>> {
    Ok(match weight {
        QuantizedWeight::Int8(w) => vec![
            Cow::Owned(w.qweight.iter().map(|&q| q as u8).collect()),
            Cow::Owned(f16_bytes(&w.scales)),
        ],
        QuantizedWeight::Int4(w) => vec![
            Cow::Borrowed(w.packed.as_slice()),
            Cow::Owned(f16_bytes(&w.scales)),
            Cow::Borrowed(w.zeros.as_slice()),
        ],
        QuantizedWeight::Nf4(w) => vec![
            Cow::Borrowed(w.packed.as_slice()),
            Cow::Owned(w.absmax.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ],
        QuantizedWeight::Gguf(q) => vec![q.data()?],
    })
}

fn f16_bytes(values: &[f16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The safetensors dtype name and little-endian bytes of a dense tensor (F32, F16, BF16, I64, U32,
/// U8 kept; others converted to F32).
///
/// # Errors
/// Fails when the tensor cannot be copied to the host.
pub fn dense_bytes(tensor: &Tensor) -> Result<(&'static str, Vec<u8>)> {
    let t = tensor.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F16 => (
            "F16",
            t.to_vec1::<f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            "BF16",
            t.to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "I64",
            t.to_vec1::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            "U32",
            t.to_vec1::<u32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::U8 => ("U8", t.to_vec1::<u8>()?),
        _ => (
            "F32",
            t.to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
    })
}

/// Saves tensors (dense or quantized) to one safetensors file in the layout above.
///
/// # Errors
/// Fails on a write error or duplicate names.
pub fn save(
    path: &Path,
    tensors: &[(String, StoredTensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut plan = Vec::new();
    let mut data: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut quant = QuantMetadata {
        format: FORMAT.into(),
        tensors: BTreeMap::new(),
    };
    for (name, tensor) in tensors {
        match tensor {
            StoredTensor::Dense(t) => {
                let (dtype, bytes) = dense_bytes(t)?;
                plan.push(EntryPlan {
                    name: name.clone(),
                    dtype: dtype.to_string(),
                    shape: t.dims().to_vec(),
                    bytes: bytes.len(),
                });
                data.push(Cow::Owned(bytes));
            }
            StoredTensor::Quantized(w) => {
                plan.extend(quantized_entries(name, &w.dims(), w.scheme()));
                data.extend(quantized_bytes(w)?);
                quant.tensors.insert(
                    name.clone(),
                    QuantEntry {
                        scheme: w.scheme().to_string(),
                        shape: w.dims(),
                    },
                );
            }
        }
    }
    let mut metadata = metadata.clone();
    if !quant.tensors.is_empty() {
        metadata.insert(
            METADATA_KEY.into(),
            serde_json::to_string(&quant).map_err(|e| EngineError::json(path, e))?,
        );
    }
    let mut writer = SafetensorsWriter::create(path, plan, &metadata)?;
    for bytes in &data {
        writer.write_next(bytes)?;
    }
    writer.finish()
}

/// Loads every tensor of a file in this layout (dense tensors on `device`, quantized weights on
/// the CPU, as kernels build their own device copies).
///
/// # Errors
/// Fails when the file is unreadable, its `quantization` metadata is malformed, or an entry the
/// metadata names is missing or has the wrong size.
pub fn load(path: &Path, device: &Device) -> Result<Vec<(String, StoredTensor)>> {
    let file = SafetensorsFile::open(path)?;
    let quant: QuantMetadata = match file.metadata().get(METADATA_KEY) {
        Some(json) => serde_json::from_str(json).map_err(|e| EngineError::json(path, e))?,
        None => QuantMetadata::default(),
    };
    let mut out = Vec::new();
    let mut parts = std::collections::BTreeSet::new();
    for (name, entry) in &quant.tensors {
        let scheme: QuantScheme = entry.scheme.parse()?;
        if let Some(reason) = scheme.unsupported_reason(&entry.shape) {
            return Err(EngineError::InvalidModel(format!(
                "{}: {name} is recorded as {scheme} with shape {:?}, which it cannot have: {reason}",
                path.display(),
                entry.shape
            )));
        }
        let planned = quantized_entries(name, &entry.shape, scheme);
        let mut data = Vec::new();
        for plan in &planned {
            let raw = file.entries().get(&plan.name);
            let raw = raw
                .filter(|r| r.data_offsets[1] - r.data_offsets[0] == plan.bytes)
                .ok_or_else(|| {
                    EngineError::InvalidModel(format!(
                        "{}: {} is missing or has the wrong size",
                        path.display(),
                        plan.name
                    ))
                })?;
            data.push(file.bytes(raw));
            parts.insert(plan.name.clone());
        }
        out.push((
            name.clone(),
            StoredTensor::Quantized(weight_from_parts(&entry.shape, scheme, &data)?),
        ));
    }
    for name in file.entries().keys().filter(|n| !parts.contains(*n)) {
        out.push((
            name.clone(),
            StoredTensor::Dense(file.tensor(name, device)?),
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Rebuilds a quantized weight from its entries' bytes (sizes already checked).
fn weight_from_parts(
    dims: &[usize],
    scheme: QuantScheme,
    data: &[&[u8]],
) -> Result<QuantizedWeight> {
    let f16s = |b: &[u8]| {
        b.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]))
            .collect::<Vec<_>>()
    };
    Ok(match scheme {
        QuantScheme::Int8 => QuantizedWeight::Int8(Int8Weight {
            dims: dims.to_vec(),
            qweight: data[0].iter().map(|&b| b as i8).collect(),
            scales: f16s(data[1]),
        }),
        QuantScheme::Int4 { group_size } => QuantizedWeight::Int4(Int4Weight {
            dims: dims.to_vec(),
            group_size,
            packed: data[0].to_vec(),
            scales: f16s(data[1]),
            zeros: data[2].to_vec(),
        }),
        QuantScheme::Nf4 => QuantizedWeight::Nf4(Nf4Weight {
            dims: dims.to_vec(),
            packed: data[0].to_vec(),
            absmax: data[1]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }),
        QuantScheme::Gguf(dtype) => QuantizedWeight::Gguf(Arc::new(gguf::qtensor_from_bytes(
            data[0],
            dims,
            dtype,
            &Device::Cpu,
        )?)),
    })
}
