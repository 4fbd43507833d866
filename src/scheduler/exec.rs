//! `compressd exec`: the child process that runs one job for a worker.
//!
//! It reads an [`ExecRequest`] from stdin, runs the job and reports on stdout with the
//! [protocol](super::protocol), ending with one verdict. It never touches the database or the
//! network: the worker owns every write, fenced by its lease, so a child orphaned by a dead worker
//! can do no harm (and exits at its next message, when its stdout is gone).
//!
//! A dry run validates the spec, checks the inputs and plans each stage ([`super::plan`]). A real
//! run goes through [`super::engine_run`], the single place where the worker calls the engine.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use compressd_engine::spec::JobSpec;

use super::plan::{plan, PlanError};
use super::protocol::{ChildMessage, ExecRequest};

/// Exit status when the worker went away (stdout closed) before the verdict could be written.
pub const EXIT_WORKER_GONE: i32 = 3;

/// TEST HOOK, honoured only in debug builds: a dry run sleeps this many milliseconds in steps of
/// [`SLOW_STEP`], reporting progress and keeping a checkpoint of the steps done in its work
/// folder, so tests can kill a worker mid-job and watch the next attempt resume. Release builds
/// ignore it.
pub const SLOW_DRY_RUN_ENV: &str = "COMPRESSD_TEST_DRY_RUN_SLEEP_MS";
/// Length of one step of the slow dry-run hook.
const SLOW_STEP: Duration = Duration::from_millis(100);
/// File in the work folder where the slow dry-run hook keeps its checkpoint.
const SLOW_CHECKPOINT_FILE: &str = "dry_run.checkpoint";

/// Runs one job: reads the request from `input`, writes messages to `out`. Returns the process
/// exit status: 0 once a verdict was written (whatever it is), [`EXIT_WORKER_GONE`] when `out` broke.
pub fn exec(input: impl Read, out: &mut impl Write) -> i32 {
    let verdict = match read_request(input) {
        Ok(request) => run_request(&request, out),
        Err(message) => Ok(failed("invalid_request", message, false)),
    };
    match verdict.and_then(|v| v.write_line(out)) {
        Ok(()) => 0,
        Err(_) => EXIT_WORKER_GONE,
    }
}

fn read_request(mut input: impl Read) -> Result<ExecRequest, String> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("malformed request: {e}"))
}

fn failed(code: &str, message: impl Into<String>, retryable: bool) -> ChildMessage {
    ChildMessage::Failed {
        code: code.to_owned(),
        message: message.into(),
        retryable,
        kept: Vec::new(),
    }
}

/// Runs a parsed request and returns its verdict; `Err` only when `out` broke.
fn run_request(request: &ExecRequest, out: &mut impl Write) -> std::io::Result<ChildMessage> {
    let mut spec: JobSpec = match serde_json::from_value(request.spec.clone()) {
        Ok(spec) => spec,
        Err(e) => {
            return Ok(failed(
                "invalid_spec",
                format!("the stored spec does not parse: {e}"),
                false,
            ))
        }
    };
    spec.fill_defaults();
    if let Some(v) = spec.validate().into_iter().next() {
        return Ok(failed(
            "invalid_spec",
            format!("{}: {}", v.pointer, v.message),
            false,
        ));
    }
    if spec.dry_run {
        // A setting this worker's device does not offer fails the dry run as it would the run.
        let device = compressd_engine::device::parse_device("auto")
            .and_then(|device| spec.check_device(&device));
        if let Err(e) = device {
            return Ok(failed("invalid_input", e.to_string(), false));
        }
        dry_run(request, &spec, out)
    } else {
        super::engine_run::run_pipeline(request, &spec, out)
    }
}

fn dry_run(
    request: &ExecRequest,
    spec: &JobSpec,
    out: &mut impl Write,
) -> std::io::Result<ChildMessage> {
    let stages = spec.pipeline.len();
    ChildMessage::StageStarted {
        stage: "plan".into(),
        index: 0,
        stages: 1,
    }
    .write_line(out)?;
    let planned = plan(
        spec,
        request.inputs.model.as_deref(),
        request.inputs.dataset.as_deref(),
    );
    let plan = match planned {
        Ok(plan) => plan,
        Err(PlanError { pointer, message }) => {
            return Ok(failed(
                "invalid_input",
                format!("{pointer}: {message}"),
                false,
            ))
        }
    };
    let resumed_from_step = match slow_dry_run_ms() {
        Some(total_ms) => match slow_steps(total_ms, &request.work_dir, out)? {
            Ok(step) => step,
            Err(verdict) => return Ok(verdict),
        },
        None => 0,
    };
    let report = serde_json::json!({ "stages": stages });
    ChildMessage::StageFinished {
        stage: "plan".into(),
        index: 0,
        report,
    }
    .write_line(out)?;
    // The job result's shape: metrics (none measured in a dry run), the acceptance verdict (not
    // judged) and the plan.
    let mut result = serde_json::json!({ "metrics": {}, "acceptance_met": null, "plan": plan });
    if resumed_from_step > 0 {
        result["plan"]["resumed_from_step"] = resumed_from_step.into();
    }
    Ok(ChildMessage::Succeeded {
        result,
        outputs: Vec::new(),
    })
}

/// The test hook's setting; always `None` in release builds.
fn slow_dry_run_ms() -> Option<u64> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var(SLOW_DRY_RUN_ENV).ok()?.parse().ok()
}

/// The verdict for a file the job could not write: a full disk fails the job for good (another
/// attempt on the same disk would fill it again; the operator must make room), any other write
/// error may pass on another attempt. The message names the path.
pub fn write_failure(path: &Path, error: &std::io::Error) -> ChildMessage {
    if error.kind() == std::io::ErrorKind::StorageFull {
        failed(
            "disk_full",
            format!("the disk is full: cannot write {}: {error}", path.display()),
            false,
        )
    } else {
        failed(
            "io",
            format!("cannot write {}: {error}", path.display()),
            true,
        )
    }
}

/// The slow dry-run hook: sleeps step by step, checkpointing, and returns the step it resumed
/// from (0 on a fresh start), or the verdict when its checkpoint cannot be written. `Err` only
/// when `out` broke.
fn slow_steps(
    total_ms: u64,
    work_dir: &Path,
    out: &mut impl Write,
) -> std::io::Result<Result<u64, ChildMessage>> {
    use std::io::Read;
    let steps = (total_ms / SLOW_STEP.as_millis() as u64).max(1);
    let checkpoint = work_dir.join(SLOW_CHECKPOINT_FILE);
    // A checkpoint is a number: read no more than a number's worth of bytes.
    let mut text = String::new();
    let start = std::fs::File::open(&checkpoint)
        .and_then(|file| file.take(32).read_to_string(&mut text))
        .ok()
        .and_then(|_| text.trim().parse().ok())
        .unwrap_or(0u64);
    if start > 0 {
        let message = format!("resumed from checkpoint at step {start} of {steps}");
        ChildMessage::Log {
            level: "info".into(),
            message,
        }
        .write_line(out)?;
    }
    if let Err(error) = std::fs::create_dir_all(work_dir) {
        return Ok(Err(write_failure(work_dir, &error)));
    }
    for step in start..steps {
        std::thread::sleep(SLOW_STEP);
        if let Err(error) = std::fs::write(&checkpoint, (step + 1).to_string()) {
            return Ok(Err(write_failure(&checkpoint, &error)));
        }
        let fraction = (step + 1) as f64 / steps as f64;
        ChildMessage::Progress {
            fraction,
            eta_seconds: None,
            message: None,
        }
        .write_line(out)?;
    }
    Ok(Ok(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict_of(input: &str) -> ChildMessage {
        let mut out = Vec::new();
        assert_eq!(exec(input.as_bytes(), &mut out), 0);
        let text = String::from_utf8(out).unwrap();
        let last = text.lines().last().expect("at least the verdict");
        ChildMessage::parse_line(last)
    }

    #[test]
    fn a_malformed_request_fails_without_retry() {
        let verdict = verdict_of("{not json");
        assert!(
            matches!(verdict, ChildMessage::Failed { ref code, retryable: false, .. } if code == "invalid_request")
        );
    }

    #[test]
    fn a_spec_that_does_not_parse_fails_without_retry() {
        let request = serde_json::json!({
            "job_id": uuid::Uuid::now_v7(), "attempt": 1, "spec": {"name": 3}, "work_dir": "/nonexistent"
        });
        let verdict = verdict_of(&request.to_string());
        assert!(
            matches!(verdict, ChildMessage::Failed { ref code, retryable: false, .. } if code == "invalid_spec")
        );
    }

    /// A dry run on a worker whose device lacks a setting fails as the real run would, naming
    /// the stage's field (this test's worker is a CPU).
    #[test]
    fn a_dry_run_asking_for_mixed_precision_on_a_cpu_worker_fails_at_the_field() {
        // A build with the `cuda` feature on a GPU machine offers it: nothing to refuse there.
        if !compressd_engine::device::parse_device("auto").is_ok_and(|d| d.is_cpu()) {
            return;
        }
        // bf16 runs on a CPU with AVX-512 BF16; f16 never does.
        let refused: &[&str] = if compressd_engine::ops::bf16_gemm::available() {
            &["f16"]
        } else {
            &["bf16", "f16"]
        };
        for &mode in refused {
            let spec = serde_json::json!({
                "name": mode, "model": "m", "dry_run": true,
                "task": {"type": "text_classification", "dataset": "d"},
                "pipeline": [{"type": "finetune"}, {"type": "finetune", "mixed_precision": mode}]
            });
            let request = serde_json::json!({
                "job_id": uuid::Uuid::now_v7(), "attempt": 1, "spec": spec, "work_dir": "/nonexistent"
            });
            let ChildMessage::Failed {
                code,
                message,
                retryable,
                ..
            } = verdict_of(&request.to_string())
            else {
                panic!("a CPU worker cannot run {mode}");
            };
            assert_eq!((code.as_str(), retryable), ("invalid_input", false));
            assert!(
                message.contains("/pipeline/1/mixed_precision") && message.contains(mode),
                "{message}"
            );
        }
    }

    #[test]
    fn a_broken_stdout_gives_the_worker_gone_status() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        assert_eq!(exec("{}".as_bytes(), &mut Broken), EXIT_WORKER_GONE);
    }
}
