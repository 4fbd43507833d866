//! The reaper: finds running jobs whose lease expired (their worker died or lost the database)
//! and returns them to the queue, or fails them once their attempts are used up.
//!
//! It is safe to run in every process at once: each pass is one conditional update per job in
//! the store, so two reapers never both act on the same expired lease.
//!
//! A tracked job it ends gets its MLflow run ended too (`FAILED` or `KILLED`): the worker that
//! would have ended it is gone.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::WorkerContext;
use crate::store::Reaped;
use crate::tracking::run::{Ending, JobIdentity, RunTracker};

/// Jobs handled per reaper pass; more wait for the next pass.
pub const REAP_BATCH: u32 = 100;

/// Runs reaper passes every `reap_interval` until `shutdown`.
pub async fn run_reaper(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(ctx.settings.reap_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        reap_once(&ctx)
            .instrument(tracing::info_span!("job.reaper"))
            .await;
    }
}

/// One pass: reaps up to [`REAP_BATCH`] expired leases. Returns what it did.
pub async fn reap_once(ctx: &WorkerContext) -> Vec<Reaped> {
    match ctx
        .store
        .reap_expired(REAP_BATCH, ctx.settings.retry_backoff)
        .await
    {
        Ok(reaped) => {
            for job in &reaped {
                let outcome = match job {
                    Reaped::Requeued { job_id, attempt } => {
                        tracing::warn!(%job_id, attempt, "lease expired; job returned to the queue");
                        "requeued"
                    }
                    Reaped::Failed { job_id, attempt } => {
                        tracing::warn!(%job_id, attempt, "lease expired on the last attempt; job failed");
                        end_tracked_run(ctx, *job_id, "failed").await;
                        "failed"
                    }
                    Reaped::Cancelled { job_id } => {
                        tracing::info!(%job_id, "lease expired after a cancel request; job cancelled");
                        end_tracked_run(ctx, *job_id, "cancelled").await;
                        "cancelled"
                    }
                };
                ctx.metrics.reaped(outcome);
            }
            reaped
        }
        Err(error) => {
            tracing::warn!(%error, "reaper pass failed");
            Vec::new()
        }
    }
}

/// Ends the MLflow run of a job the reaper ended, when the job is tracked. Runs beside the reaper
/// (MLflow may be slow or down; the tracker retries it up to its finish timeout), best effort.
async fn end_tracked_run(ctx: &WorkerContext, job_id: uuid::Uuid, status: &str) {
    let job = match ctx.store.get_job(job_id).await {
        Ok(Some(job)) => job,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%job_id, %error, "cannot read the reaped job; its MLflow run is left as it is");
            return;
        }
    };
    let Some(target) = ctx.settings.tracking.target(&job.spec) else {
        return;
    };
    let tracker = RunTracker::start(
        target,
        &ctx.settings.tracking,
        JobIdentity {
            id: job.id,
            name: job.name.clone(),
            attempt: job.attempt,
            spec: job.spec.clone(),
        },
    );
    let ending = Ending {
        job_status: status.to_owned(),
        result: None,
        error: job.error.map(|e| e.message),
        work_dir: std::path::PathBuf::new(),
    };
    let span = tracing::info_span!("job.reaper.mlflow", %job_id);
    tokio::spawn(tracing::Instrument::instrument(
        tracker.finish(ending),
        span,
    ));
}
