//! The artifact store and the API against a local S3 server (`moto_server`): multipart uploads
//! across several parts, ranged reads, aborted uploads leaving nothing, presigned URLs, an
//! `s3://` model reference, and 302 download redirects.
//!
//! Uses `COMPRESSD_TEST_S3_ENDPOINT` when set; otherwise starts `moto_server` from PATH (`.ci/run`
//! installs it), and fails when neither is there rather than pass without checking anything.

use crate::api_models_support as support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use compressd::artifacts::{ArtifactStore, S3Config, StoreConfig, MIN_PART_SIZE};
use futures::TryStreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};

/// A local S3 endpoint, stopped on drop when this test started it.
pub(crate) struct LocalS3 {
    /// The endpoint URL (`http://127.0.0.1:<port>`).
    pub(crate) endpoint: String,
    child: Option<Child>,
}

impl Drop for LocalS3 {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The local S3 server.
///
/// # Panics
/// When there is neither `COMPRESSD_TEST_S3_ENDPOINT` nor a `moto_server` that answers.
pub(crate) async fn local_s3() -> LocalS3 {
    if let Ok(endpoint) = std::env::var("COMPRESSD_TEST_S3_ENDPOINT") {
        return LocalS3 {
            endpoint,
            child: None,
        };
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "no COMPRESSD_TEST_S3_ENDPOINT and no moto_server on PATH (pip install 'moto[server]')",
        );
    let s3 = LocalS3 {
        endpoint: format!("http://127.0.0.1:{port}"),
        child: Some(child),
    };
    for _ in 0..100 {
        if reqwest::get(&s3.endpoint).await.is_ok() {
            return s3;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not answer on {}", s3.endpoint);
}

async fn bucket(s3: &LocalS3) -> String {
    let name = format!("b{}", uuid::Uuid::now_v7().simple());
    let status = reqwest::Client::new()
        .put(format!("{}/{name}", s3.endpoint))
        .send()
        .await
        .unwrap()
        .status();
    assert!(status.is_success(), "creating bucket: {status}");
    name
}

fn s3_config(s3: &LocalS3) -> S3Config {
    S3Config {
        endpoint: Some(s3.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        allow_http: true,
    }
}

#[tokio::test]
async fn multipart_uploads_ranges_aborts_and_presigned_urls() {
    let s3 = local_s3().await;
    let bucket = bucket(&s3).await;
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&StoreConfig {
        url: Some(format!("s3://{bucket}/pre")),
        default_dir: dir.path().into(),
        s3: s3_config(&s3),
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 2,
    })
    .unwrap();
    store.check().await.unwrap();
    let data: Vec<u8> = (0..(12u32 << 20)).map(|i| (i % 253) as u8).collect();
    let mut writer = store.writer("jobs/j/attempt-1/w.bin").await.unwrap();
    for chunk in data.chunks(1 << 20) {
        writer.write(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    assert!(
        store.head("jobs/j/attempt-1/w.bin").await.is_err(),
        "visible before completion"
    );
    let written = writer.finish().await.unwrap();
    assert_eq!(written.sha256, hex::encode(Sha256::digest(&data)));
    let range: Vec<Bytes> = store
        .read("jobs/j/attempt-1/w.bin", Some(5_000_000..5_000_100))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(range.concat(), data[5_000_000..5_000_100]);

    let url = store
        .presigned_get("jobs/j/attempt-1/w.bin", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let fetched = reqwest::get(url).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().len(), data.len());
    // A presigned URL carries its lifetime (`presign_ttl_secs`); S3 refuses it after that.
    // (moto does not enforce the expiry, so the test checks what is signed.)
    let short = store
        .presigned_get("jobs/j/attempt-1/w.bin", Duration::from_secs(7))
        .await
        .unwrap()
        .unwrap();
    assert!(
        short
            .query_pairs()
            .any(|(k, v)| k == "X-Amz-Expires" && v == "7"),
        "{short}"
    );

    let mut aborted = store.writer("jobs/j/attempt-2/x.bin").await.unwrap();
    aborted
        .write(Bytes::from(vec![1u8; 6 << 20]))
        .await
        .unwrap();
    aborted.abort().await.unwrap();
    let keys: Vec<String> = store
        .list("jobs")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(keys, vec!["jobs/j/attempt-1/w.bin".to_owned()]);
}

#[tokio::test]
#[ignore = "needs ../shared: cargo test --test store artifacts_s3:: -- --ignored"]
async fn the_api_registers_from_s3_and_redirects_downloads() {
    let s3 = local_s3().await;
    let shared = support::shared();
    let bucket = bucket(&s3).await;
    let s3c = s3_config(&s3);
    let server = support::start(&[
        ("artifacts_url", json!(format!("s3://{bucket}/store"))),
        ("s3_endpoint", json!(s3c.endpoint)),
        ("s3_region", json!("us-east-1")),
        ("s3_access_key_id", json!("testing")),
        ("s3_secret_access_key", json!("testing")),
        ("s3_allow_http", json!(true)),
        ("redirect_downloads", json!(true)),
    ])
    .await;
    // Put the MiniLM folder in the bucket, then register it by reference.
    let staging = ArtifactStore::open(&StoreConfig {
        url: Some(format!("s3://{bucket}/incoming/minilm")),
        default_dir: server.dir.path().into(),
        s3: s3c,
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 2,
    })
    .unwrap();
    for (name, path) in support::folder_files(&shared.join("models/all-MiniLM-L6-v2")) {
        staging
            .put_small(&name, Bytes::from(std::fs::read(path).unwrap()))
            .await
            .unwrap();
    }
    let uri = format!("s3://{bucket}/incoming/minilm/");
    let (status, model) = server
        .post_json("/v1/models", &json!({"uri": uri, "name": "from-s3"}))
        .await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(model["parameters"], 22_713_216);

    let bbc = shared.join("data/bbc_news/bbc_news.jsonl");
    let (status, dataset) = server
        .upload("/v1/datasets", &[], &[("bbc_news.jsonl", bbc)])
        .await;
    assert_eq!(status, 201, "{dataset}");
    assert_eq!(dataset["rows"], 2225);

    let stored = server.state.artifacts.list("").await.unwrap();
    assert!(
        stored.iter().any(|o| o.key.starts_with("models/")),
        "{stored:?}"
    );

    let spec = json!({"name": "j", "model": model["id"], "pipeline": [{"type": "finetune"}],
        "task": {"type": "text_classification", "dataset": dataset["id"]}});
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let job_id: uuid::Uuid = job["id"].as_str().unwrap().parse().unwrap();
    let uri = format!("jobs/{job_id}/attempt-1/report.json");
    server
        .state
        .artifacts
        .put_small(&uri, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let artifact = compressd::store::Artifact {
        job_id,
        attempt: 1,
        name: "report.json".into(),
        kind: "report".into(),
        format: "json".into(),
        bytes: 2,
        sha256: hex::encode(Sha256::digest(b"{}")),
        uri,
        created_at: chrono::Utc::now(),
    };
    server.state.store.insert_artifact(&artifact).await.unwrap();
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_follow
        .get(format!(
            "{}/v1/jobs/{job_id}/artifacts/report.json",
            server.base
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(
        location.starts_with(&s3.endpoint) && location.contains("X-Amz-Signature"),
        "{location}"
    );
    assert_eq!(
        reqwest::get(location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .as_ref(),
        b"{}"
    );
}
