//! One claimed attempt, from the child's start to the recorded outcome.
//!
//! Three things run side by side: the child (its messages forwarded to the store), the lease
//! keeper (heartbeats; it also wakes at once on a cancel notice), and the worker's shutdown
//! signal. Whichever asks first to stop the child wins; the outcome is then written with a fenced
//! write, so an attempt that lost its lease records nothing.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::forward::{is_lease_lost, Forwarder};
use super::protocol::{ChildMessage, ExecRequest, OutputFile};
use super::publish::publish;
use super::runner::{ChildCommand, ChildOutcome, RunningChild, StopReason};
use super::WorkerContext;
use crate::error::Result;
use crate::events::hub::Notice;
use crate::store::{retry_backoff, AttemptOutcome, Job, JobError, Lease};
use crate::tracking::run::{Ending, JobIdentity, RunTracker};

/// Runs `job` (just claimed by this worker) to its end and records the outcome.
pub async fn run_attempt(ctx: Arc<WorkerContext>, job: Job, shutdown: CancellationToken) {
    let lease = Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: ctx.owner.clone(),
    };
    let span = tracing::info_span!("job.attempt", job_id = %job.id, attempt = job.attempt);
    let started = Instant::now();
    let _running = ctx.metrics.attempt_started();
    async {
        tracing::info!("attempt started");
        let tracker = ctx.settings.tracking.target(&job.spec).map(|target| {
            let identity = JobIdentity {
                id: job.id,
                name: job.name.clone(),
                attempt: job.attempt,
                spec: job.spec.clone(),
            };
            RunTracker::start(target, &ctx.settings.tracking, identity)
        });
        let outcome = supervise(&ctx, &job, &lease, shutdown, tracker.as_ref()).await;
        let (result, error) = match &outcome {
            Ok(ChildOutcome::Reported(ChildMessage::Succeeded { result, .. })) => {
                (Some(result.clone()), None)
            }
            Ok(ChildOutcome::Reported(ChildMessage::Failed { message, .. })) => {
                (None, Some(message.clone()))
            }
            Ok(ChildOutcome::Died { cause, .. }) => (None, Some(cause.describe())),
            _ => (None, None),
        };
        // A failed run whose finished stages could not be published keeps its work folder.
        let keep_work_dir = matches!(
            &outcome,
            Ok(ChildOutcome::Reported(ChildMessage::Failed { kept, retryable, .. }))
                if !kept.is_empty() && (!retryable || job.attempt >= job.max_attempts)
        );
        let label = record(&ctx, &job, &lease, outcome).await;
        ctx.metrics.attempt_finished(label, started.elapsed());
        // After the outcome is recorded, so MLflow never holds up the job; before the work
        // folder goes, so the outputs can still be uploaded.
        if let Some(tracker) = tracker {
            let ending = Ending {
                job_status: label.to_owned(),
                result,
                error,
                work_dir: work_dir(&ctx, &job),
            };
            tracker.finish(ending).await;
        }
        if is_finished(label) && !keep_work_dir {
            remove_work_dir(work_dir(&ctx, &job)).await;
        }
    }
    .instrument(span)
    .await;
}

/// Runs the child until it ends or is stopped.
async fn supervise(
    ctx: &Arc<WorkerContext>,
    job: &Job,
    lease: &Lease,
    shutdown: CancellationToken,
    tracker: Option<&RunTracker>,
) -> Result<ChildOutcome> {
    let command = child_command(ctx, job).await?;
    let mut child = RunningChild::spawn(&command)
        .await
        .map_err(|e| crate::error::Error::io(&command.program, e))?;
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let keeper = tokio::spawn(keep_lease(
        Arc::clone(ctx),
        lease.clone(),
        stop_tx,
        shutdown,
    ));
    let stages = job
        .spec
        .get("pipeline")
        .and_then(|p| p.as_array())
        .map_or(1, |p| p.len());
    let mut forwarder = Forwarder::new(
        Arc::clone(&ctx.store),
        lease.clone(),
        u32::try_from(stages).unwrap_or(1),
    );
    let grace = ctx.settings.stop_grace;
    let outcome = loop {
        let flush_at = forwarder.flush_deadline();
        tokio::select! {
            biased;
            Ok(()) = stop_rx.changed() => {
                let reason = *stop_rx.borrow_and_update();
                if let Some(reason) = reason {
                    break child.stop(reason, grace).await;
                }
            }
            message = child.next_message() => match message {
                Some(message) => {
                    if let Some(tracker) = tracker {
                        tracker.observe(&message);
                    }
                    if let ChildMessage::StageFinished { stage, report, .. } = &message {
                        if let Some(seconds) = report["wall_seconds"].as_f64() {
                            ctx.metrics.stage_finished(stage, seconds);
                        }
                    }
                    if let Err(error) = forwarder.forward(message).await {
                        if is_lease_lost(&error) {
                            break child.stop(StopReason::LeaseLost, grace).await;
                        }
                        tracing::warn!(%error, "could not record a message of the job");
                    }
                }
                None => break child.finish().await,
            },
            () = sleep_until(flush_at.unwrap_or_else(Instant::now)), if flush_at.is_some() => {
                if let Err(error) = forwarder.flush().await {
                    if is_lease_lost(&error) {
                        break child.stop(StopReason::LeaseLost, grace).await;
                    }
                }
            }
        }
    };
    let outcome = match outcome {
        Ok(ChildOutcome::Reported(ChildMessage::Succeeded { result, outputs }))
            if !outputs.is_empty() =>
        {
            Ok(publish_outputs(ctx, job, lease, result, &outputs).await)
        }
        // A failure that ends the job: what its finished stages made is published, not dropped
        // with the work folder. (A failure with attempts left keeps the folder to resume from.)
        Ok(ChildOutcome::Reported(ChildMessage::Failed {
            code,
            message,
            retryable,
            kept,
        })) if !kept.is_empty() && (!retryable || job.attempt >= job.max_attempts) => {
            Ok(publish_kept(ctx, job, lease, code, message, retryable, kept).await)
        }
        other => other,
    };
    keeper.abort();
    outcome.map_err(|e| crate::error::Error::io(&command.program, e))
}

/// Heartbeats until stopped; sends the reason to stop the child (cancel, lost lease, shutdown).
/// After a cancel it keeps the lease alive, so the job is not reaped while the child winds down.
async fn keep_lease(
    ctx: Arc<WorkerContext>,
    lease: Lease,
    stop: watch::Sender<Option<StopReason>>,
    shutdown: CancellationToken,
) {
    let mut notices = ctx.hub.subscribe();
    let mut ticker = interval(ctx.settings.heartbeat);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = wait_for_cancel_notice(&mut notices, lease.job_id) => {}
            () = shutdown.cancelled(), if stop.borrow().is_none() => {
                stop.send_replace(Some(StopReason::Shutdown));
                continue;
            }
        }
        match ctx.store.heartbeat(&lease, ctx.settings.lease).await {
            Ok(Some(state)) if state.cancel_requested && stop.borrow().is_none() => {
                tracing::info!("cancel requested; stopping the child");
                stop.send_replace(Some(StopReason::Cancelled));
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                tracing::warn!("lease lost: another worker owns the job now");
                ctx.metrics.lease_lost();
                stop.send_replace(Some(StopReason::LeaseLost));
                return;
            }
            // A database hiccup: keep trying; if the lease lapses meanwhile, the next beat says so.
            Err(error) => tracing::warn!(%error, "heartbeat failed"),
        }
    }
}

async fn wait_for_cancel_notice(notices: &mut broadcast::Receiver<Notice>, job_id: uuid::Uuid) {
    loop {
        match notices.recv().await {
            Ok(Notice::CancelRequested { job_id: id }) if id == job_id => return,
            Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}

/// The `compressd exec` command for `job`, with its inputs resolved to local paths.
async fn child_command(ctx: &WorkerContext, job: &Job) -> Result<ChildCommand> {
    let inputs = super::inputs::resolve(ctx, job).await?;
    let request = ExecRequest {
        job_id: job.id,
        attempt: job.attempt,
        spec: job.spec.clone(),
        inputs,
        work_dir: work_dir(ctx, job),
    };
    let stdin =
        serde_json::to_vec(&request).map_err(|e| crate::error::Error::Corrupt(e.to_string()))?;
    Ok(ChildCommand {
        program: ctx.settings.executable.clone(),
        args: vec![
            OsString::from("exec"),
            OsString::from("--job"),
            OsString::from(job.id.to_string()),
        ],
        envs: Vec::new(),
        stdin,
        log_tail_lines: ctx.settings.log_tail_lines,
    })
}

/// The job's work folder on this machine; it outlives an attempt so the next one can resume.
fn work_dir(ctx: &WorkerContext, job: &Job) -> PathBuf {
    ctx.settings.work_dir.join(job.id.to_string())
}

/// Publishes a successful run's outputs while the lease is still kept alive, and turns the
/// verdict into the one to record: the result gains the committed `artifacts`; a failed upload
/// becomes a retryable failure, a lost lease a lost attempt.
async fn publish_outputs(
    ctx: &WorkerContext,
    job: &Job,
    lease: &Lease,
    mut result: serde_json::Value,
    outputs: &[OutputFile],
) -> ChildOutcome {
    match publish(ctx, lease, &work_dir(ctx, job), outputs).await {
        Ok(artifacts) => {
            if let Some(object) = result.as_object_mut() {
                object.insert("artifacts".into(), artifacts.into());
            }
            ChildOutcome::Reported(ChildMessage::Succeeded {
                result,
                outputs: Vec::new(),
            })
        }
        Err(error) if is_lease_lost(&error) => ChildOutcome::Stopped(StopReason::LeaseLost),
        Err(error) => {
            tracing::warn!(%error, "could not publish the job's outputs");
            ChildOutcome::Reported(ChildMessage::Failed {
                code: "publish_failed".into(),
                message: format!("the outputs could not be stored: {error}"),
                retryable: true,
                kept: Vec::new(),
            })
        }
    }
}

/// Whether the metrics label of an attempt says its job has ended.
fn is_finished(label: &str) -> bool {
    crate::store::JobStatus::ALL
        .iter()
        .any(|status| status.as_str() == label && status.is_finished())
}

/// Removes a finished job's work folder: its outputs are in the artifact store now, and no
/// attempt will resume from its checkpoints.
async fn remove_work_dir(dir: PathBuf) {
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(%error, dir = %dir.display(), "work folder left behind"),
    }
}

/// Publishes the finished stages' models of a failed run that ends the job, and says so in the
/// failure's message. The verdict keeps `kept` only when they could not be stored: the work
/// folder then stays on this machine instead of being removed with the job.
async fn publish_kept(
    ctx: &WorkerContext,
    job: &Job,
    lease: &Lease,
    code: String,
    message: String,
    retryable: bool,
    kept: Vec<OutputFile>,
) -> ChildOutcome {
    let dir = work_dir(ctx, job);
    let (message, kept) = match publish(ctx, lease, &dir, &kept).await {
        Ok(artifacts) => {
            let mut folders: Vec<&str> = artifacts
                .iter()
                .filter_map(|a| a["name"].as_str())
                .filter_map(|name| name.rsplit_once('/').map(|(folder, _)| folder))
                .collect();
            folders.dedup();
            let message = format!(
                "{message}; the models of the stages that finished are kept as artifacts: {}",
                folders.join(", ")
            );
            (message, Vec::new())
        }
        Err(error) if is_lease_lost(&error) => return ChildOutcome::Stopped(StopReason::LeaseLost),
        Err(error) => {
            tracing::warn!(%error, dir = %dir.display(), "could not publish the finished stages' models; keeping the work folder");
            let message = format!(
                "{message}; the models of the stages that finished could not be stored ({error}) and are left in the worker's folder {}",
                dir.display()
            );
            (message, kept)
        }
    };
    ChildOutcome::Reported(ChildMessage::Failed {
        code,
        message,
        retryable,
        kept,
    })
}

/// Records how the attempt ended; returns a label for metrics: the job's new status, `lease_lost`
/// or `record_failed`.
async fn record(
    ctx: &WorkerContext,
    job: &Job,
    lease: &Lease,
    outcome: Result<ChildOutcome>,
) -> &'static str {
    let backoff = retry_backoff(ctx.settings.retry_backoff, job.attempt + 1);
    let attempt_outcome = match outcome {
        Ok(ChildOutcome::Reported(ChildMessage::Succeeded { result, .. })) => {
            AttemptOutcome::Succeeded { result }
        }
        Ok(ChildOutcome::Reported(ChildMessage::Failed {
            code,
            message,
            retryable,
            ..
        })) => {
            let error = JobError { code, message };
            if retryable {
                AttemptOutcome::Retry { error, backoff }
            } else {
                AttemptOutcome::Failed { error }
            }
        }
        Ok(ChildOutcome::Reported(other)) => {
            let error = JobError {
                code: "protocol".into(),
                message: format!("unexpected verdict {other:?}"),
            };
            AttemptOutcome::Retry { error, backoff }
        }
        Ok(ChildOutcome::Stopped(StopReason::Cancelled)) => AttemptOutcome::Cancelled,
        Ok(ChildOutcome::Stopped(StopReason::LeaseLost)) => return "lease_lost",
        Ok(ChildOutcome::Stopped(StopReason::Shutdown)) => {
            let error = JobError {
                code: "worker_shutdown".into(),
                message: "the worker shut down during the attempt".into(),
            };
            AttemptOutcome::Retry {
                error,
                backoff: std::time::Duration::ZERO,
            }
        }
        Ok(ChildOutcome::Died {
            cause,
            log_tail,
            peak_rss_bytes,
        }) => {
            if !log_tail.is_empty() {
                let payload = json!({
                    "level": "error",
                    "message": log_tail.join("\n"),
                    "peak_rss_bytes": peak_rss_bytes,
                });
                // Best effort: the outcome below carries the same lines.
                let _ = ctx.store.append_fenced_event(lease, "log", payload).await;
            }
            let peak = match peak_rss_bytes {
                Some(bytes) => format!(
                    "; peak resident memory {:.1} MiB ({bytes} bytes)",
                    bytes as f64 / f64::from(1u32 << 20)
                ),
                None => String::new(),
            };
            let message = format!(
                "{}{peak}; last log lines:\n{}",
                cause.describe(),
                log_tail.join("\n")
            );
            AttemptOutcome::Retry {
                error: JobError {
                    code: cause.code().into(),
                    message,
                },
                backoff,
            }
        }
        Err(error) => {
            tracing::error!(%error, "the job's process could not be run");
            let error = JobError {
                code: "worker_error".into(),
                message: error.to_string(),
            };
            AttemptOutcome::Retry { error, backoff }
        }
    };
    match finish_with_retries(ctx, lease, attempt_outcome).await {
        Ok(status) => {
            tracing::info!(%status, "attempt finished");
            status.as_str()
        }
        Err(error) if is_lease_lost(&error) => {
            tracing::warn!(
                "lease lost before the outcome could be recorded; another worker owns the job"
            );
            ctx.metrics.lease_lost();
            "lease_lost"
        }
        Err(error) => {
            tracing::error!(%error, "could not record the attempt's outcome; the reaper will retry the job");
            "record_failed"
        }
    }
}

/// First wait before writing the outcome again after a database error.
const RECORD_FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait between two tries.
const RECORD_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Records the outcome, trying again with backoff while the database is unreachable (restarting,
/// failing over) for as long as the lease would last: a finished job must not be run again just
/// because its verdict met a restart. The write is fenced, so a try whose commit went through
/// but whose answer was lost makes the next one fail with `LeaseLost`, never a second record.
async fn finish_with_retries(
    ctx: &WorkerContext,
    lease: &Lease,
    outcome: AttemptOutcome,
) -> Result<crate::store::JobStatus> {
    let give_up_at = Instant::now() + ctx.settings.lease;
    let mut backoff = RECORD_FIRST_BACKOFF;
    loop {
        match ctx.store.finish_attempt(lease, outcome.clone()).await {
            Err(crate::error::Error::Database(error)) if Instant::now() + backoff < give_up_at => {
                tracing::warn!(%error, retry_in_s = backoff.as_secs_f64(), "recording the outcome failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECORD_MAX_BACKOFF);
            }
            other => return other,
        }
    }
}
