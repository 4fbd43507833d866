//! `POST/GET/DELETE /v1/models` against a real server: the shared MiniLM folder by upload and by
//! `file://` reference, the SmolLM2 GGUF by upload, and every bad input of issue 4 answered with
//! a 4xx that leaves no object behind.

use crate::api_models_support as support;

use std::path::Path;

use serde_json::{json, Value};
use support::{folder_files, sha256_file, shared, start, Server};

/// Parameters of all-MiniLM-L6-v2: the element count of its F32 tensors, from its safetensors
/// header (python: sum(prod(shape)) over dtype == F32), i.e. without the I64 `position_ids`.
const MINILM_PARAMETERS: u64 = 22_713_216;

fn minilm(shared: &Path) -> Vec<(String, std::path::PathBuf)> {
    folder_files(&shared.join("models/all-MiniLM-L6-v2"))
}

async fn upload_minilm(server: &Server, shared: &Path) -> (u16, Value) {
    let owned = minilm(shared);
    let files: Vec<(&str, std::path::PathBuf)> =
        owned.iter().map(|(n, p)| (n.as_str(), p.clone())).collect();
    server
        .upload("/v1/models", &[("name", "minilm")], &files)
        .await
}

fn assert_minilm(model: &Value, shared: &Path) {
    assert_eq!(model["architecture"], "bert");
    assert_eq!(model["format"], "safetensors");
    assert_eq!(model["parameters"], MINILM_PARAMETERS);
    let files = minilm(shared);
    let total: u64 = files
        .iter()
        .map(|(_, p)| std::fs::metadata(p).unwrap().len())
        .sum();
    assert_eq!(model["bytes"], total);
    assert_eq!(model["files"].as_array().unwrap().len(), files.len());
    let weights = model["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "model.safetensors")
        .unwrap();
    let path = shared.join("models/all-MiniLM-L6-v2/model.safetensors");
    assert_eq!(weights["sha256"], sha256_file(&path));
    assert_eq!(weights["bytes"], std::fs::metadata(&path).unwrap().len());
}

#[tokio::test]
#[ignore = "needs ../shared: cargo test --test api models:: -- --ignored"]
async fn registers_minilm_by_upload_and_by_file_reference() {
    let shared = shared();
    let server = start(&[]).await;
    let (status, uploaded) = upload_minilm(&server, &shared).await;
    assert_eq!(status, 201, "{uploaded}");
    assert_minilm(&uploaded, &shared);
    assert_eq!(uploaded["name"], "minilm");
    assert_eq!(uploaded["source"], "upload");
    let id = uploaded["id"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v1/models/{id}")).await.1, uploaded);
    let stored = server.stored_files();
    assert_eq!(stored.len(), minilm(&shared).len(), "{stored:?}");

    let uri = format!(
        "file://{}",
        shared
            .join("models/all-MiniLM-L6-v2")
            .canonicalize()
            .unwrap()
            .display()
    );
    let (status, referenced) = server.post_json("/v1/models", &json!({"uri": uri})).await;
    assert_eq!(status, 201, "{referenced}");
    assert_minilm(&referenced, &shared);
    assert_eq!(referenced["name"], "all-MiniLM-L6-v2");
    assert_eq!(referenced["source"], uri);
    assert_eq!(
        referenced["sha256"], uploaded["sha256"],
        "same files, same manifest digest"
    );

    let (status, list) = server.get("/v1/models?limit=1").await;
    assert_eq!(status, 200);
    assert_eq!(list["models"].as_array().unwrap().len(), 1);
    assert!(list["next"].is_string());
}

#[tokio::test]
#[ignore = "needs ../shared: cargo test --test api models:: -- --ignored"]
async fn registers_the_smollm2_gguf_by_upload() {
    let shared = shared();
    let server = start(&[]).await;
    let dir = shared.join("models/SmolLM2-135M-Instruct-Q4_1");
    let files = [
        (
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            dir.join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
        ("tokenizer.json", dir.join("tokenizer.json")),
    ];
    let (status, model) = server.upload("/v1/models", &[], &files).await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["architecture"], "llama");
    assert_eq!(model["format"], "gguf");
    assert_eq!(model["name"], "SmolLM2-135M-Instruct.Q4_1");
    // shared/README.md: 134.5M parameters.
    let parameters = model["parameters"].as_u64().unwrap();
    assert!(
        (134_400_000..134_600_000).contains(&parameters),
        "{parameters}"
    );
    let gguf = &model["files"][0];
    assert_eq!(gguf["sha256"], sha256_file(&files[0].1));
}

#[tokio::test]
#[ignore = "needs ../shared: cargo test --test api models:: -- --ignored"]
async fn deletes_models_and_their_files_but_not_while_a_job_uses_them() {
    let shared = shared();
    let server = start(&[]).await;
    let (_, model) = upload_minilm(&server, &shared).await;
    let id = model["id"].as_str().unwrap().to_owned();
    let data = shared.join("data/sms_spam/sms_spam.jsonl");
    let (status, dataset) = server
        .upload("/v1/datasets", &[], &[("sms.jsonl", data)])
        .await;
    assert_eq!(status, 201, "{dataset}");
    let spec = json!({"name": "uses-it", "model": id, "pipeline": [{"type": "finetune"}],
        "task": {"type": "text_classification", "dataset": dataset["id"]}});
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let (status, problem) = server.delete(&format!("/v1/models/{id}")).await;
    assert_eq!(status, 409, "{problem}");
    server
        .post_json(
            &format!("/v1/jobs/{}/cancel", job["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    let (status, _) = server.delete(&format!("/v1/models/{id}")).await;
    assert_eq!(status, 204);
    assert_eq!(server.get(&format!("/v1/models/{id}")).await.0, 404);
    assert!(server
        .stored_files()
        .iter()
        .all(|f| !f.to_string_lossy().contains(&id)));
    assert_eq!(server.get("/v1/models/not-a-uuid").await.0, 400);
}
