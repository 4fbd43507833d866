//! The pipeline runner: baseline, then each stage on the previous stage's output, with
//! evaluation, checkpoints, the acceptance contract and the report.
//!
//! Output folder (`out_dir`):
//! ```text
//! state.json                 what finished: the baseline and stage records (resume point)
//! baseline/model/            the input model as loaded (its size is the baseline size)
//! stages/<i>-<type>/model/   the model after stage i (never deleted)
//! stages/<i>-<type>/stage.json   the stage's own report (sparsity per layer, kept tensors...)
//! stages/<i>-<type>/work/    training checkpoints of the stage in progress (removed when it ends)
//! best/                      the model of the last stage that met the contract (baseline if none)
//! final/                     the model of the last stage
//! report.json, report.md     see [`crate::report`]
//! ```
//! A run that finds `state.json` for the same spec resumes after the last finished stage, and
//! inside the stage in progress from its trainer's last checkpoint (a reclaimed job loses at most
//! the steps since that checkpoint). `acceptance` compares each stage with the
//! reference: the baseline, or — when the pipeline starts with fine-tuning, whose input has an
//! untrained head — the last leading stage that fits the model to the task (`finetune`); stages
//! before the reference are not judged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::report::{self, InputHash, ModelMetrics, Report, Software, StageRecord};
use crate::spec::{Acceptance, JobSpec, Metric, StageSpec};

/// A progress event, serialized with an `event` tag for the service's SSE stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A stage (or the baseline evaluation, index `None`) began.
    StageStarted {
        /// Position in the pipeline.
        index: Option<usize>,
        /// `baseline` or the stage type.
        stage: String,
    },
    /// Training progress inside a stage.
    Progress {
        /// Position in the pipeline.
        index: usize,
        /// Optimizer steps done.
        step: u64,
        /// Optimizer steps planned.
        total_steps: u64,
        /// Latest training loss.
        loss: Option<f64>,
        /// Current learning rate.
        learning_rate: Option<f64>,
        /// Training examples per second.
        samples_per_s: Option<f64>,
        /// Estimated seconds left in this training run.
        eta_s: Option<f64>,
        /// Each named part of the loss (`task`, `response`, `feature`, `relation`), unweighted,
        /// averaged over the steps since the last report; empty except every
        /// [`crate::stages::TrainSettings::log_every_steps`] steps and at the last step of a run
        /// on a multi-part objective.
        loss_terms: Vec<(String, f64)>,
    },
    /// Measurements after the baseline or a stage.
    Metric {
        /// The record's label.
        label: String,
        /// The measurements.
        metrics: ModelMetrics,
    },
    /// Something the user should know that does not stop the run (e.g. a glob matching nothing).
    Warning {
        /// Position in the pipeline, if a stage raised it.
        index: Option<usize>,
        /// What happened.
        message: String,
    },
    /// A stage finished and its model is saved.
    StageFinished {
        /// Position in the pipeline.
        index: usize,
        /// The stage type.
        stage: String,
        /// Wall time in seconds.
        wall_s: f64,
        /// Whether the contract holds after it.
        acceptance_met: Option<bool>,
    },
}

/// Where events go; called from the engine's thread.
pub type ProgressFn<'a> = &'a (dyn Fn(Event) + Send + Sync);

/// What a stage receives besides the model.
pub struct StageContext<'a> {
    /// Position of the stage in the pipeline.
    pub index: usize,
    /// The job's seed.
    pub seed: u64,
    /// Event sink.
    pub progress: ProgressFn<'a>,
    /// Set when the job must stop; stages poll it between steps.
    pub cancel: &'a AtomicBool,
    /// A folder for the stage's resumable work (training checkpoints), kept until the stage
    /// finishes, so a reclaimed job resumes inside a long stage instead of at its start. `None`
    /// runs without checkpoints.
    pub work_dir: Option<PathBuf>,
}

impl StageContext<'_> {
    /// Reports a warning event for this stage.
    pub fn warn(&self, message: impl Into<String>) {
        (self.progress)(Event::Warning {
            index: Some(self.index),
            message: message.into(),
        });
    }

    /// Fails with [`EngineError::Cancelled`] when the cancel flag is set.
    ///
    /// # Errors
    /// [`EngineError::Cancelled`].
    pub fn check_cancel(&self) -> Result<()> {
        check_cancel(self.cancel)
    }
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        Err(EngineError::Cancelled)
    } else {
        Ok(())
    }
}

/// The model-specific work the runner delegates: loading, running a stage, saving, measuring.
/// [`crate::stages::Session`] is the real one; tests use small fakes.
pub trait Workbench {
    /// The in-memory model passed from stage to stage.
    type Model;
    /// Loads the input model.
    ///
    /// # Errors
    /// Whatever loading fails with.
    fn load_input(&mut self) -> Result<Self::Model>;
    /// Loads a model saved by [`Workbench::save`] (to resume).
    ///
    /// # Errors
    /// Whatever loading fails with.
    fn load_saved(&mut self, dir: &Path) -> Result<Self::Model>;
    /// Runs one stage on the model, returning the stage's own report.
    ///
    /// # Errors
    /// Whatever the stage fails with, including [`EngineError::Cancelled`].
    fn run_stage(
        &mut self,
        model: &mut Self::Model,
        spec: &StageSpec,
        ctx: &StageContext,
    ) -> Result<serde_json::Value>;
    /// Saves the model into the (new, empty) folder `dir`.
    ///
    /// # Errors
    /// Whatever writing fails with.
    fn save(&mut self, model: &Self::Model, dir: &Path) -> Result<()>;
    /// Measures the model (size on disk is filled by the runner from `dir`).
    ///
    /// # Errors
    /// Whatever evaluation fails with.
    fn evaluate(&mut self, model: &Self::Model, dir: &Path) -> Result<ModelMetrics>;
}

/// The local inputs of a run and where it computes.
#[derive(Clone, Debug)]
pub struct PipelineInputs {
    /// The input model (folder or file).
    pub model: PathBuf,
    /// The dataset file.
    pub dataset: PathBuf,
    /// `cpu`, `cuda:N`, ... (for the report).
    pub device: String,
    /// Local paths of the registered models that stages name (a `distill` stage's `teacher` or
    /// `student`), by the name the spec gives them; a name not here is read as a path.
    pub models: BTreeMap<String, PathBuf>,
}

/// What a finished run produced.
#[derive(Clone, Debug)]
pub struct PipelineResult {
    /// The report (also in `report.json`).
    pub report: Report,
    /// The final model folder.
    pub final_dir: PathBuf,
    /// The `best` model folder.
    pub best_dir: PathBuf,
    /// Whether the final model met the contract; `None` without a contract.
    pub acceptance_met: Option<bool>,
}

/// The resume point, saved after the baseline and after every stage.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RunState {
    spec: serde_json::Value,
    baseline: Option<StageRecord>,
    stages: Vec<StageRecord>,
    best: Option<String>,
}

/// Runs `spec` with `bench` into `out_dir` (see the module docs for the layout).
///
/// # Errors
/// Fails when a stage fails, on I/O errors, when `out_dir` holds the state of a different spec, or
/// with [`EngineError::Cancelled`]; finished stages stay on disk either way.
pub fn run<W: Workbench>(
    spec: &JobSpec,
    inputs: &PipelineInputs,
    bench: &mut W,
    out_dir: &Path,
    progress: ProgressFn,
    cancel: &AtomicBool,
) -> Result<PipelineResult> {
    let spec_json = serde_json::to_value(spec).map_err(|e| EngineError::json(out_dir, e))?;
    let mut state = RunState::load(out_dir, &spec_json)?;
    let reference = reference_index(&spec.pipeline);
    let mut model = match state.stages.last() {
        Some(last) => bench.load_saved(&out_dir.join("stages").join(&last.label).join("model"))?,
        None => bench.load_input()?,
    };
    if state.baseline.is_none() {
        check_cancel(cancel)?;
        progress(Event::StageStarted {
            index: None,
            stage: "baseline".into(),
        });
        let (record, _) = measure(
            bench,
            &model,
            out_dir.join("baseline"),
            "baseline",
            Instant::now(),
            progress,
        )?;
        state.baseline = Some(record);
        state.best = Some("baseline".into());
        state.save(out_dir)?;
    }
    for (index, stage) in spec.pipeline.iter().enumerate().skip(state.stages.len()) {
        check_cancel(cancel)?;
        report::reset_peak_memory();
        let started = Instant::now();
        progress(Event::StageStarted {
            index: Some(index),
            stage: stage.type_name().into(),
        });
        let label = format!("{index}-{}", stage.type_name());
        let dir = out_dir.join("stages").join(&label);
        let work_dir = dir.join("work");
        let ctx = StageContext {
            index,
            seed: spec.seed,
            progress,
            cancel,
            work_dir: Some(work_dir.clone()),
        };
        let span = tracing::info_span!("engine.stage", index, stage = stage.type_name());
        let details = span.in_scope(|| bench.run_stage(&mut model, stage, &ctx))?;
        let (mut record, wall_s) = measure(bench, &model, dir.clone(), &label, started, progress)?;
        write_json(&dir.join("stage.json"), &details)?;
        record.details = details;
        // A student replaces its teacher: the report shows both, the teacher measured as the
        // stage before left it.
        if stage.type_name() == "distill" {
            let teacher = state
                .stages
                .last()
                .or(state.baseline.as_ref())
                .map(|r| &r.metrics);
            if let (Some(teacher), Some(details)) = (teacher, record.details.as_object_mut()) {
                let side_by_side = report::Comparison::new(teacher, &record.metrics);
                details.insert(
                    report::comparison::DETAILS_KEY.into(),
                    serde_json::to_value(side_by_side)
                        .map_err(|e| EngineError::json(dir.join("stage.json"), e))?,
                );
            }
        }
        let judged = reference.is_none_or(|r| index > r);
        record.acceptance_met = match (&spec.acceptance, judged) {
            (Some(contract), true) => Some(
                state
                    .reference_metrics(reference)
                    .is_some_and(|r| meets(contract, r, &record.metrics)),
            ),
            _ => None,
        };
        if record.acceptance_met != Some(false) {
            state.best = Some(label.clone());
        }
        progress(Event::StageFinished {
            index,
            stage: stage.type_name().into(),
            wall_s,
            acceptance_met: record.acceptance_met,
        });
        state.stages.push(record);
        state.save(out_dir)?;
        // Checkpoints are only for resuming the stage, which has now finished.
        // A folder that cannot be removed costs disk, not the finished stage.
        if let Err(e) = std::fs::remove_dir_all(&work_dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %work_dir.display(), "stage checkpoints not removed: {e}");
            }
        }
    }
    finish(spec, inputs, out_dir, state, reference)
}

/// Saves the model under `dir/model`, measures it and makes its record.
fn measure<W: Workbench>(
    bench: &mut W,
    model: &W::Model,
    dir: PathBuf,
    label: &str,
    started: Instant,
    progress: ProgressFn,
) -> Result<(StageRecord, f64)> {
    let _span = tracing::info_span!("engine.measure", label).entered();
    let model_dir = dir.join("model");
    if model_dir.exists() {
        // A stage interrupted after saving: its output is redone from the previous checkpoint.
        std::fs::remove_dir_all(&model_dir).map_err(|e| EngineError::io(&model_dir, e))?;
    }
    std::fs::create_dir_all(&model_dir).map_err(|e| EngineError::io(&model_dir, e))?;
    bench.save(model, &model_dir)?;
    let mut metrics = bench.evaluate(model, &model_dir)?;
    // The compressed-tensors folder is the same model again, in another layout.
    let copy = report::size_on_disk(&model_dir.join(crate::export::COMPRESSED_TENSORS_DIR));
    metrics.size_on_disk_bytes = report::size_on_disk(&model_dir).saturating_sub(copy);
    let wall_s = started.elapsed().as_secs_f64();
    progress(Event::Metric {
        label: label.to_string(),
        metrics: metrics.clone(),
    });
    let record = StageRecord {
        label: label.to_string(),
        metrics,
        wall_seconds: wall_s,
        peak_memory_bytes: report::peak_memory_bytes(),
        acceptance_met: None,
        details: serde_json::Value::Null,
    };
    Ok((record, wall_s))
}

/// Writes `best/`, `final/` and the report.
fn finish(
    spec: &JobSpec,
    inputs: &PipelineInputs,
    out_dir: &Path,
    state: RunState,
    reference: Option<usize>,
) -> Result<PipelineResult> {
    let model_dir = |label: &str| match label {
        "baseline" => out_dir.join("baseline").join("model"),
        stage => out_dir.join("stages").join(stage).join("model"),
    };
    let best_label = state.best.clone().unwrap_or_else(|| "baseline".into());
    let final_label = state
        .stages
        .last()
        .map_or("baseline".to_string(), |s| s.label.clone());
    let best_dir = out_dir.join("best");
    let final_dir = out_dir.join("final");
    link_tree(&model_dir(&best_label), &best_dir)?;
    link_tree(&model_dir(&final_label), &final_dir)?;
    let baseline = state
        .baseline
        .clone()
        .ok_or_else(|| EngineError::InvalidModel("no baseline record".into()))?;
    let acceptance_met = match &spec.acceptance {
        Some(_) => Some(
            state
                .stages
                .last()
                .is_none_or(|s| s.acceptance_met != Some(false)),
        ),
        None => None,
    };
    let inputs_hashed = vec![
        InputHash {
            role: "model".into(),
            path: inputs.model.display().to_string(),
            sha256: report::hash_path(&inputs.model)?,
        },
        InputHash {
            role: "dataset".into(),
            path: inputs.dataset.display().to_string(),
            sha256: report::hash_path(&inputs.dataset)?,
        },
    ];
    let report = Report {
        spec: state.spec.clone(),
        seed: spec.seed,
        inputs: inputs_hashed,
        software: Software::current(&inputs.device),
        baseline,
        reference: Some(reference.map_or("baseline".to_string(), |r| {
            state
                .stages
                .get(r)
                .map_or(String::new(), |s| s.label.clone())
        })),
        stages: state.stages,
        acceptance_met,
        best: Some(best_label),
    };
    report.write(out_dir)?;
    Ok(PipelineResult {
        report,
        final_dir,
        best_dir,
        acceptance_met,
    })
}

/// The index of the last stage that fits the model to the task (`finetune`) before the first
/// other stage, if the pipeline starts with such stages.
fn reference_index(pipeline: &[StageSpec]) -> Option<usize> {
    let leading = pipeline.iter().take_while(|s| s.fits_task()).count();
    leading.checked_sub(1)
}

/// Whether `current` keeps the contract against `reference`.
pub fn meets(contract: &Acceptance, reference: &ModelMetrics, current: &ModelMetrics) -> bool {
    let pick = |m: &ModelMetrics| match contract.metric {
        Metric::Accuracy => m.accuracy,
        Metric::MacroF1 => m.macro_f1,
        Metric::Perplexity => m.perplexity,
    };
    let (Some(before), Some(after)) = (pick(reference), pick(current)) else {
        return false;
    };
    // A drop is a loss of quality: lower accuracy/F1, higher perplexity.
    let drop = match contract.metric {
        Metric::Perplexity => after - before,
        Metric::Accuracy | Metric::MacroF1 => before - after,
    };
    if !drop.is_finite() {
        return false;
    }
    match (contract.max_drop, contract.max_relative_drop) {
        (Some(max), _) => drop <= max + 1e-12,
        (None, Some(max)) => drop <= max * before.abs() + 1e-12,
        (None, None) => true,
    }
}

impl RunState {
    /// The state in `out_dir`, or a fresh one; a state written for another spec is an error.
    fn load(out_dir: &Path, spec: &serde_json::Value) -> Result<Self> {
        let path = out_dir.join("state.json");
        if !path.exists() {
            std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
            return Ok(Self {
                spec: spec.clone(),
                ..Self::default()
            });
        }
        let bytes = std::fs::read(&path).map_err(|e| EngineError::io(&path, e))?;
        let state: Self =
            serde_json::from_slice(&bytes).map_err(|e| EngineError::json(&path, e))?;
        if &state.spec != spec {
            return Err(EngineError::InvalidSetting(format!(
                "{} belongs to a different job spec; use an empty output folder",
                out_dir.display()
            )));
        }
        Ok(state)
    }

    /// Writes `state.json` atomically (temporary file, then rename).
    fn save(&self, out_dir: &Path) -> Result<()> {
        let tmp = out_dir.join("state.json.tmp");
        write_json(&tmp, self)?;
        let path = out_dir.join("state.json");
        std::fs::rename(&tmp, &path).map_err(|e| EngineError::io(&path, e))
    }

    fn reference_metrics(&self, reference: Option<usize>) -> Option<&ModelMetrics> {
        match reference {
            Some(r) => self.stages.get(r).map(|s| &s.metrics),
            None => self.baseline.as_ref().map(|b| &b.metrics),
        }
    }
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| EngineError::json(path, e))?;
    std::fs::write(path, bytes).map_err(|e| EngineError::io(path, e))
}

/// Mirrors the files of `from` into a fresh `to`, by hard link where the file system allows (no
/// extra space), else by copy.
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(|e| EngineError::io(to, e))?;
    }
    std::fs::create_dir_all(to).map_err(|e| EngineError::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| EngineError::io(from, e))? {
        let path = entry.map_err(|e| EngineError::io(from, e))?.path();
        let target = to.join(path.file_name().unwrap_or_default());
        if path.is_dir() {
            link_tree(&path, &target)?;
        } else if std::fs::hard_link(&path, &target).is_err() {
            std::fs::copy(&path, &target).map_err(|e| EngineError::io(&target, e))?;
        }
    }
    Ok(())
}
