//! The pipeline runner's bookkeeping with a fake workbench: acceptance, `best`, resume, cancel.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;

use anyhow::Result;
use compressd_engine::pipeline::{run, Event, PipelineInputs, StageContext, Workbench};
use compressd_engine::report::ModelMetrics;
use compressd_engine::spec::{JobSpec, StageSpec};
use compressd_engine::EngineError;

/// A "model" that is just its accuracy; each stage type sets a fixed accuracy.
struct FakeBench {
    stage_runs: Vec<String>,
    fail_at: Option<usize>,
}

impl Workbench for FakeBench {
    type Model = f64;

    fn load_input(&mut self) -> compressd_engine::Result<f64> {
        Ok(0.2)
    }

    fn load_saved(&mut self, dir: &Path) -> compressd_engine::Result<f64> {
        let text =
            std::fs::read_to_string(dir.join("model.txt")).map_err(|e| EngineError::io(dir, e))?;
        text.trim()
            .parse()
            .map_err(|_| EngineError::InvalidModel("bad fake model".into()))
    }

    fn run_stage(
        &mut self,
        model: &mut f64,
        spec: &StageSpec,
        ctx: &StageContext,
    ) -> compressd_engine::Result<serde_json::Value> {
        if self.fail_at == Some(ctx.index) {
            return Err(EngineError::InvalidModel("simulated crash".into()));
        }
        ctx.warn("a warning from the stage");
        self.stage_runs.push(spec.type_name().to_string());
        *model = match spec.type_name() {
            "finetune" => 0.90,
            "prune" => 0.895,
            _ => 0.85,
        };
        Ok(serde_json::json!({ "stage": spec.type_name() }))
    }

    fn save(&mut self, model: &f64, dir: &Path) -> compressd_engine::Result<()> {
        std::fs::write(dir.join("model.txt"), model.to_string())
            .map_err(|e| EngineError::io(dir, e))
    }

    fn evaluate(&mut self, model: &f64, _dir: &Path) -> compressd_engine::Result<ModelMetrics> {
        Ok(ModelMetrics {
            accuracy: Some(*model),
            parameters: 10,
            nonzero_parameters: 10,
            ..Default::default()
        })
    }
}

fn spec() -> JobSpec {
    let json = serde_json::json!({
        "name": "fake",
        "model": "m",
        "task": { "type": "text_classification", "dataset": "d" },
        "pipeline": [
            { "type": "finetune", "epochs": 1 },
            { "type": "prune", "sparsity": 0.5 },
            { "type": "quantize", "scheme": "int8" }
        ],
        "acceptance": { "metric": "accuracy", "max_drop": 0.01 }
    });
    serde_json::from_value(json).expect("valid spec")
}

fn inputs(dir: &Path) -> Result<PipelineInputs> {
    let model = dir.join("model.bin");
    let dataset = dir.join("data.jsonl");
    std::fs::write(&model, b"weights")?;
    std::fs::write(&dataset, b"{}")?;
    Ok(PipelineInputs {
        model,
        dataset,
        device: "cpu".into(),
        models: Default::default(),
    })
}

#[test]
fn contract_is_judged_against_the_fine_tuned_model_and_best_is_kept() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let events = Mutex::new(Vec::new());
    let sink = |e: Event| events.lock().unwrap().push(e);
    let mut bench = FakeBench {
        stage_runs: vec![],
        fail_at: None,
    };
    let result = run(
        &spec(),
        &inputs(dir.path())?,
        &mut bench,
        &out,
        &sink,
        &AtomicBool::new(false),
    )?;
    assert_eq!(bench.stage_runs, vec!["finetune", "prune", "quantize"]);
    let report = &result.report;
    assert_eq!(report.reference.as_deref(), Some("0-finetune"));
    let verdicts: Vec<Option<bool>> = report.stages.iter().map(|s| s.acceptance_met).collect();
    assert_eq!(verdicts, vec![None, Some(true), Some(false)]);
    assert_eq!(result.acceptance_met, Some(false));
    assert_eq!(report.best.as_deref(), Some("1-prune"));
    assert_eq!(
        std::fs::read_to_string(result.best_dir.join("model.txt"))?,
        "0.895"
    );
    assert_eq!(
        std::fs::read_to_string(result.final_dir.join("model.txt"))?,
        "0.85"
    );
    assert!(out.join("stages/1-prune/stage.json").exists() && out.join("report.md").exists());
    assert_eq!(report.inputs.len(), 2);
    assert_eq!(report.inputs[0].sha256.len(), 64);
    let events = events.into_inner().unwrap();
    let started = events
        .iter()
        .filter(|e| matches!(e, Event::StageStarted { .. }))
        .count();
    let finished = events
        .iter()
        .filter(|e| matches!(e, Event::StageFinished { .. }))
        .count();
    let warnings = events
        .iter()
        .filter(|e| matches!(e, Event::Warning { .. }))
        .count();
    assert_eq!(
        (started, finished, warnings),
        (4, 3, 3),
        "baseline + 3 stages started"
    );
    Ok(())
}

#[test]
fn a_crashed_run_resumes_at_the_next_stage() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let inputs = inputs(dir.path())?;
    let mut crashing = FakeBench {
        stage_runs: vec![],
        fail_at: Some(2),
    };
    assert!(run(
        &spec(),
        &inputs,
        &mut crashing,
        &out,
        &|_| {},
        &AtomicBool::new(false)
    )
    .is_err());
    assert_eq!(crashing.stage_runs, vec!["finetune", "prune"]);
    let mut resumed = FakeBench {
        stage_runs: vec![],
        fail_at: None,
    };
    let result = run(
        &spec(),
        &inputs,
        &mut resumed,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )?;
    assert_eq!(
        resumed.stage_runs,
        vec!["quantize"],
        "finished stages are not redone"
    );
    assert_eq!(result.report.stages.len(), 3);
    Ok(())
}

#[test]
fn cancel_stops_before_the_next_stage_and_another_spec_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out");
    let inputs = inputs(dir.path())?;
    let mut bench = FakeBench {
        stage_runs: vec![],
        fail_at: None,
    };
    let err = run(
        &spec(),
        &inputs,
        &mut bench,
        &out,
        &|_| {},
        &AtomicBool::new(true),
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::Cancelled), "{err}");
    run(
        &spec(),
        &inputs,
        &mut bench,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )?;
    let mut other = spec();
    other.seed += 1;
    let err = run(
        &other,
        &inputs,
        &mut bench,
        &out,
        &|_| {},
        &AtomicBool::new(false),
    )
    .unwrap_err();
    assert!(err.to_string().contains("different job spec"), "{err}");
    Ok(())
}
