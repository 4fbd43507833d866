//! Dry-run planning: check that a job's inputs are there and estimate each stage's time and peak
//! memory, without loading a tensor.
//!
//! The estimates are coarse on purpose (order of magnitude, for "will this fit, and is it minutes
//! or hours"). This module fills in the [`Workload`] (parameters counted from file sizes, rows
//! from the dataset); each stage prices itself from it ([`compressd_engine::spec::StageKind`]).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;

use compressd_engine::spec::{JobSpec, Workload};
use serde::Serialize;

/// Why a plan could not be made; always the job's own fault (no retry helps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError {
    /// JSON pointer of the input at fault.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

/// The plan of one stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StagePlan {
    /// The stage's type.
    pub stage: String,
    /// Estimated wall time, seconds.
    pub estimated_seconds: f64,
    /// Estimated peak resident memory, bytes.
    pub estimated_peak_bytes: u64,
}

/// A dry run's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Parameters of the input model, estimated from its file sizes.
    pub estimated_parameters: u64,
    /// Rows in the dataset file.
    pub dataset_rows: u64,
    /// One entry per pipeline stage, in order.
    pub stages: Vec<StagePlan>,
    /// Sum of the stage estimates, seconds.
    pub estimated_total_seconds: f64,
    /// Largest stage peak, bytes.
    pub estimated_peak_bytes: u64,
}

/// Plans `spec` with its inputs at `model` and `dataset`.
///
/// # Errors
/// A [`PlanError`] naming the input that is missing or unreadable.
pub fn plan(
    spec: &JobSpec,
    model: Option<&Path>,
    dataset: Option<&Path>,
) -> Result<Plan, PlanError> {
    let model =
        model.ok_or_else(|| missing("/model", "the model is not available to this worker"))?;
    let dataset = dataset.ok_or_else(|| {
        missing(
            "/task/dataset",
            "the dataset is not available to this worker",
        )
    })?;
    let params = estimate_parameters(model)?;
    let rows = count_rows(dataset)?;
    let work = Workload::new(&spec.task, params, rows);
    let stages: Vec<StagePlan> = spec
        .pipeline
        .iter()
        .map(|stage| {
            let estimate = stage.estimate(&work);
            StagePlan {
                stage: stage.type_name().to_owned(),
                estimated_seconds: estimate.seconds,
                estimated_peak_bytes: estimate.peak_bytes as u64,
            }
        })
        .collect();
    Ok(Plan {
        estimated_parameters: params as u64,
        dataset_rows: rows,
        estimated_total_seconds: stages.iter().map(|s| s.estimated_seconds).sum(),
        estimated_peak_bytes: stages
            .iter()
            .map(|s| s.estimated_peak_bytes)
            .max()
            .unwrap_or(0),
        stages,
    })
}

fn missing(pointer: &str, message: &str) -> PlanError {
    PlanError {
        pointer: pointer.to_owned(),
        message: message.to_owned(),
    }
}

/// Parameters from weight-file sizes: 4 bytes each in safetensors (f32 is what the engine trains
/// in), about 0.6 in GGUF (4- to 8-bit blocks with scales).
fn estimate_parameters(model: &Path) -> Result<f64, PlanError> {
    let unreadable =
        |e: std::io::Error| missing("/model", &format!("cannot read {}: {e}", model.display()));
    let files: Vec<_> = if model.is_dir() {
        fs::read_dir(model)
            .map_err(unreadable)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .collect()
    } else {
        vec![model.to_path_buf()]
    };
    let mut params = 0.0;
    for file in files {
        let bytes_per_param = match file.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => 4.0,
            Some("gguf") => 0.6,
            _ => continue,
        };
        params += fs::metadata(&file).map_err(unreadable)?.len() as f64 / bytes_per_param;
    }
    if params == 0.0 {
        return Err(missing("/model", "no .safetensors or .gguf weights found"));
    }
    Ok(params)
}

fn count_rows(dataset: &Path) -> Result<u64, PlanError> {
    let unreadable = |e: std::io::Error| {
        missing(
            "/task/dataset",
            &format!("cannot read {}: {e}", dataset.display()),
        )
    };
    let mut reader = BufReader::new(fs::File::open(dataset).map_err(unreadable)?);
    let (mut rows, mut line) = (0u64, Vec::new());
    while reader.read_until(b'\n', &mut line).map_err(unreadable)? > 0 {
        rows += u64::from(line.iter().any(|b| !b.is_ascii_whitespace()));
        line.clear();
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pipeline: serde_json::Value) -> JobSpec {
        let mut spec: JobSpec = serde_json::from_value(serde_json::json!({
            "name": "p", "model": "m", "task": {"type": "text_classification", "dataset": "d"}, "pipeline": pipeline
        }))
        .unwrap();
        spec.fill_defaults();
        spec
    }

    fn inputs(
        dir: &Path,
        weight_bytes: usize,
        rows: usize,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let model = dir.join("model");
        fs::create_dir_all(&model).unwrap();
        fs::write(model.join("model.safetensors"), vec![0u8; weight_bytes]).unwrap();
        fs::write(model.join("config.json"), "{}").unwrap();
        let data = dir.join("data.jsonl");
        fs::write(&data, "{\"text\":\"x\"}\n\n".repeat(rows)).unwrap();
        (model, data)
    }

    #[test]
    fn counts_parameters_and_rows_and_plans_every_stage() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = inputs(dir.path(), 4000, 50);
        let spec = spec(
            serde_json::json!([{"type": "finetune", "epochs": 2}, {"type": "quantize", "scheme": "int8"}]),
        );
        let plan = plan(&spec, Some(&model), Some(&data)).unwrap();
        assert_eq!(
            plan.estimated_parameters, 1000,
            "4000 bytes of f32 weights; config.json is not weights"
        );
        assert_eq!(plan.dataset_rows, 50, "blank lines are not rows");
        let names: Vec<_> = plan.stages.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(names, ["finetune", "quantize"]);
        // Fine-tuning holds weights, gradients and two moments; quantizing only weights and a copy.
        assert_eq!(plan.stages[0].estimated_peak_bytes, 16_000);
        assert_eq!(plan.stages[1].estimated_peak_bytes, 8_000);
        assert_eq!(plan.estimated_peak_bytes, 16_000);
        assert!(plan.stages[0].estimated_seconds > plan.stages[1].estimated_seconds);
    }

    #[test]
    fn more_epochs_take_proportionally_longer() {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = inputs(dir.path(), 4000, 50);
        let one = plan(
            &spec(serde_json::json!([{"type": "finetune", "epochs": 1}])),
            Some(&model),
            Some(&data),
        )
        .unwrap();
        let three = plan(
            &spec(serde_json::json!([{"type": "finetune", "epochs": 3}])),
            Some(&model),
            Some(&data),
        )
        .unwrap();
        let ratio = three.estimated_total_seconds / one.estimated_total_seconds;
        assert!((ratio - 3.0).abs() < 1e-9, "{ratio}");
    }

    #[test]
    fn missing_inputs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(serde_json::json!([{"type": "finetune"}]));
        let (model, _) = inputs(dir.path(), 4000, 1);
        assert_eq!(plan(&spec, None, None).unwrap_err().pointer, "/model");
        let gone = dir.path().join("nope.jsonl");
        assert_eq!(
            plan(&spec, Some(&model), Some(&gone)).unwrap_err().pointer,
            "/task/dataset"
        );
        let empty = dir.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        assert_eq!(
            plan(&spec, Some(&empty), Some(&gone)).unwrap_err().pointer,
            "/model"
        );
    }
}
