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
//!
//! `--auth both` (issue 17) measures what authentication costs: two servers share the store, one
//! open and one requiring API keys (a `write` key sent as `Authorization: Bearer`, checked against
//! the database on every request, with a per-key rate limiter set far above the load so it is
//! consulted but never refuses). The schedule alternates between them request by request at the
//! same rate, so both see the same machine at the same moments (a database hiccup or a scheduling
//! stall lands on both alike, not on whichever had that second), and the line for each is printed
//! with their p99 ratio.
//!
//! ```sh
//! cargo bench --bench api_load -- --backend postgres --rate 500 --seconds 20
//! cargo bench --bench api_load -- --backend sqlite --rate 500 --seconds 20
//! cargo bench --bench api_load -- --backend sqlite --rate 500 --seconds 40 --auth both
//! ```

#[path = "../tests/common/pg.rs"]
mod pg;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use compressd::api::access::{AuthMode, KeyRateLimiter};
use compressd::api::metrics::Metrics;
use compressd::api::{ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::auth;
use compressd::clock::{Clock, SystemClock};
use compressd::settings::Settings;
use compressd::store::{Dataset, Model, PgStore, Scope, SqliteStore, Store};
use figment::providers::Serialized;
use rand::SeedableRng;
use serde_json::json;

struct Options {
    backend: String,
    /// `off`, `on` or `both` (alternating requests).
    auth: String,
    rate: u32,
    seconds: u32,
    warmup: u32,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        backend: "sqlite".into(),
        auth: "off".into(),
        rate: 500,
        seconds: 20,
        warmup: 2,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--backend" => options.backend = args.next().context("--backend needs a value")?,
            "--auth" => options.auth = args.next().context("--auth needs a value")?,
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

/// A server on a port-0 listener over `state`; returns its jobs URL, its stop switch and its task.
async fn start_server(
    state: AppState,
) -> anyhow::Result<(
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<compressd::error::Result<()>>,
)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/jobs", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(compressd::server::serve(
        listener,
        state,
        async move { drop(stopped.await) },
        Duration::from_secs(5),
    ));
    Ok((url, stop, server))
}

/// Which server a request goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    Off,
    On,
}

fn report(
    options: &Options,
    label: &str,
    latencies: &mut [Duration],
    errors: u32,
    elapsed: Duration,
) -> Duration {
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p99 = percentile(latencies, 99.0);
    println!(
        "backend={} auth={label} rate={}/s seconds={} (after {} s warm-up) requests={} errors={} throughput={:.0}/s p50={:.2}ms p90={:.2}ms p99={:.2}ms max={:.2}ms",
        options.backend,
        options.rate,
        options.seconds,
        options.warmup,
        latencies.len(),
        errors,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(latencies, 50.0)),
        ms(percentile(latencies, 90.0)),
        ms(p99),
        ms(*latencies.last().unwrap_or(&Duration::ZERO)),
    );
    p99
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    if !matches!(options.auth.as_str(), "off" | "on" | "both") {
        bail!("--auth is off, on or both");
    }
    let dir = tempfile::tempdir()?;
    let figment = Settings::figment(None)?.merge(Serialized::default("data_dir", dir.path()));
    let settings = Settings::from_figment(figment)?;
    let store = store(&options.backend, dir.path()).await?;
    let clock = Arc::new(SystemClock);
    let (model, dataset) = register_inputs(&*store, &*clock).await?;
    let open = AppState {
        store: Arc::clone(&store),
        artifacts: ArtifactStore::from_settings(&settings)?,
        clock,
        metrics: Arc::new(Metrics::new()),
        config: ApiConfig::from_settings(&settings),
    };
    let mut keyed = open.clone();
    keyed.config.access.mode = AuthMode::Keys;
    keyed.config.access.limiter = KeyRateLimiter::new(1_000_000, 1_000_000);
    let made = auth::generate_key(
        &mut rand::rngs::StdRng::from_entropy(),
        "default",
        vec![Scope::Read, Scope::Write],
        chrono::Utc::now(),
    )?;
    store.insert_api_key(&made.key).await?;
    let bearer = format!("Bearer {}", made.token);
    let (open_url, open_stop, open_server) = start_server(open).await?;
    let (keyed_url, keyed_stop, keyed_server) = start_server(keyed).await?;

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
        let auth = match options.auth.as_str() {
            "on" => Auth::On,
            "both" if i % 2 == 1 => Auth::On,
            _ => Auth::Off,
        };
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, body) = (client.clone(), body.clone());
        let request = match auth {
            Auth::Off => client.post(&open_url),
            Auth::On => client.post(&keyed_url).header("authorization", &bearer),
        };
        tasks.spawn(async move {
            let response = request
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let ok = matches!(&response, Ok(r) if r.status() == 201);
            (scheduled.elapsed(), ok, counted, auth)
        });
    }
    let mut latencies = [Vec::new(), Vec::new()];
    let mut errors = [0u32; 2];
    while let Some(joined) = tasks.join_next().await {
        let (latency, ok, counted, auth) = joined?;
        if counted {
            let slot = usize::from(auth == Auth::On);
            latencies[slot].push(latency);
            errors[slot] += u32::from(!ok);
        }
    }
    let elapsed = started.elapsed();
    let _ = open_stop.send(());
    let _ = keyed_stop.send(());
    open_server.await??;
    keyed_server.await??;

    let [mut off, mut on] = latencies;
    // In `both` each mode ran half the time.
    let share = if options.auth == "both" {
        elapsed / 2
    } else {
        elapsed
    };
    let off_p99 = (!off.is_empty()).then(|| report(&options, "off", &mut off, errors[0], share));
    let on_p99 = (!on.is_empty()).then(|| report(&options, "on", &mut on, errors[1], share));
    if let (Some(off), Some(on)) = (off_p99, on_p99) {
        let ratio = on.as_secs_f64() / off.as_secs_f64();
        println!(
            "p99 with auth / without = {ratio:.3} (target <= 1.10: {})",
            if ratio <= 1.10 { "met" } else { "missed" }
        );
    }
    Ok(())
}
