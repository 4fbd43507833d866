//! Issue 14 acceptance through the HTTP API: all-MiniLM-L6-v2 on BBC News fine-tuned in full and
//! with LoRA (rank 8) by two jobs of the same data, epochs and seed; the LoRA job's adapter
//! (`model/adapter/`, PEFT's layout) is downloaded and loaded with `peft` onto the uploaded model,
//! and its predictions compared with the merged model's in transformers.
//!
//! `#[ignore]`d (needs `../shared` or `COMPRESSD_SHARED`, and a Python with torch, transformers and
//! peft in `COMPRESSD_INTEROP_PYTHON`, which `.ci/run` prepares):
//! `COMPRESSD_INTEROP_PYTHON=/root/.cache/compressd-pyenv/bin/python cargo test --release --test acceptance lora:: -- --ignored --test-threads=1 --nocapture`.

use crate::acceptance_support as support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use support::{folder_files, shared_data, Service};

const MODEL: &str = "models/all-MiniLM-L6-v2";
const DATASET: &str = "data/bbc_news/bbc_news.jsonl";
/// Training rows (after the seeded shuffle), as in the issue 6 acceptance runs.
const TRAIN_ROWS: u64 = 256;
/// Test rows the accuracy is measured on.
const TEST_ROWS: u64 = 240;
/// A guard against a hung job on a heavily loaded 2-core machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(90 * 60);
/// BBC News classes: the LoRA adapter's classifier has one row per class.
const CLASSES: usize = 5;

/// One fine-tune of MiniLM on BBC News: `stage` holds the method's settings.
fn spec(model: &str, dataset: &str, name: &str, stage: Value, outputs: Value) -> Value {
    let mut finetune = json!({"type": "finetune", "epochs": 3, "batch_size": 16});
    if let (Value::Object(f), Value::Object(s)) = (&mut finetune, stage) {
        f.extend(s);
    }
    json!({
        "name": name, "model": model, "seed": 7,
        "task": {"type": "text_classification", "dataset": dataset, "max_length": 128,
                 "max_train_samples": TRAIN_ROWS, "max_eval_samples": TEST_ROWS},
        "pipeline": [finetune], "outputs": outputs
    })
}

/// Runs `spec` and downloads its artifacts into `out`; returns the report.
async fn run(service: &Service, spec: &Value, out: &Path) -> Result<Value> {
    let (job, _) = service
        .run_to_success(spec, &["finetune"], JOB_TIMEOUT)
        .await?;
    let id = job["id"].as_str().context("job id")?;
    service.download_all(id, out).await?;
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    eprintln!(
        "{}\n{}",
        spec["name"],
        std::fs::read_to_string(out.join("report.md"))?
    );
    Ok(report)
}

/// Loads the adapter in `adapter_dir` with peft onto the model folder `base` and the merged folder
/// in transformers, and returns how often their predictions on BBC test texts agree.
fn peft_agreement(base: &Path, adapter_dir: &Path, merged: &Path, texts: &[String]) -> Result<f64> {
    const SCRIPT: &str = r#"
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
base_dir, adapter_dir, merged_dir, classes, texts_path = sys.argv[1:6]
texts = json.load(open(texts_path))
base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=int(classes))
peft = PeftModel.from_pretrained(base, adapter_dir).eval()
merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
tok = AutoTokenizer.from_pretrained(merged_dir)
same = 0
with torch.no_grad():
    for text in texts:
        enc = tok(text, truncation=True, max_length=128, return_tensors="pt")
        same += int(peft(**enc).logits.argmax(-1) == merged(**enc).logits.argmax(-1))
print(json.dumps({"agreement": same / len(texts)}))
"#;
    let python = std::env::var("COMPRESSD_INTEROP_PYTHON")
        .context("set COMPRESSD_INTEROP_PYTHON to a Python with torch, transformers and peft")?;
    let dir = tempfile::tempdir()?;
    let texts_path = dir.path().join("texts.json");
    std::fs::write(&texts_path, serde_json::to_vec(texts)?)?;
    let output = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(base)
        .arg(adapter_dir)
        .arg(merged)
        .arg(CLASSES.to_string())
        .arg(&texts_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .output()?;
    if !output.status.success() {
        bail!(
            "peft check failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let result: Value = serde_json::from_slice(&output.stdout)?;
    result["agreement"].as_f64().context("agreement")
}

/// The first `limit` BBC rows of the file's test split.
fn test_texts(dataset: &Path, limit: usize) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for line in std::fs::read_to_string(dataset)?.lines() {
        let row: Value = serde_json::from_str(line)?;
        if row["split"] == "test" {
            texts.push(row["text"].as_str().unwrap_or_default().to_owned());
        }
        if texts.len() == limit {
            break;
        }
    }
    Ok(texts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow, needs ../shared and peft: COMPRESSD_INTEROP_PYTHON=/root/.cache/compressd-pyenv/bin/python cargo test --release --test acceptance lora:: -- --ignored --test-threads=1 --nocapture"]
async fn minilm_lora_rank_8_within_one_point_of_full_finetuning_and_loads_in_peft() -> Result<()> {
    let shared = shared_data(&[MODEL, DATASET])?;
    let _turn = support::ONE_AT_A_TIME.lock().await;
    let service = Service::start().await?;
    let files = folder_files(&shared.join(MODEL))?;
    let model = service
        .upload("/v1/models", &[("name", "minilm")], &files)
        .await?;
    let data = vec![("bbc_news.jsonl".to_owned(), shared.join(DATASET))];
    let dataset = service.upload("/v1/datasets", &[], &data).await?;
    let (model, dataset) = (
        model["id"].as_str().context("model id")?,
        dataset["id"].as_str().context("dataset id")?,
    );

    let full_out = tempfile::tempdir()?;
    let full = spec(
        model,
        dataset,
        "minilm-bbc-full",
        json!({"learning_rate": 1e-4, "head_learning_rate": 3e-3}),
        json!(["safetensors"]),
    );
    let full = run(&service, &full, full_out.path()).await?;
    let lora_out = tempfile::tempdir()?;
    let lora = spec(
        model,
        dataset,
        "minilm-bbc-lora",
        json!({"method": "lora", "rank": 8, "alpha": 16, "learning_rate": 3e-3,
               "head_learning_rate": 3e-3}),
        json!(["safetensors", "adapter"]),
    );
    let lora = run(&service, &lora, lora_out.path()).await?;

    let accuracy = |r: &Value| {
        r["stages"][0]["metrics"]["accuracy"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let (full_accuracy, lora_accuracy) = (accuracy(&full), accuracy(&lora));
    assert!(full_accuracy > 0.85, "full fine-tuning {full_accuracy}");
    assert!(
        lora_accuracy >= full_accuracy - 0.01,
        "LoRA {lora_accuracy} vs full {full_accuracy}"
    );
    let details = &lora["stages"][0]["details"];
    let share = details["trainable_share"].as_f64().unwrap_or(1.0);
    assert!(share <= 0.05, "trainable share {share}: {details}");
    // Optimizer moments and gradients exist for the adapters (and the head) only.
    let optimizer_bytes = |r: &Value| {
        r["stages"][0]["details"]["training"]["optimizer_and_gradient_bytes"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    assert!(
        optimizer_bytes(&lora) * 10 < optimizer_bytes(&full),
        "optimizer and gradient memory LoRA {} vs full {}",
        optimizer_bytes(&lora),
        optimizer_bytes(&full)
    );
    // Reported, not asserted: the issue asks LoRA for less optimizer and gradient memory (above);
    // a lower peak is QLoRA's target.
    let peak = |r: &Value| r["stages"][0]["peak_memory_bytes"].as_u64().unwrap_or(0);
    eprintln!("peak memory LoRA {} vs full {}", peak(&lora), peak(&full));
    eprintln!(
        "full {full_accuracy} in {} s, LoRA {lora_accuracy} in {} s; trainable {share}",
        full["stages"][0]["wall_seconds"], lora["stages"][0]["wall_seconds"]
    );

    let adapter = lora_out.path().join("model/adapter");
    assert!(adapter.join("adapter_config.json").is_file());
    let texts = test_texts(&shared.join(DATASET), 200)?;
    let agreement = peft_agreement(
        &shared.join(MODEL),
        &adapter,
        &lora_out.path().join("model"),
        &texts,
    )?;
    eprintln!("peft and the merged model agree on {agreement} of the test texts");
    assert!(
        agreement >= 0.99,
        "peft and the merged model agree on {agreement}"
    );
    Ok(())
}
