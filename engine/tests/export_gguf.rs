//! A Llama-style model exported as GGUF loads in candle-transformers' quantized_llama (which uses
//! llama.cpp's names and interleaved rope) with the same logits, and round-trips through our loader.

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use compressd_engine::export::{export_llama_gguf, GgufExportOptions};
use compressd_engine::layers::LinearFactory;
use compressd_engine::loading::gguf::read_gguf_metadata;
use compressd_engine::loading::read_gguf;
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};
use compressd_engine::params::ParamStore;

fn tiny_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 96, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": true
    }))
    .expect("valid config")
}

fn last_logits_of_candle_quantized_llama(path: &std::path::Path, ids: &Tensor) -> Result<Tensor> {
    let mut file = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut model = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut file,
        &Device::Cpu,
    )?;
    Ok(model.forward(ids, 0)?.squeeze(0)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn exported_gguf_matches_candle_quantized_llama_and_round_trips() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let store = ParamStore::new();
    store.set_init_missing(Some(11));
    let ours = LlamaForCausalLm::load(
        store.var_builder(DType::F32, &dev),
        &cfg,
        &LinearFactory::default(),
    )?;
    // Fresh norms are all ones; perturb them so a misplaced norm would show.
    for (name, var) in store.trainable_vars() {
        if name.ends_with("norm.weight") {
            var.set(&(var.as_tensor() + var.randn_like(0.0, 0.2)?)?)?;
        }
    }
    let ids = Tensor::new(&[[1u32, 50, 7, 93, 12, 3]], &dev)?;
    let our_last = ours.forward(&ids, None, None)?.logits.i((0, 5))?;
    let dir = tempfile::tempdir()?;

    let f32_path = dir.path().join("model-f32.gguf");
    export_llama_gguf(
        &f32_path,
        &cfg,
        &store.tensors(),
        GgufExportOptions::default(),
    )?;
    let diff = max_diff(
        &last_logits_of_candle_quantized_llama(&f32_path, &ids)?,
        &our_last,
    )?;
    assert!(diff < 1e-3, "F32 GGUF logits differ by {diff}");

    let checkpoint = read_gguf(&f32_path, DType::F32, &dev)?;
    let reread: LlamaConfig = checkpoint.parse_config()?;
    assert!(reread.tie_word_embeddings);
    assert_eq!(reread.kv_heads(), 2);
    let reloaded_store = checkpoint.into_store(|_| false)?;
    let reloaded = LlamaForCausalLm::load(
        reloaded_store.var_builder(DType::F32, &dev),
        &reread,
        &LinearFactory::default(),
    )?;
    let diff = max_diff(
        &reloaded.forward(&ids, None, None)?.logits.i((0, 5))?,
        &our_last,
    )?;
    assert!(diff < 1e-5, "GGUF round trip changed logits by {diff}");

    let q8_path = dir.path().join("model-q8.gguf");
    let tokenizer_model = (
        "tokenizer.ggml.model".to_string(),
        Value::String("gpt2".into()),
    );
    let options = GgufExportOptions {
        weight_type: GgmlDType::Q8_0,
        extra_metadata: vec![tokenizer_model.clone()],
        ..Default::default()
    };
    export_llama_gguf(&q8_path, &cfg, &store.tensors(), options)?;
    let carried = read_gguf_metadata(&q8_path, "tokenizer.")?;
    assert_eq!(carried.len(), 1);
    assert_eq!(carried[0].0, tokenizer_model.0);
    assert_eq!(carried[0].1.to_string()?, "gpt2");
    let q8_last = last_logits_of_candle_quantized_llama(&q8_path, &ids)?;
    let spread = our_last.abs()?.max(0)?.to_scalar::<f32>()?;
    let diff = max_diff(&q8_last, &our_last)?;
    assert!(
        diff < 0.05 * spread.max(1.0),
        "Q8_0 GGUF logits differ by {diff} (max |logit| {spread})"
    );
    Ok(())
}
