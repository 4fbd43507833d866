//! Times one BERT training step on CPU, by phase: forward (with the loss), backward, optimizer
//! (clipping measurement + fused AdamW). The PyTorch reference is `bench/pytorch_train_step.py`
//! (same config, batch and optimizer settings); results go to BENCHMARKS.md.
//!
//! ```text
//! cargo run --release -p compressd-engine --example train_step -- [--steps 10] [--warmup 3] [--dropout 0.0] \
//!   [--seq 128] [--checkpointing true] [--bf16 true]
//! # or, reusing the dev build's opt-level-3 dependencies and optimising only the engine:
//! cargo --config 'profile.dev.package.compressd-engine.opt-level=3' \
//!   --config 'profile.dev.package.compressd-engine.debug-assertions=false' \
//!   run -p compressd-engine --example train_step
//! ```
//!
//! Prints one JSON line with median milliseconds per phase and the process's peak RSS. With
//! `--checkpointing true` the step recomputes each block in backward (`gradient_checkpointing`):
//! the forward phase keeps only the blocks' inputs and the backward phase runs them again. With
//! `--bf16 true` the linear layers' products run in bf16 (`mixed_precision: "bf16"`, CPU mixed
//! precision: needs AVX-512 BF16); compare with `bench/pytorch_train_step.py --autocast bf16`.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use compressd_engine::data::Batch;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification};
use compressd_engine::models::common::DropoutRng;
use compressd_engine::models::{Outputs, TaskModel};
use compressd_engine::params::ParamStore;
use compressd_engine::task::SequenceClassificationTask;
use compressd_engine::train::recompute::RecomputingForward;
use compressd_engine::train::{clip, AdamW, AdamWConfig, ClipConfig, Gradients, TrainTask};

const BATCH: usize = 8;

struct Args {
    steps: usize,
    warmup: usize,
    dropout: f64,
    seq: usize,
    checkpointing: bool,
    bf16: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        steps: 10,
        warmup: 3,
        dropout: 0.0,
        seq: 128,
        checkpointing: false,
        bf16: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--steps" => args.steps = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            "--dropout" => args.dropout = value.parse()?,
            "--seq" => args.seq = value.parse()?,
            "--checkpointing" => args.checkpointing = value.parse()?,
            "--bf16" => args.bf16 = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if !(1..=512).contains(&args.seq) {
        bail!("--seq must be 1 to 512 (the position table)");
    }
    Ok(args)
}

fn bench_config(dropout: f64) -> Result<BertConfig> {
    Ok(serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "max_position_embeddings": 512, "type_vocab_size": 2,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        "id2label": {"0": "a", "1": "b"}
    }))?)
}

/// A fixed random batch of full-length rows (no padding, like the PyTorch script).
fn bench_batch(seq: usize, dev: &Device) -> Result<Batch> {
    let ids: Vec<u32> = (0..BATCH * seq)
        .map(|i| ((i as u64 * 2_654_435_761) % 30522) as u32)
        .collect();
    let input_ids = Tensor::from_vec(ids, (BATCH, seq), dev)?;
    Ok(Batch {
        attention_mask: input_ids.ones_like()?,
        token_type_ids: input_ids.zeros_like()?,
        labels: Tensor::from_vec(
            (0..BATCH as u32).map(|i| i % 2).collect::<Vec<_>>(),
            BATCH,
            dev,
        )?,
        input_ids,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (`VmHWM`) in MiB, when `/proc` has it: the model, its
/// AdamW moments and the largest step's activations and gradients.
fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

fn main() -> Result<()> {
    compressd_engine::perf::tune_threads();
    compressd_engine::perf::tune_allocator();
    let args = parse_args()?;
    let dev = Device::Cpu;
    let store = ParamStore::new();
    // Every weight is missing, so the store draws them all (N(0, 0.02²) matrices, as in HF BERT).
    store.set_init_missing(Some(0));
    if args.bf16 && !compressd_engine::ops::bf16_gemm::available() {
        bail!("--bf16 needs a CPU with AVX-512 BF16");
    }
    let linears = if args.bf16 {
        LinearFactory::default().with_compute_dtype(DType::BF16)
    } else {
        LinearFactory::default()
    };
    let model = BertForSequenceClassification::load(
        store.var_builder(DType::F32, &dev),
        &bench_config(args.dropout)?,
        &linears,
    )?;
    let task = SequenceClassificationTask { model: &model };
    let cfg = AdamWConfig {
        lr: 2e-5,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable_vars(), cfg)?;
    let vars = opt.vars();
    let clip_cfg = ClipConfig {
        max_norm: Some(1.0),
        max_value: None,
    };
    let batch = bench_batch(args.seq, &dev)?;
    let (mut fwd, mut bwd, mut optim, mut clip_only, mut step) =
        (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..args.warmup + args.steps {
        let dropout = (args.dropout > 0.0).then(|| DropoutRng::new(i as u64));
        let t0 = Instant::now();
        let (loss, recomputing) = if args.checkpointing {
            let forward =
                RecomputingForward::run(&model, &batch, Outputs::LOGITS, dropout.as_ref())?;
            (model.task_loss(forward.output(), &batch)?, Some(forward))
        } else {
            (task.loss(&batch, dropout.as_ref())?, None)
        };
        // Force the forward computation to finish (candle is eager on CPU, this is a cheap read).
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = match recomputing {
            Some(forward) => forward.backward(&batch, loss, &vars)?,
            None => loss.backward()?,
        };
        let t2 = Instant::now();
        let outcome = clip::measure(&vars, Gradients::Store(&grads), &clip_cfg)?;
        let t_clip = Instant::now();
        opt.step(Gradients::Store(&grads), 1.0, outcome.transform)?;
        drop(grads);
        let t3 = Instant::now();
        if i >= args.warmup {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            optim.push((t3 - t2).as_secs_f64() * 1e3);
            clip_only.push((t_clip - t2).as_secs_f64() * 1e3);
            step.push((t3 - t0).as_secs_f64() * 1e3);
        }
    }
    let round = |x: f64| (x * 100.0).round() / 100.0;
    let report = serde_json::json!({
        "impl": "compressd-candle",
        "forward_ms": round(median(fwd)),
        "backward_ms": round(median(bwd)),
        "optimizer_ms": round(median(optim)),
        "of_which_clip_norm_ms": round(median(clip_only)),
        "step_ms": round(median(step)),
        "params": store.parameter_count(),
        "dropout": args.dropout,
        "mixed_precision": if args.bf16 { Some("bf16") } else { None },
        "seq": args.seq,
        "checkpointing": args.checkpointing,
        "steps": args.steps,
        "peak_rss_mib": peak_rss_mib(),
    });
    println!("{report}");
    Ok(())
}
