//! Shared by the real-data acceptance tests (issue 6): the gate, the shared files, and a
//! `compressd serve` child process (embedded SQLite, the in-process worker, a local artifact
//! folder) driven over real HTTP the way a user drives it: multipart uploads, a job, its SSE
//! stream, its artifacts.
//!
//! The service runs as the real binary rather than in-process so the test exercises exactly what
//! a user runs: the worker, its `compressd exec` children and the artifact commit.

#![allow(dead_code)] // each test binary uses a different subset

#[path = "../scheduler_support/sse.rs"]
pub mod sse;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sse::{Frame, SseReader};
use tempfile::TempDir;

/// How long the service gets to answer `/healthz` after it starts.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped service gets to hand its jobs back before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// One job at a time: the tests of this binary run on parallel threads, and two training jobs
/// sharing the cores would only both get slower (and their latencies less meaningful).
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared models and data (`COMPRESSD_SHARED`, else `../shared`).
///
/// # Errors
/// When any of `needed` is missing: these tests are `#[ignore]`d, so one that runs was asked for
/// and must fail rather than pass without checking anything.
pub fn shared_data(needed: &[&str]) -> Result<PathBuf> {
    let shared = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|p| !shared.join(p).exists())
        .collect();
    ensure!(
        missing.is_empty(),
        "{missing:?} not found under {} (set COMPRESSD_SHARED)",
        shared.display()
    );
    Ok(shared)
}

/// A running `compressd serve` on a free local port, with its data in a temp dir.
pub struct Service {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// The HTTP client.
    pub client: reqwest::Client,
    child: Child,
    log: PathBuf,
    dir: TempDir,
}

impl Service {
    /// Starts the service (API plus one in-process worker) and waits until it answers.
    ///
    /// # Errors
    /// When the binary does not start or does not answer within a minute.
    pub async fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let log = dir.path().join("serve.log");
        let child = Command::new(env!("CARGO_BIN_EXE_compressd"))
            .arg("serve")
            .env_remove("RUST_LOG")
            .env("COMPRESSD_LISTEN", format!("127.0.0.1:{port}"))
            .env("COMPRESSD_DATA_DIR", dir.path().join("data"))
            .env("COMPRESSD_LOG", "info")
            // Uploads and downloads of whole models; the default suits small JSON requests.
            .env("COMPRESSD_REQUEST_TIMEOUT_SECS", "600")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("start compressd serve")?;
        let service = Self {
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            child,
            log,
            dir,
        };
        service.wait_healthy().await?;
        Ok(service)
    }

    async fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let answer = self
                .client
                .get(format!("{}/healthz", self.base))
                .send()
                .await;
            if answer.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("compressd serve did not answer:\n{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of the service's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// POSTs a multipart form: text parts, then file parts streamed from disk.
    ///
    /// # Errors
    /// An unreadable file, a transport error or a non-2xx answer.
    pub async fn upload(
        &self,
        path: &str,
        texts: &[(&str, &str)],
        files: &[(String, PathBuf)],
    ) -> Result<Value> {
        let mut form = reqwest::multipart::Form::new();
        for (name, value) in texts {
            form = form.text(name.to_string(), value.to_string());
        }
        for (name, file) in files {
            let handle = tokio::fs::File::open(file).await?;
            let len = handle.metadata().await?.len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(handle));
            let part =
                reqwest::multipart::Part::stream_with_length(body, len).file_name(name.clone());
            form = form.part("file", part);
        }
        let request = self.client.post(format!("{}{path}", self.base));
        json_answer(request.multipart(form).send().await?).await
    }

    /// Registers the model folder `model` and the one-file dataset `dataset` (both under
    /// `shared`, the file uploaded under its own name) and returns their ids.
    ///
    /// # Errors
    /// An unreadable file, a refused upload or an answer without an id.
    pub async fn register_model_and_dataset(
        &self,
        shared: &Path,
        model: &str,
        dataset: &str,
    ) -> Result<(String, String)> {
        let model = self
            .upload(
                "/v1/models",
                &[("name", "minilm")],
                &folder_files(&shared.join(model))?,
            )
            .await?;
        let file = shared.join(dataset);
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .context("dataset file name")?
            .to_owned();
        let dataset = self.upload("/v1/datasets", &[], &[(name, file)]).await?;
        let id = |v: &Value| v["id"].as_str().map(str::to_owned).context("id");
        Ok((id(&model)?, id(&dataset)?))
    }

    /// POSTs JSON.
    ///
    /// # Errors
    /// A transport error or a non-2xx answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let request = self.client.post(format!("{}{path}", self.base)).json(body);
        json_answer(request.send().await?).await
    }

    /// GETs JSON.
    ///
    /// # Errors
    /// A transport error or a non-2xx answer.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        json_answer(
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .await?,
        )
        .await
    }

    /// GETs raw bytes.
    ///
    /// # Errors
    /// A transport error or a non-2xx answer.
    pub async fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        ensure!(status.is_success(), "GET {path}: {status}");
        Ok(bytes.to_vec())
    }

    /// Follows the job's SSE stream until the server ends it (after the terminal event) or
    /// `timeout` passes; prints a line per stage event as it comes.
    ///
    /// # Errors
    /// When the stream cannot be opened or does not end in time.
    pub async fn follow_events(&self, job: &str, timeout: Duration) -> Result<Vec<Frame>> {
        let response = self
            .client
            .get(format!("{}/v1/jobs/{job}/events", self.base))
            .header("accept", "text/event-stream")
            .send()
            .await?;
        ensure!(response.status().is_success(), "SSE: {}", response.status());
        let mut reader = SseReader::new(response);
        let mut frames = Vec::new();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, reader.next()).await;
            let Ok(next) = next else {
                bail!(
                    "job {job} still running after {timeout:?}:\n{}",
                    self.log_tail()
                );
            };
            let Some(frame) = next else {
                return Ok(frames);
            };
            announce(&frame, started.elapsed());
            frames.push(frame);
        }
    }

    /// Posts the job `spec`, follows its events to the end and checks what every successful
    /// pipeline shows: the job succeeded, its stream ends in `succeeded`, and each of `stages`
    /// (pipeline order) started and finished. Returns the job's final record and its events.
    ///
    /// # Errors
    /// When the job cannot be posted or its stream does not end within `timeout`.
    pub async fn run_to_success(
        &self,
        spec: &Value,
        stages: &[&str],
        timeout: Duration,
    ) -> Result<(Value, Vec<Frame>)> {
        let job = self.post_json("/v1/jobs", spec).await?;
        let id = job["id"].as_str().context("job id")?.to_owned();
        let frames = self.follow_events(&id, timeout).await?;
        let types = event_types(&frames);
        let job = self.get_json(&format!("/v1/jobs/{id}")).await?;
        assert_eq!(job["status"], "succeeded", "{job}\n{}", self.log_tail());
        assert_eq!(
            types.last().map(String::as_str),
            Some("succeeded"),
            "{types:?}"
        );
        for (index, stage) in stages.iter().enumerate() {
            for kind in ["stage_started", "stage_finished"] {
                assert!(
                    has_stage_event(&frames, kind, stage, index),
                    "no {kind} for {index}-{stage}: {types:?}"
                );
            }
        }
        Ok((job, frames))
    }

    /// Downloads every artifact of `job`, checking each body against the listing's size and
    /// sha256, and returns the listing.
    ///
    /// # Errors
    /// A failed download or a body that does not match the listing.
    pub async fn download_all(&self, job: &str, into: &Path) -> Result<Vec<Value>> {
        let listing = self.get_json(&format!("/v1/jobs/{job}/artifacts")).await?;
        let artifacts = listing["artifacts"]
            .as_array()
            .context("artifacts listing")?
            .clone();
        for artifact in &artifacts {
            let name = artifact["name"].as_str().context("artifact name")?;
            let body = self
                .get_bytes(&format!("/v1/jobs/{job}/artifacts/{name}"))
                .await?;
            ensure!(
                Some(body.len() as u64) == artifact["bytes"].as_u64(),
                "{name}: {} bytes downloaded, listing says {}",
                body.len(),
                artifact["bytes"]
            );
            let digest = hex::encode(Sha256::digest(&body));
            ensure!(
                artifact["sha256"] == digest.as_str(),
                "{name}: sha256 {digest}, listing says {}",
                artifact["sha256"]
            );
            let path = into.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, body)?;
        }
        Ok(artifacts)
    }

    /// The data folder of the service.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
}

impl Drop for Service {
    /// SIGTERM, so the worker stops its child and hands running jobs back; SIGKILL after a grace.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now (the OS picks it; it is released before the service binds).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn json_answer(response: reqwest::Response) -> Result<Value> {
    let status = response.status();
    let bytes = response.bytes().await?;
    let body: Value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

/// Prints stage boundaries and metrics as they arrive, so a long run shows where it is.
fn announce(frame: &Frame, elapsed: Duration) {
    let kind = frame.event.as_deref().unwrap_or("?");
    if matches!(kind, "progress" | "log") {
        return;
    }
    eprintln!(
        "[{:>6.1} s] {kind} {}",
        elapsed.as_secs_f64(),
        frame.data["payload"]
    );
}

/// The event types of `frames`, in order.
pub fn event_types(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f.event.clone().unwrap_or_default())
        .collect()
}

/// Whether `frames` has a `kind` event (`stage_started`/`stage_finished`) for stage `stage` at
/// pipeline position `index`.
pub fn has_stage_event(frames: &[Frame], kind: &str, stage: &str, index: usize) -> bool {
    frames.iter().any(|f| {
        f.event.as_deref() == Some(kind)
            && f.data["payload"]["stage"] == stage
            && f.data["payload"]["index"] == index
    })
}

/// The files directly in `dir` as (name, path), sorted; hidden files and subfolders (such as
/// sentence-transformers' `1_Pooling/`, which the engine does not read) skipped.
pub fn folder_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .context("file name")?
            .to_owned();
        if path.is_file() && !name.starts_with('.') {
            files.push((name, path));
        }
    }
    files.sort();
    Ok(files)
}

/// Total bytes of the files under `dir`, recursively.
pub fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| e.path())
        .map(|p| {
            if p.is_dir() {
                folder_bytes(&p)
            } else {
                std::fs::metadata(&p).map_or(0, |m| m.len())
            }
        })
        .sum()
}
