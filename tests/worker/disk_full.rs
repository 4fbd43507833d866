//! The disk filling during a stage: the job's checkpoint file is made to point at `/dev/full`
//! (every write to it fails with ENOSPC, as on a full disk) before a real `compressd worker`
//! runs it. The job fails once, for good, with an error that says the disk is full and names the
//! file; the worker goes on to run the next job to success.

use crate::scheduler_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, terminal_count};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_the_job_naming_the_path_and_the_worker_runs_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = scheduler_support::backends::postgres_url().await;
    let store = scheduler_support::backends::postgres_at(&database_url).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    // Higher priority: claimed first.
    let full = queue_job(&*store, &inputs, dry_run_spec(&inputs, "full"), 10, 3).await;
    let next = queue_job(&*store, &inputs, dry_run_spec(&inputs, "next"), 0, 3).await;
    let work = dir.path().join("work").join(full.id.to_string());
    std::fs::create_dir_all(&work).unwrap();
    let checkpoint = work.join("dry_run.checkpoint");
    std::os::unix::fs::symlink("/dev/full", &checkpoint).unwrap();

    let mut worker = Command::new(env!("CARGO_BIN_EXE_compressd"))
        .arg("worker")
        .env("COMPRESSD_DATABASE_URL", &database_url)
        .env("COMPRESSD_DATA_DIR", dir.path())
        .env("COMPRESSD_WORKER_CONCURRENCY", "1")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env("COMPRESSD_WORKER_RETRY_BACKOFF_SECS", "0")
        .env("COMPRESSD_TEST_DRY_RUN_SLEEP_MS", "500")
        .env("COMPRESSD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = store.get_job(full.id).await.unwrap().unwrap();
        let b = store.get_job(next.id).await.unwrap().unwrap();
        if a.status.is_finished() && b.status.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "timed out: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.kill().unwrap();
    worker.wait().unwrap();

    let failed = store.get_job(full.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.attempt), (JobStatus::Failed, 1));
    let error = failed.error.expect("a reason");
    assert_eq!(error.code, "disk_full", "{error:?}");
    assert!(
        error.message.contains("disk is full")
            && error.message.contains(&checkpoint.display().to_string()),
        "{}",
        error.message
    );
    assert_eq!(terminal_count(&all_events(&*store, full.id).await), 1);

    let served = store.get_job(next.id).await.unwrap().unwrap();
    assert_eq!(served.status, JobStatus::Succeeded, "{:?}", served.error);
    assert_eq!(terminal_count(&all_events(&*store, next.id).await), 1);
}
