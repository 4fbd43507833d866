//! Shared by the model, dataset and artifact API tests: a real server on a port-0 listener over
//! SQLite and a local artifact folder, streaming multipart uploads, and the shared test files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use compressd::api::metrics::Metrics;
use compressd::api::{self, ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::clock::SystemClock;
use compressd::settings::Settings;
use compressd::store::{SqliteStore, Store};
use figment::providers::Serialized;
use serde_json::Value;
use tempfile::TempDir;

/// A running API.
pub struct Server {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub state: AppState,
    /// Data dir: database and artifact folder.
    pub dir: TempDir,
    pub client: reqwest::Client,
}

/// The shared models and data (`COMPRESSD_SHARED`, else `../shared`).
///
/// # Panics
/// When they are not there: the tests that call this are `#[ignore]`d, so one that runs was asked
/// for and must fail rather than pass without checking anything.
pub fn shared() -> PathBuf {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    assert!(
        dir.join("models").is_dir(),
        "shared test data not found at {} (set COMPRESSD_SHARED)",
        dir.display()
    );
    dir
}

/// Starts a server with default settings plus `overrides` (`allowed_file_roots` defaults to
/// the shared folder and the temp dir).
pub async fn start(overrides: &[(&str, Value)]) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let mut figment = Settings::figment(None)
        .expect("defaults")
        .merge(Serialized::default("data_dir", dir.path()))
        .merge(Serialized::default(
            "allowed_file_roots",
            vec![shared, dir.path().to_path_buf()],
        ));
    for (key, value) in overrides {
        figment = figment.merge(Serialized::default(key, value));
    }
    let settings = Settings::from_figment(figment).expect("settings");
    let store = SqliteStore::open_file(&dir.path().join("compressd.db"), 4)
        .await
        .expect("sqlite");
    store.migrate().await.expect("migrate");
    let state = AppState {
        store: Arc::new(store),
        artifacts: ArtifactStore::from_settings(&settings).expect("artifact store"),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        config: ApiConfig::from_settings(&settings),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let router = api::router(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        base,
        state,
        dir,
        client: reqwest::Client::new(),
    }
}

impl Server {
    /// Every file left in the artifact folder (staging files included).
    pub fn stored_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        walk(&self.dir.path().join("artifacts"), &mut out);
        out
    }

    /// Asserts that a refused registration left no file and no model record behind.
    pub async fn assert_nothing_left(&self) {
        assert!(
            self.stored_files().is_empty(),
            "left behind: {:?}",
            self.stored_files()
        );
        assert_eq!(
            self.get("/v1/models").await.1["models"],
            Value::Array(Vec::new())
        );
    }

    /// POSTs a multipart form of text parts then file parts streamed from disk.
    pub async fn upload(
        &self,
        path: &str,
        texts: &[(&str, &str)],
        files: &[(&str, PathBuf)],
    ) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new();
        for (name, value) in texts {
            form = form.text(name.to_string(), value.to_string());
        }
        for (name, file) in files {
            let handle = tokio::fs::File::open(file).await.expect("open upload");
            let len = handle.metadata().await.expect("metadata").len();
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(handle));
            let part =
                reqwest::multipart::Part::stream_with_length(body, len).file_name(name.to_string());
            form = form.part("file", part);
        }
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .multipart(form)
            .send()
            .await
            .expect("send");
        decode(response).await
    }

    /// POSTs in-memory files.
    pub async fn upload_bytes(
        &self,
        path: &str,
        texts: &[(&str, &str)],
        files: &[(&str, Vec<u8>)],
    ) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new();
        for (name, value) in texts {
            form = form.text(name.to_string(), value.to_string());
        }
        for (name, bytes) in files {
            form = form.part(
                "file",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_string()),
            );
        }
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .multipart(form)
            .send()
            .await
            .expect("send");
        decode(response).await
    }

    /// POSTs JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        decode(
            self.client
                .post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await
                .expect("send"),
        )
        .await
    }

    /// GETs JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        decode(
            self.client
                .get(format!("{}{path}", self.base))
                .send()
                .await
                .expect("send"),
        )
        .await
    }

    /// DELETEs.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        decode(
            self.client
                .delete(format!("{}{path}", self.base))
                .send()
                .await
                .expect("send"),
        )
        .await
    }
}

async fn decode(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

/// Regular files under `dir`, recursively.
pub fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.path().is_dir() {
            walk(&entry.path(), out);
        } else {
            out.push(entry.path());
        }
    }
}

/// The files of a model folder as (name inside the folder, path), hidden files skipped.
pub fn folder_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut paths = Vec::new();
    walk(dir, &mut paths);
    let mut files: Vec<(String, PathBuf)> = paths
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir)
                    .expect("inside")
                    .to_string_lossy()
                    .into_owned(),
                p,
            )
        })
        .filter(|(name, _)| !name.starts_with('.'))
        .collect();
    files.sort();
    files
}

/// The problem `type` slug of an error body.
pub fn slug(body: &Value) -> &str {
    body["type"]
        .as_str()
        .and_then(|t| t.rsplit(':').next())
        .unwrap_or("<none>")
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).expect("read")))
}
