//! A job's process killed the way the kernel's OOM killer kills (SIGKILL, after growing): the
//! attempt is reported as out of memory with its sampled peak resident size, and retried by the
//! job's policy until `max_attempts`, then failed once.
//!
//! The worker's `executable` is a shell script standing in for `compressd exec`: it grows to about
//! 100 MiB and sends itself SIGKILL, as the OOM killer would.

use crate::scheduler_support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, local_artifacts, queue_job, seed_inputs};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_memory_kill_is_reported_with_its_peak_and_retried_by_policy() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "oom"), 0, 2).await;

    let script = dir.path().join("grows-and-is-killed.sh");
    std::fs::write(
        &script,
        "#!/bin/bash\ncat >/dev/null\ngrowing=$(head -c 100000000 /dev/zero | tr '\\0' x)\nsleep 1\nkill -9 $$\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut settings = WorkerSettings::with_defaults(dir.path()).unwrap();
    settings.executable = script;
    settings.poll_interval = Duration::from_millis(100);
    settings.retry_backoff = Duration::ZERO;
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&store),
        local_artifacts(dir.path()),
        settings,
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let job = store.get_job(job.id).await.unwrap().unwrap();
        if job.status.is_finished() {
            break job;
        }
        assert!(Instant::now() < deadline, "still {:?}", job.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    shutdown.cancel();
    worker.await.unwrap();

    // Retried once by the policy (max_attempts 2), then failed for good.
    assert_eq!((ended.status, ended.attempt), (JobStatus::Failed, 2));
    let error = ended.error.expect("a reason");
    assert_eq!(error.code, "child_out_of_memory", "{error:?}");
    assert!(error.message.contains("out of memory"), "{}", error.message);
    // The peak is the child's own: the script held about 100 MB.
    let peak: f64 = error
        .message
        .split("peak resident memory ")
        .nth(1)
        .and_then(|rest| rest.split(" MiB").next())
        .and_then(|mib| mib.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {}", error.message));
    assert!(peak >= 90.0, "peak {peak} MiB: {}", error.message);
    let events = all_events(&*store, ended.id).await;
    let attempts: Vec<i32> = events
        .iter()
        .filter(|e| e.event_type == "status" && e.payload["status"] == "running")
        .map(|e| e.attempt)
        .collect();
    assert_eq!(attempts, [1, 2], "{events:?}");
    assert_eq!(scheduler_support::terminal_count(&events), 1);
}
