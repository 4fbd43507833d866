//! The job API's happy paths, in process, on SQLite and (one flow) on PostgreSQL.

use crate::common;

use axum::http::{Method, StatusCode};
use common::api::TestApi;
use serde_json::json;

#[tokio::test]
async fn probes_metrics_and_contract_answer() {
    let (api, _dir) = TestApi::sqlite().await;
    let health = api.get("/healthz").await;
    assert_eq!(
        (health.status, &health.body),
        (StatusCode::OK, &json!({"status": "ok"}))
    );
    let ready = api.get("/readyz").await;
    assert_eq!(
        (ready.status, &ready.body),
        (StatusCode::OK, &json!({"status": "ready"}))
    );
    let contract = api.get("/openapi.json").await;
    assert_eq!(contract.status, StatusCode::OK);
    assert!(
        contract.body["paths"]["/v1/jobs"]["post"].is_object(),
        "{}",
        contract.body
    );
    let metrics = api.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.body.as_str().expect("metrics are text");
    assert!(
        text.contains(
            r#"compressd_http_requests_total{method="GET",route="/healthz",status="200"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_job_is_created_with_defaults_and_can_be_read_back() {
    let (api, _dir) = TestApi::sqlite().await;
    let created = api.post_json("/v1/jobs", &api.spec(), &[]).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    assert_eq!(
        created.headers["location"],
        format!("/v1/jobs/{id}").as_str()
    );
    assert_eq!(created.body["status"], "queued");
    assert_eq!(created.body["name"], "minilm-news");
    assert_eq!(created.body["attempt"], 0);
    // Defaults are filled in the stored spec.
    assert_eq!(created.body["spec"]["seed"], 42);
    assert_eq!(created.body["spec"]["task"]["label_field"], "label");
    assert_eq!(created.body["spec"]["pipeline"][0]["learning_rate"], 5e-5);
    assert_eq!(created.body["spec"]["outputs"], json!(["safetensors"]));
    let uuid: uuid::Uuid = id.parse().unwrap();
    assert_eq!(uuid.get_version_num(), 7);

    let fetched = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.body, created.body);
    let listed = api.get("/v1/jobs").await;
    assert_eq!(listed.body["jobs"][0]["id"], id.as_str());
    assert_eq!(listed.body["next"], serde_json::Value::Null);
}

#[tokio::test]
async fn request_ids_are_made_or_echoed() {
    let (api, _dir) = TestApi::sqlite().await;
    let made = api.get("/healthz").await;
    let id = made.headers["x-request-id"].to_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
    let echoed = api
        .send(
            Method::GET,
            "/healthz",
            &[("x-request-id", "abc-123")],
            axum::body::Body::empty(),
        )
        .await;
    assert_eq!(echoed.headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn idempotency_keys_replay_or_conflict() {
    let (api, _dir) = TestApi::sqlite().await;
    let key = [("idempotency-key", "create-1")];
    let first = api.post_json("/v1/jobs", &api.spec(), &key).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The same request with its defaults spelled out is the same request.
    let mut spelled_out = api.spec();
    spelled_out["seed"] = json!(42);
    let replay = api.post_json("/v1/jobs", &spelled_out, &key).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body["id"], first.body["id"]);
    let mut different = api.spec();
    different["seed"] = json!(7);
    let reused = api.post_json("/v1/jobs", &different, &key).await;
    assert_eq!(reused.status, StatusCode::CONFLICT);
    assert_eq!(reused.slug(), "idempotency-key-reused");
    assert_eq!(
        api.get("/v1/jobs").await.body["jobs"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn jobs_page_newest_first() {
    let (api, _dir) = TestApi::sqlite().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(api.create_job().await.to_string());
    }
    ids.reverse();
    let first = api.get("/v1/jobs?limit=2").await;
    let page: Vec<&str> = first.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, ids[..2]);
    let next = first.body["next"].as_str().unwrap();
    let second = api.get(&format!("/v1/jobs?limit=2&after={next}")).await;
    let page: Vec<&str> = second.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(page, ids[2..]);
    assert!(second.body["next"].is_null());
    let cancelled = api.get("/v1/jobs?status=cancelled").await;
    assert_eq!(cancelled.body["jobs"], json!([]));
}

#[tokio::test]
async fn cancel_then_delete() {
    let (api, _dir) = TestApi::sqlite().await;
    let id = api.create_job().await;
    let running_delete = api.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!(running_delete.status, StatusCode::CONFLICT);
    assert_eq!(running_delete.slug(), "job-state-conflict");
    let cancelled = api.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(cancelled.status, StatusCode::OK);
    assert_eq!(cancelled.body["status"], "cancelled");
    assert!(cancelled.body["finished_at"].is_string());
    let deleted = api.delete(&format!("/v1/jobs/{id}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.get(&format!("/v1/jobs/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn postgres_serves_the_same_flow() {
    let api = TestApi::new(common::pg_store().await).await;
    assert_eq!(api.get("/readyz").await.status, StatusCode::OK);
    let id = api.create_job().await;
    let listed = api.get("/v1/jobs").await;
    assert_eq!(listed.body["jobs"][0]["id"], id.to_string().as_str());
    let mut bad = api.spec();
    bad["pipeline"][0]["epochs"] = json!(0);
    let rejected = api.post_json("/v1/jobs", &bad, &[]).await;
    assert_eq!(
        (rejected.status, rejected.pointer()),
        (StatusCode::UNPROCESSABLE_ENTITY, "/pipeline/0/epochs")
    );
    let cancelled = api.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_eq!(cancelled.body["status"], "cancelled");
    assert_eq!(
        api.post_empty(&format!("/v1/jobs/{id}/cancel"))
            .await
            .status,
        StatusCode::CONFLICT
    );
}
