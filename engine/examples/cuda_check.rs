//! GPU check for a machine with CUDA: (1) a small random BERT classifier gives the same logits, loss,
//! gradients and AdamW trajectory on CUDA as on the CPU, within float tolerance, and each
//! quantization scheme's layer is as close to the f32 product on CUDA as on the CPU; (2) the time of one
//! BERT-base-sized training step (forward with loss, backward, clipping + AdamW) on CUDA, in f32 and
//! with bf16 and f16 mixed precision (`mixed_precision: "bf16"`, `"f16"`: f16 with the trainer's
//! dynamic loss scaling), whose first losses must match f32's.
//!
//! ```text
//! bench/cuda_check.sh            # builds with `--features cuda` and runs this; see BENCHMARKS.md
//! cargo run --release -p compressd-engine --features cuda --example cuda_check -- \
//!   [--device cuda:0] [--batch 32] [--seq 128] [--steps 10] [--warmup 3] [--dropout 0.0]
//! ```
//!
//! `--device cpu` (with a small `--batch`/`--seq`) runs the same comparisons CPU against CPU, to try
//! this program where no GPU exists. Built without the `cuda` feature it compiles (so CPU-only CI type-checks it) but stops at once
//! with the engine's "built without the `cuda` feature" error. Exits non-zero when any comparison is
//! out of tolerance; prints one JSON line with every measured difference and the step timings.

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use compressd_engine::data::{Batch, Example};
use compressd_engine::device::{device_name, parse_device};
use compressd_engine::layers::{LinearFactory, LinearLayer, QuantizedLinear};
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification};
use compressd_engine::models::common::DropoutRng;
use compressd_engine::models::{Outputs, TaskModel};
use compressd_engine::params::ParamStore;
use compressd_engine::quant::{quantize, QuantScheme, Quantized};
use compressd_engine::task::SequenceClassificationTask;
use compressd_engine::train::recompute::RecomputingForward;
use compressd_engine::train::{
    clip, loss_scale, AdamW, AdamWConfig, ClipConfig, Gradients, LossScaler, LossScaling, TrainTask,
};
use serde_json::{json, Value};

/// Logits of a 2-layer, hidden-64 model: both devices do the same f32 math with differently ordered
/// reductions (cuBLAS vs gemm, full f32: candle leaves TF32 off by default), so ~1e-6 is expected;
/// 1e-4 still catches a wrong mask, activation or normalisation.
const MAX_LOGIT_DIFF: f32 = 1e-4;
/// Per-tensor gradient tolerance, relative to the tensor's largest CPU gradient (plus a small
/// absolute floor for tensors whose gradient is all but zero).
const MAX_GRAD_REL_DIFF: f32 = 1e-3;
const GRAD_ABS_FLOOR: f32 = 1e-6;
/// Relative loss tolerance over the AdamW trajectory. Weights may differ by up to ~lr where a
/// gradient element is near zero (AdamW's first step is ±lr whatever the gradient's size), so the
/// trajectory is compared through the loss, which such elements barely move.
const MAX_LOSS_REL_DIFF: f64 = 1e-3;
/// bf16 keeps 8 significant bits: the dry run on the CPU (`--device cpu --batch 2 --seq 32`) put
/// BERT-base's first bf16 loss 1.1e-3 (relative) from the f32 one.
const MAX_BF16_LOSS_REL_DIFF: f64 = 2e-2;
/// f16 keeps 11 significant bits, 8x bf16's precision: held to the same bound.
const MAX_F16_LOSS_REL_DIFF: f64 = 2e-2;
/// A quantized layer on the GPU (candle's block kernels or a dequantized matmul) may round
/// differently from our CPU kernels, but it must be as close to the exact f32 product: its
/// relative RMS error at most this many times the CPU layer's, plus [`QUANT_ABS_SLACK`].
const MAX_QUANT_ERROR_RATIO: f64 = 1.5;
const QUANT_ABS_SLACK: f64 = 2e-3;
const CHECK_STEPS: u64 = 5;
const CHECK_LR: f64 = 1e-3;

struct Args {
    device: String,
    batch: usize,
    seq: usize,
    steps: usize,
    warmup: usize,
    dropout: f64,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        device: "cuda:0".into(),
        batch: 32,
        seq: 128,
        steps: 10,
        warmup: 3,
        dropout: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--device" => args.device = value,
            "--batch" => args.batch = value.parse()?,
            "--seq" => args.seq = value.parse()?,
            "--steps" => args.steps = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            "--dropout" => args.dropout = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    ensure!(
        args.batch > 0 && args.steps > 0 && (2..=512).contains(&args.seq),
        "--batch and --steps must be >= 1 and --seq in 2..=512"
    );
    Ok(args)
}

fn bert_config(size: &Value, dropout: f64) -> Result<BertConfig> {
    let mut cfg = json!({
        "max_position_embeddings": 512, "type_vocab_size": 2, "hidden_act": "gelu",
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
    });
    for (key, value) in size.as_object().context("size must be an object")? {
        cfg[key] = value.clone();
    }
    Ok(serde_json::from_value(cfg)?)
}

/// Small enough to compare element by element, big enough to run every kernel (4 heads, padding).
fn tiny_config() -> Result<BertConfig> {
    bert_config(
        &json!({"vocab_size": 120, "hidden_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 128,
                "id2label": {"0": "a", "1": "b", "2": "c"}}),
        0.1,
    )
}

/// BERT-base (110M parameters) with a 2-label head.
fn base_config(dropout: f64) -> Result<BertConfig> {
    bert_config(
        &json!({"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072,
                "id2label": {"0": "neg", "1": "pos"}}),
        dropout,
    )
}

fn load(
    store: &ParamStore,
    cfg: &BertConfig,
    dev: &Device,
) -> Result<BertForSequenceClassification> {
    load_with(store, cfg, dev, &LinearFactory::default())
}

fn load_with(
    store: &ParamStore,
    cfg: &BertConfig,
    dev: &Device,
    linears: &LinearFactory,
) -> Result<BertForSequenceClassification> {
    Ok(BertForSequenceClassification::load(
        store.var_builder(DType::F32, dev),
        cfg,
        linears,
    )?)
}

/// A random CPU store with every parameter non-trivial (fresh biases are zero and norms one, which
/// would hide bugs in their gradients).
fn random_cpu_store(cfg: &BertConfig) -> Result<ParamStore> {
    let store = ParamStore::new();
    store.set_init_missing(Some(7));
    load(&store, cfg, &Device::Cpu)?;
    for (_, var) in store.trainable_vars() {
        var.set(&(var.as_tensor() + var.randn_like(0.0, 0.1)?)?)?;
    }
    Ok(store)
}

/// The same values on `dev`, trainable or frozen, in fresh storage (a variable made from a variable
/// shares its storage, and `to_device` to the same device is a no-op, so copy first: replicas must not
/// see each other's updates).
fn copy_store(store: &ParamStore, dev: &Device, trainable: bool) -> Result<ParamStore> {
    let tensors = store
        .tensors()
        .into_iter()
        .map(|(name, t)| Ok((name, t.copy()?.to_device(dev)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(ParamStore::from_tensors(tensors, |_| trainable)?)
}

/// Four rows of different lengths, so the batch carries padding and the attention mask matters.
fn tiny_examples() -> Vec<Example> {
    (0..4u32)
        .map(|row| Example {
            input_ids: (0..6 + 3 * row)
                .map(|i| 1 + (i * 37 + row * 11) % 119)
                .collect(),
            label: Some(row % 3),
        })
        .collect()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let b = b.to_device(a.device())?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Logits of the CPU model against the CUDA model on its gradient (composed-op) path and, with
/// frozen weights, on candle's fused inference kernels.
fn check_logits(cpu_store: &ParamStore, cfg: &BertConfig, cuda: &Device) -> Result<Value> {
    let examples = tiny_examples();
    let refs: Vec<&Example> = examples.iter().collect();
    let cpu_logits = {
        let model = load(cpu_store, cfg, &Device::Cpu)?;
        let batch = Batch::collate(&refs, 0, &Device::Cpu)?;
        SequenceClassificationTask { model: &model }.logits(&batch, None)?
    };
    let batch = Batch::collate(&refs, 0, cuda)?;
    let mut diffs = serde_json::Map::new();
    for (path, trainable) in [("composed", true), ("fused", false)] {
        let model = load(&copy_store(cpu_store, cuda, trainable)?, cfg, cuda)?;
        let logits = SequenceClassificationTask { model: &model }.logits(&batch, None)?;
        let diff = max_abs_diff(&cpu_logits, &logits)?;
        ensure!(
            diff <= MAX_LOGIT_DIFF,
            "{path} CUDA logits differ from the CPU's by {diff:e} (> {MAX_LOGIT_DIFF:e})"
        );
        diffs.insert(format!("logits_{path}_max_abs_diff"), json!(diff));
    }
    Ok(Value::Object(diffs))
}

/// One training replica: a model, its optimizer and its batch on one device.
struct Replica {
    store: ParamStore,
    model: BertForSequenceClassification,
    optimizer: AdamW,
    batch: Batch,
}

impl Replica {
    fn new(store: ParamStore, cfg: &BertConfig, dev: &Device, batch: Batch) -> Result<Self> {
        let model = load(&store, cfg, dev)?;
        let opt_cfg = AdamWConfig {
            lr: CHECK_LR,
            ..Default::default()
        };
        let optimizer = AdamW::new(store.trainable_vars(), opt_cfg)?;
        Ok(Self {
            store,
            model,
            optimizer,
            batch,
        })
    }

    /// Loss and gradients of step `step` (dropout seeded by the step; every mask is a function of
    /// a seed from that generator, so both devices drop the same elements), then a clipped AdamW
    /// update.
    fn step(&mut self, step: u64) -> Result<(f64, candle_core::backprop::GradStore)> {
        let dropout = DropoutRng::new(step);
        let task = SequenceClassificationTask { model: &self.model };
        let loss = task.loss(&self.batch, Some(&dropout))?;
        let grads = loss.backward()?;
        let clip_cfg = ClipConfig {
            max_norm: Some(1.0),
            max_value: None,
        };
        let outcome = clip::measure(&self.optimizer.vars(), Gradients::Store(&grads), &clip_cfg)?;
        self.optimizer
            .step(Gradients::Store(&grads), 1.0, outcome.transform)?;
        Ok((f64::from(loss.to_scalar::<f32>()?), grads))
    }
}

/// Activation recomputation (`gradient_checkpointing`) on `dev`: the same step's gradients with
/// and without it, with dropout on. On CUDA the model runs candle's composed ops, whose gradients
/// can carry graphs of their own, a path the CPU tests do not take. Returns the worst relative
/// difference, failing past [`MAX_GRAD_REL_DIFF`].
fn check_recomputation(cpu_store: &ParamStore, cfg: &BertConfig, dev: &Device) -> Result<Value> {
    let examples = tiny_examples();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = Batch::collate(&refs, 0, dev)?;
    let store = copy_store(cpu_store, dev, true)?;
    let model = load(&store, cfg, dev)?;
    let vars = store.trainable_vars();
    let plain_loss =
        SequenceClassificationTask { model: &model }.loss(&batch, Some(&DropoutRng::new(9)))?;
    let plain = plain_loss.backward()?;
    let dropout = DropoutRng::new(9);
    let forward = RecomputingForward::run(&model, &batch, Outputs::LOGITS, Some(&dropout))?;
    let loss = model.task_loss(forward.output(), &batch)?;
    let loss_diff =
        (f64::from(loss.to_scalar::<f32>()?) - f64::from(plain_loss.to_scalar::<f32>()?)).abs();
    let recomputed = forward.backward(&batch, loss, &vars)?;
    let mut worst = 0f32;
    for (name, var) in &vars {
        let a = plain
            .get(var)
            .with_context(|| format!("no plain gradient for {name}"))?;
        let b = recomputed
            .get(var)
            .with_context(|| format!("no recomputed gradient for {name}"))?;
        let scale = max_abs(a)?.max(GRAD_ABS_FLOOR / MAX_GRAD_REL_DIFF);
        let rel = max_abs_diff(a, b)? / scale;
        ensure!(
            rel <= MAX_GRAD_REL_DIFF,
            "gradient of {name}: recomputation differs from the plain step by {rel:e}"
        );
        worst = worst.max(rel);
    }
    ensure!(
        loss_diff < 1e-6,
        "recomputation changed the loss by {loss_diff:e}"
    );
    Ok(json!({"recompute_grad_max_rel_diff": worst, "recompute_loss_abs_diff": loss_diff}))
}

/// The worst relative gradient difference over all parameters, failing past the tolerance.
fn compare_grads(
    cpu: &Replica,
    cpu_grads: &candle_core::backprop::GradStore,
    cuda: &Replica,
    cuda_grads: &candle_core::backprop::GradStore,
) -> Result<f32> {
    let cuda_vars: std::collections::HashMap<String, _> =
        cuda.store.trainable_vars().into_iter().collect();
    let mut worst = 0f32;
    for (name, var) in cpu.store.trainable_vars() {
        let g_cpu = cpu_grads
            .get(&var)
            .with_context(|| format!("no CPU gradient for {name}"))?;
        let g_cuda = cuda_vars
            .get(&name)
            .and_then(|v| cuda_grads.get(v))
            .with_context(|| format!("no CUDA gradient for {name}"))?;
        let scale = max_abs(g_cpu)?.max(GRAD_ABS_FLOOR / MAX_GRAD_REL_DIFF);
        let rel = max_abs_diff(g_cpu, g_cuda)? / scale;
        ensure!(
            rel <= MAX_GRAD_REL_DIFF,
            "gradient of {name}: CUDA differs from CPU by {rel:e} of its largest element"
        );
        worst = worst.max(rel);
    }
    Ok(worst)
}

/// Root mean square of `a - b` relative to that of `b`.
fn relative_rms(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?;
    let b = b.to_device(&Device::Cpu)?;
    let err = (&a - &b)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
    let scale = b.sqr()?.mean_all()?.to_scalar::<f32>()?;
    Ok(f64::from(err.sqrt() / scale.sqrt().max(1e-12)))
}

/// Each quantization scheme a `quantize` stage writes, run as a layer on the device and on the
/// CPU (issue 15: "on CUDA, the same schemes run through candle's kernels or a dequantize path,
/// correct before fast"): a 768 → 384 layer with a bias, 64 rows, against the exact f32 product.
fn check_quantized(dev: &Device) -> Result<Value> {
    let (rows, in_features, out_features) = (64, 768, 384);
    let weight = (Tensor::randn(0f32, 1.0, (out_features, in_features), &Device::Cpu)? * 0.05)?;
    let bias = (Tensor::randn(0f32, 1.0, out_features, &Device::Cpu)? * 0.1)?;
    let x = Tensor::randn(0f32, 1.0, (rows, in_features), &Device::Cpu)?;
    let exact = x.matmul(&weight.t()?)?.broadcast_add(&bias)?;
    let schemes = [
        ("int8", QuantScheme::Int8, None),
        ("int8_static", QuantScheme::Int8, Some(4.0f32 / 127.0)),
        ("int4_g32", QuantScheme::Int4 { group_size: 32 }, None),
        ("nf4", QuantScheme::Nf4, None),
        (
            "q8_0",
            QuantScheme::Gguf(candle_core::quantized::GgmlDType::Q8_0),
            None,
        ),
        (
            "q4_k",
            QuantScheme::Gguf(candle_core::quantized::GgmlDType::Q4K),
            None,
        ),
    ];
    let mut report = serde_json::Map::new();
    for (name, scheme, input_scale) in schemes {
        let Quantized::Weight(q) = quantize(&weight, scheme)? else {
            bail!("{name} did not take a {out_features} x {in_features} weight");
        };
        let layer_on = |device: &Device| -> Result<Tensor> {
            let layer = QuantizedLinear::new(q.clone(), Some(bias.to_device(device)?), device)?;
            let layer = match input_scale {
                Some(scale) => layer.with_input_scale(scale, device)?,
                None => layer,
            };
            let y = layer.forward(&x.to_device(device)?)?;
            Ok(y.to_device(&Device::Cpu)?)
        };
        let on_cpu = layer_on(&Device::Cpu)?;
        let on_dev = layer_on(dev)?;
        let cpu_error = relative_rms(&on_cpu, &exact)?;
        let dev_error = relative_rms(&on_dev, &exact)?;
        ensure!(
            dev_error <= MAX_QUANT_ERROR_RATIO * cpu_error + QUANT_ABS_SLACK,
            "{name} on the device is {dev_error} (relative RMS) from the f32 product, the CPU \
             layer {cpu_error}"
        );
        report.insert(
            name.into(),
            json!({"cpu_rel_rms": cpu_error, "device_rel_rms": dev_error,
                   "device_vs_cpu_rel_rms": relative_rms(&on_dev, &on_cpu)?}),
        );
    }
    Ok(Value::Object(report))
}

/// Trains CPU and CUDA replicas side by side from the same weights; step 0's gradients are
/// compared tensor by tensor, every step's loss within [`MAX_LOSS_REL_DIFF`].
fn check_training(cpu_store: &ParamStore, cfg: &BertConfig, cuda: &Device) -> Result<Value> {
    let examples = tiny_examples();
    let refs: Vec<&Example> = examples.iter().collect();
    let cpu_batch = Batch::collate(&refs, 0, &Device::Cpu)?;
    let cuda_batch = Batch::collate(&refs, 0, cuda)?;
    let mut cpu = Replica::new(
        copy_store(cpu_store, &Device::Cpu, true)?,
        cfg,
        &Device::Cpu,
        cpu_batch,
    )?;
    let mut gpu = Replica::new(copy_store(cpu_store, cuda, true)?, cfg, cuda, cuda_batch)?;
    let (mut losses, mut worst_grad, mut worst_loss) = (vec![], 0f32, 0f64);
    for step in 0..CHECK_STEPS {
        let (loss_cpu, grads_cpu) = cpu.step(step)?;
        let (loss_cuda, grads_cuda) = gpu.step(step)?;
        if step == 0 {
            worst_grad = compare_grads(&cpu, &grads_cpu, &gpu, &grads_cuda)?;
        }
        let rel = (loss_cpu - loss_cuda).abs() / loss_cpu.abs().max(1.0);
        ensure!(
            rel <= MAX_LOSS_REL_DIFF,
            "step {step}: CUDA loss {loss_cuda} vs CPU loss {loss_cpu}"
        );
        worst_loss = worst_loss.max(rel);
        losses.push(json!([loss_cpu, loss_cuda]));
    }
    let (moved, weight_diff) = weight_drift(cpu_store, &cpu.store, &gpu.store)?;
    // Each AdamW step moves a weight with a gradient by about lr, so after several steps the
    // largest move must be well above lr: anything less means the CUDA update did not happen.
    ensure!(
        f64::from(moved) > CHECK_LR,
        "CUDA weights moved by at most {moved:e} in {CHECK_STEPS} steps of lr {CHECK_LR:e}"
    );
    Ok(json!({
        "grad_max_rel_diff": worst_grad,
        "loss_max_rel_diff": worst_loss,
        "losses_cpu_cuda": losses,
        "cuda_weights_max_move": moved,
        "weights_cpu_cuda_max_abs_diff": weight_diff,
    }))
}

/// How far the CUDA replica's weights moved from `initial`, and how far they ended from the CPU
/// replica's (reported, not bounded: see [`MAX_LOSS_REL_DIFF`]).
fn weight_drift(initial: &ParamStore, cpu: &ParamStore, cuda: &ParamStore) -> Result<(f32, f32)> {
    let (mut moved, mut diff) = (0f32, 0f32);
    for (name, start) in initial.tensors() {
        let (Some(on_cpu), Some(on_cuda)) = (cpu.get(&name), cuda.get(&name)) else {
            bail!("{name} is missing from a replica");
        };
        moved = moved.max(max_abs_diff(&start, on_cuda.tensor())?);
        diff = diff.max(max_abs_diff(on_cpu.tensor(), on_cuda.tensor())?);
    }
    Ok((moved, diff))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A fixed batch of full-length rows of pseudo-random ids.
fn timing_batch(args: &Args, dev: &Device) -> Result<Batch> {
    let ids: Vec<u32> = (0..args.batch * args.seq)
        .map(|i| ((i as u64 * 2_654_435_761) % 30522) as u32)
        .collect();
    let input_ids = Tensor::from_vec(ids, (args.batch, args.seq), dev)?;
    let labels: Vec<u32> = (0..args.batch as u32).map(|i| i % 2).collect();
    Ok(Batch {
        attention_mask: input_ids.ones_like()?,
        token_type_ids: input_ids.zeros_like()?,
        labels: Tensor::from_vec(labels, args.batch, dev)?,
        input_ids,
    })
}

/// Median milliseconds of the forward (with loss), backward and optimizer phases of a BERT-base
/// training step; the device is synchronised after each phase since CUDA launches are asynchronous.
/// `compute` is the mixed-precision dtype of the dense layers' products (`None`: f32). The same
/// seed draws the same weights, so the first step's loss compares across precisions.
fn time_training_step(args: &Args, dev: &Device, compute: Option<DType>) -> Result<Value> {
    let store = ParamStore::new();
    store.set_init_missing(Some(0));
    let linears = match compute {
        Some(dtype) => LinearFactory::default().with_compute_dtype(dtype),
        None => LinearFactory::default(),
    };
    let model = load_with(&store, &base_config(args.dropout)?, dev, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let mut opt = AdamW::new(store.trainable_vars(), AdamWConfig::default())?;
    let vars = opt.vars();
    let clip_cfg = ClipConfig {
        max_norm: Some(1.0),
        max_value: None,
    };
    let batch = timing_batch(args, dev)?;
    let (mut fwd, mut bwd, mut optim, mut step) = (vec![], vec![], vec![], vec![]);
    let mut first_loss = None;
    // f16 trains as a job's trainer does: loss scaled before backward, gradients unscaled and
    // checked for overflow (timed with backward), the step skipped on overflow.
    let scaling = (compute == Some(DType::F16)).then(LossScaling::default);
    let mut scaler = scaling.as_ref().map(LossScaler::new);
    for i in 0..args.warmup + args.steps {
        let dropout = (args.dropout > 0.0).then(|| DropoutRng::new(i as u64));
        let t0 = Instant::now();
        let loss = task.loss(&batch, dropout.as_ref())?;
        dev.synchronize()?;
        if i == 0 {
            first_loss = Some(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        }
        let t1 = Instant::now();
        let (grads, finite) = match (scaler.as_mut(), &scaling) {
            (Some(scaler), Some(scaling)) => {
                let mut grads = (&loss * scaler.scale)?.backward()?;
                let finite = loss_scale::unscale(&mut grads, &vars, scaler.scale)?;
                if finite {
                    scaler.record_good_step(scaling);
                } else {
                    scaler.record_overflow(scaling)?;
                }
                (grads, finite)
            }
            _ => (loss.backward()?, true),
        };
        dev.synchronize()?;
        let t2 = Instant::now();
        if finite {
            let outcome = clip::measure(&vars, Gradients::Store(&grads), &clip_cfg)?;
            opt.step(Gradients::Store(&grads), 1.0, outcome.transform)?;
        }
        dev.synchronize()?;
        let t3 = Instant::now();
        if i >= args.warmup {
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
            fwd.push(ms(t0, t1));
            bwd.push(ms(t1, t2));
            optim.push(ms(t2, t3));
            step.push(ms(t0, t3));
        }
    }
    let step_ms = median(step);
    Ok(json!({
        "precision": compute.map_or("f32".to_string(), |d| format!("{d:?}").to_lowercase()),
        "first_loss": first_loss,
        "params": store.parameter_count(),
        "batch": args.batch, "seq": args.seq, "dropout": args.dropout, "steps": args.steps,
        "forward_ms": median(fwd), "backward_ms": median(bwd), "optimizer_ms": median(optim),
        "step_ms": step_ms,
        "tokens_per_s": (args.batch * args.seq) as f64 / (step_ms / 1e3),
        "skipped_steps": scaler.map(|s| s.skipped_steps),
    }))
}

fn main() -> Result<()> {
    let args = parse_args()?;
    // `--device cpu` runs every comparison CPU against CPU (trainable custom ops against frozen fused
    // kernels): a dry run of this program on a machine without a GPU.
    let cuda = parse_device(&args.device)?;
    let cfg = tiny_config()?;
    let cpu_store = random_cpu_store(&cfg)?;
    let logits = check_logits(&cpu_store, &cfg, &cuda)?;
    let training = check_training(&cpu_store, &cfg, &cuda)?;
    let recomputation = check_recomputation(&cpu_store, &cfg, &cuda)?;
    let quantized = check_quantized(&cuda)?;
    eprintln!("CUDA matches the CPU: {logits} {training} {recomputation} {quantized}");
    let timing = time_training_step(&args, &cuda, None)?;
    // Mixed precision (bf16 products, f32 master weights): its first loss must be the f32 one
    // to within bf16's rounding, or the casts compute something else.
    let bf16 = time_training_step(&args, &cuda, Some(DType::BF16))?;
    let f16 = time_training_step(&args, &cuda, Some(DType::F16))?;
    let loss_of = |v: &Value| v["first_loss"].as_f64().unwrap_or(f64::NAN);
    let bf16_loss_rel_diff = (loss_of(&bf16) - loss_of(&timing)).abs() / loss_of(&timing).abs();
    let f16_loss_rel_diff = (loss_of(&f16) - loss_of(&timing)).abs() / loss_of(&timing).abs();
    println!(
        "{}",
        json!({
            "device": device_name(&cuda),
            "check": {"logits": logits, "training": training, "recomputation": recomputation,
                      "quantized": quantized,
                      "bf16_first_loss_rel_diff": bf16_loss_rel_diff,
                      "f16_first_loss_rel_diff": f16_loss_rel_diff},
            "bert_base_train_step": timing,
            "bert_base_train_step_bf16": bf16,
            "bert_base_train_step_f16": f16,
        })
    );
    ensure!(
        bf16_loss_rel_diff < MAX_BF16_LOSS_REL_DIFF,
        "bf16 mixed precision's first loss is {bf16_loss_rel_diff} away from f32's"
    );
    ensure!(
        f16_loss_rel_diff < MAX_F16_LOSS_REL_DIFF,
        "f16 mixed precision's first loss is {f16_loss_rel_diff} away from f32's"
    );
    Ok(())
}
