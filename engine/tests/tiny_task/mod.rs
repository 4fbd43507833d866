//! A tiny keyword-classification task shared by the engine's and the service's end-to-end tests:
//! a random 2-layer BERT encoder saved as a Hugging Face folder, and a JSONL dataset whose label
//! is decided by one keyword per row.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use compressd_engine::export::export_hf_folder;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification};
use compressd_engine::params::ParamStore;

const TOKENIZER: &str = r#"{
  "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
  "normalizer": {"type": "Lowercase"}, "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {"type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                       "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
  "decoder": null,
  "model": {"type": "WordLevel", "unk_token": "[UNK]",
    "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "good": 4, "bad": 5, "movie": 6,
              "great": 7, "awful": 8, "film": 9, "the": 10, "a": 11, "plot": 12, "was": 13}}
}"#;

/// A random 2-layer BERT (hidden 32) saved as a Hugging Face folder with the tokenizer.
pub fn write_model(dir: &Path) -> Result<()> {
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 14, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 32,
        "type_vocab_size": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0
    });
    let cfg: BertConfig = serde_json::from_value(config.clone())?;
    let store = ParamStore::new();
    store.set_init_missing(Some(3));
    BertForSequenceClassification::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &cfg,
        &LinearFactory::default(),
    )?;
    // Missing linear weights are created as zeros; an encoder needs random ones to learn anything.
    // The input model is an encoder without a task head, like a sentence-transformer.
    let mut tensors = Vec::new();
    for (name, t) in store
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("classifier"))
    {
        let random = t.rank() == 2 && !name.contains("embeddings");
        tensors.push((
            name,
            if random {
                Tensor::randn(0f32, 0.2, t.dims(), &Device::Cpu)?
            } else {
                t
            },
        ));
    }
    export_hf_folder(dir, &config, &tensors, None)?;
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER)?;
    Ok(())
}

/// Rows of filler words; positive when they contain "good" or "great".
pub fn write_data(path: &Path) -> Result<()> {
    let words = ["movie", "film", "the", "a", "plot", "was"];
    let mut lines = Vec::new();
    for i in 0..240usize {
        let positive = i % 2 == 0;
        let key = match (positive, i % 3) {
            (true, 0) => "great",
            (true, _) => "good",
            (false, 0) => "awful",
            (false, _) => "bad",
        };
        let text = format!(
            "{} {} {} {}",
            words[i % 6],
            words[(i / 6) % 6],
            key,
            words[(i / 36) % 6]
        );
        let split = if i % 5 == 0 { "test" } else { "train" };
        let label = if positive { "pos" } else { "neg" };
        lines.push(serde_json::json!({"text": text, "label": label, "split": split}).to_string());
    }
    std::fs::write(path, lines.join("\n"))?;
    Ok(())
}
