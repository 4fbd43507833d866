//! The generation check of the SmolLM2 acceptance tests (the engine's and the service's): an
//! exported GGUF is loaded in candle-transformers' quantized Llama, the reader llama.cpp-style
//! files are written for, and must continue `golden.json`'s prompt as the original model does.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

/// `golden.json`'s prompt ("The capital of France is") as SmolLM2 token ids.
pub const PROMPT_IDS: [u32; 5] = [504, 3575, 282, 4649, 314];
/// The original model's top next token there (" Paris", 2.5 logits ahead of the runner-up, so a
/// faithful quantization keeps it).
pub const PARIS: u32 = 7042;

/// Greedy generation of `count` tokens after `prompt` from the GGUF file `gguf`.
pub fn generate(gguf: &Path, prompt: &[u32], count: usize) -> Result<Vec<u32>> {
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

/// Generates `count` tokens from `gguf` after the prompt, prints them decoded with `tokenizer`
/// (under `label`), checks that there are `count` and that they are not only whitespace, and
/// returns them.
pub fn check_generates(
    gguf: &Path,
    tokenizer: &Path,
    count: usize,
    label: &str,
) -> Result<Vec<u32>> {
    let generated = generate(gguf, &PROMPT_IDS, count)?;
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer).map_err(anyhow::Error::msg)?;
    let text = tokenizer
        .decode(&generated, false)
        .map_err(anyhow::Error::msg)?;
    eprintln!("{label}: \"The capital of France is\" -> {text:?} {generated:?}");
    assert_eq!(generated.len(), count);
    assert!(
        !text.trim().is_empty(),
        "{label} generated only whitespace: {generated:?}"
    );
    Ok(generated)
}

/// As [`check_generates`], and checks the first token is " Paris".
pub fn check_paris(gguf: &Path, tokenizer: &Path, count: usize, label: &str) -> Result<()> {
    let generated = check_generates(gguf, tokenizer, count, label)?;
    assert_eq!(generated[0], PARIS, "{label}: {generated:?}");
    Ok(())
}
