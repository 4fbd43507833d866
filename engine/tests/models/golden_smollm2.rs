//! SmolLM2-135M (Q4_1 GGUF, dequantized to f32) through our Llama model against PyTorch.
//!
//! `../shared/golden/golden.json` holds, from transformers loading the same GGUF (weights dequantized
//! to f32, CPU): the mean NLL of the 256 next-token predictions over the first 257 Hamlet tokens, and
//! the top-5 next-token ids and logits for "The capital of France is".

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use compressd_engine::layers::LinearFactory;
use compressd_engine::loading::{load_tokenizer, read_gguf};
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};

fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    dir.join("golden/golden.json").is_file().then_some(dir)
}

/// Logits `(seq, vocab)` for one sequence.
fn logits(model: &LlamaForCausalLm, ids: &[u32]) -> Result<Tensor> {
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    Ok(model.forward(&input, None, None)?.logits.squeeze(0)?)
}

#[test]
#[ignore = "needs ../shared: cargo test -p compressd-engine --test models golden_smollm2:: -- --ignored"]
fn smollm2_gguf_matches_pytorch_nll_and_top5() -> Result<()> {
    let shared = shared_dir()
        .ok_or_else(|| anyhow::anyhow!("../shared not found (set COMPRESSD_SHARED)"))?;
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared.join("golden/golden.json"))?)?;
    let golden = &golden["smollm2_q4_1_gguf"];
    let path = shared.join("models/SmolLM2-135M-Instruct-Q4_1/SmolLM2-135M-Instruct.Q4_1.gguf");
    let checkpoint = read_gguf(&path, DType::F32, &Device::Cpu)?;
    let config: LlamaConfig = checkpoint.parse_config()?;
    assert!(config.tie_word_embeddings, "SmolLM2 ties its embeddings");
    let tokenizer = checkpoint
        .tokenizer
        .clone()
        .context("tokenizer.json next to the GGUF")?;
    let store = checkpoint.into_store(|_| false)?;
    let model = LlamaForCausalLm::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &config,
        &LinearFactory::default(),
    )?;

    let ids: Vec<u32> = serde_json::from_value(golden["hamlet_first_257_token_ids"].clone())?;
    let log_probs =
        candle_nn::ops::log_softmax(&logits(&model, &ids)?.i(..ids.len() - 1)?, D::Minus1)?;
    let targets = Tensor::new(&ids[1..], &Device::Cpu)?.unsqueeze(1)?;
    let nll = log_probs
        .gather(&targets, 1)?
        .neg()?
        .mean_all()?
        .to_scalar::<f32>()?;
    let want = golden["mean_nll_256"].as_f64().context("mean_nll_256")? as f32;
    eprintln!("mean NLL over 256 positions: ours {nll:.5}, PyTorch {want:.5}");
    assert!(
        (nll - want).abs() / want <= 0.005,
        "mean NLL {nll} vs {want}"
    );

    let prompt_ids: Vec<u32> = serde_json::from_value(golden["prompt_ids"].clone())?;
    let prompt = golden["prompt"].as_str().context("prompt")?;
    let encoding = load_tokenizer(&tokenizer)?
        .encode(prompt, false)
        .map_err(anyhow::Error::msg)?;
    assert_eq!(
        encoding.get_ids(),
        prompt_ids.as_slice(),
        "prompt token ids"
    );
    let last: Vec<f32> = logits(&model, &prompt_ids)?
        .i(prompt_ids.len() - 1)?
        .to_vec1()?;
    let mut order: Vec<usize> = (0..last.len()).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    let want_top5: Vec<u32> = serde_json::from_value(golden["top5_next_ids"].clone())?;
    let want_logits: Vec<f32> = serde_json::from_value(golden["top5_next_logits"].clone())?;
    eprintln!(
        "top-5: ours {top5:?} {:?}, PyTorch {want_top5:?} {want_logits:?}",
        &order[..5].iter().map(|&i| last[i]).collect::<Vec<_>>()
    );
    assert_eq!(top5, want_top5);
    assert!(
        (last[top5[0] as usize] - want_logits[0]).abs() < 0.1,
        "top logit"
    );
    Ok(())
}
