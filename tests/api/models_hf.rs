//! `hf://` references against a mock Hugging Face Hub started in the test: an axum router on
//! 127.0.0.1:0 answering the two endpoints `hf-hub` calls — the repository listing
//! (`GET /api[/datasets]/{kind}/{org}/{name}/revision/{rev}`) and file downloads
//! (`GET /[datasets/]{org}/{name}/resolve/{rev}/{file}` with `Range`, `ETag`, `X-Repo-Commit`
//! and `Content-Range`, as `hf_hub::api::tokio` reads them). It serves a tiny random BERT, a
//! broken repository and a dataset, and logs every download so the tests can tell what was fetched.

use crate::api_models_support as support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{slug, start, Server};

/// The commit every mock repository is at.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Files of each mock repository, by `kind/org/name`.
type Repos = BTreeMap<String, BTreeMap<String, Vec<u8>>>;

#[derive(Clone)]
struct MockHub {
    repos: Arc<Repos>,
    /// `kind/org/name/file` of every download request, in order.
    downloads: Arc<Mutex<Vec<String>>>,
    /// Files answered with a 500.
    failing: Arc<Vec<String>>,
}

/// A one-layer BERT (hidden 4, vocab 10) with (seeded) random weights, valid as built.
fn tiny_bert() -> BTreeMap<String, Vec<u8>> {
    let config = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6});
    let shapes: [(&str, [u64; 2]); 8] = [
        ("embeddings.position_embeddings.weight", [6, 4]),
        ("embeddings.word_embeddings.weight", [10, 4]),
        ("encoder.layer.0.attention.output.dense.weight", [4, 4]),
        ("encoder.layer.0.attention.self.key.weight", [4, 4]),
        ("encoder.layer.0.attention.self.query.weight", [4, 4]),
        ("encoder.layer.0.attention.self.value.weight", [4, 4]),
        ("encoder.layer.0.intermediate.dense.weight", [8, 4]),
        ("encoder.layer.0.output.dense.weight", [4, 8]),
    ];
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in shapes {
        let bytes = 4 * shape[0] * shape[1];
        header.insert(
            name.into(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut weights = (header.len() as u64).to_le_bytes().to_vec();
    weights.extend_from_slice(&header);
    // Seeded, so every call builds the same bytes and the test can compare digests.
    let mut rng = StdRng::seed_from_u64(7);
    weights.extend((0..offset / 4).flat_map(|_| rng.gen::<f32>().to_le_bytes()));
    let vocab: serde_json::Map<String, Value> =
        (0..10).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    BTreeMap::from([
        ("config.json".into(), serde_json::to_vec(&config).unwrap()),
        ("model.safetensors".into(), weights),
        (
            "tokenizer.json".into(),
            serde_json::to_vec(&tokenizer).unwrap(),
        ),
        // What a real repository also holds and a registration must not fetch.
        ("README.md".into(), b"# tiny".to_vec()),
        ("pytorch_model.bin".into(), vec![7; 64]),
        ("onnx/model.onnx".into(), vec![8; 64]),
    ])
}

fn news_dataset() -> BTreeMap<String, Vec<u8>> {
    let rows: String = (0..6)
        .map(|i| {
            format!(
                "{{\"text\": \"story number {i}\", \"label\": \"{}\"}}\n",
                i % 2
            )
        })
        .collect();
    BTreeMap::from([
        ("README.md".into(), b"# news".to_vec()),
        ("data/train.jsonl".into(), rows.into_bytes()),
    ])
}

impl MockHub {
    async fn start(failing: &[&str]) -> (String, MockHub) {
        let repos = Repos::from([
            ("models/org/tiny-bert".into(), tiny_bert()),
            ("models/org/broken".into(), tiny_bert()),
            ("datasets/org/news".into(), news_dataset()),
        ]);
        let hub = MockHub {
            repos: Arc::new(repos),
            downloads: Arc::default(),
            failing: Arc::new(failing.iter().map(|s| s.to_string()).collect()),
        };
        let router = Router::new()
            .route("/api/{kind}/{org}/{name}/revision/{rev}", get(listing))
            .route(
                "/datasets/{org}/{name}/resolve/{rev}/{*file}",
                get(dataset_file),
            )
            .route("/{org}/{name}/resolve/{rev}/{*file}", get(model_file))
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        (base, hub)
    }

    fn downloaded(&self) -> Vec<String> {
        let mut files = self.downloads.lock().unwrap().clone();
        files.dedup();
        files
    }
}

fn hub_error(status: StatusCode, code: &str) -> Response {
    (status, [("x-error-code", code.to_owned())], "{}").into_response()
}

/// The real Hub answers 401 for an unknown repository without a token, and names the case.
async fn listing(
    State(hub): State<MockHub>,
    Path((kind, org, name, rev)): Path<(String, String, String, String)>,
) -> Response {
    let Some(files) = hub.repos.get(&format!("{kind}/{org}/{name}")) else {
        return hub_error(StatusCode::UNAUTHORIZED, "RepoNotFound");
    };
    if rev != "main" && rev != COMMIT {
        return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let siblings: Vec<Value> = files
        .iter()
        .map(|(path, bytes)| json!({"rfilename": path, "size": bytes.len()}))
        .collect();
    axum::Json(json!({"id": format!("{org}/{name}"), "sha": COMMIT, "siblings": siblings}))
        .into_response()
}

async fn model_file(
    State(hub): State<MockHub>,
    Path((org, name, rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    serve(&hub, &format!("models/{org}/{name}"), &rev, &file, &headers)
}

async fn dataset_file(
    State(hub): State<MockHub>,
    Path((org, name, rev, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    serve(
        &hub,
        &format!("datasets/{org}/{name}"),
        &rev,
        &file,
        &headers,
    )
}

/// A file with the headers hf-hub needs: its ETag (the blob's name in the cache), the commit,
/// and for a `Range` request a 206 with `Content-Range` (hf-hub asks for `bytes=0-0` first to
/// learn the size, then for chunks whose end may lie one past the last byte).
fn serve(hub: &MockHub, repo: &str, rev: &str, file: &str, headers: &HeaderMap) -> Response {
    let Some(bytes) = hub.repos.get(repo).and_then(|files| files.get(file)) else {
        return hub_error(StatusCode::NOT_FOUND, "EntryNotFound");
    };
    if rev != "main" && rev != COMMIT {
        return hub_error(StatusCode::NOT_FOUND, "RevisionNotFound");
    }
    let key = format!("{repo}/{file}");
    hub.downloads.lock().unwrap().push(key.clone());
    if hub.failing.contains(&key) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let etag = format!("\"{}\"", hex::encode(Sha256::digest(bytes)));
    let common = [
        (header::ETAG.as_str(), etag),
        ("x-repo-commit", COMMIT.to_owned()),
    ];
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    match range {
        Some((first, last)) if first < bytes.len() => {
            let last = last.min(bytes.len() - 1);
            let content_range = format!("bytes {first}-{last}/{}", bytes.len());
            let mut response = (
                StatusCode::PARTIAL_CONTENT,
                common,
                bytes[first..=last].to_vec(),
            )
                .into_response();
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, content_range.parse().unwrap());
            response
        }
        _ => (StatusCode::OK, common, bytes.clone()).into_response(),
    }
}

async fn hf_server(endpoint: &str, cache: &std::path::Path, offline: bool) -> Server {
    start(&[
        ("hf_endpoint", json!(endpoint)),
        ("hf_cache_dir", json!(cache)),
        ("hf_offline", json!(offline)),
    ])
    .await
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test]
async fn registers_a_model_by_hf_reference_then_again_offline_from_the_cache() {
    let (endpoint, hub) = MockHub::start(&[]).await;
    let cache = tempfile::tempdir().unwrap();
    let server = hf_server(&endpoint, cache.path(), false).await;
    let uri = "hf://org/tiny-bert@main";
    let (status, model) = server.post_json("/v1/models", &json!({"uri": uri})).await;
    assert_eq!(status, 201, "{model}");
    assert_eq!(
        (&model["name"], &model["source"], &model["architecture"]),
        (&json!("tiny-bert"), &json!(uri), &json!("bert"))
    );
    assert_eq!(model["source_revision"], COMMIT, "`main` is pinned");
    let (_, listed) = server
        .get(&format!("/v1/models/{}", model["id"].as_str().unwrap()))
        .await;
    assert_eq!(listed["source_revision"], COMMIT, "the record keeps it");
    let repo = tiny_bert();
    let files = model["files"].as_array().unwrap();
    let names: Vec<&str> = files.iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    for file in files {
        let bytes = &repo[file["name"].as_str().unwrap()];
        assert_eq!(file["sha256"], sha256(bytes), "{file}");
        assert_eq!(file["bytes"], bytes.len());
    }
    let wanted = ["config.json", "model.safetensors", "tokenizer.json"];
    let mut fetched = hub.downloaded();
    fetched.sort();
    let expected: Vec<String> = wanted
        .iter()
        .map(|f| format!("models/org/tiny-bert/{f}"))
        .collect();
    assert_eq!(fetched, expected, "only the model's own files are fetched");

    // The cache now answers for `main` without the Hub, and the record is the same model.
    let offline = hf_server("http://127.0.0.1:9", cache.path(), true).await;
    let (status, again) = offline.post_json("/v1/models", &json!({"uri": uri})).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(again["sha256"], model["sha256"]);
    assert_eq!(
        again["source_revision"], COMMIT,
        "the cache remembers the commit"
    );
    assert_eq!(hub.downloaded().len(), 3, "offline fetched nothing");
}

#[tokio::test]
async fn an_unknown_repo_or_revision_is_a_4xx_naming_uri_and_leaves_nothing() {
    let (endpoint, _hub) = MockHub::start(&[]).await;
    let cache = tempfile::tempdir().unwrap();
    let server = hf_server(&endpoint, cache.path(), false).await;
    for (uri, word) in [
        ("hf://org/missing", "no such repository"),
        ("hf://org/tiny-bert@v9", "no such revision"),
        ("hf://org/tiny-bert/nope", "no file or folder"),
    ] {
        let (status, body) = server.post_json("/v1/models", &json!({"uri": uri})).await;
        assert_eq!(status, 422, "{uri}: {body}");
        assert_eq!(slug(&body), "uri-not-found", "{body}");
        assert_eq!(body["pointer"], "/uri", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(word), "{body}");
    }
    let (status, body) = server
        .post_json("/v1/models", &json!({"uri": "hf://org/a b"}))
        .await;
    assert_eq!((status, slug(&body)), (422, "invalid-uri"), "{body}");
    server.assert_nothing_left().await;
}

#[tokio::test]
async fn offline_with_an_empty_cache_is_a_clear_error_without_network() {
    let (endpoint, hub) = MockHub::start(&[]).await;
    let cache = tempfile::tempdir().unwrap();
    let server = hf_server(&endpoint, cache.path(), true).await;
    let (status, body) = server
        .post_json("/v1/models", &json!({"uri": "hf://org/tiny-bert"}))
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(slug(&body), "uri-not-cached", "{body}");
    assert_eq!(body["pointer"], "/uri");
    assert!(
        body["detail"].as_str().unwrap().contains("hf_offline"),
        "{body}"
    );
    assert!(hub.downloaded().is_empty());
    server.assert_nothing_left().await;
}

#[tokio::test]
async fn a_hub_failure_midway_is_502_and_leaves_nothing_behind() {
    // The config and tokenizer are fetched and stored first; the weights then fail.
    let (endpoint, hub) = MockHub::start(&["models/org/broken/model.safetensors"]).await;
    let cache = tempfile::tempdir().unwrap();
    let server = hf_server(&endpoint, cache.path(), false).await;
    let (status, body) = server
        .post_json("/v1/models", &json!({"uri": "hf://org/broken"}))
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(slug(&body), "upstream-failed", "{body}");
    assert_eq!(body["pointer"], "/uri");
    assert!(hub.downloaded().len() >= 3, "{:?}", hub.downloaded());
    server.assert_nothing_left().await;

    let unreachable = hf_server("http://127.0.0.1:9", cache.path(), false).await;
    let (status, body) = unreachable
        .post_json("/v1/models", &json!({"uri": "hf://org/tiny-bert"}))
        .await;
    assert_eq!((status, slug(&body)), (502, "upstream-failed"), "{body}");
    assert!(body["detail"].as_str().unwrap().contains("127.0.0.1:9"));
}

#[tokio::test]
async fn registers_a_dataset_file_from_a_dataset_repo() {
    let (endpoint, hub) = MockHub::start(&[]).await;
    let cache = tempfile::tempdir().unwrap();
    let server = hf_server(&endpoint, cache.path(), false).await;
    let uri = "hf://datasets/org/news";
    let (status, dataset) = server.post_json("/v1/datasets", &json!({"uri": uri})).await;
    assert_eq!(status, 201, "{dataset}");
    assert_eq!(dataset["name"], "train.jsonl");
    assert_eq!(dataset["rows"], 6);
    assert_eq!(dataset["format"], "jsonl");
    let bytes = &news_dataset()["data/train.jsonl"];
    assert_eq!(dataset["sha256"], sha256(bytes));
    assert_eq!(dataset["source_revision"], COMMIT);
    assert_eq!(hub.downloaded(), ["datasets/org/news/data/train.jsonl"]);

    let (status, body) = server
        .post_json(
            "/v1/datasets",
            &json!({"uri": "hf://datasets/org/news/README.md"}),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["pointer"], json!(null), "a bad file is not a bad uri");
}
