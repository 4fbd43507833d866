//! Issue 15 acceptance through the HTTP API: all-MiniLM-L6-v2 fine-tuned on BBC News, then
//! quantized to static int8 W8A8 (int8 weights per channel, inputs int8 with one calibrated scale
//! per layer), the layers whose int8 output error on the calibration rows is above 0.1 kept in
//! f32 (three FFN output layers, measured). The model must stay within 1 point of the f32 one, with every layer's calibration and the
//! fallbacks in the report; its compressed-tensors folder (`int-quantized`, `input_scale`s) is part
//! of the artifacts.
//!
//! `#[ignore]`d (needs `../shared` or `COMPRESSD_SHARED`):
//! `cargo test --release --test acceptance minilm_static:: -- --ignored --test-threads=1 --nocapture`.

use crate::acceptance_support as support;

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use support::{shared_data, Service};

const MODEL: &str = "models/all-MiniLM-L6-v2";
const DATASET: &str = "data/bbc_news/bbc_news.jsonl";
/// A guard against a hung job on a loaded 2-core machine.
const JOB_TIMEOUT: Duration = Duration::from_secs(90 * 60);
const STAGES: [&str; 2] = ["finetune", "quantize"];
/// The fallback threshold on a layer's relative output error.
const MAX_OUTPUT_ERROR: f64 = 0.1;

fn job_spec(model: &str, dataset: &str) -> Value {
    json!({
        "name": "minilm-static-int8", "model": model, "seed": 7,
        "task": {"type": "text_classification", "dataset": dataset, "max_length": 128,
                 "max_train_samples": 256, "max_eval_samples": 240},
        "pipeline": [
            {"type": "finetune", "epochs": 2, "learning_rate": 1e-4, "head_learning_rate": 3e-3,
             "batch_size": 16},
            {"type": "quantize", "method": "static", "scheme": "int8", "calibration": "mse",
             "calibration_batches": 8, "fallback": {"max_output_error": MAX_OUTPUT_ERROR}}
        ],
        "outputs": ["safetensors", "compressed_tensors"]
    })
}

/// Runs the job (`job_spec`, changed by `edit`) to success through the API, downloads its
/// artifacts and checks that its compressed-tensors folder quantizes inputs statically per tensor.
/// Returns the report and the folder the artifacts are in.
async fn run_static_job(edit: impl FnOnce(&mut Value)) -> Result<(Value, tempfile::TempDir)> {
    let shared = shared_data(&[MODEL, DATASET])?;
    let _turn = support::ONE_AT_A_TIME.lock().await;
    let service = Service::start().await?;
    let (model, dataset) = service
        .register_model_and_dataset(&shared, MODEL, DATASET)
        .await?;
    let mut spec = job_spec(&model, &dataset);
    edit(&mut spec);
    let (job, _) = service.run_to_success(&spec, &STAGES, JOB_TIMEOUT).await?;
    let job_id = job["id"].as_str().context("job id")?;
    let out = tempfile::tempdir()?;
    service.download_all(job_id, out.path()).await?;
    let report: Value = serde_json::from_slice(&std::fs::read(out.path().join("report.json"))?)?;
    eprintln!("{}", std::fs::read_to_string(out.path().join("report.md"))?);
    let ct = out.path().join("model/compressed-tensors");
    let config: Value = serde_json::from_slice(&std::fs::read(ct.join("config.json"))?)?;
    let inputs = &config["quantization_config"]["config_groups"]["group_0"]["input_activations"];
    assert_eq!(inputs["strategy"], "tensor", "{config}");
    assert_eq!(inputs["dynamic"], false, "{config}");
    Ok((report, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow, needs ../shared: cargo test --release --test acceptance minilm_static:: -- --ignored --test-threads=1 --nocapture"]
async fn minilm_static_int8_within_one_point_with_fallbacks_reported() -> Result<()> {
    let (report, _out) = run_static_job(|_| {}).await?;
    assert_static(&report)
}

/// The bar and the report's calibration on a finished job's report.
fn assert_static(report: &Value) -> Result<()> {
    let metric = |i: usize, name: &str| report["stages"][i]["metrics"][name].as_f64();
    let (tuned, int8) = (
        metric(0, "accuracy").unwrap_or(0.0),
        metric(1, "accuracy").unwrap_or(0.0),
    );
    let ms = |i: usize, name: &str| metric(i, name).unwrap_or(f64::INFINITY);
    let details = &report["stages"][1]["details"];
    let calibration = &details["calibration"];
    let layers = calibration["layers"].as_object().context("layers")?;
    let kept: Vec<&str> = calibration["kept_full_precision"]
        .as_array()
        .context("kept")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    eprintln!(
        "accuracy f32 {tuned:.4}, static int8 {int8:.4}; latency f32 {:.1} / {:.0} ms, static \
         {:.1} / {:.0} ms (batch 1 / 32); kept in f32: {kept:?}",
        ms(0, "latency_batch1_ms"),
        ms(0, "latency_batch32_ms"),
        ms(1, "latency_batch1_ms"),
        ms(1, "latency_batch32_ms"),
    );
    for (module, layer) in layers {
        eprintln!(
            "  {module}: absmax {:.2} clip {:.2} input error {:.4} output error {:.4}{}",
            layer["absmax"].as_f64().unwrap_or(0.0),
            layer["clip"].as_f64().unwrap_or(0.0),
            layer["input_error"].as_f64().unwrap_or(0.0),
            layer["output_error"].as_f64().unwrap_or(0.0),
            if kept.contains(&module.as_str()) {
                " (kept in f32)"
            } else {
                ""
            }
        );
    }
    assert_eq!(details["method"], "static");
    assert_eq!(calibration["batches_run"], 8);
    assert_eq!(layers.len(), 37, "6 layers × 6 linears and the pooler");
    for (module, layer) in layers {
        let error = layer["output_error"].as_f64().unwrap_or(f64::NAN);
        let is_kept = kept.contains(&module.as_str());
        assert_eq!(is_kept, error > MAX_OUTPUT_ERROR, "{module}: {error}");
        assert_eq!(layer["kept_full_precision"], is_kept, "{module}");
    }
    let quantized = details["quantized"].as_array().context("quantized")?.len();
    assert_eq!(quantized, 37 - kept.len());
    assert!(tuned > 0.85, "fine-tuned accuracy {tuned}");
    assert!(int8 >= tuned - 0.01, "static {int8} vs fine-tuned {tuned}");
    Ok(())
}

/// QAT for static int8: the same fine-tune, then one epoch of quantization-aware training with
/// each layer's input rounded per tensor with an observed range (frozen after half the epoch's
/// 16 batches), the float model as teacher; stored static with the observed scales and no layer
/// kept in f32. The bar is the static one: within 1 point of the f32 model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow, needs ../shared: cargo test --release --test acceptance minilm_static:: -- --ignored --test-threads=1 --nocapture"]
async fn minilm_qat_static_int8_with_observed_scales_within_one_point() -> Result<()> {
    let (report, _out) = run_static_job(|spec| {
        spec["name"] = json!("minilm-qat-static-int8");
        spec["pipeline"][1] = json!({
            "type": "quantize", "method": "qat", "scheme": "int8",
            "qat": {"epochs": 1, "learning_rate": 5e-5, "distill_from_float": true,
                    "activations": "int8_per_tensor", "freeze_observers_after": 8}
        });
    })
    .await?;
    let metric = |i: usize, name: &str| report["stages"][i]["metrics"][name].as_f64();
    let (tuned, int8) = (
        metric(0, "accuracy").unwrap_or(0.0),
        metric(1, "accuracy").unwrap_or(0.0),
    );
    let details = &report["stages"][1]["details"];
    let ranges = details["observed_ranges"]
        .as_object()
        .context("observed_ranges")?;
    eprintln!(
        "accuracy f32 {tuned:.4}, QAT static int8 {int8:.4}; latency f32 {:.1} / {:.0} ms, QAT \
         static {:.1} / {:.0} ms (batch 1 / 32)",
        metric(0, "latency_batch1_ms").unwrap_or(f64::NAN),
        metric(0, "latency_batch32_ms").unwrap_or(f64::NAN),
        metric(1, "latency_batch1_ms").unwrap_or(f64::NAN),
        metric(1, "latency_batch32_ms").unwrap_or(f64::NAN),
    );
    for (module, range) in ranges {
        eprintln!("  {module}: absmax {}", range["absmax"]);
        assert_eq!(range["batches"], 8, "{module}");
        assert_eq!(range["frozen"], true, "{module}");
    }
    assert_eq!(ranges.len(), 37, "6 layers × 6 linears and the pooler");
    let quantized: Vec<&str> = details["quantized"]
        .as_array()
        .context("quantized")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for module in ranges.keys() {
        let weight = format!("{module}.weight");
        assert!(quantized.contains(&weight.as_str()), "{module} stored int8");
    }
    assert!(tuned > 0.85, "fine-tuned accuracy {tuned}");
    assert!(
        int8 >= tuned - 0.01,
        "QAT static {int8} vs fine-tuned {tuned}"
    );
    Ok(())
}
