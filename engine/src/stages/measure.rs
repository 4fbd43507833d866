//! Measuring a model for the report: task metric, parameters, latency and throughput.
//!
//! Classification is scored on the test split (validation drives early stopping); language models
//! on the held-out sequences. Latency is the median of timed forward passes at batch 1 and 32 on
//! real examples; language-model latency uses 64-token prefixes so a 32-row batch stays affordable
//! on a CPU (the report says so in the stage details).

use candle_core::Device;

use super::model::WorkingModel;
use super::session::{Session, TaskData};
use super::training::eval_batch_size;
use crate::data::{Batch, Example};
use crate::error::Result;
use crate::eval::{measure_latency, parameter_counts};
use crate::models::Outputs;
use crate::report::ModelMetrics;
use crate::task::{evaluate_model, TaskScores};

/// Tokens of each language-model example used for latency.
const LM_LATENCY_TOKENS: usize = 64;
/// Timed runs at batch 1 and batch 32 (after one warm-up each). The median of 3 batch-32 runs
/// swung by a third on an idle 2-core VM (the same MiniLM measured 988 to 1,340 ms in eight jobs,
/// BENCHMARKS.md); 7 runs cost a few seconds more per measurement.
const RUNS_BATCH1: usize = 10;
const RUNS_BATCH32: usize = 7;

/// Measures `model` on the session's data.
///
/// # Errors
/// A forward-pass failure or an empty evaluation split.
pub(super) fn evaluate(session: &Session, model: &WorkingModel) -> Result<ModelMetrics> {
    let built = session.build_model(model, false)?;
    let counts = parameter_counts(&model.store)?;
    let pad = session.encoder.pad_id();
    let device = &session.device;
    let mut metrics = ModelMetrics {
        parameters: counts.total,
        nonzero_parameters: counts.nonzero,
        ..ModelMetrics::default()
    };
    let (scored, latency_rows): (&[Example], Vec<Example>) = match &session.data {
        TaskData::Classification(data) => (&data.test, data.test.clone()),
        TaskData::LanguageModeling(corpus) => (
            &corpus.validation,
            corpus
                .validation
                .iter()
                .map(|e| truncated(e, LM_LATENCY_TOKENS))
                .collect(),
        ),
    };
    let batch_size = eval_batch_size(built.task());
    let labels = session.labels().len();
    match evaluate_model(&*built, scored, batch_size, pad, device, labels)? {
        TaskScores::Classification(scores) => {
            metrics.accuracy = Some(scores.accuracy);
            metrics.macro_f1 = Some(scores.macro_f1);
        }
        TaskScores::LanguageModeling(_, perplexity) => metrics.perplexity = Some(perplexity),
    }
    let forward = |batch: &Batch| -> Result<()> {
        built.forward(batch, Outputs::LOGITS, None)?;
        Ok(())
    };
    if let Some(one) = latency_batch(&latency_rows, 1, pad, device)? {
        metrics.latency_batch1_ms =
            Some(measure_latency(1, 1, RUNS_BATCH1, || forward(&one))?.p50_ms);
    }
    if let Some(many) = latency_batch(&latency_rows, 32, pad, device)? {
        let report = measure_latency(32, 1, RUNS_BATCH32, || forward(&many))?;
        metrics.latency_batch32_ms = Some(report.p50_ms);
        metrics.throughput_per_s = Some(report.throughput_per_s);
    }
    Ok(metrics)
}

/// The first `rows` examples as one batch (cycling when there are fewer), `None` with no examples.
fn latency_batch(
    examples: &[Example],
    rows: usize,
    pad: u32,
    device: &Device,
) -> Result<Option<Batch>> {
    if examples.is_empty() {
        return Ok(None);
    }
    let picked: Vec<&Example> = examples.iter().cycle().take(rows).collect();
    Ok(Some(Batch::collate(&picked, pad, device)?))
}

fn truncated(example: &Example, tokens: usize) -> Example {
    Example {
        input_ids: example.input_ids.iter().copied().take(tokens).collect(),
        label: example.label,
    }
}
