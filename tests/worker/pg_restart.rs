//! PostgreSQL restarted while jobs run: a real `compressd worker` process runs three slow jobs on
//! a private cluster (so the tests beside it keep their shared one), the cluster is restarted with
//! `pg_ctl restart -m fast` mid-job, and afterwards the API (its pool) takes a new job and every
//! job ends exactly once, in its first attempt: none lost, none run twice.

use crate::common::api::TestApi;
use crate::common::pg::Cluster;
use crate::scheduler_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, terminal_count};
use uuid::Uuid;

/// A worker running three jobs at once, each a slow dry run of about `sleep_ms`.
fn start_worker(database_url: &str, data_dir: &Path, sleep_ms: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_compressd"))
        .arg("worker")
        .env("COMPRESSD_DATABASE_URL", database_url)
        .env("COMPRESSD_DATA_DIR", data_dir)
        .env("COMPRESSD_WORKER_CONCURRENCY", "3")
        .env("COMPRESSD_WORKER_LEASE_SECS", "8")
        .env("COMPRESSD_WORKER_HEARTBEAT_SECS", "0.5")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env("COMPRESSD_WORKER_RETRY_BACKOFF_SECS", "0")
        .env("COMPRESSD_TEST_DRY_RUN_SLEEP_MS", sleep_ms.to_string())
        .env("COMPRESSD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts")
}

async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !ready().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_survive_a_postgres_restart_each_ending_once_in_its_first_attempt() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .unwrap()
        .expect("a private PostgreSQL cluster starts");
    let dir = tempfile::tempdir().unwrap();
    let database_url = cluster.fresh_database_url().await;
    let store = scheduler_support::backends::postgres_at(&database_url).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let api = TestApi::new(store.clone()).await;
    let mut jobs = Vec::new();
    for n in 0..3 {
        let spec = dry_run_spec(&inputs, &format!("restart-{n}"));
        jobs.push(queue_job(&*store, &inputs, spec, 0, 3).await.id);
    }

    let mut worker = start_worker(&database_url, dir.path(), 6000);
    wait_until(
        Duration::from_secs(60),
        "every job to be running",
        || async {
            for id in &jobs {
                let job = store.get_job(*id).await.unwrap().unwrap();
                if job.status != JobStatus::Running {
                    return false;
                }
            }
            true
        },
    )
    .await;

    let restart_started = Instant::now();
    tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        move || cluster.restart()
    })
    .await
    .unwrap()
    .expect("pg_ctl restart");
    eprintln!(
        "postgres restarted in {:.1} s while 3 jobs ran",
        restart_started.elapsed().as_secs_f64()
    );

    // The API's pool drops the cut connections and opens new ones: a job submitted now is taken.
    let after = dry_run_spec(&inputs, "after-restart");
    let mut submitted = None;
    for _ in 0..20 {
        let reply = api.post_json("/v1/jobs", &after, &[]).await;
        if reply.status == 201 {
            submitted = Some(reply);
            break;
        }
        // Only a refusal that says "retry" is acceptable while connections are replaced.
        assert_eq!(reply.status, 503, "{:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let submitted = submitted.expect("the API takes a job after the restart");
    let id: Uuid = submitted.body["id"].as_str().unwrap().parse().unwrap();
    jobs.push(id);

    wait_until(Duration::from_secs(120), "every job to finish", || async {
        for id in &jobs {
            let job = store.get_job(*id).await.unwrap().unwrap();
            if !job.status.is_finished() {
                return false;
            }
        }
        true
    })
    .await;
    worker.kill().unwrap();
    worker.wait().unwrap();

    for id in &jobs {
        let job = store.get_job(*id).await.unwrap().unwrap();
        assert_eq!(
            (job.status, job.attempt),
            (JobStatus::Succeeded, 1),
            "job {id} ended once, in its first attempt: {:?}",
            job.error
        );
        let events = all_events(&*store, *id).await;
        assert_eq!(terminal_count(&events), 1, "job {id}: {events:?}");
        let runs = events
            .iter()
            .filter(|e| e.event_type == "status" && e.payload["status"] == "running")
            .count();
        assert_eq!(runs, 1, "job {id} was claimed once");
        let reply = api.get(&format!("/v1/jobs/{id}")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.body["status"], "succeeded");
    }
}
