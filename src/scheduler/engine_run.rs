//! A real run inside `compressd exec`: the engine's pipeline on the job's local inputs.
//!
//! The engine runs on its own thread and reports through a channel; this thread turns each engine
//! event into [protocol](super::protocol) messages and writes them. That keeps the engine's
//! callback free of I/O and lets a broken stdout (the worker went away) stop the engine through
//! its cancel flag. The pipeline writes into the job's work folder, which outlives the attempt, so
//! a later attempt on this machine resumes after the last finished stage. On success the verdict
//! lists the files the worker is to publish as artifacts; the child itself writes nothing outside
//! the work folder.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use compressd_engine::device::{device_name, parse_device};
use compressd_engine::error::EngineError;
use compressd_engine::pipeline::{Event, PipelineInputs, PipelineResult};
use compressd_engine::report::ModelMetrics;
use compressd_engine::spec::JobSpec;
use compressd_engine::stages::run_job;
use serde_json::json;

use super::protocol::{ChildMessage, ExecRequest, OutputFile};

/// Least time between two training-metric messages: every one becomes a stored event, and a
/// training loop reports every step.
const TRAIN_METRIC_INTERVAL: Duration = Duration::from_secs(5);

/// Runs the pipeline of `spec` and returns the verdict; `Err` only when `out` broke.
#[tracing::instrument(name = "job.pipeline", skip_all, fields(job_id = %request.job_id, attempt = request.attempt, stages = spec.pipeline.len()))]
pub fn run_pipeline(
    request: &ExecRequest,
    spec: &JobSpec,
    out: &mut impl Write,
) -> std::io::Result<ChildMessage> {
    let (Some(model), Some(dataset)) = (&request.inputs.model, &request.inputs.dataset) else {
        return Ok(failed(
            "invalid_input",
            "the job's model or dataset could not be found on this worker",
            false,
        ));
    };
    let device = match parse_device("auto") {
        Ok(device) => device,
        Err(e) => return Ok(engine_failure(&e)),
    };
    let inputs = PipelineInputs {
        model: model.clone(),
        dataset: dataset.clone(),
        device: device_name(&device),
        models: request.inputs.models.clone(),
    };
    if let Err(e) = std::fs::create_dir_all(&request.work_dir) {
        let message = format!("cannot create the work folder: {e}");
        return Ok(failed("io", message, true));
    }
    let stages = spec.pipeline.len();
    let cancel = AtomicBool::new(false);
    let (events, received) = mpsc::channel::<Event>();
    // The engine's own spans (`engine.*`) nest under this job's on its thread too.
    let span = tracing::Span::current();
    let outcome = std::thread::scope(|scope| {
        let engine = scope.spawn(|| {
            let _entered = span.enter();
            let progress = move |event: Event| {
                // The receiver only goes away once the run is over.
                let _ = events.send(event);
            };
            run_job(spec, &inputs, device, &request.work_dir, &progress, &cancel)
        });
        let mut translator = Translator::new(stages);
        let mut broken = None;
        for event in received {
            if broken.is_some() {
                continue;
            }
            for message in translator.translate(event) {
                if let Err(e) = message.write_line(out) {
                    cancel.store(true, Ordering::Relaxed);
                    broken = Some(e);
                    break;
                }
            }
        }
        let result = engine.join().unwrap_or_else(|_| {
            Err(EngineError::Unsupported(
                "the engine panicked; see the job's log".into(),
            ))
        });
        match broken {
            Some(e) => Err(e),
            None => Ok(result),
        }
    })?;
    Ok(match outcome {
        Ok(result) => succeeded(&result, &request.work_dir),
        Err(EngineError::Cancelled) => engine_failure(&EngineError::Cancelled),
        Err(e) => match engine_failure(&e) {
            ChildMessage::Failed {
                code,
                message,
                retryable,
                ..
            } => ChildMessage::Failed {
                code,
                message,
                retryable,
                kept: finished_stage_outputs(&request.work_dir),
            },
            other => other,
        },
    })
}

/// The saved models of the stages that finished (those with a `stage.json`, written once the
/// stage's model was saved and measured), as artifacts named `stages/{label}/{file}`.
fn finished_stage_outputs(work_dir: &Path) -> Vec<OutputFile> {
    let stages = work_dir.join("stages");
    let Ok(entries) = std::fs::read_dir(&stages) else {
        return Vec::new();
    };
    let mut labels: Vec<String> = entries
        .flatten()
        .filter(|entry| entry.path().join("stage.json").is_file())
        .filter_map(|entry| entry.file_name().to_str().map(str::to_owned))
        .collect();
    labels.sort();
    labels
        .iter()
        .flat_map(|label| {
            let model = stages.join(label).join("model");
            folder_outputs(&format!("stages/{label}"), &model, work_dir)
        })
        .collect()
}

fn failed(code: &str, message: impl Into<String>, retryable: bool) -> ChildMessage {
    ChildMessage::Failed {
        code: code.to_owned(),
        message: message.into(),
        retryable,
        kept: Vec::new(),
    }
}

/// The verdict for an engine error: a fault of the job (bad input, a setting the model cannot
/// take) fails it for good; an I/O error may pass on another attempt.
fn engine_failure(error: &EngineError) -> ChildMessage {
    if let EngineError::Io { path, source } = error {
        if source.kind() == std::io::ErrorKind::StorageFull {
            return super::exec::write_failure(path, source);
        }
    }
    let (code, retryable) = match error {
        EngineError::Io { .. } => ("io", true),
        EngineError::Cancelled => ("cancelled", false),
        EngineError::Candle(_) => ("engine_error", false),
        EngineError::Json { .. }
        | EngineError::Tokenizer(_)
        | EngineError::InvalidModel(_)
        | EngineError::InvalidSetting(_)
        | EngineError::Unsupported(_)
        | EngineError::Data { .. } => ("invalid_input", false),
    };
    failed(code, error.to_string(), retryable)
}

/// The success verdict: headline numbers in the result, files to publish in `outputs`.
fn succeeded(result: &PipelineResult, work_dir: &Path) -> ChildMessage {
    let report = &result.report;
    let final_record = report.stages.last().unwrap_or(&report.baseline);
    let best_label = report.best.clone().unwrap_or_else(|| "baseline".into());
    let best_metrics = std::iter::once(&report.baseline)
        .chain(&report.stages)
        .find(|r| r.label == best_label)
        .map(|r| &r.metrics);
    let stages: Vec<_> = report
        .stages
        .iter()
        .map(|s| {
            json!({
                "label": s.label,
                "acceptance_met": s.acceptance_met,
                "wall_seconds": s.wall_seconds,
                "peak_memory_bytes": s.peak_memory_bytes,
            })
        })
        .collect();
    let result_json = json!({
        "acceptance_met": result.acceptance_met,
        "best": best_label,
        "final": final_record.label,
        "reference": report.reference,
        "metrics": {
            "baseline": headline(&report.baseline.metrics),
            "final": headline(&final_record.metrics),
            "best": best_metrics.map(headline),
        },
        "stages": stages,
    });
    let mut outputs = Vec::new();
    for (folder, dir) in [("model", &result.final_dir), ("best", &result.best_dir)] {
        outputs.extend(folder_outputs(folder, dir, work_dir));
    }
    for (name, format) in [("report.json", "json"), ("report.md", "markdown")] {
        if work_dir.join(name).is_file() {
            outputs.push(OutputFile {
                name: name.into(),
                path: name.into(),
                kind: "report".into(),
                format: format.into(),
            });
        }
    }
    ChildMessage::Succeeded {
        result: result_json,
        outputs,
    }
}

/// The numbers a user looks at first.
fn headline(metrics: &ModelMetrics) -> serde_json::Value {
    json!({
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "perplexity": metrics.perplexity,
        "parameters": metrics.parameters,
        "nonzero_parameters": metrics.nonzero_parameters,
        "size_on_disk_bytes": metrics.size_on_disk_bytes,
        "latency_batch1_ms": metrics.latency_batch1_ms,
        "latency_batch32_ms": metrics.latency_batch32_ms,
        "throughput_per_s": metrics.throughput_per_s,
    })
}

/// Every file under `dir` as an artifact named `{folder}/{relative path}`, in a stable order.
fn folder_outputs(folder: &str, dir: &Path, work_dir: &Path) -> Vec<OutputFile> {
    let mut files = Vec::new();
    collect_files(dir, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let inner = path.strip_prefix(dir).ok()?;
            let relative = path.strip_prefix(work_dir).ok()?.to_path_buf();
            let inner = inner.to_str()?.replace('\\', "/");
            Some(OutputFile {
                name: format!("{folder}/{inner}"),
                format: format_of(&path).into(),
                path: relative,
                kind: "model".into(),
            })
        })
        .collect()
}

fn collect_files(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, files);
        } else if path.is_file() {
            files.push(path);
        }
    }
}

/// The artifact format of a file, from its extension.
fn format_of(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => "safetensors",
        Some("gguf") => "gguf",
        Some("json") => "json",
        Some("md") => "markdown",
        Some("txt") => "text",
        _ => "binary",
    }
}

/// Turns engine events into protocol messages.
struct Translator {
    stages: usize,
    last_train_metric: Option<Instant>,
}

impl Translator {
    fn new(stages: usize) -> Self {
        Self {
            stages,
            last_train_metric: None,
        }
    }

    fn translate(&mut self, event: Event) -> Vec<ChildMessage> {
        match event {
            Event::StageStarted { index: None, stage } => vec![ChildMessage::Log {
                level: "info".into(),
                message: format!("{stage}: evaluating the input model"),
            }],
            Event::StageStarted {
                index: Some(index),
                stage,
            } => vec![ChildMessage::StageStarted {
                stage,
                index,
                stages: self.stages,
            }],
            Event::Progress {
                step,
                total_steps,
                loss,
                learning_rate,
                samples_per_s,
                eta_s,
                loss_terms,
                ..
            } => {
                let mut messages =
                    self.progress(step, total_steps, loss, learning_rate, samples_per_s, eta_s);
                // The stage already spaces these out (every N steps), so none is throttled.
                messages.extend(loss_terms.into_iter().filter(|(_, v)| v.is_finite()).map(
                    |(term, value)| ChildMessage::Metric {
                        name: format!("train.loss.{term}"),
                        value,
                        step: Some(step),
                    },
                ));
                messages
            }
            Event::Metric { label, metrics } => metric_messages(&label, &metrics),
            Event::Warning { index, message } => vec![ChildMessage::Log {
                level: "warn".into(),
                message: match index {
                    Some(i) => format!("stage {i}: {message}"),
                    None => message,
                },
            }],
            Event::StageFinished {
                index,
                stage,
                wall_s,
                acceptance_met,
            } => vec![ChildMessage::StageFinished {
                stage,
                index,
                report: json!({ "wall_seconds": wall_s, "acceptance_met": acceptance_met }),
            }],
        }
    }

    fn progress(
        &mut self,
        step: u64,
        total_steps: u64,
        loss: Option<f64>,
        learning_rate: Option<f64>,
        samples_per_s: Option<f64>,
        eta_s: Option<f64>,
    ) -> Vec<ChildMessage> {
        let mut note = format!("step {step}/{total_steps}");
        if let Some(loss) = loss {
            note.push_str(&format!(" · loss {loss:.4}"));
        }
        if let Some(rate) = samples_per_s {
            note.push_str(&format!(" · {rate:.1} samples/s"));
        }
        let mut messages = vec![ChildMessage::Progress {
            fraction: if total_steps == 0 {
                0.0
            } else {
                (step as f64 / total_steps as f64).min(1.0)
            },
            eta_seconds: eta_s,
            message: Some(note),
        }];
        let due = self
            .last_train_metric
            .is_none_or(|t| t.elapsed() >= TRAIN_METRIC_INTERVAL)
            || step == total_steps;
        if due {
            self.last_train_metric = Some(Instant::now());
            for (name, value) in [("train.loss", loss), ("train.learning_rate", learning_rate)] {
                if let Some(value) = value.filter(|v| v.is_finite()) {
                    messages.push(ChildMessage::Metric {
                        name: name.into(),
                        value,
                        step: Some(step),
                    });
                }
            }
        }
        messages
    }
}

/// One metric message per measured value, named `{label}.{measure}`.
fn metric_messages(label: &str, metrics: &ModelMetrics) -> Vec<ChildMessage> {
    let values = [
        ("accuracy", metrics.accuracy),
        ("macro_f1", metrics.macro_f1),
        ("perplexity", metrics.perplexity),
        ("latency_batch1_ms", metrics.latency_batch1_ms),
        ("latency_batch32_ms", metrics.latency_batch32_ms),
        ("throughput_per_s", metrics.throughput_per_s),
        (
            "size_on_disk_bytes",
            Some(metrics.size_on_disk_bytes as f64),
        ),
        ("parameters", Some(metrics.parameters as f64)),
        (
            "nonzero_parameters",
            Some(metrics.nonzero_parameters as f64),
        ),
    ];
    values
        .into_iter()
        .filter_map(|(name, value)| {
            value
                .filter(|v| v.is_finite())
                .map(|value| ChildMessage::Metric {
                    name: format!("{label}.{name}"),
                    value,
                    step: None,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_metrics_are_throttled_but_progress_is_not() {
        let mut translator = Translator::new(2);
        let step = |t: &mut Translator, step| {
            t.translate(Event::Progress {
                index: 0,
                step,
                total_steps: 100,
                loss: Some(0.5),
                learning_rate: Some(1e-4),
                samples_per_s: Some(10.0),
                eta_s: Some(3.0),
                loss_terms: Vec::new(),
            })
        };
        let first = step(&mut translator, 1);
        assert_eq!(
            first.len(),
            3,
            "progress, loss and learning rate: {first:?}"
        );
        let second = step(&mut translator, 2);
        assert_eq!(second.len(), 1, "only progress inside the interval");
        assert!(matches!(
            second[0],
            ChildMessage::Progress { fraction, .. } if (fraction - 0.02).abs() < 1e-12
        ));
        let last = step(&mut translator, 100);
        assert_eq!(last.len(), 3, "the last step always reports its metrics");
    }

    #[test]
    fn loss_terms_become_one_unthrottled_metric_each() {
        let mut translator = Translator::new(1);
        let step = |t: &mut Translator, step, loss_terms| {
            t.translate(Event::Progress {
                index: 0,
                step,
                total_steps: 100,
                loss: Some(0.5),
                learning_rate: None,
                samples_per_s: None,
                eta_s: None,
                loss_terms,
            })
        };
        step(&mut translator, 1, Vec::new());
        let terms = vec![
            ("response".to_owned(), 0.25),
            ("task".to_owned(), 0.75),
            ("feature".to_owned(), f64::NAN),
        ];
        let metrics: Vec<_> = step(&mut translator, 10, terms)
            .into_iter()
            .filter_map(|m| match m {
                ChildMessage::Metric { name, value, step } => Some((name, value, step)),
                _ => None,
            })
            .collect();
        assert_eq!(
            metrics,
            vec![
                ("train.loss.response".to_owned(), 0.25, Some(10)),
                ("train.loss.task".to_owned(), 0.75, Some(10)),
            ]
        );
    }

    #[test]
    fn the_baseline_is_a_log_line_and_stages_carry_the_pipeline_length() {
        let mut translator = Translator::new(3);
        let baseline = translator.translate(Event::StageStarted {
            index: None,
            stage: "baseline".into(),
        });
        assert!(matches!(baseline[..], [ChildMessage::Log { .. }]));
        let stage = translator.translate(Event::StageStarted {
            index: Some(1),
            stage: "prune".into(),
        });
        assert_eq!(
            stage,
            vec![ChildMessage::StageStarted {
                stage: "prune".into(),
                index: 1,
                stages: 3
            }]
        );
    }

    #[test]
    fn unmeasured_values_are_not_reported() {
        let metrics = ModelMetrics {
            accuracy: Some(0.9),
            perplexity: Some(f64::NAN),
            ..ModelMetrics::default()
        };
        let names: Vec<_> = metric_messages("baseline", &metrics)
            .into_iter()
            .map(|m| match m {
                ChildMessage::Metric { name, .. } => name,
                other => panic!("not a metric: {other:?}"),
            })
            .collect();
        assert!(names.contains(&"baseline.accuracy".to_string()));
        assert!(!names.iter().any(|n| n.ends_with("perplexity")));
        assert!(!names.iter().any(|n| n.ends_with("macro_f1")));
    }

    #[test]
    fn folder_files_become_named_model_artifacts() {
        let work = tempfile::tempdir().unwrap();
        let final_dir = work.path().join("final");
        std::fs::create_dir_all(final_dir.join("sub")).unwrap();
        std::fs::write(final_dir.join("model.safetensors"), b"x").unwrap();
        std::fs::write(final_dir.join("sub/config.json"), b"{}").unwrap();
        let outputs = folder_outputs("model", &final_dir, work.path());
        let names: Vec<_> = outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["model/model.safetensors", "model/sub/config.json"]);
        assert_eq!(outputs[0].format, "safetensors");
        assert_eq!(outputs[0].path, Path::new("final/model.safetensors"));
        assert_eq!(outputs[1].kind, "model");
    }

    #[test]
    fn missing_inputs_fail_the_job_without_retry() {
        let request = ExecRequest {
            job_id: uuid::Uuid::now_v7(),
            attempt: 1,
            spec: json!({}),
            inputs: super::super::protocol::ExecInputs::default(),
            work_dir: PathBuf::from("/nonexistent"),
        };
        let spec: JobSpec = serde_json::from_value(json!({
            "name": "x", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
            "pipeline": [{"type": "finetune", "epochs": 1}]
        }))
        .unwrap();
        let verdict = run_pipeline(&request, &spec, &mut Vec::new()).unwrap();
        assert!(matches!(
            verdict,
            ChildMessage::Failed { ref code, retryable: false, .. } if code == "invalid_input"
        ));
    }
}
