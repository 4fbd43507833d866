//! `POST/GET/DELETE /v1/datasets`: the shared BBC and SMS datasets by upload and reference, CSV
//! and text, and every bad dataset of issue 4 (invalid UTF-8, missing field, one label, zero
//! rows, over the size limit) refused with a 4xx that leaves nothing behind.

use crate::api_models_support as support;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};
use support::{sha256_file, shared, slug, start, Server};

/// Rows, labels and splits counted straight from a JSONL file.
fn expected_counts(path: &Path) -> (u64, BTreeMap<String, u64>, BTreeMap<String, u64>) {
    let (mut rows, mut labels, mut splits) = (0, BTreeMap::new(), BTreeMap::new());
    for line in std::fs::read_to_string(path).unwrap().lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        rows += 1;
        *labels
            .entry(row["label"].as_str().unwrap().to_owned())
            .or_default() += 1;
        *splits
            .entry(row["split"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    (rows, labels, splits)
}

fn assert_counts(dataset: &Value, path: &Path) {
    let (rows, labels, splits) = expected_counts(path);
    assert_eq!(dataset["rows"], rows);
    assert_eq!(
        dataset["label_counts"],
        serde_json::to_value(labels).unwrap()
    );
    assert_eq!(dataset["splits"], serde_json::to_value(splits).unwrap());
    assert_eq!(dataset["sha256"], sha256_file(path));
    assert_eq!(dataset["bytes"], std::fs::metadata(path).unwrap().len());
    assert_eq!(dataset["format"], "jsonl");
    assert_eq!(dataset["rejected"], 0);
}

#[tokio::test]
#[ignore = "needs ../shared: cargo test --test api datasets:: -- --ignored"]
async fn registers_bbc_by_upload_and_sms_by_reference_with_matching_counts() {
    let shared = shared();
    let server = start(&[]).await;
    let bbc = shared.join("data/bbc_news/bbc_news.jsonl");
    let (status, dataset) = server
        .upload(
            "/v1/datasets",
            &[("name", "bbc")],
            &[("bbc_news.jsonl", bbc.clone())],
        )
        .await;
    assert_eq!(status, 201, "{dataset}");
    assert_counts(&dataset, &bbc);
    assert_eq!(dataset["label_counts"]["business"], 510);
    let id = dataset["id"].as_str().unwrap();
    assert_eq!(server.get(&format!("/v1/datasets/{id}")).await.1, dataset);

    let sms = shared.join("data/sms_spam/sms_spam.jsonl");
    let uri = format!("file://{}", sms.canonicalize().unwrap().display());
    let (status, dataset) = server.post_json("/v1/datasets", &json!({"uri": uri})).await;
    assert_eq!(status, 201, "{dataset}");
    assert_counts(&dataset, &sms);
    assert_eq!(dataset["label_counts"]["spam"], 642);
    assert_eq!(dataset["name"], "sms_spam.jsonl");
    assert_eq!(
        server.get("/v1/datasets").await.1["datasets"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn reads_csv_and_text_and_reports_skipped_rows() {
    let server = start(&[]).await;
    let csv = b"body,tag\n\"hello, world\",a\nbye,b\n\xff,a\n".to_vec();
    let texts = [
        ("text_field", "body"),
        ("label_field", "tag"),
        ("strict", "false"),
    ];
    let (status, dataset) = server
        .upload_bytes("/v1/datasets", &texts, &[("d.csv", csv)])
        .await;
    assert_eq!(status, 201, "{dataset}");
    assert_eq!(
        (dataset["rows"].as_u64(), dataset["rejected"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(dataset["rejected_rows"][0]["line"], 4);
    assert_eq!(dataset["format"], "csv");
    let (status, text) = server
        .upload_bytes(
            "/v1/datasets",
            &[],
            &[("plays.txt", b"to be\nor not\n".to_vec())],
        )
        .await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(
        (text["rows"].as_u64(), text["label_counts"].clone()),
        (Some(2), json!({}))
    );
}

async fn refused(
    server: &Server,
    texts: &[(&str, &str)],
    name: &str,
    bytes: &[u8],
    status: u16,
    word: &str,
) {
    let (got, body) = server
        .upload_bytes("/v1/datasets", texts, &[(name, bytes.to_vec())])
        .await;
    assert_eq!(got, status, "{body}");
    let want = match status {
        413 => "body-too-large",
        _ if word == "format" || word == "xml" => "invalid-format",
        _ => "invalid-dataset",
    };
    assert_eq!(slug(&body), want, "{body}");
    assert!(
        body["detail"].as_str().unwrap().contains(word),
        "{word} not in {body}"
    );
    assert!(
        server.stored_files().is_empty(),
        "left behind: {:?}",
        server.stored_files()
    );
    assert_eq!(server.get("/v1/datasets").await.1["datasets"], json!([]));
}

#[tokio::test]
async fn bad_datasets_are_refused_and_leave_nothing() {
    let server = start(&[("dataset_upload_max_bytes", json!(1024))]).await;
    let ok = "{\"text\":\"a\",\"label\":\"x\"}\n";
    refused(
        &server,
        &[],
        "d.jsonl",
        format!("{ok}not json\n").as_bytes(),
        422,
        "line 2: not valid JSON",
    )
    .await;
    refused(
        &server,
        &[],
        "d.jsonl",
        b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"\xc3\x28\",\"label\":\"y\"}\n",
        422,
        "invalid UTF-8",
    )
    .await;
    refused(
        &server,
        &[],
        "d.jsonl",
        format!("{ok}{{\"text\":\"b\"}}\n").as_bytes(),
        422,
        "field `label` is missing",
    )
    .await;
    refused(
        &server,
        &[],
        "d.jsonl",
        format!("{ok}{ok}").as_bytes(),
        422,
        "at least two labels",
    )
    .await;
    refused(&server, &[], "d.jsonl", b"\n\n", 422, "no usable rows").await;
    refused(&server, &[], "d.jsonl", b"", 422, "empty").await;
    refused(
        &server,
        &[],
        "d.jsonl",
        ok.repeat(100).as_bytes(),
        413,
        "1024",
    )
    .await;
    refused(&server, &[], "d.parquet", ok.as_bytes(), 422, "format").await;
    refused(
        &server,
        &[("format", "xml")],
        "d.jsonl",
        ok.as_bytes(),
        422,
        "xml",
    )
    .await;
}
