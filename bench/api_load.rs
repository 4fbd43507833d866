//! API load benchmark: `POST /v1/jobs` at a fixed rate against a real server on a real socket.
//!
//! Open loop: requests are sent on a fixed schedule whether or not earlier ones have finished, and
//! latency is measured from each request's scheduled time, so a slow server cannot hide its queueing
//! (no coordinated omission). The first `--warmup` seconds (default 2) run at the same rate but are
//! not counted: they open the HTTP and database connections a running service already holds.
//! The server runs in this process on a port-0 listener, over SQLite in
//! a temp dir or over PostgreSQL (a throwaway cluster, as in the tests, or
//! `COMPRESSD_TEST_DATABASE_URL`).
//!
//! ```sh
//! cargo bench --bench api_load -- --backend postgres --rate 500 --seconds 20
//! cargo bench --bench api_load -- --backend sqlite --rate 500 --seconds 20
//! ```

#[path = "../tests/common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use compressd::api::metrics::Metrics;
use compressd::api::{ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::clock::{Clock, SystemClock};
use compressd::settings::Settings;
use compressd::store::{Dataset, Model, PgStore, SqliteStore, Store};
use figment::providers::Serialized;
use serde_json::json;

struct Options {
    backend: String,
    rate: u32,
    seconds: u32,
    warmup: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        backend: "sqlite".into(),
        rate: 500,
        seconds: 20,
        warmup: 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => options.backend = args.next().context("--backend needs a value")?,
            "--rate" => options.rate = args.next().context("--rate needs a value")?.parse()?,
            "--seconds" => {
                options.seconds = args.next().context("--seconds needs a value")?.parse()?
            }
            "--warmup" => {
                options.warmup = args.next().context("--warmup needs a value")?.parse()?
            }
            "--bench" => {} // cargo bench passes this to harness=false targets
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

async fn store(backend: &str, dir: &std::path::Path) -> anyhow::Result<Arc<dyn Store>> {
    let store: Arc<dyn Store> = match backend {
        "sqlite" => Arc::new(SqliteStore::open_file(&dir.join("bench.db"), 16).await?),
        "postgres" => Arc::new(PgStore::connect(&pg::fresh_database_url().await, 16).await?),
        other => bail!("unknown backend {other} (sqlite or postgres)"),
    };
    store.migrate().await?;
    Ok(store)
}

async fn register_inputs(store: &dyn Store, clock: &dyn Clock) -> anyhow::Result<(String, String)> {
    let model = Model {
        tenant: "default".into(),
        id: clock.new_id(),
        name: "bench-model".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: "models/bench".into(),
        bytes: 1,
        sha256: "00".repeat(32),
        metadata: json!({}),
        created_at: clock.now(),
    };
    let dataset = Dataset {
        tenant: "default".into(),
        id: clock.new_id(),
        name: "bench-data".into(),
        format: "jsonl".into(),
        uri: "datasets/bench.jsonl".into(),
        bytes: 1,
        sha256: "00".repeat(32),
        rows: 1,
        metadata: json!({}),
        created_at: clock.now(),
    };
    store.insert_model(&model).await?;
    store.insert_dataset(&dataset).await?;
    Ok((model.id.to_string(), dataset.id.to_string()))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let dir = tempfile::tempdir()?;
    let figment = Settings::figment(None)?.merge(Serialized::default("data_dir", dir.path()));
    let settings = Settings::from_figment(figment)?;
    let store = store(&options.backend, dir.path()).await?;
    let clock = Arc::new(SystemClock);
    let (model, dataset) = register_inputs(&*store, &*clock).await?;
    let state = AppState {
        store,
        artifacts: ArtifactStore::from_settings(&settings)?,
        clock,
        metrics: Arc::new(Metrics::new()),
        config: ApiConfig::from_settings(&settings),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/jobs", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(compressd::server::serve(
        listener,
        state,
        async move { drop(stopped.await) },
        Duration::from_secs(5),
    ));

    let body = json!({
        "name": "bench",
        "model": model,
        "task": {"type": "text_classification", "dataset": dataset},
        "pipeline": [{"type": "finetune", "epochs": 1}]
    })
    .to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let total = options.rate * options.seconds;
    let warmup = options.rate * options.warmup;
    let period = Duration::from_secs_f64(1.0 / f64::from(options.rate));
    let origin = Instant::now();
    let started = origin + period * warmup;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..warmup + total {
        let scheduled = origin + period * i;
        let counted = i >= warmup;
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, url, body) = (client.clone(), url.clone(), body.clone());
        tasks.spawn(async move {
            let response = client
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let ok = matches!(&response, Ok(r) if r.status() == 201);
            (scheduled.elapsed(), ok, counted)
        });
    }
    let mut latencies = Vec::with_capacity(total as usize);
    let mut errors = 0u32;
    while let Some(joined) = tasks.join_next().await {
        let (latency, ok, counted) = joined?;
        if counted {
            latencies.push(latency);
            errors += u32::from(!ok);
        }
    }
    let elapsed = started.elapsed();
    let _ = stop.send(());
    server.await??;

    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "backend={} rate={}/s seconds={} (after {} s warm-up) requests={} errors={} throughput={:.0}/s p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        options.backend,
        options.rate,
        options.seconds,
        options.warmup,
        total,
        errors,
        f64::from(total) / elapsed.as_secs_f64(),
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 90.0)),
        ms(percentile(&latencies, 99.0)),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
    );
    Ok(())
}
