//! Event streaming on Postgres: latency from an event's commit to an SSE client of *another* API
//! process, and the memory of many open streams in that process.
//!
//! The API is a real `compressd serve --no-worker` child process; this process writes the events
//! with the worker's fenced writes, so every event reaches the server only through Postgres
//! `NOTIFY` and its listener, as in a deployment with separate worker and API replicas.
//!
//! ```sh
//! cargo bench --profile dev --bench sse_events -- --events 500 --streams 1000
//! ```

#[path = "../tests/common/pg.rs"]
mod pg;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chrono::Utc;
use compressd::store::{Dataset, Lease, Model, NewJob, PgStore, Store};
use futures::StreamExt;
use serde_json::json;
use uuid::Uuid;

struct Options {
    events: usize,
    streams: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut options = Options {
        events: 500,
        streams: 1000,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--events" => {
                options.events = args.next().context("--events needs a value")?.parse()?
            }
            "--streams" => {
                options.streams = args.next().context("--streams needs a value")?.parse()?
            }
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

/// The API server child; killed when dropped.
struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    async fn start(database_url: &str, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_compressd"))
            .args(["serve", "--no-worker"])
            .env("COMPRESSD_DATABASE_URL", database_url)
            .env("COMPRESSD_DATA_DIR", data_dir)
            .env("COMPRESSD_LISTEN", format!("127.0.0.1:{port}"))
            .env("COMPRESSD_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{}/healthz", server.base))
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("the server did not start");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// Resident memory of the server process, bytes.
    fn rss(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS")?
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    }
}

/// A running job in `store`, claimed by this process so it can write events.
async fn running_job(store: &Arc<dyn Store>) -> anyhow::Result<Lease> {
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
    let spec = json!({"name": "sse", "model": model.id, "task": {"type": "text_classification", "dataset": dataset.id},
        "pipeline": [{"type": "finetune"}], "dry_run": true});
    let job = NewJob {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "sse".into(),
        spec,
        model_id: model.id,
        dataset_id: dataset.id,
        priority: 0,
        max_attempts: 3,
        idempotency: None,
        webhooks: Vec::new(),
        created_at: now,
        max_active_jobs: None,
    };
    store.create_job(job).await?;
    let claimed = store
        .claim_next("bench", Duration::from_secs(3600))
        .await?
        .context("the job is claimable")?;
    Ok(Lease {
        job_id: claimed.id,
        attempt: claimed.attempt,
        owner: "bench".into(),
    })
}

/// An SSE stream of `job` from after `after_seq`.
async fn open_stream(base: &str, job: Uuid, after_seq: i64) -> anyhow::Result<reqwest::Response> {
    let response = reqwest::Client::new()
        .get(format!("{base}/v1/jobs/{job}/events"))
        .header("accept", "text/event-stream")
        .header("last-event-id", after_seq.to_string())
        .send()
        .await?;
    if !response.status().is_success() {
        bail!("stream answered {}", response.status());
    }
    Ok(response)
}

/// Latency, in ms, from commit (the append returned) to the frame's arrival, for `events` events
/// sent 10 ms apart, on a stream opened after `after_seq`. Returns the sorted latencies and the
/// last seq written.
async fn latencies(
    server: &Server,
    store: &Arc<dyn Store>,
    lease: &Lease,
    events: usize,
    after_seq: i64,
) -> anyhow::Result<(Vec<f64>, i64)> {
    let mut body = open_stream(&server.base, lease.job_id, after_seq)
        .await?
        .bytes_stream();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    // The reader stamps each data frame's arrival; the replayed frames (queued, status) come first.
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        while let Some(Ok(chunk)) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                if frame.contains("event: log") && tx.send(Instant::now()).is_err() {
                    return;
                }
            }
        }
    });
    let mut result = Vec::with_capacity(events);
    let mut last_seq = after_seq;
    for n in 0..events {
        last_seq = store
            .append_fenced_event(
                lease,
                "log",
                json!({"level": "info", "message": format!("event {n}")}),
            )
            .await?
            .seq;
        let committed = Instant::now();
        let arrived = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await?
            .context("stream ended")?;
        // An arrival before the writer saw its commit returned counts as zero latency.
        result.push(arrived.saturating_duration_since(committed).as_secs_f64() * 1e3);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    result.sort_by(f64::total_cmp);
    Ok((result, last_seq))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let options = options()?;
    let dir = tempfile::tempdir()?;
    let url = pg::fresh_database_url().await;
    let store: Arc<dyn Store> = Arc::new(PgStore::connect(&url, 8).await?);
    store.migrate().await?;
    let server = Server::start(&url, dir.path()).await?;
    let lease = running_job(&store).await?;

    let (measured, last_seq) = latencies(&server, &store, &lease, options.events, 0).await?;
    println!(
        "commit->SSE latency over {} events: p50={:.2} ms p99={:.2} ms max={:.2} ms",
        measured.len(),
        percentile(&measured, 0.5),
        percentile(&measured, 0.99),
        measured[measured.len() - 1]
    );

    let idle = server.rss()?;
    let mut streams = Vec::with_capacity(options.streams);
    for _ in 0..options.streams {
        streams.push(open_stream(&server.base, lease.job_id, last_seq).await?);
    }
    // One event for every stream to deliver, then let the server settle.
    let last_seq = store
        .append_fenced_event(&lease, "log", json!({"level": "info", "message": "to all"}))
        .await?
        .seq;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let open = server.rss()?;
    let (with_streams, _) = latencies(&server, &store, &lease, 100, last_seq).await?;
    println!(
        "server RSS: {:.1} MB idle, {:.1} MB with {} open streams ({:.1} KB per stream); latency with them open: p50={:.2} ms p99={:.2} ms",
        idle as f64 / 1e6,
        open as f64 / 1e6,
        streams.len(),
        (open.saturating_sub(idle)) as f64 / 1e3 / streams.len() as f64,
        percentile(&with_streams, 0.5),
        percentile(&with_streams, 0.99),
    );
    drop(streams);
    Ok(())
}
