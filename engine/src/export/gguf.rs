//! GGUF for Llama-style models, with llama.cpp tensor names and metadata, q/k rows re-permuted for
//! llama.cpp's interleaved rope. Reference: llama.cpp `convert_hf_to_gguf.py`.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

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
}

impl Default for GgufExportOptions {
    fn default() -> Self {
        Self {
            weight_type: GgmlDType::F32,
            tensor_types: None,
            name: "compressd".into(),
            extra_metadata: Vec::new(),
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
    let mut qtensors = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if name == "lm_head.weight" && config.tie_word_embeddings {
            continue;
        }
        let gguf = gguf_name(name).ok_or_else(|| {
            EngineError::InvalidModel(format!("no GGUF name for tensor {name:?}"))
        })?;
        let tensor = match name.rsplit('.').nth(1) {
            Some("q_proj") => permute_rows(tensor, config.num_attention_heads)?,
            Some("k_proj") => permute_rows(tensor, config.kv_heads())?,
            _ => tensor.clone(),
        };
        let dtype = match &options.tensor_types {
            Some(types) => types.get(name).copied().unwrap_or(GgmlDType::F32),
            None => options.weight_type,
        };
        qtensors.push((gguf, quantize(&tensor.to_dtype(DType::F32)?, dtype)?));
    }
    let mut metadata = llama_metadata(config, head_dim, &options.name);
    metadata.extend(options.extra_metadata.iter().cloned());
    let metadata_refs: Vec<(&str, &Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let file = File::create(path).map_err(|e| EngineError::io(path, e))?;
    let mut writer = BufWriter::new(file);
    gguf_file::write(&mut writer, &metadata_refs, &tensor_refs)?;
    Ok(())
}

/// Quantizes a weight matrix to `dtype` when its rows fit the block size; vectors and misfits stay F32.
fn quantize(tensor: &Tensor, dtype: GgmlDType) -> Result<QTensor> {
    let fits = tensor.rank() == 2 && tensor.dims()[1] % dtype.block_size() == 0;
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
