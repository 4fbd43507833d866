//! The prune and quantize stages on a small BERT-shaped parameter store, with a fake trainer that
//! moves every weight (as an optimizer would) and then re-applies the masks (the trainer contract).

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use compressd_engine::objective::Objective;
use compressd_engine::params::{Param, ParamStore};
use compressd_engine::pipeline::{Event, StageContext};
use compressd_engine::prune::verify_n_m;
use compressd_engine::spec::StageSpec;
use compressd_engine::stages::{
    build, TrainRequest, TrainSettings, TrainSummary, Trainer, WorkingModel,
};
use compressd_engine::train::GradientObserver;

struct NudgingTrainer {
    runs: Mutex<u32>,
}

impl Trainer for NudgingTrainer {
    fn train_with(
        &self,
        model: &mut WorkingModel,
        _s: &TrainSettings,
        _request: TrainRequest<'_>,
        _ctx: &StageContext,
    ) -> compressd_engine::Result<TrainSummary> {
        *self.runs.lock().unwrap() += 1;
        for (_, var) in model.store.trainable_vars() {
            var.set(&(var.as_tensor() + 0.01)?)?;
        }
        if let Some(masks) = model.masks() {
            masks.apply(&model.store)?;
        }
        Ok(TrainSummary {
            steps: 1,
            ..Default::default()
        })
    }

    fn observe_gradients(
        &self,
        _model: &WorkingModel,
        _batches: usize,
        _batch_size: usize,
        _objective: Option<&dyn Objective>,
        _observer: &mut dyn GradientObserver,
    ) -> compressd_engine::Result<usize> {
        // The stages under test never score by gradients.
        Ok(0)
    }
}

fn model(width: usize) -> Result<WorkingModel> {
    let dev = Device::Cpu;
    let store = ParamStore::new();
    let add = |name: &str, shape: &[usize]| -> Result<()> {
        let t = Tensor::randn(0f32, 1.0, shape, &dev)?;
        store.insert(name, Param::Trainable(Var::from_tensor(&t)?));
        Ok(())
    };
    add("embeddings.word_embeddings.weight", &[50, 64])?;
    for layer in 0..2 {
        add(
            &format!("encoder.layer.{layer}.attention.self.query.weight"),
            &[64, 64],
        )?;
        add(
            &format!("encoder.layer.{layer}.attention.self.query.bias"),
            &[64],
        )?;
        add(
            &format!("encoder.layer.{layer}.intermediate.dense.weight"),
            &[128, 64],
        )?;
        add(
            &format!("encoder.layer.{layer}.output.dense.weight"),
            &[64, width],
        )?;
        add(
            &format!("encoder.layer.{layer}.output.LayerNorm.weight"),
            &[64],
        )?;
    }
    add("classifier.weight", &[5, 64])?;
    let config = serde_json::json!({"model_type": "bert", "vocab_size": 50, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": width,
        "max_position_embeddings": 32, "id2label": {"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"}});
    Ok(WorkingModel::new(store, config))
}

fn stage(json: serde_json::Value) -> StageSpec {
    serde_json::from_value(json).expect("valid stage")
}

fn zeros(model: &WorkingModel, name: &str) -> Result<f32> {
    let t = model.store.get(name).unwrap().tensor().clone();
    Ok(t.eq(0f64)?.to_dtype(DType::F32)?.mean_all()?.to_scalar()?)
}

fn run_stage(
    model: &mut WorkingModel,
    json: serde_json::Value,
    trainer: &NudgingTrainer,
) -> Result<(serde_json::Value, Vec<Event>)> {
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let cancel = AtomicBool::new(false);
    let ctx = StageContext {
        work_dir: None,
        index: 0,
        seed: 1,
        progress: &sink,
        cancel: &cancel,
    };
    let report = build(&stage(json))?.run(model, trainer, &ctx)?;
    Ok((report, events.into_inner().unwrap()))
}

#[test]
fn iterative_global_pruning_reaches_the_target_and_survives_recovery() -> Result<()> {
    let mut m = model(128)?;
    let trainer = NudgingTrainer {
        runs: Mutex::new(0),
    };
    let spec =
        serde_json::json!({"type": "prune", "sparsity": 0.5, "steps": 5, "recover": {"epochs": 1}});
    let (report, _) = run_stage(&mut m, spec, &trainer)?;
    assert_eq!(
        *trainer.runs.lock().unwrap(),
        5,
        "one recovery per increment"
    );
    let overall = report["achieved"]["overall"].as_f64().unwrap();
    assert!((overall - 0.5).abs() < 1e-3, "overall sparsity {overall}");
    assert_eq!(report["achieved"]["layers"].as_object().unwrap().len(), 6);
    assert_eq!(
        zeros(&m, "embeddings.word_embeddings.weight")?,
        0.0,
        "embeddings are excluded by default"
    );
    assert_eq!(
        zeros(&m, "classifier.weight")?,
        0.0,
        "the head is excluded by default"
    );
    Ok(())
}

#[test]
fn two_four_is_verified_and_a_bad_width_names_the_layer() -> Result<()> {
    let mut m = model(128)?;
    let trainer = NudgingTrainer {
        runs: Mutex::new(0),
    };
    let spec = serde_json::json!({"type": "prune", "sparsity": 0.5, "pattern": "2:4", "scope": "layer", "recover": {"epochs": 1}});
    let (report, _) = run_stage(&mut m, spec.clone(), &trainer)?;
    assert_eq!(report["pattern_verified"], serde_json::json!(true));
    let w = m
        .store
        .get("encoder.layer.1.output.dense.weight")
        .unwrap()
        .tensor()
        .clone();
    assert!(verify_n_m(&w, 2, 4)?);
    let mut odd = model(66)?;
    let err = run_stage(&mut odd, spec, &trainer).unwrap_err();
    assert!(
        err.to_string()
            .contains("encoder.layer.0.output.dense.weight"),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_exclude_glob_matching_nothing_is_a_warning_event() -> Result<()> {
    let mut m = model(128)?;
    let trainer = NudgingTrainer {
        runs: Mutex::new(0),
    };
    let spec = serde_json::json!({"type": "prune", "sparsity": 0.3, "exclude": ["*embeddings*", "decoder.*"]});
    let (_, events) = run_stage(&mut m, spec, &trainer)?;
    let warned = events
        .iter()
        .any(|e| matches!(e, Event::Warning { message, .. } if message.contains("decoder.*")));
    assert!(warned, "{events:?}");
    assert!(
        zeros(&m, "classifier.weight")? > 0.0,
        "a user exclude list replaces the defaults"
    );
    Ok(())
}

#[test]
fn quantize_keeps_odd_layers_in_full_precision_and_then_refuses_training() -> Result<()> {
    let mut m = model(48)?;
    let trainer = NudgingTrainer {
        runs: Mutex::new(0),
    };
    let (report, events) = run_stage(
        &mut m,
        serde_json::json!({"type": "quantize", "scheme": "q4_k"}),
        &trainer,
    )?;
    let kept = report["kept_full_precision"].as_object().unwrap();
    assert_eq!(kept.len(), 7, "q4_k needs rows of 256: {kept:?}");
    let fallbacks = kept
        .values()
        .filter(|r| r.as_str().unwrap().contains("stored as q5_0"))
        .count();
    assert_eq!(
        fallbacks, 5,
        "64-wide rows fall back to q5_0, 48-wide ones stay f32: {kept:?}"
    );
    assert_eq!(report["quantized"].as_array().unwrap().len(), 5);
    assert!(events.iter().any(|e| matches!(e, Event::Warning { .. })));
    let mut m = model(64)?;
    let (report, _) = run_stage(
        &mut m,
        serde_json::json!({"type": "quantize", "scheme": "int8"}),
        &trainer,
    )?;
    assert_eq!(
        report["quantized"].as_array().unwrap().len(),
        7,
        "6 linears and the embedding table"
    );
    assert_eq!(zeros(&m, "classifier.weight")?, 0.0);
    let err = run_stage(&mut m, serde_json::json!({"type": "finetune"}), &trainer).unwrap_err();
    assert!(err.to_string().contains("quantized"), "{err}");
    Ok(())
}
