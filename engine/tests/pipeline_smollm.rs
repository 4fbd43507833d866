//! SmolLM2-135M (the Q4_1 GGUF, dequantized to f32) on Shakespeare: post-training `q8_0` and
//! `q4_k` against the dequantized baseline, capped to a few held-out sequences to fit CI; the GGUF
//! artifact is written, loads in candle-transformers' `quantized_llama` and generates text.
//!
//! Needs `../shared` (or `COMPRESSD_SHARED`); without it the test says so loudly and passes.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use compressd_engine::pipeline::PipelineInputs;
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::run_job;

fn shared() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    dir.join("models/SmolLM2-135M-Instruct-Q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
        .is_file()
        .then_some(dir)
}

/// Perplexity before and after quantizing to `scheme`.
fn perplexities(
    shared: &std::path::Path,
    scheme: &str,
) -> Result<(f64, f64, PathBuf, tempfile::TempDir)> {
    let model = shared.join("models/SmolLM2-135M-Instruct-Q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let dataset = shared.join("data/shakespeare/shakespeare_plays.txt");
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": format!("smollm-{scheme}"), "model": model, "outputs": ["safetensors", "gguf"],
        "task": {"type": "language_modeling", "dataset": dataset, "max_length": 128,
                 "max_train_samples": 1, "max_eval_samples": 8},
        "pipeline": [{"type": "quantize", "scheme": scheme}],
        "acceptance": {"metric": "perplexity", "max_relative_drop": 0.06}
    }))?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
    };
    let out = tempfile::tempdir()?;
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        out.path(),
        &|_| {},
        &AtomicBool::new(false),
    )?;
    eprintln!("{}", result.report.to_markdown());
    let before = result
        .report
        .baseline
        .metrics
        .perplexity
        .unwrap_or(f64::NAN);
    let after = result.report.stages[0]
        .metrics
        .perplexity
        .unwrap_or(f64::NAN);
    Ok((before, after, result.final_dir, out))
}

/// `golden.json`'s prompt and the top next token of the original model there (" Paris", 2.5 logits
/// ahead of the runner-up, so a faithful quantization keeps it).
const PROMPT_IDS: [u32; 5] = [504, 3575, 282, 4649, 314];
const PARIS: u32 = 7042;

/// Greedy generation of `count` tokens after `prompt` with candle-transformers' quantized Llama
/// reading our GGUF: proof that the file is a usable llama.cpp-style model, not just parseable.
fn generate(gguf: &std::path::Path, prompt: &[u32], count: usize) -> Result<Vec<u32>> {
    let mut file = std::fs::File::open(gguf)?;
    let content = gguf_file::Content::read(&mut file)?;
    let mut model = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;
    let mut tokens = prompt.to_vec();
    for _ in 0..count {
        let position = if tokens.len() == prompt.len() {
            0
        } else {
            tokens.len() - 1
        };
        let input = Tensor::new(&tokens[position..], &Device::Cpu)?.unsqueeze(0)?;
        let logits: Vec<f32> = model.forward(&input, position)?.squeeze(0)?.to_vec1()?;
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(id, _)| id as u32)
            .context("empty logits")?;
        tokens.push(next);
    }
    Ok(tokens[prompt.len()..].to_vec())
}

/// Loads the exported GGUF, generates a few tokens and checks the first is " Paris".
fn check_generation(final_dir: &std::path::Path, scheme: &str) -> Result<()> {
    let generated = generate(&final_dir.join("model.gguf"), &PROMPT_IDS, 6)?;
    let tokenizer = tokenizers::Tokenizer::from_file(final_dir.join("tokenizer.json"))
        .map_err(anyhow::Error::msg)?;
    let text = tokenizer
        .decode(&generated, false)
        .map_err(anyhow::Error::msg)?;
    eprintln!("{scheme}: \"The capital of France is\" -> {text:?} {generated:?}");
    assert_eq!(generated.len(), 6);
    assert_eq!(generated[0], PARIS, "{scheme} first token: {text:?}");
    Ok(())
}

#[test]
fn smollm_q8_0_and_q4_k_keep_perplexity() -> Result<()> {
    // Minutes of CPU per scheme (88 minutes for both at load 7-15 on 2 cores, 13 idle in a release
    // build; most of it the quantized models' latency measurement): too long for every CI run.
    if std::env::var_os("COMPRESSD_SLOW_TESTS").is_none() {
        eprintln!("SKIPPED: slow real-data acceptance test; run with COMPRESSD_SLOW_TESTS=1");
        return Ok(());
    }
    let Some(shared) = shared() else {
        eprintln!(
            "SKIPPED: ../shared with SmolLM2 and Shakespeare is not here (set COMPRESSD_SHARED)"
        );
        return Ok(());
    };
    let (base, q8, final_dir, _keep) = perplexities(&shared, "q8_0")?;
    assert!(q8 <= base * 1.01, "q8_0: {q8} vs {base}");
    let mut file = std::fs::File::open(final_dir.join("model.gguf"))?;
    let gguf = candle_core::quantized::gguf_file::Content::read(&mut file)?;
    assert!(gguf.tensor_infos.contains_key("blk.0.attn_q.weight"));
    check_generation(&final_dir, "q8_0")?;
    let (base, q4, final_dir, _keep) = perplexities(&shared, "q4_k")?;
    assert!(q4 <= base * 1.06, "q4_k: {q4} vs {base}");
    check_generation(&final_dir, "q4_k")?;
    Ok(())
}
