//! A real job through the whole service: a tiny random BERT and a keyword dataset uploaded over
//! HTTP, a fine-tune → prune → int8 pipeline run by a worker in its child process, the stage
//! events recorded, and the outputs published as artifacts that download with their sha256.

use crate::api_models_support;
use crate::tiny_task;

use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_pipeline_runs_in_a_worker_and_publishes_its_artifacts() {
    let server = api_models_support::start(&[]).await;
    let inputs = tempfile::tempdir().unwrap();
    let model_dir = inputs.path().join("model");
    tiny_task::write_model(&model_dir).unwrap();
    let data = inputs.path().join("data.jsonl");
    tiny_task::write_data(&data).unwrap();

    let files: Vec<(&str, std::path::PathBuf)> =
        ["config.json", "model.safetensors", "tokenizer.json"]
            .into_iter()
            .map(|f| (f, model_dir.join(f)))
            .collect();
    let (status, model) = server
        .upload("/v1/models", &[("name", "tiny")], &files)
        .await;
    assert_eq!(status, 201, "{model}");
    let (status, dataset) = server
        .upload("/v1/datasets", &[], &[("data.jsonl", data.clone())])
        .await;
    assert_eq!(status, 201, "{dataset}");

    let spec = json!({
        "name": "tiny-pipeline",
        "model": model["id"], "task": {"type": "text_classification", "dataset": dataset["id"]},
        "pipeline": [
            {"type": "finetune", "epochs": 4, "learning_rate": 0.003, "batch_size": 16},
            {"type": "prune", "sparsity": 0.5, "steps": 2, "recover": {"epochs": 1, "learning_rate": 0.001}},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.2}
    });
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();

    let mut settings = WorkerSettings::with_defaults(server.dir.path()).unwrap();
    settings.executable = env!("CARGO_BIN_EXE_compressd").into();
    settings.poll_interval = Duration::from_millis(200);
    let work_dir = settings.work_dir.join(&job_id);
    let shutdown = CancellationToken::new();
    let metrics = SchedulerMetrics::default();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&server.state.store),
        server.state.artifacts.clone(),
        settings,
        metrics.clone(),
        shutdown.clone(),
    ));

    let job = wait_until_finished(&server, &job_id, Duration::from_secs(300)).await;
    shutdown.cancel();
    worker.await.unwrap();
    assert_eq!(job["status"], "succeeded", "{job:#}");

    // The worker's Prometheus metrics count the attempt and time each stage by type.
    let mut registry = prometheus_client::registry::Registry::with_prefix("compressd");
    metrics.register(&mut registry);
    let mut exported = String::new();
    prometheus_client::encoding::text::encode(&mut exported, &registry).unwrap();
    for line in [
        "compressd_job_claims_total 1",
        "compressd_job_attempts_running 0",
        "compressd_job_attempt_duration_seconds_count{status=\"succeeded\"} 1",
        "compressd_stage_duration_seconds_count{stage=\"finetune\"} 1",
        "compressd_stage_duration_seconds_count{stage=\"prune\"} 1",
        "compressd_stage_duration_seconds_count{stage=\"quantize\"} 1",
    ] {
        assert!(
            exported.lines().any(|l| l == line),
            "{line} not in:\n{exported}"
        );
    }

    // Every stage started and finished, in order, as events of the job.
    let id = uuid::Uuid::parse_str(&job_id).unwrap();
    let events = server.state.store.list_events(id, 0, 1000).await.unwrap();
    let stages = |kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.event_type == kind)
            .map(|e| e.payload["stage"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(stages("stage_started"), ["finetune", "prune", "quantize"]);
    assert_eq!(stages("stage_finished"), ["finetune", "prune", "quantize"]);
    assert!(
        events
            .iter()
            .any(|e| e.event_type == "metric" && e.payload["name"] == "2-quantize.accuracy"),
        "the quantized model's accuracy is reported as a metric"
    );

    // The result carries the verdict, the headline numbers and the published artifacts.
    let result = &job["result"];
    assert_eq!(result["final"], "2-quantize", "{result:#}");
    assert!(result["acceptance_met"].is_boolean(), "{result:#}");
    let final_accuracy = result["metrics"]["final"]["accuracy"].as_f64().unwrap();
    assert!(
        final_accuracy > 0.8,
        "the keyword task survives compression: {final_accuracy}"
    );
    let final_size = result["metrics"]["final"]["size_on_disk_bytes"]
        .as_f64()
        .unwrap();
    let baseline_size = result["metrics"]["baseline"]["size_on_disk_bytes"]
        .as_f64()
        .unwrap();
    assert!(
        final_size < baseline_size,
        "int8 is smaller: {final_size} vs {baseline_size}"
    );

    let (status, listing) = server.get(&format!("/v1/jobs/{job_id}/artifacts")).await;
    assert_eq!(status, 200);
    let artifacts = listing["artifacts"].as_array().unwrap();
    let names: Vec<&str> = artifacts
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "report.json",
        "report.md",
        "model/model.safetensors",
        "model/config.json",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    assert!(names.iter().any(|n| n.starts_with("best/")), "{names:?}");
    assert_eq!(
        result["artifacts"].as_array().unwrap().len(),
        artifacts.len()
    );

    // Downloads match the listed digests; the report covers the three stages.
    for name in ["report.json", "model/model.safetensors"] {
        let listed = artifacts.iter().find(|a| a["name"] == name).unwrap();
        let bytes = download(&server, &job_id, name).await;
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            listed["sha256"].as_str().unwrap()
        );
        assert_eq!(bytes.len() as u64, listed["bytes"].as_u64().unwrap());
    }
    let report: Value =
        serde_json::from_slice(&download(&server, &job_id, "report.json").await).unwrap();
    assert_eq!(report["stages"].as_array().unwrap().len(), 3);

    // The finished job's work folder is gone; its outputs live in the artifact store.
    assert!(!work_dir.exists(), "{} left behind", work_dir.display());
}

pub(crate) async fn wait_until_finished(
    server: &api_models_support::Server,
    job_id: &str,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, job) = server.get(&format!("/v1/jobs/{job_id}")).await;
        assert_eq!(status, 200, "{job}");
        if ["succeeded", "failed", "cancelled"]
            .contains(&job["status"].as_str().unwrap_or_default())
        {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job still {} after {timeout:?}: {job:#}",
            job["status"]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub(crate) async fn download(
    server: &api_models_support::Server,
    job_id: &str,
    name: &str,
) -> Vec<u8> {
    let response = server
        .client
        .get(format!("{}/v1/jobs/{job_id}/artifacts/{name}", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "download of {name}");
    response.bytes().await.unwrap().to_vec()
}
