//! Every bad model input of issue 4 gets a clear 4xx and leaves nothing in the store: empty
//! files, truncated or overlapping safetensors, shapes that disagree with the config, an
//! unsupported architecture, `file://` outside the allowed roots or with `..`, an upload over the
//! size limit, and a client that disconnects mid-upload.

use crate::api_models_support as support;

use serde_json::{json, Value};
use support::{slug, start, Server};

/// A one-layer BERT (hidden 4, vocab 10) as (name, bytes) files, valid as built.
fn tiny_bert() -> Vec<(&'static str, Vec<u8>)> {
    let config = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6});
    let tensors: Vec<(&str, Vec<u64>)> = vec![
        ("embeddings.position_embeddings.weight", vec![6, 4]),
        ("embeddings.word_embeddings.weight", vec![10, 4]),
        ("encoder.layer.0.attention.output.dense.weight", vec![4, 4]),
        ("encoder.layer.0.attention.self.key.weight", vec![4, 4]),
        ("encoder.layer.0.attention.self.query.weight", vec![4, 4]),
        ("encoder.layer.0.attention.self.value.weight", vec![4, 4]),
        ("encoder.layer.0.intermediate.dense.weight", vec![8, 4]),
        ("encoder.layer.0.output.dense.weight", vec![4, 8]),
    ];
    let vocab: serde_json::Map<String, Value> =
        (0..10).map(|i| (format!("t{i}"), json!(i))).collect();
    let tokenizer = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    vec![
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("model.safetensors", safetensors(&tensors, 0)),
        ("tokenizer.json", serde_json::to_vec(&tokenizer).unwrap()),
    ]
}

/// F32 tensors back to back; `shift` moves every offset after the first tensor back by that
/// many bytes (so ranges overlap).
fn safetensors(tensors: &[(&str, Vec<u64>)], shift: u64) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let bytes = 4 * shape.iter().product::<u64>();
        let start = if i > 0 { offset - shift } else { offset };
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, start + bytes]}),
        );
        offset = start + bytes;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.resize(out.len() + offset as usize, 0);
    out
}

fn replace(
    mut files: Vec<(&'static str, Vec<u8>)>,
    name: &str,
    bytes: Vec<u8>,
) -> Vec<(&'static str, Vec<u8>)> {
    files
        .iter_mut()
        .filter(|(n, _)| *n == name)
        .for_each(|(_, b)| *b = bytes.clone());
    files
}

/// Uploads and checks the status, the slug, a word of the message, and that nothing is left.
async fn refused(
    server: &Server,
    files: &[(&str, Vec<u8>)],
    status: u16,
    want_slug: &str,
    word: &str,
) {
    let (got, body) = server.upload_bytes("/v1/models", &[], files).await;
    assert_eq!(got, status, "{body}");
    assert_eq!(slug(&body), want_slug, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains(word),
        "{word} not in {body}"
    );
    server.assert_nothing_left().await;
}

#[tokio::test]
async fn the_tiny_model_itself_is_accepted() {
    let server = start(&[]).await;
    let (status, body) = server.upload_bytes("/v1/models", &[], &tiny_bert()).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["parameters"], 24 + 40 + 4 * 16 + 32 + 32);
    // Its layer count is recorded, so a distillation that cannot shrink it is refused at
    // submission.
    let rows = b"{\"text\": \"t1 t2\", \"label\": \"a\"}\n{\"text\": \"t3\", \"label\": \"b\"}\n";
    let (status, dataset) = server
        .upload_bytes("/v1/datasets", &[], &[("data.jsonl", rows.to_vec())])
        .await;
    assert_eq!(status, 201, "{dataset}");
    let spec = json!({"name": "too-small", "model": body["id"],
        "task": {"type": "text_classification", "dataset": dataset["id"]},
        "pipeline": [{"type": "distill", "student_layers": 1}]});
    let (status, problem) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(
        problem["pointer"], "/pipeline/0/student_layers",
        "{problem}"
    );
}

#[tokio::test]
async fn bad_files_are_refused_with_422_and_leave_nothing() {
    let server = start(&[]).await;
    refused(
        &server,
        &replace(tiny_bert(), "config.json", Vec::new()),
        422,
        "invalid-model",
        "empty",
    )
    .await;
    let full = tiny_bert()[1].1.clone();
    refused(
        &server,
        &replace(
            tiny_bert(),
            "model.safetensors",
            full[..full.len() - 3].to_vec(),
        ),
        422,
        "invalid-safetensors",
        "truncated",
    )
    .await;
    let tensors = [("a", vec![4u64]), ("b", vec![4u64])];
    refused(
        &server,
        &replace(tiny_bert(), "model.safetensors", safetensors(&tensors, 8)),
        422,
        "invalid-safetensors",
        "overlap",
    )
    .await;
    let mut past_end = safetensors(&tensors, 0);
    past_end.truncate(past_end.len() - 16);
    refused(
        &server,
        &replace(tiny_bert(), "model.safetensors", past_end),
        422,
        "invalid-safetensors",
        "needs data bytes",
    )
    .await;
    let wrong = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 6});
    refused(
        &server,
        &replace(
            tiny_bert(),
            "config.json",
            serde_json::to_vec(&wrong).unwrap(),
        ),
        422,
        "config-mismatch",
        "intermediate.dense.weight",
    )
    .await;
    let gpt2 = serde_json::to_vec(&json!({"model_type": "gpt2"})).unwrap();
    let (status, body) = server
        .upload_bytes(
            "/v1/models",
            &[],
            &replace(tiny_bert(), "config.json", gpt2),
        )
        .await;
    assert_eq!(
        (status, slug(&body)),
        (422, "unsupported-architecture"),
        "{body}"
    );
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("model_type 'gpt2'") && detail.contains("bert") && detail.contains("llama"),
        "{detail}"
    );
    server.assert_nothing_left().await;
    refused(
        &server,
        &[("../escape.json", b"{}".to_vec())],
        422,
        "invalid-file-name",
        "relative path",
    )
    .await;
}

#[tokio::test]
async fn file_references_outside_the_roots_or_with_dotdot_are_refused() {
    let server = start(&[]).await;
    let root = server.dir.path().canonicalize().unwrap();
    for (uri, want) in [
        ("file:///etc".to_owned(), "uri-not-allowed"),
        (
            format!("file://{}/artifacts/../compressd.db", root.display()),
            "uri-not-allowed",
        ),
        (
            format!("file://{}/missing", root.display()),
            "uri-not-found",
        ),
        ("http://example.com/model".to_owned(), "invalid-uri"),
    ] {
        let (status, body) = server.post_json("/v1/models", &json!({"uri": uri})).await;
        assert_eq!((status, slug(&body)), (422, want), "{uri}: {body}");
    }
    let (status, body) = server
        .post_json("/v1/models", &json!({"uri": "file:///x", "extra": 1}))
        .await;
    assert_eq!(
        (status, slug(&body), body["pointer"].as_str()),
        (422, "invalid-request", Some("/extra")),
        "{body}"
    );
    server.assert_nothing_left().await;
}

#[tokio::test]
async fn an_upload_over_the_limit_is_413_and_leaves_no_partial_object() {
    let server = start(&[
        ("model_upload_max_bytes", json!(6 << 20)),
        ("upload_part_size_bytes", json!(5 << 20)),
    ])
    .await;
    let big = vec![0u8; 8 << 20];
    let (status, body) = server
        .upload_bytes("/v1/models", &[], &[("weights.bin", big)])
        .await;
    assert_eq!(status, 413, "{body}");
    server.assert_nothing_left().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_upload_leaves_nothing() {
    let server = start(&[]).await;
    // A raw HTTP request that promises 20 MiB and stops after ~6 MiB (more than one part).
    let boundary = "XyZ";
    let head = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"weights.bin\"\r\n\r\n");
    let mut stream = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n{head}",
        20 << 20
    );
    use tokio::io::AsyncWriteExt;
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut partial = (10_000u64).to_le_bytes().to_vec();
    partial.resize(6 << 20, b' ');
    stream.write_all(&partial).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(stream);
    // The handler sees the body end early, aborts the upload and removes what it wrote.
    for _ in 0..50 {
        if server.stored_files().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.assert_nothing_left().await;
}

/// Issue 17: a problem body says what, never where. A malformed GGUF (candle's parse errors carry
/// a backtrace with the build machine's paths) and a malformed safetensors header are refused
/// with bodies free of backtraces, source paths and Rust type names, each naming the request id
/// that its `x-request-id` header (and the server log) carries.
#[tokio::test]
async fn problem_bodies_carry_the_request_id_and_no_backtrace_path_or_type_name() {
    let server = start(&[]).await;
    // The magic, version 3, then counts far past the bytes that follow.
    let mut gguf = b"GGUF".to_vec();
    gguf.extend_from_slice(&3u32.to_le_bytes());
    gguf.extend_from_slice(&7u64.to_le_bytes());
    gguf.extend_from_slice(&u64::MAX.to_le_bytes());
    gguf.extend_from_slice(&[0xff; 64]);
    // A header whose tensor ends past the file.
    let header = br#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}"#;
    let mut safetensors = (header.len() as u64).to_le_bytes().to_vec();
    safetensors.extend_from_slice(header);
    let cases: Vec<Vec<(&str, Vec<u8>)>> = vec![
        vec![("model.gguf", gguf)],
        replace(tiny_bert(), "model.safetensors", safetensors),
    ];
    for files in cases {
        let mut form = reqwest::multipart::Form::new();
        for (name, bytes) in &files {
            form = form.part(
                "file",
                reqwest::multipart::Part::bytes(bytes.clone()).file_name(name.to_string()),
            );
        }
        let response = server
            .client
            .post(format!("{}/v1/models", server.base))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("an x-request-id header")
            .to_owned();
        let text = response.text().await.unwrap();
        assert!((400..500).contains(&status), "{status}: {text}");
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["request_id"], request_id.as_str(), "{text}");
        for leak in [
            "backtrace",
            "stack backtrace",
            ".rs:",
            "src/",
            "/work/",
            "/home/",
            ".cargo",
            "candle_core",
            "::",
            "Error {",
            "Some(",
            "panicked",
        ] {
            assert!(!text.contains(leak), "{leak:?} leaked into {text}");
        }
        server.assert_nothing_left().await;
    }
}

/// The artifact store holds every tenant's files: a `file://` reference into it (the data folder
/// is an allowed root here, as an operator might make it) is refused, so no tenant can register
/// another's model, dataset or job outputs as its own.
#[tokio::test]
async fn references_into_the_artifact_store_are_refused() {
    let server = start(&[]).await;
    let (status, model) = server.upload_bytes("/v1/models", &[], &tiny_bert()).await;
    assert_eq!(status, 201, "{model}");
    let rows = b"{\"text\": \"t1 t2\", \"label\": \"a\"}\n{\"text\": \"t3\", \"label\": \"b\"}\n";
    let (status, dataset) = server
        .upload_bytes("/v1/datasets", &[], &[("data.jsonl", rows.to_vec())])
        .await;
    assert_eq!(status, 201, "{dataset}");
    let artifacts = server.dir.path().join("artifacts").canonicalize().unwrap();
    let stored = server.stored_files();
    let model_file = stored
        .iter()
        .find(|p| p.ends_with("model.safetensors"))
        .expect("the uploaded model's file");
    let data_file = stored
        .iter()
        .find(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .expect("the uploaded dataset's file");
    for (route, path) in [
        ("/v1/models", artifacts.clone()),
        ("/v1/models", model_file.parent().unwrap().to_path_buf()),
        ("/v1/datasets", data_file.clone()),
    ] {
        let uri = format!("file://{}", path.display());
        let (status, problem) = server.post_json(route, &json!({"uri": uri})).await;
        assert_eq!(status, 422, "{route} {uri}: {problem}");
        assert_eq!(slug(&problem), "uri-not-allowed", "{problem}");
        assert_eq!(problem["pointer"], "/uri", "{problem}");
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("artifact store"),
            "{problem}"
        );
    }
}
