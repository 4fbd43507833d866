//! Issue 6 acceptance through the HTTP API: SmolLM2-135M (a Q4_1 GGUF) uploaded by multipart to a
//! real `compressd serve`, quantized to `q8_0` and `q4_k` by jobs its worker runs, perplexity on
//! Shakespeare kept within 1% and 6% of the dequantized (f32) baseline, and the GGUF artifact
//! downloaded, checked against its sha256 and loaded in candle-transformers' `quantized_llama`,
//! which must generate the expected continuation of a prompt.
//!
//! `#[ignore]`d (slow; needs the model and the text in `../shared` or `COMPRESSD_SHARED`, and
//! fails when they are missing): `cargo test --test acceptance smollm:: -- --ignored`. Perplexity is measured
//! on [`EVAL_SEQUENCES`] held-out sequences of 128 tokens to fit a 2-core machine.

use crate::acceptance_support as support;

use crate::gguf_generation;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use gguf_generation::check_paris;
use serde_json::{json, Value};
use support::{shared_data, Service};

pub(crate) const MODEL_DIR: &str = "models/SmolLM2-135M-Instruct-Q4_1";
const GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub(crate) const DATASET: &str = "data/shakespeare/shakespeare_plays.txt";
/// Held-out sequences of 128 tokens the perplexity is measured on.
const EVAL_SEQUENCES: u64 = 8;
/// The longest a job may take before the test gives up: a guard against a hung job, sized for a
/// heavily loaded 2-core machine (see the timings above).
const JOB_TIMEOUT: Duration = Duration::from_secs(150 * 60);
/// Tokens generated from the downloaded GGUF.
const GENERATED_TOKENS: usize = 6;

/// Uploads the GGUF with its tokenizer and the plays, returning their ids.
pub(crate) async fn upload_inputs(service: &Service, shared: &Path) -> Result<(String, String)> {
    let dir = shared.join(MODEL_DIR);
    let files = vec![
        (GGUF.to_owned(), dir.join(GGUF)),
        ("tokenizer.json".to_owned(), dir.join("tokenizer.json")),
    ];
    let model = service.upload("/v1/models", &[], &files).await?;
    assert_eq!(
        (&model["architecture"], &model["format"]),
        (&json!("llama"), &json!("gguf")),
        "{model}"
    );
    let text = vec![("shakespeare_plays.txt".to_owned(), shared.join(DATASET))];
    let dataset = service.upload("/v1/datasets", &[], &text).await?;
    let id = |v: &Value| v["id"].as_str().map(str::to_owned).context("id");
    Ok((id(&model)?, id(&dataset)?))
}

/// Runs one job through its `stages` to success, downloads every artifact, prints its report and
/// returns the report and the folder the artifacts are in.
pub(crate) async fn run_and_download(
    service: &Service,
    spec: &Value,
    stages: &[&str],
    timeout: Duration,
) -> Result<(Value, tempfile::TempDir)> {
    let started = Instant::now();
    let (job, _) = service.run_to_success(spec, stages, timeout).await?;
    let id = job["id"].as_str().context("job id")?;
    let out = tempfile::tempdir()?;
    service.download_all(id, out.path()).await?;
    let report: Value = serde_json::from_slice(&std::fs::read(out.path().join("report.json"))?)?;
    eprintln!(
        "{} finished in {:.0} s\n{}",
        spec["name"],
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string(out.path().join("report.md"))?
    );
    Ok((report, out))
}

fn job_spec(model: &str, dataset: &str, scheme: &str, max_relative_drop: f64) -> Value {
    json!({
        "name": format!("smollm2-{scheme}"), "model": model, "outputs": ["safetensors", "gguf"],
        "task": {"type": "language_modeling", "dataset": dataset, "max_length": 128,
                 "max_train_samples": 1, "max_eval_samples": EVAL_SEQUENCES},
        "pipeline": [{"type": "quantize", "scheme": scheme}],
        "acceptance": {"metric": "perplexity", "max_relative_drop": max_relative_drop}
    })
}

/// Runs one quantization job and checks its events, artifacts and perplexity; returns the
/// downloaded GGUF's path.
async fn quantize(
    service: &Service,
    inputs: &(String, String),
    scheme: &str,
    (max_relative_drop, min_ratio): (f64, f64),
    out: &Path,
) -> Result<std::path::PathBuf> {
    let started = Instant::now();
    let spec = job_spec(&inputs.0, &inputs.1, scheme, max_relative_drop);
    let (job, _) = service
        .run_to_success(&spec, &["quantize"], JOB_TIMEOUT)
        .await?;
    let id = job["id"].as_str().context("job id")?.to_owned();
    let artifacts = service.download_all(&id, out).await?;
    let gguf = artifacts
        .iter()
        .find(|a| a["name"] == "model/model.gguf")
        .with_context(|| format!("no model/model.gguf in {artifacts:?}"))?;
    assert_eq!(gguf["format"], "gguf");
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json"))?)?;
    eprintln!(
        "{scheme} job finished in {:.0} s\n{}",
        started.elapsed().as_secs_f64(),
        std::fs::read_to_string(out.join("report.md"))?
    );
    let perplexity = |row: &Value| row["metrics"]["perplexity"].as_f64().unwrap_or(f64::NAN);
    let (base, after) = (
        perplexity(&report["baseline"]),
        perplexity(&report["stages"][0]),
    );
    assert!(base.is_finite() && base > 1.0, "baseline perplexity {base}");
    assert!(
        after <= base * (1.0 + max_relative_drop),
        "{scheme}: perplexity {after} vs baseline {base}"
    );
    assert_eq!(job["result"]["acceptance_met"], true, "{}", job["result"]);
    // The baseline folder holds the f32 weights in both output formats, so the f32 size of one
    // file is taken from the parameter count.
    let f32_bytes = 4 * report["baseline"]["metrics"]["parameters"]
        .as_u64()
        .unwrap_or(0);
    let gguf_bytes = gguf["bytes"].as_u64().unwrap_or(u64::MAX);
    let ratio = f32_bytes as f64 / gguf_bytes as f64;
    eprintln!("{scheme}: GGUF {gguf_bytes} B, f32 {f32_bytes} B ({ratio:.2}x smaller)");
    assert!(
        ratio >= min_ratio,
        "{scheme}: {ratio:.2}x, want {min_ratio}x"
    );
    Ok(out.join("model/model.gguf"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow, needs ../shared: cargo test --test acceptance smollm:: -- --ignored --test-threads=1 --nocapture"]
async fn smollm_q8_0_and_q4_k_keep_perplexity_and_generate() -> Result<()> {
    let shared = shared_data(&[MODEL_DIR, DATASET])?;
    let _turn = support::ONE_AT_A_TIME.lock().await;
    let service = Service::start().await?;
    let inputs = upload_inputs(&service, &shared).await?;
    // (scheme, largest relative perplexity rise, least size ratio against f32): q8_0 is 8.5 bits
    // a weight; q4_k 4.5 bits where a row splits into 256-weight super-blocks, and SmolLM2's
    // 576-wide rows fall back to q4_1 (5 bits) with the tied output matrix at q8_0 (5.56x in all,
    // BENCHMARKS.md). Both jobs took 13 minutes on an idle 2-core machine in a release build.
    for (scheme, bounds) in [("q8_0", (0.01, 3.5)), ("q4_k", (0.06, 5.0))] {
        let out = tempfile::tempdir()?;
        let gguf = quantize(&service, &inputs, scheme, bounds, out.path()).await?;
        let tokenizer = shared.join(MODEL_DIR).join("tokenizer.json");
        check_paris(&gguf, &tokenizer, GENERATED_TOKENS, scheme)?;
    }
    Ok(())
}
