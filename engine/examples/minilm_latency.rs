//! Inference latency of all-MiniLM-L6-v2 on CPU: our `BertModel` (frozen weights, so every op takes
//! its gradient-free fused path) against candle-transformers' `BertModel`, on the same weights and
//! the same tokenized BBC News texts, and our model with every linear layer quantized to int8 (the
//! integer kernel of `layers::int8_matmul`). Before timing, it asserts that the two f32 encoders
//! agree and that the int8 encoder's mean-pooled embeddings stay close to f32's (cosine).
//!
//! ```text
//! cargo run --release -p compressd-engine --example minilm_latency -- [--runs 20] [--warmup 3] \
//!   [--case 'batch 1']
//! # or, reusing the dev build's opt-level-3 dependencies and optimising only the engine:
//! cargo --config 'profile.dev.package.compressd-engine.opt-level=3' \
//!   --config 'profile.dev.package.compressd-engine.debug-assertions=false' \
//!   run -p compressd-engine --example minilm_latency
//! ```
//!
//! Reads `models/all-MiniLM-L6-v2` and `data/bbc_news/bbc_news.jsonl` under `../shared` from the
//! repository root (or `$COMPRESSD_SHARED`) and fails when they are missing. Results go to
//! BENCHMARKS.md ("MiniLM inference latency").

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use candle_transformers::models::bert as reference_bert;
use compressd_engine::layers::{LinearFactory, LinearKind, LinearPlan};
use compressd_engine::loading::{load_tokenizer, read_hf_folder};
use compressd_engine::models::bert::{mean_pool, BertConfig, BertInput, BertModel};
use compressd_engine::quant::QuantScheme;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

const MODEL_DIR: &str = "models/all-MiniLM-L6-v2";
const DATA_FILE: &str = "data/bbc_news/bbc_news.jsonl";
/// Texts taken from the head of the data file: one batch-32 case, 32 distinct batch-1 inputs.
const TEXT_COUNT: usize = 32;
const MAX_TOKENS: usize = 128;
/// Largest accepted difference between the two encoders' outputs on real tokens. Both run the same
/// f32 math with differently ordered reductions, so agreement should be around 1e-5; 1e-3 leaves
/// room for that while still catching any real divergence (a wrong mask, activation or eps).
const MAX_ABS_DIFF: f32 = 1e-3;
/// Smallest accepted cosine between a text's f32 and int8 mean-pooled embeddings. Per-channel int8
/// weights and per-row int8 activations keep it near 0.999; a broken kernel lands far below.
const MIN_INT8_COSINE: f32 = 0.99;

struct Args {
    runs: usize,
    warmup: usize,
    /// Only the cases whose name contains this (`--case "batch 1"`), e.g. to profile one.
    case: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        runs: 20,
        warmup: 3,
        case: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => args.runs = value.parse()?,
            "--warmup" => args.warmup = value.parse()?,
            "--case" => args.case = Some(value),
            other => bail!("unknown flag {other} (expected --runs N, --warmup N, --case NAME)"),
        }
    }
    ensure!(args.runs > 0, "--runs must be at least 1");
    Ok(args)
}

/// The shared folder, failing loudly (a benchmark without its model must not pass silently).
fn shared_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    for needed in [MODEL_DIR, DATA_FILE] {
        if !dir.join(needed).exists() {
            bail!(
                "{} not found: this benchmark needs the shared models and data \
                 (set COMPRESSD_SHARED to the folder holding {MODEL_DIR} and {DATA_FILE})",
                dir.join(needed).display()
            );
        }
    }
    // Canonical, so the path printed in results reads plainly.
    Ok(dir.canonicalize().unwrap_or(dir))
}

/// The 1-minute load average, to record how busy the machine was (Linux only).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "n/a".to_owned())
}

/// The `text` fields of the first `count` rows of a JSONL file.
fn read_texts(path: &Path, count: usize) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut texts = Vec::with_capacity(count);
    for line in std::io::BufReader::new(file).lines().take(count) {
        let row: serde_json::Value = serde_json::from_str(&line?)?;
        let text = row["text"]
            .as_str()
            .context("a row without a \"text\" string")?;
        texts.push(text.to_owned());
    }
    ensure!(
        texts.len() == count,
        "{} holds fewer than {count} rows",
        path.display()
    );
    Ok(texts)
}

/// One tokenized batch as the tensors both encoders take.
struct Inputs {
    input_ids: Tensor,
    token_type_ids: Tensor,
    attention_mask: Tensor,
}

impl Inputs {
    fn shape(&self) -> Result<(usize, usize)> {
        Ok(self.input_ids.dims2()?)
    }
}

/// The model's tokenizer, truncating at [`MAX_TOKENS`] and padding to the longest row of a batch.
fn batch_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tokenizer = load_tokenizer(path)?;
    let pad_id = tokenizer
        .token_to_id("[PAD]")
        .context("tokenizer has no [PAD] token")?;
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: MAX_TOKENS,
            ..Default::default()
        }))
        .map_err(anyhow::Error::msg)?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id,
        pad_token: "[PAD]".to_owned(),
        ..Default::default()
    }));
    Ok(tokenizer)
}

fn tokenize(tokenizer: &Tokenizer, texts: &[&str], dev: &Device) -> Result<Inputs> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .map_err(anyhow::Error::msg)?;
    let rows = encodings.len();
    let seq = encodings.first().map_or(0, |e| e.get_ids().len());
    let flat = |field: fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor> {
        let values: Vec<u32> = encodings
            .iter()
            .flat_map(|e| field(e).iter().copied())
            .collect();
        Ok(Tensor::from_vec(values, (rows, seq), dev)?)
    };
    Ok(Inputs {
        input_ids: flat(tokenizers::Encoding::get_ids)?,
        token_type_ids: flat(tokenizers::Encoding::get_type_ids)?,
        attention_mask: flat(tokenizers::Encoding::get_attention_mask)?,
    })
}

/// The two encoders, built on the very same weight tensors.
struct Encoders {
    ours: BertModel,
    reference: reference_bert::BertModel,
    int8: BertModel,
}

impl Encoders {
    fn load(dir: &Path, dev: &Device) -> Result<Self> {
        let checkpoint = read_hf_folder(dir, DType::F32, dev)?;
        let config: BertConfig = checkpoint.parse_config()?;
        let reference_config: reference_bert::Config =
            serde_json::from_value(checkpoint.config.clone())?;
        // Tensors share storage, so this clone hands the reference the same buffers, not a copy.
        let weights: HashMap<String, Tensor> = checkpoint.tensors.iter().cloned().collect();
        let reference = reference_bert::BertModel::load(
            VarBuilder::from_tensors(weights, DType::F32, dev),
            &reference_config,
        )?;
        // No trainable parameter: the forward pass records no graph and uses the fused kernels.
        let store = checkpoint.into_store(|_| false)?;
        let ours = BertModel::load(
            store.var_builder(DType::F32, dev),
            &config,
            &LinearFactory::default(),
        )?;
        let int8_plan = LinearPlan::uniform(LinearKind::Quantized(QuantScheme::Int8));
        let int8 = BertModel::load(
            store.var_builder(DType::F32, dev),
            &config,
            &LinearFactory::new(int8_plan),
        )?;
        Ok(Self {
            ours,
            reference,
            int8,
        })
    }

    fn run_ours(&self, x: &Inputs) -> Result<Tensor> {
        run(&self.ours, x)
    }

    fn run_int8(&self, x: &Inputs) -> Result<Tensor> {
        run(&self.int8, x)
    }

    fn run_reference(&self, x: &Inputs) -> Result<Tensor> {
        Ok(self
            .reference
            .forward(&x.input_ids, &x.token_type_ids, Some(&x.attention_mask))?)
    }
}

fn run(model: &BertModel, x: &Inputs) -> Result<Tensor> {
    let input = BertInput {
        input_ids: &x.input_ids,
        token_type_ids: Some(&x.token_type_ids),
        attention_mask: Some(&x.attention_mask),
    };
    Ok(model.forward(input, None)?.last_hidden_state)
}

/// Smallest cosine, over the rows of a batch, between f32 and int8 mean-pooled embeddings.
fn int8_cosine(encoders: &Encoders, x: &Inputs) -> Result<f32> {
    let f32_emb = mean_pool(&encoders.run_ours(x)?, &x.attention_mask)?;
    let int8_emb = mean_pool(&encoders.run_int8(x)?, &x.attention_mask)?;
    let dot = (&f32_emb * &int8_emb)?.sum(D::Minus1)?;
    let norms =
        (f32_emb.sqr()?.sum(D::Minus1)?.sqrt()? * int8_emb.sqr()?.sum(D::Minus1)?.sqrt()?)?;
    Ok((dot / norms)?.min(0)?.to_scalar::<f32>()?)
}

/// Largest absolute difference between the two `(batch, seq, hidden)` outputs, over real tokens and
/// over every position (padding rows included).
fn output_difference(encoders: &Encoders, x: &Inputs) -> Result<(f32, f32)> {
    let diff = (encoders.run_ours(x)? - encoders.run_reference(x)?)?.abs()?;
    let real = x
        .attention_mask
        .to_dtype(DType::F32)?
        .unsqueeze(D::Minus1)?;
    let on_real_tokens = diff.broadcast_mul(&real)?.max_all()?.to_scalar::<f32>()?;
    let everywhere = diff.max_all()?.to_scalar::<f32>()?;
    Ok((on_real_tokens, everywhere))
}

/// Median (p50) of measured milliseconds.
fn median(mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let mid = ms.len() / 2;
    if ms.len() % 2 == 1 {
        ms[mid]
    } else {
        (ms[mid - 1] + ms[mid]) / 2.0
    }
}

fn elapsed_ms(f: impl FnOnce() -> Result<Tensor>) -> Result<f64> {
    let start = Instant::now();
    // candle's CPU backend is eager: the output is computed when the call returns.
    let out = f()?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    drop(out);
    Ok(ms)
}

/// p50 milliseconds of each encoder.
struct Timings {
    ours: f64,
    reference: f64,
    int8: f64,
}

/// p50 milliseconds over `args.runs` forward passes after `args.warmup`, cycling through `batches`.
/// The encoders rotate which goes first so all see the same load.
fn time_case(encoders: &Encoders, batches: &[Inputs], args: &Args) -> Result<Timings> {
    type Run = fn(&Encoders, &Inputs) -> Result<Tensor>;
    let runs: [Run; 3] = [
        Encoders::run_ours,
        Encoders::run_reference,
        Encoders::run_int8,
    ];
    for x in batches.iter().cycle().take(args.warmup) {
        for run in runs {
            run(encoders, x)?;
        }
    }
    let mut ms: [Vec<f64>; 3] = Default::default();
    for (i, x) in batches.iter().cycle().take(args.runs).enumerate() {
        for j in 0..3 {
            let which = (i + j) % 3;
            ms[which].push(elapsed_ms(|| runs[which](encoders, x))?);
        }
    }
    let [ours, reference, int8] = ms.map(median);
    Ok(Timings {
        ours,
        reference,
        int8,
    })
}

/// Checks that the encoders agree on every batch of a case, times it and prints one table row.
fn report_case(encoders: &Encoders, name: &str, batches: &[Inputs], args: &Args) -> Result<()> {
    let mut worst = (0f32, 0f32);
    let mut cosine = 1f32;
    for x in batches {
        let (real, all) = output_difference(encoders, x)?;
        ensure!(
            real <= MAX_ABS_DIFF,
            "{name}: outputs differ by {real} on real tokens"
        );
        worst = (worst.0.max(real), worst.1.max(all));
        cosine = cosine.min(int8_cosine(encoders, x)?);
    }
    ensure!(
        cosine >= MIN_INT8_COSINE,
        "{name}: int8 embeddings drift from f32 (cosine {cosine})"
    );
    let seq_lens: Vec<usize> = batches
        .iter()
        .map(|x| Ok(x.shape()?.1))
        .collect::<Result<_>>()?;
    let (min_seq, max_seq) = (seq_lens.iter().min(), seq_lens.iter().max());
    let t = time_case(encoders, batches, args)?;
    println!(
        "| {name} | {}–{} | {:.1} | {:.1} | {:.2}x | {:.1e} / {:.1e} | {:.1} | {:.2}x | {cosine:.4} |",
        min_seq.unwrap_or(&0),
        max_seq.unwrap_or(&0),
        t.ours,
        t.reference,
        t.ours / t.reference,
        worst.0,
        worst.1,
        t.int8,
        t.int8 / t.ours,
    );
    Ok(())
}

fn main() -> Result<()> {
    compressd_engine::perf::tune_threads();
    compressd_engine::perf::tune_allocator();
    let args = parse_args()?;
    let shared = shared_dir()?;
    let dev = Device::Cpu;
    let texts = read_texts(&shared.join(DATA_FILE), TEXT_COUNT)?;
    let articles: Vec<&str> = texts.iter().map(String::as_str).collect();
    // Each BBC text starts with its headline line: short rows of unequal length, so this batch is
    // really padded and exercises the attention mask.
    let headlines: Vec<&str> = texts
        .iter()
        .map(|t| t.lines().next().unwrap_or(""))
        .collect();

    let model_dir = shared.join(MODEL_DIR);
    let started = Instant::now();
    let encoders = Encoders::load(&model_dir, &dev)?;
    let tokenizer = batch_tokenizer(&model_dir.join("tokenizer.json"))?;
    println!(
        "loaded {} in {:.0} ms",
        model_dir.display(),
        started.elapsed().as_secs_f64() * 1e3
    );

    let singles = articles
        .iter()
        .map(|t| tokenize(&tokenizer, &[t], &dev))
        .collect::<Result<Vec<_>>>()?;
    let cases = [
        ("batch 1, BBC articles", singles),
        (
            "batch 32, BBC articles",
            vec![tokenize(&tokenizer, &articles, &dev)?],
        ),
        (
            "batch 32, BBC headlines (padded)",
            vec![tokenize(&tokenizer, &headlines, &dev)?],
        ),
    ];

    println!(
        "threads: {}, runs: {}, warm-up: {}, f32 CPU, load average {}",
        candle_core::utils::get_num_threads(),
        args.runs,
        args.warmup,
        load_average()
    );
    println!(
        "| case | tokens per row | ours p50 (ms) | candle-transformers p50 (ms) | ours / candle \
         | max abs diff (real tokens / all) | int8 p50 (ms) | int8 / ours f32 | min cos int8 vs f32 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let wanted = |name: &str| args.case.as_deref().is_none_or(|c| name.contains(c));
    for (name, batches) in cases.iter().filter(|(name, _)| wanted(name)) {
        report_case(&encoders, name, batches, &args)?;
    }
    println!("load average at the end: {}", load_average());
    Ok(())
}
