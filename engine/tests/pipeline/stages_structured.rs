//! Structured pruning (`pattern: heads | neurons | structured`) on the tiny BERT classifier and the
//! tiny GQA Llama: the model really shrinks (tensors and config), loads back as the engine saved it,
//! reports what each layer kept, and bad input is refused with a reason.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{DType, Device};
use compressd_engine::loading::read_hf_folder;
use compressd_engine::objective::Objective;
use compressd_engine::params::ParamStore;
use compressd_engine::pipeline::{PipelineInputs, PipelineResult, StageContext, Workbench};
use compressd_engine::spec::{JobSpec, ModelState, StageSpec, TaskType};
use compressd_engine::stages::{
    build, run_job, Session, TrainRequest, TrainSettings, TrainSummary, Trainer, WorkingModel,
};
use compressd_engine::train::GradientObserver;
use serde_json::{json, Value};

use crate::gguf_generation::generate;
use crate::interop::{lm_logits, write_corpus, write_llama};
use crate::tiny_task::{write_data, write_model};

/// Runs `pipeline` on the tiny BERT keyword task; the folder lives as long as the returned guard.
fn bert_job(
    pipeline: Value,
) -> Result<(JobSpec, PipelineInputs, PipelineResult, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec = json!({
        "name": "tiny-structured", "model": model, "seed": 5,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": pipeline, "acceptance": {"metric": "accuracy", "max_drop": 0.5}
    });
    run(spec, model, dataset, dir)
}

fn run(
    spec: Value,
    model: PathBuf,
    dataset: PathBuf,
    dir: tempfile::TempDir,
) -> Result<(JobSpec, PipelineInputs, PipelineResult, tempfile::TempDir)> {
    let spec: JobSpec = serde_json::from_value(spec)?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &dir.path().join("out"),
        &|_| {},
        &AtomicBool::new(false),
    )?;
    Ok((spec, inputs, result, dir))
}

fn config(dir: &Path) -> Result<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("config.json"),
    )?)?)
}

fn rows(model: &WorkingModel, name: &str) -> usize {
    model.store.get(name).unwrap().tensor().dims()[0]
}

const FINETUNE: &str =
    r#"{"type": "finetune", "epochs": 3, "learning_rate": 0.003, "batch_size": 16}"#;

/// `importance: "mask"` (Michel et al.'s first-order masking loss change) scores both heads and
/// neurons from calibration batches and cuts the requested share of each.
#[test]
fn mask_importance_prunes_heads_and_neurons_to_the_target() -> Result<()> {
    let (_spec, _inputs, result, _dir) = bert_job(json!([
        serde_json::from_str::<Value>(FINETUNE)?,
        {"type": "prune", "pattern": "structured", "importance": "mask", "scope": "per_layer",
         "sparsity": 0.5, "calibration_batches": 2}
    ]))?;
    let details = &result.report.stages[1].details;
    assert_eq!(details["importance"], "mask");
    for (target, before) in details["targets"].as_array().unwrap().iter().zip([8, 128]) {
        assert_eq!(target["after"], before / 2, "{target}");
    }
    // Every layer's kept structures carry real (positive) scores: the gradients reached them.
    for layer in details["layers"].as_array().unwrap() {
        let range = layer["kept_score_range"].as_array().unwrap();
        assert!(range[1].as_f64().unwrap() > 0.0, "{layer}");
    }
    Ok(())
}

#[test]
fn taylor_layer_adaptive_prune_shrinks_bert_and_reloads_from_its_padded_folder() -> Result<()> {
    let (spec, inputs, result, _dir) = bert_job(json!([
        serde_json::from_str::<Value>(FINETUNE)?,
        {"type": "prune", "pattern": "structured", "importance": "taylor", "scope": "layer_adaptive",
         "sparsity": 0.5, "steps": 2, "min_keep": 1, "recover": {"epochs": 1, "learning_rate": 0.001},
         "calibration_batches": 2}
    ]))?;
    let details = &result.report.stages[1].details;
    assert_eq!(details["pattern"], "structured");
    assert_eq!(details["importance"], "taylor");
    for (target, before) in details["targets"].as_array().unwrap().iter().zip([8, 128]) {
        assert_eq!(target["before"], before, "{target}");
        assert_eq!(target["after"], before / 2, "{target}");
        assert_eq!(target["achieved_share"], 0.5, "{target}");
    }
    let before = details["parameters_before"].as_u64().unwrap();
    let after = details["parameters_after"].as_u64().unwrap();
    assert!(after < before, "{after} < {before}");
    // The pipeline's own measurements agree: fewer parameters than after fine-tuning.
    let params = |i: usize| result.report.stages[i].metrics.parameters;
    assert!(params(1) < params(0), "{} < {}", params(1), params(0));
    // Each layer lists the structures it kept and their score range.
    let layers = details["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4, "2 layers × heads and neurons");
    let kept: usize = layers
        .iter()
        .filter(|l| l["structure"] == "heads")
        .map(|l| l["kept"].as_array().unwrap().len())
        .sum();
    assert_eq!(kept, 4);
    for layer in layers {
        let range = layer["kept_score_range"].as_array().unwrap();
        assert!(range[0].as_f64() <= range[1].as_f64(), "{layer}");
    }
    let md = result.report.to_markdown();
    assert!(md.contains("### `1-prune`: structures kept"), "{md}");
    assert!(
        md.contains("- heads: 50.0% requested, 50.0% removed (8 → 4)"),
        "{md}"
    );
    assert!(md.contains("| 1 | neurons |"), "{md}");

    // The folder holds transformers' full widths (zeros padded) and the real ones in the config.
    let saved = config(&result.final_dir)?;
    let widths = &saved["compressd_layer_widths"];
    let heads: Vec<usize> = serde_json::from_value(widths["attention_heads"].clone())?;
    let neurons: Vec<usize> = serde_json::from_value(widths["intermediate_sizes"].clone())?;
    assert_eq!(heads.iter().sum::<usize>(), 4, "{widths}");
    assert_eq!(neurons.iter().sum::<usize>(), 64, "{widths}");
    assert_eq!(saved["num_attention_heads"], 4);
    assert_eq!(saved["intermediate_size"], *neurons.iter().max().unwrap());
    let stored = read_hf_folder(&result.final_dir, DType::F32, &Device::Cpu)?;
    let query = stored
        .tensors
        .iter()
        .find(|(n, _)| n == "bert.encoder.layer.0.attention.self.query.weight")
        .unwrap();
    assert_eq!(query.1.dims(), &[32, 32], "padded to 4 heads of 8");

    // Loaded back, the engine runs the narrow layers and scores what the job reported.
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let reloaded = session.load_saved(&result.final_dir)?;
    for (layer, &h) in heads.iter().enumerate() {
        let q = format!("encoder.layer.{layer}.attention.self.query.weight");
        assert_eq!(rows(&reloaded, &q), h * 8, "{q}");
        let up = format!("encoder.layer.{layer}.intermediate.dense.weight");
        assert_eq!(rows(&reloaded, &up), neurons[layer], "{up}");
    }
    let again = session.evaluate(&reloaded, &result.final_dir)?;
    assert_eq!(again.accuracy, result.report.stages[1].metrics.accuracy);
    Ok(())
}

#[test]
fn uneven_structured_prune_then_int8_saves_and_reloads_narrow() -> Result<()> {
    let (spec, inputs, result, _dir) = bert_job(json!([
        serde_json::from_str::<Value>(FINETUNE)?,
        {"type": "prune", "pattern": "structured", "scope": "global", "sparsity": 0.3, "min_keep": 1},
        {"type": "quantize", "scheme": "int8"}
    ]))?;
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let reloaded = session.load_saved(&result.final_dir)?;
    assert!(reloaded.quantized().is_some());
    let after_prune: usize = ["0", "1"]
        .iter()
        .map(|l| {
            rows(
                &reloaded,
                &format!("encoder.layer.{l}.intermediate.dense.weight"),
            )
        })
        .sum();
    assert_eq!(after_prune, 90, "128 neurons less 30%, rounded");
    let again = session.evaluate(&reloaded, &result.final_dir)?;
    assert_eq!(again.accuracy, result.report.stages[2].metrics.accuracy);
    Ok(())
}

#[test]
fn uniform_neuron_prune_changes_intermediate_size_without_padding() -> Result<()> {
    let (_, _, result, _dir) = bert_job(json!([
        {"type": "prune", "pattern": "neurons", "importance": "activation", "scope": "uniform",
         "sparsity": 0.25, "calibration_batches": 2}
    ]))?;
    let saved = config(&result.final_dir)?;
    assert_eq!(saved["intermediate_size"], 48);
    assert!(saved.get("compressd_layer_widths").is_none(), "{saved}");
    let details = &result.report.stages[0].details;
    assert_eq!(details["targets"][0]["achieved_share"], 0.25);
    assert!(details["targets"][0]["note"].is_null());
    Ok(())
}

#[test]
fn a_target_that_empties_a_layer_is_refused_unless_min_keep_allows_it() -> Result<()> {
    let prune =
        json!({"type": "prune", "pattern": "heads", "scope": "per_layer", "sparsity": 0.95});
    let Err(err) = bert_job(json!([prune.clone()])) else {
        panic!("a target that empties a layer was accepted")
    };
    let message = format!("{err:#}");
    assert!(
        message.contains("every one of layer 0's heads"),
        "{message}"
    );
    assert!(message.contains("min_keep"), "{message}");

    let mut allowed = prune;
    allowed["min_keep"] = json!(1);
    let (_, _, result, _dir) = bert_job(json!([allowed]))?;
    let target = &result.report.stages[0].details["targets"][0];
    assert_eq!(target["after"], 2, "one head kept in each layer: {target}");
    assert!(
        target["note"].as_str().unwrap().contains("min_keep kept"),
        "{target}"
    );
    Ok(())
}

/// A trainer with no training rows: nothing to calibrate on.
struct NoData;

impl Trainer for NoData {
    fn train_with(
        &self,
        _model: &mut WorkingModel,
        _s: &TrainSettings,
        _request: TrainRequest<'_>,
        _ctx: &StageContext,
    ) -> compressd_engine::Result<TrainSummary> {
        Ok(TrainSummary::default())
    }

    fn observe_gradients(
        &self,
        _model: &WorkingModel,
        _batches: usize,
        _batch_size: usize,
        _objective: Option<&dyn Objective>,
        _observer: &mut dyn GradientObserver,
    ) -> compressd_engine::Result<usize> {
        Ok(0)
    }
}

fn working_model(dir: &Path) -> Result<WorkingModel> {
    let checkpoint = read_hf_folder(dir, DType::F32, &Device::Cpu)?;
    Ok(WorkingModel::new(
        ParamStore::from_tensors(checkpoint.tensors, |_| true)?,
        checkpoint.config,
    ))
}

fn run_stage(model: &mut WorkingModel, stage: Value) -> compressd_engine::Result<Value> {
    let spec: StageSpec = serde_json::from_value(stage).expect("valid stage");
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        work_dir: None,
        index: 0,
        seed: 1,
        progress: &|_| {},
        cancel: &cancel,
    };
    build(&spec)?.run(model, &NoData, &ctx)
}

#[test]
fn taylor_and_activation_need_training_data() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_model(dir.path())?;
    for importance in ["taylor", "activation", "mask", "lora"] {
        let mut model = working_model(dir.path())?;
        let stage = json!({"type": "prune", "pattern": "heads", "importance": importance, "sparsity": 0.25});
        let Err(err) = run_stage(&mut model, stage) else {
            panic!("{importance} ran without training data")
        };
        let message = err.to_string();
        assert!(message.contains("needs training data"), "{message}");
        assert!(message.contains(importance), "{message}");
    }
    // Magnitude importance needs none.
    let mut model = working_model(dir.path())?;
    let stage = json!({"type": "prune", "pattern": "heads", "importance": "l2", "sparsity": 0.25});
    run_stage(&mut model, stage)?;
    Ok(())
}

#[test]
fn llama_heads_go_in_whole_kv_groups_uniformly_with_the_rounding_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_llama(dir.path(), true)?;
    // 4 query heads share 2 key/value heads: 25% of heads is half a group per layer.
    let mut model = working_model(dir.path())?;
    let global = json!({"type": "prune", "pattern": "heads", "scope": "global", "sparsity": 0.25});
    let Err(err) = run_stage(&mut model, global) else {
        panic!("a global scope was accepted for Llama")
    };
    assert!(err.to_string().contains("use scope uniform"), "{err}");

    let uniform =
        json!({"type": "prune", "pattern": "structured", "scope": "uniform", "sparsity": 0.25});
    let report = run_stage(&mut model, uniform)?;
    let heads = &report["targets"][0];
    assert_eq!(heads["group_size"], 2);
    assert_eq!(heads["before"], 8);
    assert_eq!(
        heads["after"], 4,
        "one whole group of two per layer: {heads}"
    );
    assert_eq!(heads["achieved_share"], 0.5);
    let note = heads["note"].as_str().unwrap();
    assert!(note.contains("25.00% requested, 50.00% removed"), "{note}");
    assert!(
        note.contains("key/value groups of 2 heads in every layer"),
        "{note}"
    );
    let neurons = &report["targets"][1];
    assert_eq!(
        neurons["after"], 96,
        "64 → 48 in each of 2 layers: {neurons}"
    );
    assert_eq!(model.config["num_attention_heads"], 2);
    assert_eq!(model.config["num_key_value_heads"], 1);
    assert_eq!(model.config["head_dim"], 8);
    assert_eq!(model.config["intermediate_size"], 48);
    assert_eq!(
        rows(&model, "model.layers.1.self_attn.q_proj.weight"),
        16,
        "2 heads of 8"
    );
    Ok(())
}

#[test]
fn a_uniformly_pruned_llama_job_reloads_and_its_gguf_keeps_ffn_pruning_only() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_llama(&model, true)?;
    let dataset = dir.path().join("corpus.txt");
    write_corpus(&dataset)?;
    let spec = json!({
        "name": "tiny-llama-structured", "model": model,
        "task": {"type": "language_modeling", "dataset": dataset, "max_length": 16},
        "pipeline": [{"type": "prune", "pattern": "neurons", "importance": "taylor", "scope": "uniform",
                      "sparsity": 0.25, "calibration_batches": 2}],
        "outputs": ["safetensors", "gguf"],
        "acceptance": {"metric": "perplexity", "max_relative_drop": 100.0}
    });
    let (spec, inputs, result, _dir) = run(spec, model, dataset, dir)?;
    let saved = config(&result.final_dir)?;
    assert_eq!(saved["intermediate_size"], 48);
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let reloaded = session.load_saved(&result.final_dir)?;
    assert_eq!(rows(&reloaded, "model.layers.0.mlp.up_proj.weight"), 48);
    // candle-transformers' quantized Llama reads the GGUF and continues a prompt as the engine does.
    let prompt = [1u32, 2, 3, 4];
    let generated = generate(&result.final_dir.join("model.gguf"), &prompt, 1)?;
    let engine = lm_logits(&reloaded, &[prompt.to_vec()])?;
    let last = engine[0].last().unwrap();
    let argmax = (0..last.len())
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap() as u32;
    assert_eq!(generated, vec![argmax]);
    Ok(())
}

#[test]
fn structured_options_are_checked_at_submission() {
    let violations = |pipeline: Value| -> Vec<String> {
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "t", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
            "pipeline": pipeline
        }))
        .expect("parses");
        spec.validate().into_iter().map(|v| v.pointer).collect()
    };
    assert_eq!(
        violations(json!([{"type": "prune", "sparsity": 0.5, "importance": "taylor"}])),
        ["/pipeline/0/importance"]
    );
    assert_eq!(
        violations(json!([{"type": "prune", "sparsity": 0.5, "scope": "uniform"}])),
        ["/pipeline/0/scope"]
    );
    assert_eq!(
        violations(json!([{"type": "prune", "sparsity": 0.5, "pattern": "heads", "min_keep": 0}])),
        ["/pipeline/0/min_keep"]
    );
    assert_eq!(
        violations(
            json!([{"type": "prune", "sparsity": 0.5, "pattern": "neurons", "exclude": ["x"]}])
        ),
        ["/pipeline/0/exclude"]
    );
    // A recovery's batch size is checked where it is written.
    assert_eq!(
        violations(
            json!([{"type": "prune", "sparsity": 0.25, "pattern": "neurons",
                           "recover": {"batch_size": 0}}])
        ),
        ["/pipeline/0/recover/batch_size"]
    );
    // A structured prune after quantization is refused by the stage's precondition.
    assert_eq!(
        violations(json!([
            {"type": "quantize", "scheme": "int8"},
            {"type": "prune", "sparsity": 0.4, "pattern": "structured", "importance": "taylor"}
        ])),
        ["/pipeline/1/type"]
    );
    // A Llama model needs one shape in every layer: known at submission from the registered model.
    let llama: JobSpec = serde_json::from_value(json!({
        "name": "t", "model": "m", "task": {"type": "language_modeling", "dataset": "d"},
        "pipeline": [{"type": "prune", "sparsity": 0.25, "pattern": "neurons", "scope": "per_layer"}]
    }))
    .expect("parses");
    let mut input = ModelState::input(TaskType::LanguageModeling);
    input.family = Some("llama".into());
    let refused = llama.validate_from(&input);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].pointer, "/pipeline/0/scope");
    assert!(refused[0].message.contains("scope uniform"), "{refused:?}");
    assert!(
        llama.validate().is_empty(),
        "the family unknown, the run checks it"
    );
    assert!(violations(json!([
        {"type": "finetune"},
        {"type": "prune", "sparsity": 0.4, "pattern": "structured", "importance": "taylor",
         "scope": "layer_adaptive", "min_keep": 2, "steps": 4, "recover": {"epochs": 1}}
    ]))
    .is_empty());
}
