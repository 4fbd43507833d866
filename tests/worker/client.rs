//! The command-line client against a real `compressd serve` (API and worker in one process, a
//! real job on a tiny random BERT): create from a YAML spec with local paths, follow to the end,
//! download with sha256 checks and a resumed download; bad input (no server, a bad spec, a
//! corrupt partial file) exits non-zero with the reason; `follow` resumes a dropped stream.

use crate::served;
use crate::tiny_task;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A `compressd serve` on a data folder of its own, removed with it.
struct Served {
    server: served::Served,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Served {
    type Target = served::Served;
    fn deref(&self) -> &served::Served {
        &self.server
    }
}

fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    Served {
        server: served::serve(dir.path()),
        _dir: dir,
    }
}

fn client(server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_compressd"))
        .args(args)
        .env_remove("RUST_LOG")
        .env("COMPRESSD_SERVER", server)
        .env_remove("COMPRESSD_API_KEY")
        .env("COMPRESSD_CLIENT_CONFIG", "/nonexistent/client.toml")
        .output()
        .expect("run the client")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_file(path: &Path) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// A GET straight to the server, not through the client under test.
fn get_json(url: &str) -> Value {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

fn write_inputs(dir: &Path) {
    tiny_task::write_model(&dir.join("model")).unwrap();
    tiny_task::write_data(&dir.join("data.jsonl")).unwrap();
}

#[test]
fn create_follow_and_download_a_job_from_a_yaml_spec_with_local_paths() {
    let server = serve();
    let dir = tempfile::tempdir().unwrap();
    write_inputs(dir.path());
    let spec = dir.path().join("job.yaml");
    std::fs::write(
        &spec,
        "name: cli-tiny\nmodel: ./model\ntask:\n  type: text_classification\n  dataset: data.jsonl\n\
         pipeline:\n  - type: finetune\n    epochs: 2\n    learning_rate: 0.003\n    batch_size: 16\n\
         \x20 - type: quantize\n    scheme: int8\nacceptance:\n  metric: accuracy\n  max_drop: 0.5\n",
    )
    .unwrap();

    // Run from another folder: the spec's paths are relative to the spec file.
    let out = client(
        &server.url,
        &["jobs", "create", "-f", spec.to_str().unwrap(), "--follow"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("registered model") && stderr.contains("registered dataset"),
        "{stderr}"
    );
    assert!(stdout.contains("▶ stage 1/2: finetune"), "{stdout}");
    assert!(stdout.contains("✓ stage quantize"), "{stdout}");
    assert!(stdout.contains("job succeeded"), "{stdout}");
    let id = stdout
        .split_whitespace()
        .nth(1)
        .expect("the first line names the job")
        .to_owned();

    // The server's own listing is the reference for the sha256 checks.
    let listed = client(&server.url, &["jobs", "get", &id, "--output", "json"]);
    let job: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(job["status"], "succeeded", "{job:#}");
    let artifacts = get_json(&format!("{}/v1/jobs/{id}/artifacts", server.url));
    let artifacts = artifacts["artifacts"].as_array().unwrap().clone();
    let weights = artifacts
        .iter()
        .find(|a| a["name"] == "model/model.safetensors")
        .expect("a model artifact");

    let target = dir.path().join("downloaded");
    let out = client(
        &server.url,
        &["jobs", "download", &id, "-o", target.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for artifact in &artifacts {
        let path = target.join(artifact["name"].as_str().unwrap());
        assert_eq!(sha256_file(&path), artifact["sha256"], "{}", path.display());
    }

    // An interrupted download resumes from its .part file with Range.
    let model = target.join("model/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(target.join("model/model.safetensors.part"), &bytes[..half]).unwrap();
    std::fs::remove_file(&model).unwrap();
    let out = client(
        &server.url,
        &[
            "jobs",
            "download",
            &id,
            "--artifact",
            "model/model.safetensors",
            "-o",
            target.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        report["downloaded"][0]["resumed_from"], half as u64,
        "{report}"
    );
    assert_eq!(sha256_file(&model), weights["sha256"]);
    assert!(!target.join("model/model.safetensors.part").exists());

    // A corrupt partial file is caught by the sha256 check and removed.
    std::fs::write(target.join("model/model.safetensors.part"), vec![7u8; half]).unwrap();
    std::fs::remove_file(&model).unwrap();
    let out = client(
        &server.url,
        &[
            "jobs",
            "download",
            &id,
            "--artifact",
            "model/model.safetensors",
            "-o",
            target.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("sha256"),
        "{}",
        text(&out.stderr)
    );
    assert!(!model.exists() && !target.join("model/model.safetensors.part").exists());

    let listed = client(&server.url, &["jobs", "list", "--output", "json"]);
    let page: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(page["jobs"][0]["id"], id.as_str());
    let out = client(&server.url, &["jobs", "delete", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = client(&server.url, &["jobs", "get", &id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
}

#[test]
fn bad_input_exits_non_zero_with_the_reason() {
    let out = client("http://127.0.0.1:9", &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach the compressd server at http://127.0.0.1:9"),
        "{}",
        text(&out.stderr)
    );
    let out = client("ftp://x", &["jobs", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("COMPRESSD_SERVER"),
        "{}",
        text(&out.stderr)
    );

    let server = serve();
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(
        &spec,
        r#"{"name": "bad", "model": "0192f0a0-0000-7000-8000-000000000000",
            "task": {"type": "text_classification", "dataset": "0192f0a0-0000-7000-8000-000000000001"},
            "pipeline": [{"type": "finetune", "epochs": 0}]}"#,
    )
    .unwrap();
    let out = client(
        &server.url,
        &["jobs", "create", "-f", spec.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("422") && stderr.contains("/pipeline/0/epochs"),
        "{stderr}"
    );
    let out = client(
        &server.url,
        &[
            "jobs",
            "create",
            "-f",
            spec.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let problem: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(problem["pointer"], "/pipeline/0/epochs", "{problem}");

    std::fs::write(&spec, r#"{"name": "bad", "model": "./missing-folder", "task": {"type": "text_classification", "dataset": "0192f0a0-0000-7000-8000-000000000001"}, "pipeline": []}"#).unwrap();
    let out = client(
        &server.url,
        &["jobs", "create", "-f", spec.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("/model"),
        "{}",
        text(&out.stderr)
    );

    let out = client(
        &server.url,
        &["jobs", "follow", "0192f0a0-0000-7000-8000-000000000000"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
}

/// A fake server whose event stream drops after the first events: the client reconnects with
/// `Last-Event-ID`, shows each event once, and exits with the job's outcome (failed: 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_resumes_a_dropped_stream_and_exits_with_the_outcome() {
    use axum::http::HeaderMap;
    use axum::routing::get;
    use std::sync::{Arc, Mutex};

    let job = "0192f0a0-0000-7000-8000-0000000000aa";
    let resumes = Arc::new(Mutex::new(Vec::<Option<String>>::new()));
    let seen = Arc::clone(&resumes);
    let event = move |seq: i64, kind: &str, payload: Value| {
        let data = serde_json::json!({"seq": seq, "job_id": job, "attempt": 1, "type": kind,
            "payload": payload, "created_at": "2026-12-06T00:00:00Z"});
        format!("id: {seq}\nevent: {kind}\ndata: {data}\n\n")
    };
    let app = axum::Router::new()
        .route(
            "/v1/jobs/{id}/events",
            get(move |headers: HeaderMap| {
                let seen = Arc::clone(&seen);
                async move {
                    let last = headers
                        .get("last-event-id")
                        .map(|v| v.to_str().unwrap().to_owned());
                    seen.lock().unwrap().push(last.clone());
                    let body = match last.as_deref() {
                        // The first connection ends after two events, as a dropped one would.
                        None => {
                            event(
                                1,
                                "stage_started",
                                serde_json::json!({"stage": "finetune", "index": 0, "stages": 1}),
                            ) + &event(
                                2,
                                "metric",
                                serde_json::json!({"name": "loss", "value": 0.5, "step": 3}),
                            )
                        }
                        Some(_) => event(
                            3,
                            "failed",
                            serde_json::json!({"error": {"message": "out of memory"}}),
                        ),
                    };
                    ([("content-type", "text/event-stream")], body)
                }
            }),
        )
        .route(
            "/v1/jobs/{id}",
            get(move || async move {
                axum::Json(
                    serde_json::json!({"id": job, "name": "x", "status": "failed",
                    "error": {"message": "out of memory"}}),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let out = tokio::task::spawn_blocking(move || client(&url, &["jobs", "follow", job]))
        .await
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert_eq!(
        stdout.matches("▶ stage 1/1: finetune").count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("loss = 0.5 (step 3)"), "{stdout}");
    assert!(stdout.contains("job failed: out of memory"), "{stdout}");
    assert_eq!(*resumes.lock().unwrap(), vec![None, Some("2".to_owned())]);
}
