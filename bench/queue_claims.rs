//! Queue throughput: concurrent workers claiming and finishing jobs through the store.
//!
//! Measures the database side of the scheduler (claim with `SKIP LOCKED`, the `status` event, the
//! fenced finish and its terminal event), without child processes: what bounds how fast a fleet
//! of workers can pick up short jobs. Each cycle is one claim transaction plus one finish
//! transaction; "claims/s" counts cycles.
//!
//! ```sh
//! cargo bench --profile dev --bench queue_claims -- --backend postgres --workers 16 --jobs 20000
//! cargo bench --profile dev --bench queue_claims -- --backend sqlite --workers 4 --jobs 5000
//! ```
//! Postgres is a throwaway cluster as in the tests (fsync off) unless `COMPRESSD_TEST_DATABASE_URL`
//! names a server.

#[path = "../tests/common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use compressd::store::{
    AttemptOutcome, Dataset, Lease, Model, NewJob, PgStore, SqliteStore, Store,
};
use serde_json::json;
use uuid::Uuid;

struct Options {
    backend: String,
    workers: usize,
    jobs: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        backend: "postgres".into(),
        workers: 16,
        jobs: 20_000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => options.backend = args.next().context("--backend needs a value")?,
            "--workers" => {
                options.workers = args.next().context("--workers needs a value")?.parse()?
            }
            "--jobs" => options.jobs = args.next().context("--jobs needs a value")?.parse()?,
            "--bench" => {} // cargo bench passes this to harness=false targets
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

async fn open_store(
    backend: &str,
    dir: &std::path::Path,
    connections: u32,
) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match backend {
        "postgres" => {
            Arc::new(PgStore::connect(&pg::fresh_database_url().await, connections).await?)
        }
        "sqlite" => Arc::new(SqliteStore::open_file(&dir.join("bench.db"), connections).await?),
        other => bail!("unknown backend {other}"),
    };
    store.migrate().await?;
    Ok(store)
}

/// Registers one model and dataset and queues `jobs` dry-run jobs on them.
async fn fill_queue(store: &Arc<dyn Store>, jobs: usize) -> anyhow::Result<()> {
    let now = Utc::now();
    let model = Model {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "m".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: "file:///nonexistent".into(),
        bytes: 0,
        sha256: "0".repeat(64),
        metadata: json!({}),
        created_at: now,
    };
    let dataset = Dataset {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "d".into(),
        format: "jsonl".into(),
        uri: "file:///nonexistent".into(),
        bytes: 0,
        sha256: "0".repeat(64),
        rows: 0,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_model(&model).await?;
    store.insert_dataset(&dataset).await?;
    let mut inserters = Vec::new();
    for part in 0..8 {
        let store = Arc::clone(store);
        inserters.push(tokio::spawn(async move {
            for i in (part..jobs).step_by(8) {
                let spec = json!({"name": format!("j{i}"), "model": model.id, "task": {"type": "text_classification", "dataset": dataset.id},
                    "pipeline": [{"type": "finetune"}], "dry_run": true});
                let job = NewJob {
                    tenant: "default".into(),
                    id: Uuid::now_v7(),
                    name: format!("j{i}"),
                    spec,
                    model_id: model.id,
                    dataset_id: dataset.id,
                    priority: 0,
                    max_attempts: 3,
                    idempotency: None,
                    webhooks: Vec::new(),
                    created_at: Utc::now(),
                    max_active_jobs: None,
                };
                store.create_job(job).await?;
            }
            anyhow::Ok(())
        }));
    }
    for inserter in inserters {
        inserter.await??;
    }
    Ok(())
}

/// Claims and finishes jobs until the queue is empty; returns the number handled.
async fn work(store: Arc<dyn Store>, owner: String) -> anyhow::Result<usize> {
    let mut done = 0;
    while let Some(job) = store.claim_next(&owner, Duration::from_secs(60)).await? {
        let lease = Lease {
            job_id: job.id,
            attempt: job.attempt,
            owner: owner.clone(),
        };
        store
            .finish_attempt(
                &lease,
                AttemptOutcome::Succeeded {
                    result: json!({"metrics": {}}),
                },
            )
            .await?;
        done += 1;
    }
    Ok(done)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let dir = tempfile::tempdir()?;
    let store = open_store(
        &options.backend,
        dir.path(),
        u32::try_from(options.workers)? + 4,
    )
    .await?;
    fill_queue(&store, options.jobs).await?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..options.workers {
        workers.push(tokio::spawn(work(Arc::clone(&store), format!("bench-{w}"))));
    }
    let mut total = 0;
    for worker in workers {
        total += worker.await??;
    }
    let took = started.elapsed().as_secs_f64();
    if total != options.jobs {
        bail!("handled {total} jobs of {}", options.jobs);
    }
    println!(
        "backend={} workers={} jobs={} seconds={took:.2} claims_per_second={:.0} (each: claim + status event + finish + terminal event)",
        options.backend,
        options.workers,
        total,
        total as f64 / took
    );
    Ok(())
}
