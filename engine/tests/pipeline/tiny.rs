//! The whole pipeline on a tiny random BERT and a synthetic keyword dataset: fine-tune, iterative
//! pruning with recovery, int8 quantization; then a saved stage is loaded back as a resume would.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::Device;
use compressd_engine::pipeline::{Event, PipelineInputs, Workbench};
use compressd_engine::quant::layout::METADATA_KEY;
use compressd_engine::quant::st_file::SafetensorsFile;
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::{run_job, Session, DYNAMIC_METADATA_KEY, DYNAMIC_METADATA_VALUE};
use tiny_task::{write_data, write_model};

use crate::tiny_task;

#[test]
fn finetune_prune_quantize_end_to_end_and_reload() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny", "model": model_dir, "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "prune", "sparsity": 0.5, "steps": 2, "recover": {"epochs": 1, "learning_rate": 0.001}},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.2}
    }))?;
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &sink,
        &AtomicBool::new(false),
    )?;
    let report = &result.report;
    let accuracy = |i: usize| report.stages[i].metrics.accuracy.unwrap();
    assert!(
        accuracy(0) > 0.9,
        "the keyword task is learnable: {}",
        accuracy(0)
    );
    let sparsity = report.stages[1].details["achieved"]["overall"]
        .as_f64()
        .unwrap();
    assert!((sparsity - 0.5).abs() < 0.01, "{sparsity}");
    assert!(
        report.stages[1].metrics.nonzero_parameters < report.stages[0].metrics.nonzero_parameters
    );
    assert!(
        report.stages[2].metrics.size_on_disk_bytes < report.stages[1].metrics.size_on_disk_bytes
    );
    assert!(report.stages[2].metrics.latency_batch1_ms.is_some());
    assert_eq!(
        report.stages[2].details["quantized"]
            .as_array()
            .unwrap()
            .len(),
        16,
        "12 linears, the pooler, 3 embedding tables"
    );
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert!(file.metadata().contains_key(METADATA_KEY));
    let progress = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Event::Progress { .. }))
        .count();
    assert!(progress > 10, "training progress is reported");

    // Resume path: the pruned stage loads back with its masks and scores the same.
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let pruned_dir = out.join("stages/1-prune/model");
    let pruned = session.load_saved(&pruned_dir)?;
    assert_eq!(pruned.masks().map(|m| m.names().len()), Some(12));
    let again = session.evaluate(&pruned, &pruned_dir)?;
    assert_eq!(again.accuracy, report.stages[1].metrics.accuracy);
    let quantized_dir = out.join("stages/2-quantize/model");
    let quantized = session.load_saved(&quantized_dir)?;
    // The packed weights come back as stored, and the layers run on them.
    let state = quantized
        .quantized()
        .expect("the reloaded model is quantized");
    assert_eq!(state.weights.len(), 16);
    assert!(state
        .weights
        .values()
        .all(|w| w.scheme().to_string() == "int8"));
    let again = session.evaluate(&quantized, &quantized_dir)?;
    assert_eq!(again.accuracy, report.stages[2].metrics.accuracy);
    Ok(())
}

/// `method: "dynamic"`: the linear layers (only) get int8 weights and per-token int8 inputs on the
/// int8 × int8 kernel; accuracy stays within quantization error of the f32 model, and the saved
/// stage reloads as dynamic.
#[test]
fn dynamic_int8_quantizes_linear_layers_and_reloads_as_dynamic() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-dynamic", "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "method": "dynamic", "scheme": "int8"}
        ]
    }))?;
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )?;
    let stages = &result.report.stages;
    let (f32_accuracy, int8_accuracy) = (
        stages[0].metrics.accuracy.unwrap(),
        stages[1].metrics.accuracy.unwrap(),
    );
    assert!(
        f32_accuracy > 0.9,
        "the keyword task is learnable: {f32_accuracy}"
    );
    assert!(
        (f32_accuracy - int8_accuracy).abs() <= 0.05,
        "int8 {int8_accuracy} vs f32 {f32_accuracy}"
    );
    let details = &stages[1].details;
    assert_eq!(details["method"], "dynamic");
    let quantized: Vec<&str> = details["quantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        quantized.len(),
        13,
        "12 linears and the pooler: {quantized:?}"
    );
    assert!(
        quantized.iter().all(|n| !n.contains("embeddings")),
        "{quantized:?}"
    );
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert_eq!(
        file.metadata()
            .get(DYNAMIC_METADATA_KEY)
            .map(String::as_str),
        Some(DYNAMIC_METADATA_VALUE)
    );

    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = out.join("stages/1-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    let state = reloaded
        .quantized()
        .expect("the reloaded model is quantized");
    assert!(state.dynamic, "the reloaded model runs dynamic again");
    assert_eq!(state.weights.len(), 13);
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, stages[1].metrics.accuracy);
    Ok(())
}

/// Runs `pipeline` on the tiny task, returning the result and the job's folder.
fn run_tiny(
    name: &str,
    pipeline: serde_json::Value,
) -> Result<(
    compressd_engine::pipeline::PipelineResult,
    JobSpec,
    PipelineInputs,
    tempfile::TempDir,
)> {
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_model(&model_dir)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": name, "model": model_dir,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": pipeline
    }))?;
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )?;
    Ok((result, spec, inputs, dir))
}

/// `method: "qat"`: trains with the linear weights fake-quantized (int4, groups of 32) against the
/// float model's outputs, then stores every planned weight as int4 with its error reported; the
/// saved stage reloads and scores the same.
#[test]
fn qat_trains_through_fake_quantized_int4_layers_and_stores_int4() -> Result<()> {
    let (result, spec, inputs, dir) = run_tiny(
        "tiny-qat",
        serde_json::json!([
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "method": "qat", "scheme": "int4", "group_size": 32,
             "qat": {"epochs": 2, "learning_rate": 0.001, "distill_from_float": true}}
        ]),
    )?;
    let stages = &result.report.stages;
    let (f32_accuracy, qat_accuracy) = (
        stages[0].metrics.accuracy.unwrap(),
        stages[1].metrics.accuracy.unwrap(),
    );
    assert!(f32_accuracy > 0.9, "learnable: {f32_accuracy}");
    assert!(
        qat_accuracy >= f32_accuracy - 0.1,
        "qat {qat_accuracy} vs f32 {f32_accuracy}"
    );
    let details = &stages[1].details;
    assert_eq!(details["method"], "qat");
    assert!(
        details["training"]["steps"].as_u64().unwrap() > 0,
        "{details}"
    );
    let curves = details["training"]["loss_curves"].as_object().unwrap();
    assert!(
        curves.contains_key("task") && curves.contains_key("response"),
        "self-distillation trains on both: {curves:?}"
    );
    let quantized = details["quantized"].as_array().unwrap();
    assert_eq!(quantized.len(), 16, "12 linears, the pooler, 3 tables");
    let errors = details["quantization_error"].as_object().unwrap();
    assert_eq!(errors.len(), 16);
    for (name, error) in errors {
        let error = error.as_f64().unwrap();
        assert!(error > 0.0 && error < 0.5, "{name}: {error}");
    }

    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = dir.path().join("out/stages/1-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    let state = reloaded.quantized().expect("stored quantized");
    assert_eq!(state.weights.len(), 16);
    assert!(state
        .weights
        .values()
        .all(|w| w.scheme().to_string() == "int4-g32"));
    assert!(!state.dynamic);
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, stages[1].metrics.accuracy);
    Ok(())
}

/// `qat.activations: "int8_per_token"` also rounds the linear layers' inputs in training and
/// leaves the model dynamically quantized (int8 × int8 at run time), like `method: "dynamic"`.
#[test]
fn qat_with_int8_activations_stores_a_dynamic_model() -> Result<()> {
    let (result, spec, inputs, dir) = run_tiny(
        "tiny-qat-dynamic",
        serde_json::json!([
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "method": "qat", "scheme": "int8",
             "qat": {"epochs": 1, "learning_rate": 0.001, "activations": "int8_per_token"}}
        ]),
    )?;
    let stages = &result.report.stages;
    let details = &stages[1].details;
    assert_eq!(details["method"], "qat");
    assert!(
        details["activations"].as_str().unwrap().contains("dynamic"),
        "{details}"
    );
    assert!(
        details["training"]["loss_curves"]
            .as_object()
            .is_none_or(|c| c.is_empty()),
        "the task loss alone: {details}"
    );
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert_eq!(
        file.metadata()
            .get(DYNAMIC_METADATA_KEY)
            .map(String::as_str),
        Some(DYNAMIC_METADATA_VALUE)
    );
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = dir.path().join("out/stages/1-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    assert!(reloaded.quantized().expect("quantized").dynamic);
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, stages[1].metrics.accuracy);
    Ok(())
}

/// QAT with `int8_per_tensor` inputs: each layer's input range is observed in training (a moving
/// average), frozen after `freeze_observers_after` batches, and becomes the static model's input
/// scale: the saved stage is statically quantized with exactly the observed scales and reloads to
/// the same score.
#[test]
fn qat_with_per_tensor_int8_activations_stores_the_observed_scales() -> Result<()> {
    let (result, spec, inputs, dir) = run_tiny(
        "tiny-qat-static",
        serde_json::json!([
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "method": "qat", "scheme": "int8",
             "qat": {"epochs": 2, "learning_rate": 0.001, "activations": "int8_per_tensor",
                     "freeze_observers_after": 3}}
        ]),
    )?;
    let stages = &result.report.stages;
    let (f32_accuracy, qat_accuracy) = (
        stages[0].metrics.accuracy.unwrap(),
        stages[1].metrics.accuracy.unwrap(),
    );
    assert!(
        qat_accuracy >= f32_accuracy - 0.1,
        "qat static {qat_accuracy} vs f32 {f32_accuracy}"
    );
    let details = &stages[1].details;
    assert!(
        details["activations"]
            .as_str()
            .unwrap()
            .contains("observed"),
        "{details}"
    );
    let steps = details["training"]["steps"].as_u64().unwrap();
    assert!(steps > 3, "more steps than the observers' window: {steps}");
    let ranges = details["observed_ranges"].as_object().unwrap();
    assert_eq!(ranges.len(), 13, "12 linears and the pooler: {ranges:?}");
    for (module, range) in ranges {
        assert_eq!(range["batches"], 3, "{module} froze after 3 batches");
        assert_eq!(range["frozen"], true, "{module}");
        assert!(range["absmax"].as_f64().unwrap() > 0.0, "{module}");
    }
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert_eq!(
        file.metadata()
            .get(DYNAMIC_METADATA_KEY)
            .map(String::as_str),
        Some("int8_per_tensor_static")
    );
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = dir.path().join("out/stages/1-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    let state = reloaded.quantized().expect("quantized");
    assert!(!state.dynamic);
    let quantized: Vec<&str> = details["quantized"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n.as_str()?.strip_suffix(".weight"))
        .filter(|m| ranges.contains_key(*m))
        .collect();
    assert!(!quantized.is_empty());
    assert_eq!(state.input_scales.len(), quantized.len());
    for module in quantized {
        let absmax = ranges[module]["absmax"].as_f64().unwrap() as f32;
        assert_eq!(
            state.input_scales[module],
            (absmax / 127.0).max(f32::MIN_POSITIVE)
        );
    }
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, stages[1].metrics.accuracy);
    Ok(())
}

/// `method: "static"`: calibrated input ranges per linear layer, the layers of largest output
/// error kept in full precision (`fallback.share`), and a saved stage that reloads with its
/// scales and scores the same.
#[test]
fn static_int8_calibrates_each_layer_and_keeps_the_worst_in_float() -> Result<()> {
    let (result, spec, inputs, dir) = run_tiny(
        "tiny-static",
        serde_json::json!([
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "method": "static", "scheme": "int8", "calibration_batches": 500,
             "calibration": "percentile", "percentile": 99.9, "fallback": {"share": 0.2}}
        ]),
    )?;
    let stages = &result.report.stages;
    let (f32_accuracy, int8_accuracy) = (
        stages[0].metrics.accuracy.unwrap(),
        stages[1].metrics.accuracy.unwrap(),
    );
    assert!(f32_accuracy > 0.9, "learnable: {f32_accuracy}");
    assert!(
        int8_accuracy >= f32_accuracy - 0.1,
        "static {int8_accuracy} vs f32 {f32_accuracy}"
    );
    let details = &stages[1].details;
    assert_eq!(details["method"], "static");
    let calibration = &details["calibration"];
    assert_eq!(calibration["method"], "percentile");
    assert_eq!(calibration["batches_requested"], 500);
    let ran = calibration["batches_run"].as_u64().unwrap();
    assert!(ran > 0 && ran < 500, "capped by the training split: {ran}");
    let layers = calibration["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 13, "12 linears and the pooler");
    let kept = calibration["kept_full_precision"].as_array().unwrap();
    assert_eq!(kept.len(), 3, "ceil(0.2 · 13)");
    let worst_kept = kept
        .iter()
        .map(|m| {
            layers[m.as_str().unwrap()]["output_error"]
                .as_f64()
                .unwrap()
        })
        .fold(f64::INFINITY, f64::min);
    for (module, layer) in layers {
        let error = layer["output_error"].as_f64().unwrap();
        let is_kept = layer["kept_full_precision"].as_bool().unwrap();
        assert!(layer["scale"].as_f64().unwrap() > 0.0, "{module}");
        assert!(
            layer["clip"].as_f64().unwrap() <= layer["absmax"].as_f64().unwrap(),
            "{module}"
        );
        if !is_kept {
            assert!(
                error <= worst_kept,
                "{module}: {error} above a kept layer's"
            );
        }
    }
    let quantized = details["quantized"].as_array().unwrap();
    assert_eq!(quantized.len(), 10);
    let file = SafetensorsFile::open(&result.final_dir.join("model.safetensors"))?;
    assert_eq!(
        file.metadata()
            .get(DYNAMIC_METADATA_KEY)
            .map(String::as_str),
        Some("int8_per_tensor_static")
    );

    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = dir.path().join("out/stages/1-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    let state = reloaded.quantized().expect("quantized");
    assert_eq!(state.input_scales.len(), 10);
    assert!(!state.dynamic);
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.accuracy, stages[1].metrics.accuracy);
    Ok(())
}

/// QAT on a tiny Llama with a tied output layer: the embedding table (also the output matrix) is
/// quantized first and frozen, the projections train fake-quantized, and the job's GGUF-free
/// folder reloads with every weight quantized and scores what the job reported.
#[test]
fn qat_on_a_tied_llama_freezes_the_table_and_trains_the_projections() -> Result<()> {
    use crate::interop::{write_corpus, write_llama};
    let dir = tempfile::tempdir()?;
    let model_dir = dir.path().join("model");
    write_llama(&model_dir, true)?;
    let dataset = dir.path().join("corpus.txt");
    write_corpus(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-llama-qat", "model": model_dir,
        "task": {"type": "language_modeling", "dataset": dataset, "max_length": 16},
        "pipeline": [
            {"type": "quantize", "method": "qat", "scheme": "int4", "group_size": 32,
             "qat": {"epochs": 2, "learning_rate": 0.003, "batch_size": 8,
                     "distill_from_float": true}}
        ]
    }))?;
    let inputs = PipelineInputs {
        model: model_dir,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )?;
    let stage = &result.report.stages[0];
    let details = &stage.details;
    assert_eq!(details["method"], "qat");
    let training = &details["training"];
    assert!(training["steps"].as_u64().unwrap() > 0, "{training}");
    let quantized: Vec<&str> = details["quantized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        quantized.contains(&"model.embed_tokens.weight"),
        "the tied table is quantized: {quantized:?}"
    );
    assert!(
        quantized.iter().any(|n| n.ends_with("q_proj.weight")),
        "{quantized:?}"
    );
    // Everything but the table trained: the table is frozen once quantized.
    let table = 16 * 32;
    let trainable = training["trainable_parameters"].as_u64().unwrap() as usize;
    let total = stage.metrics.parameters as usize;
    assert_eq!(trainable, total - table, "{training}");
    assert!(stage.metrics.perplexity.is_some_and(f64::is_finite));

    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let saved = out.join("stages/0-quantize/model");
    let reloaded = session.load_saved(&saved)?;
    let state = reloaded.quantized().expect("quantized");
    assert_eq!(state.weights.len(), quantized.len());
    let again = session.evaluate(&reloaded, &saved)?;
    assert_eq!(again.perplexity, stage.metrics.perplexity);
    Ok(())
}

/// A seeded job repeats bit for bit: the same spec run three times on the same model and data
/// writes the same fine-tuned and QAT weights. A guard against unseeded randomness or
/// order-dependent code anywhere in the loop; the tiny model is too small to split the kernels'
/// reductions across threads, so their order is tested on its own
/// (`ops::tests::parameter_gradients_repeat_exactly_over_many_chunks`).
#[test]
fn a_seeded_job_writes_the_same_weights_every_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-repeat", "model": model, "seed": 11,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 2, "learning_rate": 0.003, "batch_size": 64},
            {"type": "quantize", "method": "qat", "scheme": "int8",
             "qat": {"epochs": 1, "learning_rate": 0.001, "batch_size": 64,
                     "activations": "int8_per_tensor"}}
        ]
    }))?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let weights = |run: usize| -> Result<Vec<Vec<u8>>> {
        let out = dir.path().join(format!("out-{run}"));
        run_job(
            &spec,
            &inputs,
            Device::Cpu,
            &out,
            &|_| {},
            &AtomicBool::new(false),
        )?;
        ["stages/0-finetune/model", "stages/1-quantize/model"]
            .iter()
            .map(|stage| Ok(std::fs::read(out.join(stage).join("model.safetensors"))?))
            .collect()
    };
    let first = weights(0)?;
    for run in 1..3 {
        let again = weights(run)?;
        assert!(
            again[0] == first[0],
            "run {run}: the fine-tuned weights differ"
        );
        assert!(again[1] == first[1], "run {run}: the QAT weights differ");
    }
    Ok(())
}

/// `gradient_checkpointing` recomputes each block in backward: the same seeded full fine-tune,
/// LoRA fine-tune (adapters, and their dropout) and feature distillation (its loss reads the
/// student's last hidden state beside the logits) end with the same loss and accuracy as the plain
/// ones, up to float summing order. Gradients reaching an inner hidden state both directly and
/// through the blocks after it, and dropout's replay, are tested in `train::recompute`.
#[test]
fn gradient_checkpointing_trains_like_the_plain_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let inputs = PipelineInputs {
        model: model.clone(),
        dataset: dataset.clone(),
        device: "cpu".into(),
        models: Default::default(),
    };
    let stages = [
        (
            "full",
            serde_json::json!({"type": "finetune", "epochs": 2, "learning_rate": 0.003,
                                      "batch_size": 16}),
        ),
        (
            "lora",
            serde_json::json!({"type": "finetune", "method": "lora", "rank": 4, "dropout": 0.1,
                                      "epochs": 2, "learning_rate": 0.01, "batch_size": 16}),
        ),
        (
            "distill",
            serde_json::json!({"type": "distill", "student_layers": 1, "epochs": 2,
                                         "batch_size": 16,
                                         "weights": {"task": 0.5, "response": 0.5, "feature": 1.0}}),
        ),
    ];
    for (name, stage) in stages {
        let run = |checkpointing: bool| -> Result<serde_json::Value> {
            let mut last = stage.clone();
            last["gradient_checkpointing"] = checkpointing.into();
            // Distillation starts from a fine-tuned teacher.
            let pipeline = if name == "distill" {
                serde_json::json!([{"type": "finetune", "epochs": 2, "learning_rate": 0.003,
                                    "batch_size": 16}, last])
            } else {
                serde_json::json!([last])
            };
            let spec: JobSpec = serde_json::from_value(serde_json::json!({
                "name": "tiny-recompute", "model": model, "seed": 5,
                "task": {"type": "text_classification", "dataset": dataset},
                "pipeline": pipeline
            }))?;
            let out = dir.path().join(format!("out-{name}-{checkpointing}"));
            let result = run_job(
                &spec,
                &inputs,
                Device::Cpu,
                &out,
                &|_| {},
                &AtomicBool::new(false),
            )?;
            let stage = result.report.stages.last().unwrap();
            Ok(serde_json::json!({
                "accuracy": stage.metrics.accuracy,
                "loss": stage.details["training"]["final_loss"],
                "steps": stage.details["training"]["steps"],
            }))
        };
        let plain = run(false)?;
        let recomputed = run(true)?;
        assert_eq!(plain["steps"], recomputed["steps"], "{name}");
        assert!(plain["steps"].as_u64().unwrap() > 4, "{name}: {plain}");
        assert_eq!(plain["accuracy"], recomputed["accuracy"], "{name}");
        let (a, b) = (
            plain["loss"].as_f64().unwrap(),
            recomputed["loss"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "{name}: final loss {a} vs {b}"
        );
    }
    Ok(())
}

/// `mixed_precision` the CPU cannot run fast (f16 always, bf16 without AVX-512 BF16) fails the
/// job before its first stage runs, naming the stage's field, and writes no stage output.
#[test]
fn mixed_precision_on_the_cpu_fails_the_job_before_any_stage() -> Result<()> {
    let mode = if compressd_engine::ops::bf16_gemm::available() {
        "f16"
    } else {
        "bf16"
    };
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "tiny-bf16", "model": model,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [
            {"type": "finetune", "epochs": 1},
            {"type": "distill", "student_layers": 1, "mixed_precision": mode}
        ]
    }))?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let out = dir.path().join("out");
    let Err(err) = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    ) else {
        panic!("{mode} is not offered on this CPU");
    };
    let message = err.to_string();
    assert!(
        message.contains("/pipeline/1/mixed_precision") && message.contains(mode),
        "{message}"
    );
    assert!(
        !out.join("stages").exists(),
        "the finetune stage must not run"
    );
    Ok(())
}
