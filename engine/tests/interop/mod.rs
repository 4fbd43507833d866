//! Helpers for checking a job's saved model in Hugging Face transformers: a tiny random Llama with a
//! word-level tokenizer and a cyclic corpus (the job's inputs), the engine's own logits for a saved
//! model, and a call of `compare.py` (beside this file) with the Python that `.ci/run` prepares.

#![allow(dead_code)] // each test binary uses a part of these helpers

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use compressd_engine::export::export_hf_folder;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification, BertInput};
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};
use compressd_engine::params::ParamStore;
use compressd_engine::stages::WorkingModel;
use serde_json::{json, Value};

/// The variable naming the Python (with torch and transformers) that runs `compare.py`.
pub const PYTHON_VAR: &str = "COMPRESSD_INTEROP_PYTHON";
/// The Python environment `.ci/run` creates.
pub const CI_PYTHON: &str = "/root/.cache/compressd-pyenv/bin/python";

/// Words of the tiny Llama's vocabulary, by id.
const WORDS: [&str; 16] = [
    "<pad>", "the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "its", "red",
    "ball", "then", "slept",
];

/// A word-level tokenizer over [`WORDS`], no special tokens added.
fn llama_tokenizer() -> String {
    let vocab: serde_json::Map<String, Value> = WORDS
        .iter()
        .enumerate()
        .map(|(i, w)| ((*w).to_string(), json!(i)))
        .collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<pad>", "vocab": vocab}
    })
    .to_string()
}

/// A random 2-layer Llama (hidden 32, 4 heads over 2 key/value groups) saved as a Hugging Face
/// folder with its tokenizer; `tied` shares the embedding with the output layer.
pub fn write_llama(dir: &Path, tied: bool) -> Result<()> {
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": WORDS.len(),
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied
    });
    let cfg: LlamaConfig = serde_json::from_value(config.clone())?;
    let store = ParamStore::new();
    store.set_init_missing(Some(11));
    LlamaForCausalLm::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &cfg,
        &LinearFactory::default(),
    )?;
    // Missing linear weights are created as zeros; random ones make every position's logits differ.
    let mut tensors = Vec::new();
    for (name, t) in store.tensors() {
        let t = if t.rank() == 2 {
            Tensor::randn(0f32, 0.2, t.dims(), &Device::Cpu)?
        } else {
            t
        };
        tensors.push((name, t));
    }
    export_hf_folder(dir, &config, &tensors, None)?;
    std::fs::write(dir.join("tokenizer.json"), llama_tokenizer())?;
    Ok(())
}

/// A corpus of short stories over [`WORDS`]; the next word is mostly determined.
pub fn write_corpus(path: &Path) -> Result<()> {
    let stories = [
        "the cat sat on a mat and then slept",
        "the dog ran to its red ball and then slept",
        "a cat ran to a red mat",
        "the dog sat on its mat",
    ];
    let text: Vec<&str> = (0..60).map(|i| stories[(i * 7 + i / 4) % 4]).collect();
    std::fs::write(path, text.join(" "))?;
    Ok(())
}

/// The engine's classification logits for each row of token ids (one row per pass, no padding),
/// every layer dense on the stored (for a quantized model, dequantized) weights.
pub fn classifier_logits(model: &WorkingModel, rows: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    classifier_logits_with(model, rows, &LinearFactory::default())
}

/// As [`classifier_logits`], with the model's own layers (a quantized model's int8 kernels).
pub fn quantized_classifier_logits(
    model: &WorkingModel,
    rows: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    classifier_logits_with(model, rows, &model.linear_factory())
}

fn classifier_logits_with(
    model: &WorkingModel,
    rows: &[Vec<u32>],
    factory: &LinearFactory,
) -> Result<Vec<Vec<f32>>> {
    let cfg: BertConfig = serde_json::from_value(model.config.clone())?;
    let vb = model.store.var_builder(DType::F32, &Device::Cpu);
    let classifier = BertForSequenceClassification::load(vb, &cfg, factory)?;
    rows.iter()
        .map(|ids| {
            let input_ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let input = BertInput {
                input_ids: &input_ids,
                token_type_ids: None,
                attention_mask: None,
            };
            let logits = classifier.forward(input, None)?.logits;
            Ok(logits.squeeze(0)?.to_vec1::<f32>()?)
        })
        .collect()
}

/// The engine's next-token logits `[seq][vocab]` for each row of token ids.
pub fn lm_logits(model: &WorkingModel, rows: &[Vec<u32>]) -> Result<Vec<Vec<Vec<f32>>>> {
    let cfg: LlamaConfig = serde_json::from_value(model.config.clone())?;
    let vb = model.store.var_builder(DType::F32, &Device::Cpu);
    let lm = LlamaForCausalLm::load(vb, &cfg, &LinearFactory::default())?;
    rows.iter()
        .map(|ids| {
            let input_ids = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let logits = lm.forward(&input_ids, None, None)?.logits;
            Ok(logits.squeeze(0)?.to_vec2::<f32>()?)
        })
        .collect()
}

/// The Python named by [`PYTHON_VAR`], else `python3`.
fn python() -> PathBuf {
    std::env::var_os(PYTHON_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// Runs `compare.py` on `request` (see its docstring) offline and returns its result.
///
/// # Errors
/// Fails, saying how to get a suitable Python, when the script cannot run or load the model.
pub fn transformers_compare(request: &Value) -> Result<Value> {
    let dir = tempfile::tempdir()?;
    let request_path = dir.path().join("request.json");
    let result_path = dir.path().join("result.json");
    std::fs::write(&request_path, serde_json::to_vec(request)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/compare.py");
    let python = python();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&request_path)
        .arg(&result_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("TOKENIZERS_PARALLELISM", "false")
        .output()
        .with_context(|| {
            format!(
                "cannot start {} (set {PYTHON_VAR} to a Python with torch and transformers; \
                 .ci/run creates {CI_PYTHON})",
                python.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}); it needs torch and transformers: set {PYTHON_VAR} (.ci/run \
             creates {CI_PYTHON}).\nstderr:\n{}",
            python.display(),
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = std::fs::read_to_string(&result_path).context("compare.py wrote no result")?;
    let result: Value = serde_json::from_str(&text)?;
    eprintln!("transformers: {result}");
    Ok(result)
}

/// Asserts that transformers built `class` from the folder with every tensor it expects and no
/// other, and that its predictions agree with the engine's on at least `min_agreement` of them.
pub fn assert_loaded_and_agrees(result: &Value, class: &str, min_agreement: f64) {
    assert_eq!(result["class"], class, "{result}");
    assert_eq!(result["config_architectures"], json!([class]), "{result}");
    for keys in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
        assert_eq!(
            result[keys],
            json!([]),
            "transformers had to invent or drop weights: {result}"
        );
    }
    let agreement = result["argmax_agreement"].as_f64().unwrap_or(0.0);
    assert!(
        agreement >= min_agreement,
        "argmax agreement {agreement} < {min_agreement}: {result}"
    );
}
