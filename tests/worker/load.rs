//! Queue load: many concurrent workers drain many dry-run jobs, each run in a real `compressd
//! exec` child. Every job must succeed exactly once, on its first attempt, with no duplicate claim
//! and no lost event.

use crate::scheduler_support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::scheduler::reaper::run_reaper;
use compressd::scheduler::worker::run_worker;
use compressd::scheduler::{SchedulerMetrics, WorkerContext, WorkerSettings};
use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, SharedStore};
use tokio_util::sync::CancellationToken;

/// The events of a dry run that went straight through, in order.
const EXPECTED_EVENTS: [&str; 6] = [
    "queued",
    "status",
    "stage_started",
    "progress",
    "stage_finished",
    "succeeded",
];

fn settings(data_dir: &std::path::Path) -> WorkerSettings {
    let mut settings = WorkerSettings::with_defaults(data_dir).unwrap();
    settings.executable = env!("CARGO_BIN_EXE_compressd").into();
    settings.poll_interval = Duration::from_millis(200);
    settings
}

async fn drain(store: SharedStore, dir: &std::path::Path, workers: usize, jobs: usize) {
    let inputs = seed_inputs(&*store, dir).await;
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        ids.push(
            queue_job(
                &*store,
                &inputs,
                dry_run_spec(&inputs, &format!("load-{i}")),
                0,
                3,
            )
            .await
            .id,
        );
    }
    let metrics = SchedulerMetrics::default();
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let ctx = Arc::new(WorkerContext::new(
            Arc::clone(&store),
            scheduler_support::local_artifacts(dir),
            store.hub().clone(),
            settings(dir),
            metrics.clone(),
        ));
        tasks.push(tokio::spawn(run_worker(Arc::clone(&ctx), shutdown.clone())));
        tasks.push(tokio::spawn(run_reaper(ctx, shutdown.clone())));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let counts: HashMap<_, _> = store
            .count_jobs_by_status()
            .await
            .unwrap()
            .into_iter()
            .collect();
        let done: i64 = [
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ]
        .iter()
        .filter_map(|s| counts.get(s))
        .sum();
        if done == jobs as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs still unfinished: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap();
    }
    eprintln!(
        "{jobs} dry-run jobs on {workers} workers in {:.1} s ({:.0} jobs/s)",
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64()
    );

    for id in ids {
        let job = store.get_job(id).await.unwrap().unwrap();
        assert_eq!(
            (job.status, job.attempt),
            (JobStatus::Succeeded, 1),
            "job {id}: {:?}",
            job.error
        );
        assert!(job.result.is_some());
        let events = all_events(&*store, id).await;
        let types: Vec<_> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types, EXPECTED_EVENTS, "job {id}");
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_four_workers_drain_two_hundred_dry_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    drain(store, dir.path(), 4, 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_sixteen_workers_drain_a_thousand_dry_runs() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::postgres().await;
    drain(store, dir.path(), 16, 1000).await;
}
