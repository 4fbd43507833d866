//! Helpers shared by the scheduler, worker and event tests: tiny inputs on disk, dry-run jobs,
//! and event checks.

#![allow(dead_code)] // each test binary uses a different subset

pub mod backends;
pub mod sse;

use std::path::Path;
use std::sync::Arc;

use chrono::Utc;
use compressd::store::{Dataset, Job, JobEvent, Model, NewJob, Store};
use serde_json::json;
use uuid::Uuid;

/// A registered model and dataset whose files exist under `dir`.
pub struct Inputs {
    pub model_id: Uuid,
    pub dataset_id: Uuid,
}

/// Writes a tiny "model" (a weights file of 4 KiB: planning only reads sizes) and a 10-row JSONL
/// dataset under `dir`, and registers both with `file://` URIs.
pub async fn seed_inputs(store: &dyn Store, dir: &Path) -> Inputs {
    let model_dir = dir.join("model");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.safetensors"), vec![0u8; 4096]).unwrap();
    let rows: String = (0..10)
        .map(|i| format!("{{\"text\":\"row {i}\",\"label\":\"a\"}}\n"))
        .collect();
    let dataset_file = dir.join("data.jsonl");
    std::fs::write(&dataset_file, rows).unwrap();
    let now = Utc::now();
    let model = Model {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "tiny".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: url::Url::from_directory_path(&model_dir)
            .unwrap()
            .to_string(),
        bytes: 4096,
        sha256: "0".repeat(64),
        metadata: json!({}),
        created_at: now,
    };
    store.insert_model(&model).await.unwrap();
    let dataset = Dataset {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "tiny".into(),
        format: "jsonl".into(),
        uri: url::Url::from_file_path(&dataset_file).unwrap().to_string(),
        bytes: 10,
        sha256: "0".repeat(64),
        rows: 10,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_dataset(&dataset).await.unwrap();
    Inputs {
        model_id: model.id,
        dataset_id: dataset.id,
    }
}

/// A valid dry-run spec over `inputs`.
pub fn dry_run_spec(inputs: &Inputs, name: &str) -> serde_json::Value {
    json!({
        "name": name,
        "model": inputs.model_id.to_string(),
        "task": {"type": "text_classification", "dataset": inputs.dataset_id.to_string()},
        "pipeline": [{"type": "finetune", "epochs": 1}],
        "dry_run": true
    })
}

/// Inserts a queued job with `spec`, `priority` and `max_attempts`.
pub async fn queue_job(
    store: &dyn Store,
    inputs: &Inputs,
    spec: serde_json::Value,
    priority: i32,
    max_attempts: i32,
) -> Job {
    let job = NewJob {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: spec["name"].as_str().unwrap_or("job").to_owned(),
        spec,
        model_id: inputs.model_id,
        dataset_id: inputs.dataset_id,
        priority,
        max_attempts,
        idempotency: None,
        webhooks: Vec::new(),
        created_at: Utc::now(),
        max_active_jobs: None,
    };
    store.create_job(job).await.unwrap().job().clone()
}

/// Every event of a job, oldest first.
pub async fn all_events(store: &dyn Store, job_id: Uuid) -> Vec<JobEvent> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = store.list_events(job_id, after, 100).await.unwrap();
        let Some(last) = page.last() else {
            return events;
        };
        after = last.seq;
        events.extend(page);
    }
}

/// The number of events of `job_id` whose type is one of the terminal ones.
pub fn terminal_count(events: &[JobEvent]) -> usize {
    events
        .iter()
        .filter(|e| compressd::events::is_terminal(&e.event_type))
        .count()
}

/// The store, shared.
pub type SharedStore = Arc<dyn Store>;

/// An artifact store in a folder under `dir` (what a worker publishes to and reads inputs from).
pub fn local_artifacts(dir: &Path) -> compressd::artifacts::ArtifactStore {
    compressd::artifacts::ArtifactStore::open(&compressd::artifacts::StoreConfig {
        url: None,
        default_dir: dir.join("artifacts"),
        s3: compressd::artifacts::S3Config::default(),
        part_size_bytes: compressd::artifacts::MIN_PART_SIZE,
        max_inflight_parts: 2,
    })
    .unwrap()
}
