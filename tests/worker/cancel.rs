//! Cancelling a running job: the worker hears the request through the notification hub (not its
//! 10-second heartbeat), stops the child and records `cancelled`, within about a second.

use crate::scheduler_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, terminal_count};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_job_is_cancelled_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "cancel-me"), 0, 3).await;

    let mut settings = WorkerSettings::with_defaults(dir.path()).unwrap();
    settings.executable = slow_dry_run_executable(dir.path());
    settings.heartbeat = Duration::from_secs(10);
    settings.lease = Duration::from_secs(30);
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&store),
        scheduler_support::local_artifacts(dir.path()),
        settings,
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));

    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_events(&*store, job.id)
        .await
        .iter()
        .any(|e| e.event_type == "progress" && e.payload["fraction"].as_f64() > Some(0.0))
    {
        assert!(Instant::now() < deadline, "the job never made progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = Instant::now();
    store
        .request_cancel(job.id, chrono::Utc::now())
        .await
        .unwrap();
    while !store
        .get_job(job.id)
        .await
        .unwrap()
        .unwrap()
        .status
        .is_finished()
    {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the cancel was not applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = asked.elapsed();
    assert!(took < Duration::from_millis(1500), "cancel took {took:?}");

    let done = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!((done.status, done.attempt), (JobStatus::Cancelled, 1));
    let events = all_events(&*store, job.id).await;
    assert_eq!(terminal_count(&events), 1);
    assert_eq!(events.last().unwrap().event_type, "cancelled");
    shutdown.cancel();
    worker.await.unwrap();
}

/// A wrapper that runs `compressd` with the test hook that makes the dry run last. Set on the
/// child only: the other tests of this binary run in the same process and must not see it.
fn slow_dry_run_executable(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("slow-compressd.sh");
    let script = format!(
        "#!/bin/sh\nexport {}=30000\nexec '{}' \"$@\"\n",
        compressd::scheduler::exec::SLOW_DRY_RUN_ENV,
        env!("CARGO_BIN_EXE_compressd")
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}
