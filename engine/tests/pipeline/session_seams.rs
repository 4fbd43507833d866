//! The session's seams on the tiny keyword task: a job stopped in the middle of a training stage
//! resumes from the trainer's last checkpoint (not from the stage's start) and ends with the
//! weights an uninterrupted run ends with; a gradient pass shows a stage every weight's gradient
//! (first-order Taylor importance); training against a deep-cloned teacher leaves the teacher as
//! it was.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::tiny_task::{write_data, write_model};
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::Var;
use candle_core::{DType, Device};
use compressd_engine::pipeline::{Event, PipelineInputs, StageContext, Workbench};
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::{run_job, Session, TrainRequest, TrainSettings, Trainer};
use compressd_engine::train::GradientObserver;
use compressd_engine::EngineError;

fn spec(model: &Path, dataset: &Path) -> Result<JobSpec> {
    Ok(serde_json::from_value(serde_json::json!({
        "name": "resume", "model": model, "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [{"type": "finetune", "epochs": 3, "learning_rate": 0.003, "batch_size": 8}]
    }))?)
}

/// The final model's tensors, by name.
fn final_weights(dir: &Path) -> Result<Vec<(String, Vec<f32>)>> {
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let mut out: Vec<(String, Vec<f32>)> = tensors
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[test]
fn a_stopped_training_stage_resumes_from_its_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    write_model(&model)?;
    let dataset = dir.path().join("data.jsonl");
    write_data(&dataset)?;
    let spec = spec(&model, &dataset)?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };

    // Uninterrupted.
    let whole = dir.path().join("whole");
    let ignore = |_: Event| {};
    let result = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &whole,
        &ignore,
        &AtomicBool::new(false),
    )?;
    let total_steps = result.report.stages[0].details["training"]["steps"]
        .as_u64()
        .unwrap();
    assert!(total_steps > 6, "{total_steps} steps");

    // Stopped after five optimizer steps (the cancel flag is how a worker stops a job).
    let out = dir.path().join("out");
    let cancel = AtomicBool::new(false);
    let stop_after_five = |e: Event| {
        if matches!(e, Event::Progress { step: 5, .. }) {
            cancel.store(true, Ordering::SeqCst);
        }
    };
    let stopped = run_job(&spec, &inputs, Device::Cpu, &out, &stop_after_five, &cancel);
    assert!(
        matches!(stopped, Err(EngineError::Cancelled)),
        "{stopped:?}"
    );
    assert!(
        out.join("stages/0-finetune/work/train-0").is_dir(),
        "a checkpoint was kept"
    );

    // Resumed: the first step reported is the sixth, and the result is the uninterrupted one.
    let steps = Mutex::new(Vec::new());
    let record = |e: Event| {
        if let Event::Progress { step, .. } = e {
            steps.lock().unwrap().push(step);
        }
    };
    let resumed = run_job(
        &spec,
        &inputs,
        Device::Cpu,
        &out,
        &record,
        &AtomicBool::new(false),
    )?;
    let steps = steps.into_inner().unwrap();
    assert_eq!(steps.first(), Some(&6), "{steps:?}");
    assert_eq!(steps.last(), Some(&total_steps));
    assert_eq!(
        final_weights(&resumed.final_dir)?,
        final_weights(&result.final_dir)?
    );
    assert!(
        !out.join("stages/0-finetune/work").exists(),
        "checkpoints go when the stage ends"
    );
    Ok(())
}

/// Sums `|w · ∂L/∂w|` per parameter over the batches it sees.
#[derive(Default)]
struct Taylor {
    scores: std::collections::BTreeMap<String, f64>,
    batches: usize,
}

impl GradientObserver for Taylor {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &GradStore,
    ) -> compressd_engine::Result<()> {
        self.batches += 1;
        for (name, var) in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let score = (var.as_tensor() * g)?
                    .abs()?
                    .sum_all()?
                    .to_scalar::<f32>()?;
                *self.scores.entry(name.clone()).or_default() += f64::from(score);
            }
        }
        Ok(())
    }
}

fn tiny_session(dir: &Path) -> Result<(JobSpec, PipelineInputs)> {
    let model = dir.join("model");
    write_model(&model)?;
    let dataset = dir.join("data.jsonl");
    write_data(&dataset)?;
    let spec = spec(&model, &dataset)?;
    let inputs = PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    };
    Ok((spec, inputs))
}

#[test]
fn gradient_passes_and_training_show_every_weight_its_gradient() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, inputs) = tiny_session(dir.path())?;
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let mut model = session.load_input()?;
    let before = model.deep_clone()?;

    let mut taylor = Taylor::default();
    let batches = session.observe_gradients(&model, 3, 8, None, &mut taylor)?;
    assert_eq!((batches, taylor.batches), (3, 3));
    let trainable = model.store.trainable_vars();
    assert_eq!(taylor.scores.len(), trainable.len());
    let silent: Vec<&String> = taylor
        .scores
        .iter()
        .filter(|(_, s)| **s <= 0.0)
        .map(|(n, _)| n)
        .collect();
    // |w·g| is zero where w is: the biases the tiny model starts with at zero. Every weight
    // matrix scores above zero.
    assert!(silent.iter().all(|n| n.ends_with(".bias")), "{silent:?}");
    assert!(taylor.scores["encoder.layer.1.attention.self.query.weight"] > 0.0);

    // The same observer during training sees every micro-batch.
    let cancel = AtomicBool::new(false);
    let ignore = |_: Event| {};
    let ctx = StageContext {
        index: 0,
        seed: 1,
        progress: &ignore,
        cancel: &cancel,
        work_dir: None,
    };
    let settings = TrainSettings {
        epochs: 1,
        learning_rate: 1e-3,
        head_learning_rate: None,
        batch_size: 16,
        weight_decay: 0.0,
        warmup_ratio: 0.0,
        freeze: Vec::new(),
        grad_clip_norm: Some(1.0),
        early_stopping_patience: None,
        log_every_steps: 10,
        teacher_cache_bytes: None,
        gradient_checkpointing: false,
        mixed_precision: None,
    };
    let mut during = Taylor::default();
    let teacher = before.deep_clone()?;
    let request = TrainRequest {
        frozen: vec![&teacher],
        gradients: Some(&mut during),
        ..TrainRequest::default()
    };
    let summary = session.train_with(&mut model, &settings, request, &ctx)?;
    assert_eq!(during.batches as u64, summary.steps);

    // Training moved the model, not its deep clones.
    let changed = |a: &compressd_engine::stages::WorkingModel,
                   b: &compressd_engine::stages::WorkingModel|
     -> Result<f32> {
        let mut total = 0f32;
        for ((_, x), (_, y)) in a.store.tensors().iter().zip(b.store.tensors().iter()) {
            total += (x - y)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        }
        Ok(total)
    };
    assert!(changed(&model, &before)? > 0.0);
    assert_eq!(changed(&teacher, &before)?, 0.0);
    Ok(())
}

#[test]
fn an_input_head_for_other_classes_is_made_anew() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (spec, inputs) = tiny_session(dir.path())?;
    // The input carries a 5-class head; the dataset has 2 classes.
    let weights = inputs.model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &Device::Cpu)?;
    tensors.insert(
        "classifier.weight".into(),
        candle_core::Tensor::ones((5, 32), DType::F32, &Device::Cpu)?,
    );
    tensors.insert(
        "classifier.bias".into(),
        candle_core::Tensor::ones(5, DType::F32, &Device::Cpu)?,
    );
    candle_core::safetensors::save(&tensors, &weights)?;
    let mut session = Session::open(&spec, &inputs, Device::Cpu)?;
    let model = session.load_input()?;
    let head = model.store.get("classifier.weight").unwrap();
    assert_eq!(head.tensor().dims(), &[2, 32]);
    assert!(
        head.tensor().sum_all()?.to_scalar::<f32>()?.abs() < 2.0,
        "drawn anew, not ones"
    );
    Ok(())
}
