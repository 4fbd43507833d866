//! Transfer benchmark (issue 4): uploads a 2 GiB dataset through `POST /v1/datasets` and
//! downloads it back as a job artifact through `GET /v1/jobs/{id}/artifacts/{name}`, with
//! `curl` as the client, measuring throughput and the server process's peak RSS (VmHWM, reset
//! through `/proc/self/clear_refs` before each transfer). Runs on the local-folder store, and on
//! local S3 when `moto_server` is on PATH.
//!
//! Run: `cargo bench --bench transfer` (`TRANSFER_BYTES` overrides the size).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use compressd::api::metrics::Metrics;
use compressd::api::{self, ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::clock::SystemClock;
use compressd::settings::Settings;
use compressd::store::{Artifact, Dataset, Model, SqliteStore, Store};
use figment::providers::Serialized;
use serde_json::{json, Value};
use uuid::Uuid;

fn main() -> Result<()> {
    let bytes: u64 = std::env::var("TRANSFER_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2 << 30);
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("big.txt");
    write_text(&file, bytes)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("| store | direction | bytes | seconds | MB/s | server peak RSS (MB) |");
    println!("|---|---|---|---|---|---|");
    tracing_subscriber::fmt().with_env_filter("warn").init();
    if std::env::var_os("TRANSFER_SKIP_LOCAL").is_none() {
        runtime.block_on(run("local folder", &file, &[]))?;
    }
    match start_moto() {
        Some((mut moto, endpoint)) => {
            let bucket = "transfer-bench";
            Command::new("curl")
                .args(["-sf", "-X", "PUT", &format!("{endpoint}/{bucket}")])
                .status()?;
            let overrides = [
                ("artifacts_url", json!(format!("s3://{bucket}/bench"))),
                ("s3_endpoint", json!(endpoint)),
                ("s3_region", json!("us-east-1")),
                ("s3_access_key_id", json!("testing")),
                ("s3_secret_access_key", json!("testing")),
                ("s3_allow_http", json!(true)),
            ];
            let result = runtime.block_on(run("local S3 (moto)", &file, &overrides));
            let _ = moto.kill();
            result?;
        }
        None => println!("(local S3 skipped: moto_server not on PATH)"),
    }
    Ok(())
}

/// Lines of text, so the upload is a valid `text` dataset.
fn write_text(path: &Path, bytes: u64) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut written = 0u64;
    let mut n = 0u64;
    while written < bytes {
        let line = format!("line {n} of the transfer benchmark, some words to make it longer\n");
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
        n += 1;
    }
    out.flush()?;
    Ok(())
}

fn start_moto() -> Option<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let endpoint = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &endpoint])
            .status()
            .ok()?
            .success()
        {
            return Some((child, endpoint));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

async fn run(label: &str, file: &PathBuf, overrides: &[(&str, Value)]) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut figment = Settings::figment(None)?.merge(Serialized::default("data_dir", dir.path()));
    figment = figment.merge(Serialized::default("dataset_upload_max_bytes", 4u64 << 30));
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value));
    }
    let settings = Settings::from_figment(figment)?;
    let store = Arc::new(SqliteStore::open_file(&dir.path().join("db.sqlite"), 4).await?);
    store.migrate().await?;
    let state = AppState {
        store: store.clone(),
        artifacts: ArtifactStore::from_settings(&settings)?,
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        config: ApiConfig::from_settings(&settings),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let router = api::router(state);
    tokio::spawn(async move { axum::serve(listener, router).await });
    let size = std::fs::metadata(file)?.len();

    reset_peak_rss();
    let started = Instant::now();
    let form = format!("file=@{};filename=big.txt", file.display());
    let out = curl(&[
        "-sS",
        "-F",
        "format=text",
        "-F",
        &form,
        &format!("{base}/v1/datasets"),
    ])
    .await?;
    let upload_secs = started.elapsed().as_secs_f64();
    let dataset: Value = serde_json::from_slice(&out).context("upload answer")?;
    let Some(dataset_uri) = dataset["id"]
        .as_str()
        .map(|id| format!("datasets/{id}/big.txt"))
    else {
        bail!("upload failed: {dataset}");
    };
    report(label, "upload", size, upload_secs);

    let job = artifact_job(&*store, &base, &dataset_uri, size).await?;
    reset_peak_rss();
    let started = Instant::now();
    curl(&[
        "-sSf",
        "-o",
        "/dev/null",
        &format!("{base}/v1/jobs/{job}/artifacts/big.txt"),
    ])
    .await?;
    report(label, "download", size, started.elapsed().as_secs_f64());
    Ok(())
}

/// A job (over placeholder model and dataset rows) whose artifact is the uploaded object.
async fn artifact_job(store: &dyn Store, base: &str, uri: &str, size: u64) -> Result<Uuid> {
    let now = Utc::now();
    let model = Model {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "m".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: "models/x/".into(),
        bytes: 1,
        sha256: "0".into(),
        metadata: json!({}),
        created_at: now,
    };
    let dataset = Dataset {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "d".into(),
        format: "jsonl".into(),
        uri: "datasets/x".into(),
        bytes: 1,
        sha256: "0".into(),
        rows: 2,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_model(&model).await?;
    store.insert_dataset(&dataset).await?;
    let spec = json!({"name": "bench", "model": model.id, "pipeline": [{"type": "finetune"}],
        "task": {"type": "text_classification", "dataset": dataset.id}})
    .to_string();
    let out = curl(&[
        "-sS",
        "-H",
        "content-type: application/json",
        "-d",
        &spec,
        &format!("{base}/v1/jobs"),
    ])
    .await?;
    let job: Value = serde_json::from_slice(&out)?;
    let id: Uuid = job["id"].as_str().context("job id")?.parse()?;
    store
        .insert_artifact(&Artifact {
            job_id: id,
            attempt: 1,
            name: "big.txt".into(),
            kind: "model".into(),
            format: "text".into(),
            bytes: size as i64,
            sha256: "0".into(),
            uri: uri.into(),
            created_at: now,
        })
        .await?;
    Ok(id)
}

async fn curl(args: &[&str]) -> Result<Vec<u8>> {
    let out = tokio::process::Command::new("curl")
        .args(args)
        .output()
        .await?;
    if !out.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn report(label: &str, direction: &str, bytes: u64, seconds: f64) {
    let mbps = bytes as f64 / seconds / 1e6;
    println!(
        "| {label} | {direction} | {bytes} | {seconds:.1} | {mbps:.0} | {:.0} |",
        peak_rss_mb()
    );
}
