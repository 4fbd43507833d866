//! GGUF for Llama-style models, with llama.cpp tensor names and metadata, q/k rows re-permuted for
//! llama.cpp's interleaved rope. Reference: llama.cpp `convert_hf_to_gguf.py`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};
use crate::loading::gguf::{gguf_name, permute_rows};
use crate::models::llama::LlamaConfig;

/// How to store the weights, and what to record besides the model's shape.
#[derive(Clone, Debug)]
pub struct GgufExportOptions {
    /// The type of 2-D weight matrices; rows whose length is not a multiple of the type's block size
    /// are stored as F32 instead. Norm weights are always F32, as llama.cpp expects.
    pub weight_type: GgmlDType,
    /// A name recorded as `general.name`.
    pub name: String,
    /// Per-tensor types (Hugging Face names), e.g. a quantize stage's plan with its fallbacks for
    /// rows the main type's blocks do not divide. When given, a weight it does not name (excluded
    /// from quantization) is stored as F32 and `weight_type` is not used.
    pub tensor_types: Option<std::collections::BTreeMap<String, GgmlDType>>,
    /// More metadata to write as is, typically the source model's `tokenizer.ggml.*` entries (see
    /// `loading::gguf::read_gguf_metadata`), without which llama.cpp cannot tokenize.
    pub extra_metadata: Vec<(String, Value)>,
    /// Weights already quantized to a GGUF block type (Hugging Face names), written as they are
    /// instead of quantizing the float values again; q/k rows are permuted block row by block row.
    pub packed: BTreeMap<String, Arc<QTensor>>,
}

impl Default for GgufExportOptions {
    fn default() -> Self {
        Self {
            weight_type: GgmlDType::F32,
            tensor_types: None,
            name: "compressd".into(),
            extra_metadata: Vec::new(),
            packed: BTreeMap::new(),
        }
    }
}

/// Writes a Llama-style model (tensors under Hugging Face names) as GGUF at `path`.
///
/// # Errors
/// Fails on unknown tensor names, inconsistent configs, quantization or I/O errors.
pub fn export_llama_gguf(
    path: &Path,
    config: &LlamaConfig,
    tensors: &[(String, Tensor)],
    options: GgufExportOptions,
) -> Result<()> {
    let head_dim = config.head_dim()?;
    // GGUF readers (llama.cpp, candle) take the head size as embedding_length / head_count.
    if head_dim * config.num_attention_heads != config.hidden_size {
        return Err(EngineError::Unsupported(format!(
            "GGUF cannot describe {} heads of size {head_dim} in a {}-wide model (its readers \
             take the head size as width / heads): prune FFN neurons only for a GGUF output",
            config.num_attention_heads, config.hidden_size
        )));
    }
    let mut qtensors = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if name == "lm_head.weight" && config.tie_word_embeddings {
            continue;
        }
        let gguf = gguf_name(name).ok_or_else(|| {
            EngineError::InvalidModel(format!("no GGUF name for tensor {name:?}"))
        })?;
        let rope_heads = match name.rsplit('.').nth(1) {
            Some("q_proj") => Some(config.num_attention_heads),
            Some("k_proj") => Some(config.kv_heads()),
            _ => None,
        };
        if let Some(packed) = options.packed.get(name) {
            let packed = match rope_heads {
                Some(heads) => Arc::new(permute_packed_rows(packed, heads)?),
                None => packed.clone(),
            };
            qtensors.push((gguf, packed));
            continue;
        }
        let tensor = match rope_heads {
            Some(heads) => permute_rows(tensor, heads)?,
            None => tensor.clone(),
        };
        let dtype = match &options.tensor_types {
            Some(types) => types.get(name).copied().unwrap_or(GgmlDType::F32),
            None => options.weight_type,
        };
        let quantized = quantize(&tensor.to_dtype(DType::F32)?, dtype)?;
        qtensors.push((gguf, Arc::new(quantized)));
    }
    let mut metadata = llama_metadata(config, head_dim, &options.name);
    metadata.extend(options.extra_metadata.iter().cloned());
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(n, t)| (n.as_str(), &**t)).collect();
    let file = File::create(path).map_err(|e| EngineError::io(path, e))?;
    let mut writer = BufWriter::new(file);
    gguf_file::write(&mut writer, &metadata_refs, &tensor_refs)?;
    Ok(())
}

/// Quantizes a weight matrix to `dtype` when its rows fit the block size; vectors and misfits stay F32.
/// llama.cpp's q/k row permutation on a quantized matrix: blocks never span rows, so each row's
/// bytes move as a whole and no value is quantized again.
fn permute_packed_rows(packed: &QTensor, heads: usize) -> Result<QTensor> {
    let dims = packed.shape().dims().to_vec();
    let data = packed.data()?;
    let rows = dims.first().copied().unwrap_or(0);
    if rows == 0 || data.len() % rows != 0 {
        return Err(EngineError::InvalidModel(format!(
            "cannot split a {:?} block tensor of {} bytes into rows",
            dims,
            data.len()
        )));
    }
    let bytes = Tensor::from_slice(&data, (rows, data.len() / rows), &Device::Cpu)?;
    let permuted = permute_rows(&bytes, heads)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let storage = QStorage::from_data(Cow::Owned(permuted), &Device::Cpu, packed.dtype())?;
    Ok(QTensor::new(storage, dims)?)
}

fn quantize(tensor: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let fits = tensor.rank() == 2 && tensor.dims()[1].is_multiple_of(dtype.block_size());
    let dtype = if fits { dtype } else { GgmlDType::F32 };
    Ok(QTensor::quantize(tensor, dtype)?)
}

fn llama_metadata(config: &LlamaConfig, head_dim: usize, name: &str) -> Vec<(String, Value)> {
    let u32_of = |n: usize| Value::U32(n as u32);
    vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("llama.block_count".into(), u32_of(config.num_hidden_layers)),
        (
            "llama.context_length".into(),
            u32_of(config.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32_of(config.hidden_size)),
        (
            "llama.feed_forward_length".into(),
            u32_of(config.intermediate_size),
        ),
        (
            "llama.attention.head_count".into(),
            u32_of(config.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32_of(config.kv_heads()),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config.rope_theta as f32),
        ),
        ("llama.rope.dimension_count".into(), u32_of(head_dim)),
        ("llama.vocab_size".into(), u32_of(config.vocab_size)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_rows_permute_like_the_float_rows() {
        let values: Vec<f32> = (0..8 * 64)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let weight = Tensor::from_vec(values, (8, 64), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let packed = QTensor::quantize(&weight, dtype).unwrap();
            let moved = permute_packed_rows(&packed, 2).unwrap();
            let expected = permute_rows(&packed.dequantize(&Device::Cpu).unwrap(), 2).unwrap();
            let got = moved.dequantize(&Device::Cpu).unwrap();
            let diff = (got - expected).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{dtype:?}");
            assert_eq!(moved.dtype(), dtype);
        }
        let odd = QTensor::quantize(&weight, GgmlDType::Q8_0).unwrap();
        assert!(
            permute_packed_rows(&odd, 3).is_err(),
            "8 rows are not 3 heads of pairs"
        );
    }
}
