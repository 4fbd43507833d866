//! Real jobs on the tiny BERT, registered straight in a store: for worker tests that need a job
//! that trains and writes models without the API.

use crate::scheduler_support::Inputs;

use std::path::Path;

use chrono::Utc;
use compressd::store::{Dataset, Model, Store};
use serde_json::json;
use uuid::Uuid;

/// Registers the tiny BERT and its keyword dataset, written under `dir`, by `file://` reference.
pub async fn seed_tiny_inputs(store: &dyn Store, dir: &Path) -> Inputs {
    let model_dir = dir.join("model");
    crate::tiny_task::write_model(&model_dir).unwrap();
    let data = dir.join("data.jsonl");
    crate::tiny_task::write_data(&data).unwrap();
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
        bytes: file_size(&model_dir.join("model.safetensors")),
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
        uri: url::Url::from_file_path(&data).unwrap().to_string(),
        bytes: file_size(&data),
        sha256: "0".repeat(64),
        rows: 240,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_dataset(&dataset).await.unwrap();
    Inputs {
        model_id: model.id,
        dataset_id: dataset.id,
    }
}

fn file_size(path: &Path) -> i64 {
    i64::try_from(std::fs::metadata(path).unwrap().len()).unwrap()
}

/// A real job: fine-tune for `epochs`, then int8; each stage writes a model.
pub fn real_spec(inputs: &Inputs, name: &str, epochs: u32) -> serde_json::Value {
    json!({
        "name": name,
        "model": inputs.model_id.to_string(),
        "task": {"type": "text_classification", "dataset": inputs.dataset_id.to_string()},
        "pipeline": [
            {"type": "finetune", "epochs": epochs, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "scheme": "int8"}
        ]
    })
}
