//! `GET /v1/jobs/{id}/artifacts[/{name}]`: listing, streaming downloads with ETag = sha256,
//! Content-Length, Range (206/416), If-None-Match (304), and a folder of artifacts as one tar.

use crate::api_models_support as support;

use bytes::Bytes;
use chrono::Utc;
use compressd::store::{Artifact, Dataset, Model};
use serde_json::json;
use sha2::{Digest, Sha256};
use support::{start, Server};
use uuid::Uuid;

/// A queued job (over placeholder model and dataset rows) with three stored artifacts.
async fn job_with_artifacts(server: &Server) -> (String, Vec<u8>) {
    let store = &server.state.store;
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
        uri: "datasets/x/d.jsonl".into(),
        bytes: 1,
        sha256: "0".into(),
        rows: 2,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_model(&model).await.unwrap();
    store.insert_dataset(&dataset).await.unwrap();
    let spec = json!({"name": "j", "model": model.id, "pipeline": [{"type": "finetune"}],
        "task": {"type": "text_classification", "dataset": dataset.id}});
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let files = [
        (
            "model/model.safetensors",
            "model",
            "safetensors",
            weights.clone(),
        ),
        ("model/config.json", "model", "json", b"{}".to_vec()),
        ("report.json", "report", "json", b"{\"ok\":true}".to_vec()),
    ];
    for (name, kind, format, bytes) in files {
        let uri = format!("jobs/{id}/attempt-1/{name}");
        server
            .state
            .artifacts
            .put_small(&uri, Bytes::from(bytes.clone()))
            .await
            .unwrap();
        let artifact = Artifact {
            job_id: id.parse().unwrap(),
            attempt: 1,
            name: name.into(),
            kind: kind.into(),
            format: format.into(),
            bytes: bytes.len() as i64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            uri,
            created_at: now,
        };
        store.insert_artifact(&artifact).await.unwrap();
    }
    (id, weights)
}

#[tokio::test]
async fn lists_and_streams_artifacts_with_etag_range_and_length() {
    let server = start(&[]).await;
    let (id, weights) = job_with_artifacts(&server).await;
    let (status, list) = server.get(&format!("/v1/jobs/{id}/artifacts")).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{list}");
    let url = format!(
        "{}/v1/jobs/{id}/artifacts/model/model.safetensors",
        server.base
    );
    let full = server.client.get(&url).send().await.unwrap();
    assert_eq!(full.status(), 200);
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(&weights)));
    assert_eq!(full.headers()["etag"], etag.as_str());
    assert_eq!(
        full.headers()["content-length"],
        weights.len().to_string().as_str()
    );
    assert_eq!(full.bytes().await.unwrap(), weights);

    let part = server
        .client
        .get(&url)
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()["content-range"],
        format!("bytes 1000-1999/{}", weights.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap(), weights[1000..2000]);
    let tail = server
        .client
        .get(&url)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(tail.bytes().await.unwrap(), weights[weights.len() - 10..]);
    let past = server
        .client
        .get(&url)
        .header("range", "bytes=999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(past.status(), 416);
    let cached = server
        .client
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);

    assert_eq!(
        server
            .get(&format!("/v1/jobs/{id}/artifacts/nope.bin"))
            .await
            .0,
        404
    );
    assert_eq!(
        server
            .get(&format!("/v1/jobs/{}/artifacts", Uuid::now_v7()))
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn a_model_folder_downloads_as_one_tar() {
    let server = start(&[]).await;
    let (id, weights) = job_with_artifacts(&server).await;
    let response = server
        .client
        .get(format!("{}/v1/jobs/{id}/artifacts/model.tar", server.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let length: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let archive = response.bytes().await.unwrap();
    assert_eq!(archive.len(), length);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.tar"), &archive).unwrap();
    let status = std::process::Command::new("tar")
        .arg("-xf")
        .arg("m.tar")
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        std::fs::read(dir.path().join("model/model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(
        std::fs::read(dir.path().join("model/config.json")).unwrap(),
        b"{}"
    );
    assert!(!dir.path().join("report.json").exists());
}
