//! The claim loop of one worker.
//!
//! While it has a free slot, the worker claims the next job (priority first, then age, skipping
//! jobs whose `run_after` is still ahead) and starts an attempt for it. With nothing to claim it
//! sleeps until a queue notice (a new or requeued job, heard through the hub), the poll interval,
//! or shutdown. On shutdown it stops claiming, asks running attempts to stop (their jobs go back
//! to the queue) and waits for them.

use std::sync::Arc;

use tokio::sync::{broadcast, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::attempt::run_attempt;
use super::WorkerContext;
use crate::events::hub::Notice;

/// Runs the worker until `shutdown` is cancelled and its attempts have ended.
pub async fn run_worker(ctx: Arc<WorkerContext>, shutdown: CancellationToken) {
    let span = tracing::info_span!("job.worker", owner = %ctx.owner);
    async move {
        tracing::info!(concurrency = ctx.settings.concurrency, "worker started");
        let slots = Arc::new(Semaphore::new(ctx.settings.concurrency.max(1)));
        let mut notices = ctx.hub.subscribe();
        let mut attempts = JoinSet::new();
        loop {
            let permit = tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => permit.expect("the semaphore is never closed"),
                () = shutdown.cancelled() => break,
            };
            while attempts.try_join_next().is_some() {}
            match ctx.store.claim_next(&ctx.owner, ctx.settings.lease).await {
                Ok(Some(job)) => {
                    ctx.metrics.claimed();
                    let (ctx, shutdown) = (Arc::clone(&ctx), shutdown.clone());
                    attempts.spawn(async move {
                        run_attempt(ctx, job, shutdown).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => drop(permit),
                Err(error) => {
                    drop(permit);
                    tracing::warn!(%error, "claiming a job failed");
                }
            }
            tokio::select! {
                () = wait_for_queued(&mut notices) => {}
                () = tokio::time::sleep(ctx.settings.poll_interval) => {}
                () = shutdown.cancelled() => break,
            }
        }
        tracing::info!(running = attempts.len(), "worker stopping; waiting for running attempts");
        while attempts.join_next().await.is_some() {}
    }
    .instrument(span)
    .await;
}

/// Returns when a job may have become claimable.
async fn wait_for_queued(notices: &mut broadcast::Receiver<Notice>) {
    loop {
        match notices.recv().await {
            Ok(Notice::Queued | Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                return
            }
            Ok(_) => {}
            // No hub: fall back to polling alone.
            Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
        }
    }
}
