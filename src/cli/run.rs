//! `compressd run SPEC.json --out DIR`: one job, locally, with no server.
//!
//! Here `model` and `task.dataset` are local paths. [`execute_pipeline`] is the single place that
//! hands a validated spec to the engine.

use std::path::Path;

use std::sync::atomic::AtomicBool;

use candle_core::Device;
use compressd_engine::pipeline::{Event, PipelineInputs};
use compressd_engine::spec::{JobSpec, Violation};
use compressd_engine::stages::run_job;

use super::progress::ProgressView;
use crate::error::{Error, Result};
use crate::job_spec;

/// Reads, validates and runs a spec file, writing outputs under `out`.
///
/// # Errors
/// [`Error::Io`] for unreadable files; [`Error::InvalidSpec`] with every violation; whatever the
/// pipeline fails with.
pub fn run_spec_file(spec_path: &Path, out: &Path) -> Result<()> {
    let text = std::fs::read_to_string(spec_path).map_err(|e| Error::io(spec_path, e))?;
    let document: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        Error::InvalidSpec(vec![Violation {
            pointer: String::new(),
            message: format!("not valid JSON: {e}"),
        }])
    })?;
    let spec = job_spec::accept(&document).map_err(Error::InvalidSpec)?;
    if !spec.webhooks.is_empty() {
        // Webhooks are delivered by a server's outbox; a local run has neither.
        tracing::warn!(
            webhooks = spec.webhooks.len(),
            "`webhooks` are sent by `compressd serve` only; this local run sends none"
        );
    }
    check_local_inputs(&spec, spec_path)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    execute_pipeline(&spec, out)
}

/// Model and dataset must exist; relative paths are taken from the current directory.
fn check_local_inputs(spec: &JobSpec, spec_path: &Path) -> Result<()> {
    let mut violations = Vec::new();
    for (pointer, path) in [
        ("/model", &spec.model),
        ("/task/dataset", &spec.task.dataset),
    ] {
        if !Path::new(path).exists() {
            violations.push(Violation {
                pointer: pointer.into(),
                message: format!("`{path}` does not exist"),
            });
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        tracing::debug!(spec = %spec_path.display(), "local inputs missing");
        Err(Error::InvalidSpec(violations))
    }
}

/// Runs the pipeline of a validated spec, writing its outputs under `out`.
///
/// A dry run writes the normalized spec (`spec.json`, every default filled in) and stops.
///
/// # Errors
/// [`Error::Engine`] when a stage fails.
#[tracing::instrument(name = "job.run", skip_all, fields(name = %spec.name, stages = spec.pipeline.len()))]
pub fn execute_pipeline(spec: &JobSpec, out: &Path) -> Result<()> {
    let normalized =
        serde_json::to_string_pretty(spec).map_err(|e| Error::Corrupt(e.to_string()))?;
    let spec_file = out.join("spec.json");
    std::fs::write(&spec_file, normalized).map_err(|e| Error::io(&spec_file, e))?;
    if spec.dry_run {
        println!(
            "dry run: spec is valid and inputs exist; normalized spec written to {}",
            spec_file.display()
        );
        return Ok(());
    }
    let inputs = PipelineInputs {
        model: spec.model.clone().into(),
        dataset: spec.task.dataset.clone().into(),
        device: "cpu".into(),
        models: Default::default(),
    };
    // No server, no cancel endpoint: Ctrl-C ends the process, and a rerun resumes from the
    // checkpoint the pipeline writes after every finished stage.
    let cancel = AtomicBool::new(false);
    let view = ProgressView::for_stderr();
    let progress = |event: Event| view.show(event);
    let result = run_job(spec, &inputs, Device::Cpu, out, &progress, &cancel)?;
    println!(
        "done: final model in {}, best in {}, acceptance met: {}",
        result.final_dir.display(),
        result.best_dir.display(),
        result
            .acceptance_met
            .map_or("no contract".to_string(), |met| met.to_string())
    );
    Ok(())
}
