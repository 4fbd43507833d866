//! A Llama-style model exported as GGUF loads in candle-transformers' quantized_llama (which uses
//! llama.cpp's names and interleaved rope) with the same logits, and round-trips through our loader;
//! its `tokenizer.*` metadata is carried from a GGUF source or rebuilt from tokenizer.json.

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, IndexOp, Tensor};
use compressd_engine::export::{
    export_llama_gguf, metadata_from_tokenizer_json, tokenizer_metadata, GgufExportOptions,
};
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

/// `tokenizer.*` entries by key, each shown with `Debug` (candle's `Value` has no `PartialEq`).
fn tokenizer_entries(path: &std::path::Path) -> Result<Vec<(String, String)>> {
    Ok(read_gguf_metadata(path, "tokenizer.")?
        .into_iter()
        .map(|(k, v)| (k, format!("{v:?}")))
        .collect())
}

fn strings(values: &[&str]) -> Value {
    Value::Array(values.iter().map(|s| Value::String((*s).into())).collect())
}

/// Exports the tiny model with `metadata` carried, as the pipeline does, and returns the output.
fn export_with(
    dir: &std::path::Path,
    metadata: Vec<(String, Value)>,
) -> Result<std::path::PathBuf> {
    let cfg = tiny_config();
    let store = ParamStore::new();
    store.set_init_missing(Some(3));
    LlamaForCausalLm::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &cfg,
        &LinearFactory::default(),
    )?;
    let path = dir.join("exported.gguf");
    let options = GgufExportOptions {
        weight_type: GgmlDType::Q8_0,
        extra_metadata: metadata,
        ..Default::default()
    };
    export_llama_gguf(&path, &cfg, &store.tensors(), options)?;
    Ok(path)
}

/// A GGUF source's whole vocabulary (tokens, scores, types, merges, special ids) reaches the export.
#[test]
fn tokenizer_metadata_of_a_gguf_source_round_trips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = dir.path().join("source.gguf");
    let entries: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            strings(&["<unk>", "<s>", "</s>", "▁a", "b"]),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array([0.0f32, 0.0, 0.0, -1.5, -2.0].map(Value::F32).to_vec()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array([2i32, 3, 3, 1, 1].map(Value::I32).to_vec()),
        ),
        ("tokenizer.ggml.merges", strings(&["▁ a"])),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
    ];
    let refs: Vec<(&str, &Value)> = entries.iter().map(|(k, v)| (*k, v)).collect();
    gguf_file::write(&mut std::fs::File::create(&source)?, &refs, &[])?;

    let carried = tokenizer_metadata(&source, None)?;
    assert_eq!(carried.len(), 7, "every tokenizer.* entry and nothing else");
    let exported = export_with(dir.path(), carried)?;
    assert_eq!(tokenizer_entries(&exported)?, tokenizer_entries(&source)?);
    Ok(())
}

/// Without a GGUF source, the vocabulary is rebuilt from tokenizer.json (+ tokenizer_config.json).
#[test]
fn tokenizer_metadata_is_rebuilt_from_tokenizer_json() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tokenizer = serde_json::json!({
        "added_tokens": [
            {"id": 0, "content": "<|endoftext|>", "special": true},
            {"id": 5, "content": "<extra>", "special": false}
        ],
        "post_processor": {"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A"}}]},
        "model": {
            "type": "BPE", "byte_fallback": false,
            "vocab": {"<|endoftext|>": 0, "a": 1, "b": 2, "ab": 3, "Ġab": 4},
            "merges": [["a", "b"], "Ġ ab"]
        }
    });
    let json_path = dir.path().join("tokenizer.json");
    std::fs::write(&json_path, tokenizer.to_string())?;
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}}"#,
    )?;
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir)?;

    let exported = export_with(
        &model_dir,
        tokenizer_metadata(&model_dir, Some(&json_path))?,
    )?;
    let meta: std::collections::BTreeMap<String, Value> =
        read_gguf_metadata(&exported, "tokenizer.")?
            .into_iter()
            .collect();
    assert_eq!(meta["tokenizer.ggml.model"].to_string()?, "gpt2");
    let tokens: Vec<String> = meta["tokenizer.ggml.tokens"]
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect::<Result<_>>()?;
    assert_eq!(tokens, ["<|endoftext|>", "a", "b", "ab", "Ġab", "<extra>"]);
    let types: Vec<i32> = meta["tokenizer.ggml.token_type"]
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_i32()?))
        .collect::<Result<_>>()?;
    assert_eq!(types, [3, 1, 1, 1, 1, 4]);
    let merges: Vec<String> = meta["tokenizer.ggml.merges"]
        .to_vec()?
        .iter()
        .map(|v| Ok(v.to_string()?.clone()))
        .collect::<Result<_>>()?;
    assert_eq!(merges, ["a b", "Ġ ab"]);
    assert_eq!(meta["tokenizer.ggml.bos_token_id"].to_u32()?, 0);
    assert_eq!(meta["tokenizer.ggml.eos_token_id"].to_u32()?, 0);
    assert!(!meta["tokenizer.ggml.add_bos_token"].to_bool()?);

    // A WordPiece vocabulary cannot be written as GGUF BPE: an error, not a silently wrong file.
    std::fs::write(
        &json_path,
        r#"{"model": {"type": "WordPiece", "vocab": {}}}"#,
    )?;
    assert!(tokenizer_metadata(&model_dir, Some(&json_path)).is_err());
    Ok(())
}

/// SmolLM2's tokenizer.json rebuilds the very vocabulary its GGUF carries (needs ../shared).
#[test]
#[ignore = "needs ../shared: cargo test -p compressd-engine --test models export_gguf::smollm2 -- --ignored"]
fn smollm2_tokenizer_json_rebuilds_its_gguf_vocabulary() -> Result<()> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
        })
        .join("models/SmolLM2-135M-Instruct-Q4_1");
    anyhow::ensure!(
        dir.is_dir(),
        "{} not found (set COMPRESSD_SHARED)",
        dir.display()
    );
    let gguf: std::collections::BTreeMap<String, String> =
        tokenizer_entries(&dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"))?
            .into_iter()
            .collect();
    let rebuilt = metadata_from_tokenizer_json(&dir.join("tokenizer.json"))?;
    let keys = [
        "tokenizer.ggml.model",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
    ];
    for key in keys {
        let ours = rebuilt
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| format!("{v:?}"));
        assert_eq!(ours.as_ref(), gguf.get(key), "{key}");
    }
    Ok(())
}

/// With per-tensor types (a quantize stage's plan), each weight keeps its own type and weights the
/// plan does not name stay F32, instead of one type for all.
#[test]
fn per_tensor_types_are_kept_in_the_export() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let store = ParamStore::new();
    store.set_init_missing(Some(5));
    LlamaForCausalLm::load(
        store.var_builder(DType::F32, &dev),
        &cfg,
        &LinearFactory::default(),
    )?;
    let mut types = std::collections::BTreeMap::new();
    types.insert(
        "model.layers.0.mlp.down_proj.weight".to_string(),
        GgmlDType::Q8_0,
    );
    types.insert(
        "model.layers.0.self_attn.q_proj.weight".to_string(),
        GgmlDType::Q4_0,
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("planned.gguf");
    let options = GgufExportOptions {
        weight_type: GgmlDType::Q4K,
        tensor_types: Some(types),
        ..Default::default()
    };
    export_llama_gguf(&path, &cfg, &store.tensors(), options)?;
    let content = gguf_file::Content::read(&mut std::fs::File::open(&path)?)?;
    let type_of = |name: &str| content.tensor_infos[name].ggml_dtype;
    assert_eq!(type_of("blk.0.ffn_down.weight"), GgmlDType::Q8_0);
    assert_eq!(type_of("blk.0.attn_q.weight"), GgmlDType::Q4_0);
    assert_eq!(type_of("blk.1.ffn_down.weight"), GgmlDType::F32);
    assert_eq!(type_of("token_embd.weight"), GgmlDType::F32);
    Ok(())
}
