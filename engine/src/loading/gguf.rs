//! GGUF files of Llama-style models: metadata → Hugging Face config, every tensor dequantized, and
//! llama.cpp tensor names mapped to Hugging Face names.
//!
//! llama.cpp's converter permutes the rows of the q and k projections of Llama-family models so its
//! rope can rotate interleaved pairs `(2i, 2i+1)`; Hugging Face checkpoints (and our model) rotate
//! halves `(i, i + d/2)`. [`unpermute_rows`] undoes that permutation on load and [`permute_rows`]
//! redoes it on export. Architectures llama.cpp runs with "NEOX" rope (Qwen2, ...) are not permuted.
//! Reference: llama.cpp `convert_hf_to_gguf.py` (`LlamaModel.permute`) and `gguf-py`'s tensor map.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::Checkpoint;
use crate::error::{EngineError, Result};

/// Per-block tensor names: llama.cpp suffix after `blk.N.`, Hugging Face suffix after
/// `model.layers.N.`.
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Whole-model tensor names (without the `.weight` suffix): llama.cpp, Hugging Face.
const MODEL_NAMES: &[(&str, &str)] = &[
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// The Hugging Face name of a llama.cpp tensor name, if it is one we know.
pub fn hf_name(gguf_name: &str) -> Option<String> {
    let (stem, kind) = gguf_name.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("blk.") {
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let hf = BLOCK_NAMES.iter().find(|(g, _)| *g == suffix)?.1;
        return Some(format!("model.layers.{layer}.{hf}.{kind}"));
    }
    MODEL_NAMES
        .iter()
        .find(|(g, _)| *g == stem)
        .map(|(_, hf)| format!("{hf}.{kind}"))
}

/// The llama.cpp name of a Hugging Face tensor name, if it is one we know.
pub fn gguf_name(hf_name: &str) -> Option<String> {
    let (stem, kind) = hf_name.rsplit_once('.')?;
    if let Some(rest) = stem.strip_prefix("model.layers.") {
        let (layer, suffix) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let gguf = BLOCK_NAMES.iter().find(|(_, h)| *h == suffix)?.0;
        return Some(format!("blk.{layer}.{gguf}.{kind}"));
    }
    MODEL_NAMES
        .iter()
        .find(|(_, h)| *h == stem)
        .map(|(g, _)| format!("{g}.{kind}"))
}

/// Whether llama.cpp permuted this architecture's q/k rows for interleaved rope.
///
/// # Errors
/// Fails for architectures this loader does not support.
pub fn uses_interleaved_rope(arch: &str) -> Result<bool> {
    match arch {
        "llama" | "mistral" | "granite" => Ok(true),
        "qwen2" | "qwen3" => Ok(false),
        other => Err(EngineError::Unsupported(format!(
            "GGUF architecture {other:?}"
        ))),
    }
}

/// Undoes llama.cpp's q/k permutation: rows `(head, pair, 2)` → `(head, 2, pair)`.
///
/// # Errors
/// Fails when the rows do not split into `heads` heads of even size.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_rows(w, heads, false)
}

/// Applies llama.cpp's q/k permutation: rows `(head, 2, pair)` → `(head, pair, 2)`.
///
/// # Errors
/// Fails when the rows do not split into `heads` heads of even size.
pub fn permute_rows(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    reorder_rows(w, heads, true)
}

fn reorder_rows(w: &Tensor, heads: usize, to_interleaved: bool) -> candle_core::Result<Tensor> {
    let dims = w.dims().to_vec();
    let rows = dims[0];
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        candle_core::bail!("cannot split {rows} rows into {heads} rope heads");
    }
    let half = rows / heads / 2;
    let rest: usize = dims[1..].iter().product();
    let split = if to_interleaved {
        (heads, 2, half, rest)
    } else {
        (heads, half, 2, rest)
    };
    w.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// Reads a GGUF file: metadata becomes a Hugging Face `config.json`, every tensor is dequantized to
/// `dtype` on `device` under its Hugging Face name (q/k rows un-permuted where llama.cpp permuted
/// them). A missing `output.weight` means tied embeddings.
///
/// # Errors
/// Fails on I/O errors, missing metadata, unknown tensor names or unsupported architectures.
pub fn read_gguf(path: &Path, dtype: DType, device: &Device) -> Result<Checkpoint> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
    let meta = GgufMeta { content: &content };
    let arch = meta.string("general.architecture")?;
    let interleaved = uses_interleaved_rope(&arch)?;
    let heads = meta.usize(&format!("{arch}.attention.head_count"))?;
    let kv_heads = meta
        .usize(&format!("{arch}.attention.head_count_kv"))
        .unwrap_or(heads);

    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let hf = hf_name(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("unknown GGUF tensor {name:?}")))?;
        let tensor = content
            .tensor(&mut file, name, device)
            .and_then(|q| q.dequantize(device))
            .map_err(|e| EngineError::InvalidModel(format!("tensor {name}: {e}")))?;
        let tensor = match (interleaved, hf.rsplit('.').nth(1)) {
            (true, Some("q_proj")) => unpermute_rows(&tensor, heads)?,
            (true, Some("k_proj")) => unpermute_rows(&tensor, kv_heads)?,
            _ => tensor,
        };
        tensors.push((hf, tensor.to_dtype(dtype)?));
    }
    let config = llama_config(&meta, &arch, &tensors)?;
    let tokenizer = Some(path.with_file_name("tokenizer.json")).filter(|p| p.is_file());
    Ok(Checkpoint {
        config,
        tensors,
        tokenizer,
    })
}

/// The metadata entries of a GGUF file whose keys start with `prefix` (e.g. `tokenizer.` to carry
/// the vocabulary into an exported file), sorted by key.
///
/// # Errors
/// Fails when the file cannot be read or is not GGUF.
pub fn read_gguf_metadata(path: &Path, prefix: &str) -> Result<Vec<(String, Value)>> {
    let mut file = File::open(path).map_err(|e| EngineError::io(path, e))?;
    let content = Content::read(&mut file)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
    let mut entries: Vec<(String, Value)> = content
        .metadata
        .into_iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// Typed access to GGUF metadata with errors that name the key.
struct GgufMeta<'a> {
    content: &'a Content,
}

impl GgufMeta<'_> {
    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::InvalidModel(format!("GGUF metadata lacks {key}")))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        let n = v.to_u32().map(u64::from).or_else(|_| v.to_u64());
        n.map(|n| n as usize)
            .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.value(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.value(key)?
            .to_string()
            .cloned()
            .map_err(|e| EngineError::InvalidModel(format!("{key}: {e}")))
    }
}

/// A Hugging Face Llama `config.json` from GGUF metadata and the loaded tensors.
fn llama_config(
    meta: &GgufMeta,
    arch: &str,
    tensors: &[(String, Tensor)],
) -> Result<serde_json::Value> {
    let key = |k: &str| format!("{arch}.{k}");
    let embed = tensors
        .iter()
        .find(|(n, _)| n == "model.embed_tokens.weight")
        .ok_or_else(|| EngineError::InvalidModel("GGUF lacks token_embd.weight".into()))?;
    let (vocab_size, hidden_size) = embed.1.dims2()?;
    let heads = meta.usize(&key("attention.head_count"))?;
    let has_bias = tensors.iter().any(|(n, _)| n.ends_with("q_proj.bias"));
    Ok(json!({
        "model_type": arch,
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": meta.usize(&key("feed_forward_length"))?,
        "num_hidden_layers": meta.usize(&key("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta.usize(&key("attention.head_count_kv")).unwrap_or(heads),
        "max_position_embeddings": meta.usize(&key("context_length")).unwrap_or(2048),
        "rms_norm_eps": meta.f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": meta.f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        "tie_word_embeddings": !tensors.iter().any(|(n, _)| n == "lm_head.weight"),
        "attention_bias": has_bias,
        "hidden_act": "silu",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for (gguf, hf) in [
            (
                "blk.3.attn_q.weight",
                "model.layers.3.self_attn.q_proj.weight",
            ),
            (
                "blk.0.ffn_down.weight",
                "model.layers.0.mlp.down_proj.weight",
            ),
            (
                "blk.12.attn_norm.weight",
                "model.layers.12.input_layernorm.weight",
            ),
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output.weight", "lm_head.weight"),
            ("output_norm.weight", "model.norm.weight"),
        ] {
            assert_eq!(hf_name(gguf).as_deref(), Some(hf));
            assert_eq!(gguf_name(hf).as_deref(), Some(gguf));
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary.inv_freq"), None);
    }

    #[test]
    fn permutation_round_trips_and_interleaves_pairs() {
        // Two heads of size 4: rows 0..8. Rotate-half pairs (0,2),(1,3) become adjacent rows.
        let w = Tensor::arange(0f32, 8., &Device::Cpu)
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let permuted = permute_rows(&w, 2).unwrap();
        let rows: Vec<f32> = permuted.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(rows, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
        let back: Vec<f32> = unpermute_rows(&permuted, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert!(permute_rows(&w, 3).is_err());
    }
}
