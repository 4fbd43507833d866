//! A job stopped in the middle of a training stage resumes from the trainer's last checkpoint,
//! not from the stage's start, and ends with the weights an uninterrupted run ends with.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use candle_core::{DType, Device};
use compressd_engine::pipeline::{Event, PipelineInputs};
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::run_job;
use compressd_engine::EngineError;
use tiny_task::{write_data, write_model};

mod tiny_task;

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
