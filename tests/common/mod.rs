//! Shared test helpers: stores on both backends, fixtures, an in-process API client.

#![allow(dead_code)] // each test binary uses a different subset

pub mod api;
pub mod pg;

use std::sync::Arc;

use compressd::clock::{Clock, ManualClock};
use compressd::store::{Dataset, Model, NewJob, PgStore, SqliteStore, Store, DEFAULT_MAX_ATTEMPTS};
use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

/// A migrated SQLite store in a temp dir (kept alive by the returned guard).
pub async fn sqlite_store() -> (Arc<dyn Store>, TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteStore::open_file(&dir.path().join("test.db"), 4)
        .await
        .expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    (Arc::new(store), dir)
}

/// A migrated PostgreSQL store on a fresh database.
pub async fn pg_store() -> Arc<dyn Store> {
    let url = pg::fresh_database_url().await;
    let store = PgStore::connect(&url, 8).await.expect("connect postgres");
    store.migrate().await.expect("migrate postgres");
    Arc::new(store)
}

/// A deterministic clock.
pub fn clock() -> Arc<ManualClock> {
    Arc::new(ManualClock::default())
}

/// A registered-model row.
pub fn model(clock: &dyn Clock) -> Model {
    Model {
        tenant: "default".into(),
        id: clock.new_id(),
        name: "tiny-bert".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: "models/tiny-bert".into(),
        bytes: 1234,
        sha256: "ab".repeat(32),
        metadata: json!({"num_hidden_layers": 2, "layers": 2}),
        created_at: clock.now(),
    }
}

/// A registered-dataset row.
pub fn dataset(clock: &dyn Clock) -> Dataset {
    Dataset {
        tenant: "default".into(),
        id: clock.new_id(),
        name: "news".into(),
        format: "jsonl".into(),
        uri: "datasets/news.jsonl".into(),
        bytes: 999,
        sha256: "cd".repeat(32),
        rows: 10,
        metadata: json!({"labels": ["a", "b"]}),
        created_at: clock.now(),
    }
}

/// A valid job spec naming `model` and `dataset`.
pub fn spec_json(model: Uuid, dataset: Uuid) -> serde_json::Value {
    json!({
        "name": "minilm-news",
        "model": model.to_string(),
        "task": {"type": "text_classification", "dataset": dataset.to_string()},
        "pipeline": [{"type": "finetune", "epochs": 1}]
    })
}

/// A new job row for `model` and `dataset`.
pub fn new_job(clock: &dyn Clock, model: Uuid, dataset: Uuid) -> NewJob {
    NewJob {
        tenant: "default".into(),
        id: clock.new_id(),
        name: "job".into(),
        spec: spec_json(model, dataset),
        model_id: model,
        dataset_id: dataset,
        priority: 0,
        max_attempts: DEFAULT_MAX_ATTEMPTS,
        idempotency: None,
        webhooks: Vec::new(),
        created_at: clock.now(),
        max_active_jobs: None,
    }
}

/// Registers a model and a dataset, returning their ids.
pub async fn register_inputs(store: &dyn Store, clock: &dyn Clock) -> (Uuid, Uuid) {
    let model = model(clock);
    let dataset = dataset(clock);
    store.insert_model(&model).await.expect("insert model");
    store
        .insert_dataset(&dataset)
        .await
        .expect("insert dataset");
    (model.id, dataset.id)
}
