//! Crash recovery with real processes: a `compressd worker` is killed with SIGKILL in the middle
//! of a job; after its lease lapses another worker reclaims the job, resumes it from its
//! checkpoint and finishes it as attempt 2 with exactly one terminal event, and the dead worker's
//! lease can write nothing.
//!
//! The job is a dry run slowed down by the debug-only test hook `COMPRESSD_TEST_DRY_RUN_SLEEP_MS`
//! (see `scheduler::exec`), which also keeps a checkpoint of its progress.

use crate::scheduler_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use compressd::error::Error;
use compressd::store::{JobStatus, Lease};
use scheduler_support::{
    all_events, dry_run_spec, queue_job, seed_inputs, terminal_count, SharedStore,
};
use serde_json::json;
use uuid::Uuid;

/// Starts `compressd worker` against `database_url` with a short lease and the slow dry-run hook.
fn start_worker(database_url: &str, data_dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_compressd"))
        .arg("worker")
        .env("COMPRESSD_DATABASE_URL", database_url)
        .env("COMPRESSD_DATA_DIR", data_dir)
        .env("COMPRESSD_WORKER_LEASE_SECS", "2")
        .env("COMPRESSD_WORKER_HEARTBEAT_SECS", "0.5")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env("COMPRESSD_WORKER_RETRY_BACKOFF_SECS", "0")
        .env("COMPRESSD_TEST_DRY_RUN_SLEEP_MS", "4000")
        .env("COMPRESSD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts")
}

/// Polls until `ready` says yes or `timeout` passes.
async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn progress_events(store: &SharedStore, job_id: Uuid) -> usize {
    all_events(&**store, job_id)
        .await
        .iter()
        .filter(|e| e.event_type == "progress" && e.attempt == 1)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_a_killed_worker_finishes_elsewhere_as_attempt_two() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = scheduler_support::backends::postgres_url().await;
    let store = scheduler_support::backends::postgres_at(&database_url).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "killed"), 0, 3).await;

    let mut first = start_worker(&database_url, dir.path());
    // Progress beyond the stage start means the child is sleeping through its steps, checkpointing.
    wait_until(
        Duration::from_secs(60),
        "the first worker to make progress",
        || async { progress_events(&store, job.id).await >= 3 },
    )
    .await;
    first.kill().unwrap(); // SIGKILL: no chance to hand the job back
    first.wait().unwrap();
    let first_owner = store
        .get_job(job.id)
        .await
        .unwrap()
        .unwrap()
        .lease_owner
        .expect("still leased to the dead worker");

    let mut second = start_worker(&database_url, dir.path());
    wait_until(Duration::from_secs(60), "the job to finish", || async {
        store
            .get_job(job.id)
            .await
            .unwrap()
            .unwrap()
            .status
            .is_finished()
    })
    .await;
    second.kill().unwrap();
    second.wait().unwrap();

    let done = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!(
        (done.status, done.attempt),
        (JobStatus::Succeeded, 2),
        "{:?}",
        done.error
    );
    let plan = &done.result.as_ref().expect("a result").plan;
    let resumed = plan
        .as_ref()
        .and_then(|p| p["resumed_from_step"].as_u64())
        .unwrap_or(0);
    assert!(
        resumed >= 3,
        "attempt 2 resumed from the checkpoint, not from scratch: {plan:?}"
    );

    let events = all_events(&*store, job.id).await;
    assert_eq!(terminal_count(&events), 1);
    let requeued = events
        .iter()
        .find(|e| e.event_type == "status" && e.payload["status"] == "queued")
        .expect("a requeue event");
    assert_eq!(requeued.payload["error"]["code"], "lease_expired");
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let claimers: Vec<_> = events
        .iter()
        .filter(|e| e.payload["status"] == "running")
        .map(|e| (e.attempt, e.payload["worker"].clone()))
        .collect();
    assert_eq!(claimers.len(), 2);
    assert_eq!(claimers[0], (1, json!(first_owner)));
    assert_ne!(
        claimers[1].1,
        json!(first_owner),
        "another worker ran attempt 2"
    );

    // The dead worker, were it to come back, is fenced out of every write.
    let zombie = Lease {
        job_id: job.id,
        attempt: 1,
        owner: first_owner,
    };
    assert_eq!(
        store
            .heartbeat(&zombie, Duration::from_secs(60))
            .await
            .unwrap(),
        None
    );
    let write = store
        .append_fenced_event(&zombie, "log", json!({"message": "zombie"}))
        .await;
    assert!(matches!(write, Err(Error::LeaseLost { .. })), "{write:?}");
}
