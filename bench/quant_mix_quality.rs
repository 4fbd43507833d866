//! Perplexity of SmolLM2-135M (the Q4_1 GGUF in `../shared`, dequantized to f32) with a chosen
//! GGUF type per weight, to find which weights a quantization loses its accuracy on.
//!
//! Each weight is quantized and dequantized back to f32 and the model runs in f32, so this measures
//! the weights' rounding alone (the real quantized kernels also round activations; the pipeline's
//! report measures those). Perplexity is on the same 8 held-out 128-token sequences of the
//! Shakespeare text as the pipeline tests.
//!
//! ```text
//! cargo run --release -p compressd-engine --example quant_mix_quality -- \
//!     embed=q8_0 down_proj=q4_k 'rest=q4_1|q5_0'
//! ```
//! Each argument is `PATTERN=TYPES`: the first whose pattern occurs in a 2-D weight's name (or
//! `rest`) decides it; `TYPES` is a GGUF type, `f32` (left alone), or several joined by `|` (the one
//! with the least squared error, as the quantize stage picks fallbacks). Norms are never quantized.
//! Prints the perplexity and the bits per quantized weight; with `-v` also each weight's choice.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use compressd_engine::data::{LmCorpus, LmSpec, TextEncoder};
use compressd_engine::layers::{LinearFactory, LinearKind, LinearPlan};
use compressd_engine::loading::read_gguf;
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};
use compressd_engine::params::Param;
use compressd_engine::quant::{quantize_least_error, QuantScheme};
use compressd_engine::task::{evaluate_lm, CausalLmTask};

const MODEL: &str = "models/SmolLM2-135M-Instruct-Q4_1/SmolLM2-135M-Instruct.Q4_1.gguf";
const TEXT: &str = "data/shakespeare/shakespeare_plays.txt";

/// The weight's quantized-then-dequantized values under the candidate of least squared error (the
/// quantize stage's own choice), its type's name and its storage bytes.
fn best_of(weight: &Tensor, types: &str) -> Result<(Tensor, String, usize)> {
    let schemes = types
        .split('|')
        .map(|name| QuantScheme::parse(name, None))
        .collect::<compressd_engine::Result<Vec<_>>>()?;
    let best = quantize_least_error(weight, &schemes)?
        .with_context(|| format!("none of {types} fits shape {:?}", weight.dims()))?;
    let name = best.weight.scheme().to_string();
    Ok((best.values, name, best.weight.storage_bytes()))
}

fn main() -> Result<()> {
    let mut rules = Vec::new();
    let mut verbose = false;
    for arg in std::env::args().skip(1) {
        if arg == "-v" {
            verbose = true;
            continue;
        }
        let Some((pattern, types)) = arg.split_once('=') else {
            bail!("expected PATTERN=TYPES, got {arg:?}");
        };
        rules.push((pattern.to_owned(), types.to_owned()));
    }
    let shared = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let model = shared.join(MODEL);
    let device = Device::Cpu;
    let tokenizer = model
        .parent()
        .context("model folder")?
        .join("tokenizer.json");
    let encoder = TextEncoder::from_file(&tokenizer, 128)?;
    let spec = LmSpec {
        seq_len: 128,
        max_train_samples: Some(1),
        max_eval_samples: Some(8),
        ..LmSpec::default()
    };
    let corpus = LmCorpus::load(&shared.join(TEXT), &spec, &encoder)?;
    let checkpoint = read_gguf(&model, DType::F32, &device)?;
    let config: LlamaConfig = checkpoint.parse_config()?;
    let store = checkpoint.into_store(|_| false)?;
    let (mut bytes, mut weights) = (0usize, 0usize);
    for (name, weight) in store.tensors() {
        if weight.rank() != 2 || name.contains("norm") {
            continue;
        }
        let rule = rules
            .iter()
            .find(|(pattern, _)| pattern == "rest" || name.contains(pattern.as_str()));
        let Some((_, types)) = rule.filter(|(_, types)| types != "f32") else {
            continue;
        };
        let (values, chosen, size) = best_of(&weight, types)?;
        if verbose {
            println!("{name} {:?}: {chosen}", weight.dims());
        }
        bytes += size;
        weights += weight.elem_count();
        store.insert(name, Param::Frozen(values));
    }
    let vb = store.var_builder(DType::F32, &device);
    let factory = LinearFactory::new(LinearPlan::uniform(LinearKind::Dense));
    let lm = LlamaForCausalLm::load(vb, &config, &factory)?;
    let task = CausalLmTask { model: &lm };
    let (_, perplexity) = evaluate_lm(&task, &corpus.validation, 4, encoder.pad_id(), &device)?;
    let bits = bytes as f64 * 8.0 / weights.max(1) as f64;
    println!("perplexity {perplexity:.3}, {bits:.2} bits per quantized weight");
    Ok(())
}
