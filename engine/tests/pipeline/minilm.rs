//! all-MiniLM-L6-v2 on BBC News through the whole pipeline, capped to fit CI: fine-tune, 50%
//! unstructured pruning in two increments with recovery, int8. The full-size run is in `bench/`.
//!
//! Needs `../shared` (or `COMPRESSD_SHARED`) and 10-20 minutes: `#[ignore]`d, and fails without them.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use compressd_engine::pipeline::{Event, PipelineInputs};
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::run_job;

fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    dir.join("models/all-MiniLM-L6-v2/model.safetensors")
        .is_file()
        .then_some(dir)
}

#[test]
#[ignore = "slow, needs ../shared: cargo test -p compressd-engine --test pipeline minilm:: -- --ignored --nocapture"]
fn minilm_bbc_finetune_prune_int8() -> Result<()> {
    // A real-data acceptance run takes 10-20 minutes on a 2-core machine: too long for every CI run.
    let shared = shared().ok_or_else(|| {
        anyhow::anyhow!(
            "../shared with all-MiniLM-L6-v2 and BBC News is not here (set COMPRESSD_SHARED)"
        )
    })?;
    let model = shared.join("models/all-MiniLM-L6-v2");
    let dataset = shared.join("data/bbc_news/bbc_news.jsonl");
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "minilm-bbc-ci", "model": model, "seed": 7,
        "task": {"type": "text_classification", "dataset": dataset, "max_length": 64,
                 "max_train_samples": 320, "max_eval_samples": 120},
        "pipeline": [
            {"type": "finetune", "epochs": 3, "learning_rate": 1e-4, "head_learning_rate": 3e-3, "batch_size": 16},
            {"type": "prune", "sparsity": 0.5, "steps": 2, "recover": {"epochs": 1, "learning_rate": 5e-5}},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.05}
    }))?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = tempfile::tempdir()?;
    let progress = |e: Event| {
        if let Event::Metric { label, metrics } = &e {
            eprintln!(
                "{label}: accuracy {:?} size {} B batch-1 {:?} ms",
                metrics.accuracy, metrics.size_on_disk_bytes, metrics.latency_batch1_ms
            );
        }
    };
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        out.path(),
        &progress,
        &AtomicBool::new(false),
    )?;
    let report = &result.report;
    eprintln!("{}", report.to_markdown());
    let accuracy: Vec<f64> = report
        .stages
        .iter()
        .map(|s| s.metrics.accuracy.unwrap_or(0.0))
        .collect();
    assert!(accuracy[0] > 0.85, "fine-tuned accuracy {accuracy:?}");
    assert!(
        accuracy[2] > accuracy[0] - 0.05,
        "pruned + int8 within 5 points: {accuracy:?}"
    );
    let sparsity = report.stages[1].details["achieved"]["overall"]
        .as_f64()
        .unwrap_or(0.0);
    assert!((sparsity - 0.5).abs() < 0.01, "{sparsity}");
    let (pruned, int8) = (&report.stages[1].metrics, &report.stages[2].metrics);
    assert!(
        int8.size_on_disk_bytes * 2 < pruned.size_on_disk_bytes,
        "int8 linears, f32 embeddings: {} vs {}",
        int8.size_on_disk_bytes,
        pruned.size_on_disk_bytes
    );
    assert!(int8.latency_batch1_ms.is_some_and(|ms| ms > 0.0));
    Ok(())
}
