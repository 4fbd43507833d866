//! The whole pipeline on a tiny random BERT and a synthetic keyword dataset: fine-tune, iterative
//! pruning with recovery, int8 quantization; then a saved stage is loaded back as a resume would.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use compressd_engine::export::export_hf_folder;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification};
use compressd_engine::params::ParamStore;
use compressd_engine::pipeline::{Event, PipelineInputs, Workbench};
use compressd_engine::quant::layout::METADATA_KEY;
use compressd_engine::quant::st_file::SafetensorsFile;
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::{run_job, Session};

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
fn write_model(dir: &Path) -> Result<()> {
    let config = serde_json::json!({
        "model_type": "bert", "vocab_size": 14, "hidden_size": 32, "num_hidden_layers": 2,
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
fn write_data(path: &Path) -> Result<()> {
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

#[test]
fn finetune_prune_quantize_end_to_end_and_reload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny", "model": model_dir, "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "prune", "sparsity": 0.5, "steps": 2, "recover": {"epochs": 1, "learning_rate": 0.001}},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.2}
    }))?;
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
    };
    let out = dir.path().join("out");
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &sink,
        &AtomicBool::new(false),
    )?;
    let report = &result.report;
    let accuracy = |i: usize| report.stages[i].metrics.accuracy.unwrap();
    assert!(
        accuracy(0) > 0.9,
        "the keyword task is learnable: {}",
        accuracy(0)
    );
    let sparsity = report.stages[1].details["achieved"]["overall"]
        .as_f64()
        .unwrap();
    assert!((sparsity - 0.5).abs() < 0.01, "{sparsity}");
    assert!(
        report.stages[1].metrics.nonzero_parameters < report.stages[0].metrics.nonzero_parameters
    );
    assert!(
        report.stages[2].metrics.size_on_disk_bytes < report.stages[1].metrics.size_on_disk_bytes
    );
    assert!(report.stages[2].metrics.latency_batch1_ms.is_some());
    assert_eq!(
        report.stages[2].details["quantized"]
            .as_array()
            .unwrap()
            .len(),
        16,
        "12 linears, the pooler, 3 embedding tables"
    );
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert!(file.metadata().contains_key(METADATA_KEY));
    let progress = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Progress { .. }))
        .count();
    assert!(progress > 10, "training progress is reported");

    // Resume path: the pruned stage loads back with its masks and scores the same.
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let pruned_dir = out.join("stages/1-prune/model");
    let pruned = session.load_saved(&pruned_dir)?;
    assert_eq!(pruned.masks().map(|m| m.names().len()), Some(12));
    let again = session.evaluate(&pruned, &pruned_dir)?;
    assert_eq!(again.accuracy, report.stages[1].metrics.accuracy);
    let quantized_dir = out.join("stages/2-quantize/model");
    let quantized = session.load_saved(&quantized_dir)?;
    let again = session.evaluate(&quantized, &quantized_dir)?;
    assert_eq!(again.accuracy, report.stages[2].metrics.accuracy);
    Ok(())
}
