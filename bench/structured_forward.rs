//! Batch-32 forward time of a MiniLM-shaped encoder before and after structured pruning (issue 13).
//!
//! Builds two random-weight BERT encoders with all-MiniLM-L6-v2's shape — one dense (12 heads, 1,536
//! FFN neurons per layer) and one with the per-layer widths the MiniLM structured acceptance run kept —
//! and times their forward pass on 32 × 128 tokens, then times the pieces of one layer, so a change to
//! the forward can be judged by the pruned/dense ratio on the same machine in the same run.
//!
//! With `--real`, the weights are all-MiniLM-L6-v2's own (from `../shared` or `COMPRESSD_SHARED`),
//! the pruned model keeping the first heads and neurons of each layer (which ones does not change
//! the time).
//!
//! Run: `cargo run --release -p compressd-engine --example structured_forward [-- --runs 5 --real]`.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use compressd_engine::layers::{LinearFactory, LinearKind, LinearPlan};
use compressd_engine::models::bert::{BertConfig, BertInput, BertModel};

const HIDDEN: usize = 384;
const HEAD_DIM: usize = 32;
const VOCAB: usize = 1000;
const BATCH: usize = 32;
const SEQ: usize = 128;
/// Heads and FFN neurons per layer that the MiniLM acceptance run kept (BENCHMARKS.md, issue 13).
const PRUNED_HEADS: [usize; 6] = [8, 8, 6, 7, 7, 7];
const PRUNED_NEURONS: [usize; 6] = [989, 969, 867, 899, 928, 878];

fn config() -> Result<BertConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_hidden_layers": 6,
        "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512,
        "hidden_act": "gelu"
    }))?)
}

fn randn(shape: &[usize], dev: &Device) -> Result<Tensor> {
    Ok((Tensor::randn(0f32, 1., shape, dev)? * 0.05)?)
}

/// Random weights for an encoder whose layer `i` keeps `heads[i]` heads and `neurons[i]` neurons.
fn weights(heads: &[usize], neurons: &[usize], dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut w = HashMap::new();
    w.insert(
        "embeddings.word_embeddings.weight".into(),
        randn(&[VOCAB, HIDDEN], dev)?,
    );
    w.insert(
        "embeddings.position_embeddings.weight".into(),
        randn(&[512, HIDDEN], dev)?,
    );
    w.insert(
        "embeddings.token_type_embeddings.weight".into(),
        randn(&[2, HIDDEN], dev)?,
    );
    let norm = |w: &mut HashMap<String, Tensor>, p: &str| -> Result<()> {
        w.insert(
            format!("{p}.LayerNorm.weight"),
            Tensor::ones(HIDDEN, DType::F32, dev)?,
        );
        w.insert(
            format!("{p}.LayerNorm.bias"),
            Tensor::zeros(HIDDEN, DType::F32, dev)?,
        );
        Ok(())
    };
    norm(&mut w, "embeddings")?;
    let linear =
        |w: &mut HashMap<String, Tensor>, p: String, out: usize, inp: usize| -> Result<()> {
            w.insert(format!("{p}.weight"), randn(&[out, inp], dev)?);
            w.insert(format!("{p}.bias"), randn(&[out], dev)?);
            Ok(())
        };
    for (i, (&h, &n)) in heads.iter().zip(neurons).enumerate() {
        let l = format!("encoder.layer.{i}");
        for proj in ["query", "key", "value"] {
            linear(
                &mut w,
                format!("{l}.attention.self.{proj}"),
                h * HEAD_DIM,
                HIDDEN,
            )?;
        }
        linear(
            &mut w,
            format!("{l}.attention.output.dense"),
            HIDDEN,
            h * HEAD_DIM,
        )?;
        norm(&mut w, &format!("{l}.attention.output"))?;
        linear(&mut w, format!("{l}.intermediate.dense"), n, HIDDEN)?;
        linear(&mut w, format!("{l}.output.dense"), HIDDEN, n)?;
        norm(&mut w, &format!("{l}.output"))?;
    }
    Ok(w)
}

/// all-MiniLM-L6-v2's tensors, each layer cut to its first `heads[i]` heads and `neurons[i]`
/// neurons.
fn real_weights(
    heads: &[usize],
    neurons: &[usize],
    dev: &Device,
) -> Result<HashMap<String, Tensor>> {
    let shared = std::env::var("COMPRESSD_SHARED").unwrap_or_else(|_| "../shared".into());
    let path = std::path::Path::new(&shared).join("models/all-MiniLM-L6-v2/model.safetensors");
    let mut w = candle_core::safetensors::load(&path, dev)?;
    for (i, (&h, &n)) in heads.iter().zip(neurons).enumerate() {
        let l = format!("encoder.layer.{i}");
        for proj in ["query", "key", "value"] {
            for part in ["weight", "bias"] {
                let name = format!("{l}.attention.self.{proj}.{part}");
                let cut = w[&name].narrow(0, 0, h * HEAD_DIM)?.contiguous()?;
                w.insert(name, cut);
            }
        }
        let name = format!("{l}.attention.output.dense.weight");
        let cut = w[&name].narrow(1, 0, h * HEAD_DIM)?.contiguous()?;
        w.insert(name, cut);
        for part in ["weight", "bias"] {
            let name = format!("{l}.intermediate.dense.{part}");
            let cut = w[&name].narrow(0, 0, n)?.contiguous()?;
            w.insert(name, cut);
        }
        let name = format!("{l}.output.dense.weight");
        let cut = w[&name].narrow(1, 0, n)?.contiguous()?;
        w.insert(name, cut);
    }
    Ok(w)
}

fn median_ms(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn main() -> Result<()> {
    // As a job process does (`compressd` sets both first thing), so the ratio is the pipeline's.
    compressd_engine::perf::tune_threads();
    compressd_engine::perf::tune_allocator();
    let runs = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .map_or(Ok(5), |r| r.parse())?;
    let real = std::env::args().any(|a| a == "--real");
    let dev = Device::Cpu;
    let mut cfg = config()?;
    if real {
        cfg.vocab_size = 30522;
    }
    let factory = LinearFactory::new(LinearPlan::uniform(LinearKind::Dense));
    let ids: Vec<u32> = (0..BATCH * SEQ)
        .map(|i| (i * 7919 % VOCAB) as u32)
        .collect();
    let ids = Tensor::from_vec(ids, (BATCH, SEQ), &dev)?;
    let mask = Tensor::ones((BATCH, SEQ), DType::U32, &dev)?;
    let input = BertInput {
        input_ids: &ids,
        token_type_ids: None,
        attention_mask: Some(&mask),
    };
    let mut results = Vec::new();
    for (name, heads, neurons) in [
        ("dense", [12; 6], [1536; 6]),
        ("pruned", PRUNED_HEADS, PRUNED_NEURONS),
    ] {
        let tensors = if real {
            real_weights(&heads, &neurons, &dev)?
        } else {
            weights(&heads, &neurons, &dev)?
        };
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        let model = BertModel::load(vb, &cfg, &factory)?;
        let ms = median_ms(runs, || {
            model.forward(input, None)?;
            Ok(())
        })?;
        println!("{name}: {ms:.1} ms at batch {BATCH} x {SEQ} tokens");
        results.push(ms);
    }
    println!("speed-up: {:.2}x", results[0] / results[1]);
    Ok(())
}
