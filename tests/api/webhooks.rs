//! Signed webhooks end to end: a local receiver (axum on port 0) gets deliveries made by the real
//! delivery loop from the real outbox. Signing (checked with an independent HMAC, and with the
//! `standardwebhooks` Python package when `COMPRESSD_INTEROP_PYTHON` is set), retries with
//! backoff, the attempt budget, a loop dropped mid-delivery, the network policy, and the logs.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use compressd::api;
use compressd::net_guard::UrlPolicy;
use compressd::store::{AttemptOutcome, Lease, Store};
use compressd::webhooks::delivery::{deliver_due, run};
use compressd::webhooks::{DeliveryConfig, WebhookMetrics};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::common::api::{Reply, TestApi};

/// How the receiver answers one request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Never answers (the request stays open until the client goes away).
    Hang,
}

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    headers: HeaderMap,
    body: String,
    at: Instant,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// A webhook receiver on 127.0.0.1: records every request and answers from a script (200 once
/// the script is used up).
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    async fn start(script: &[Answer]) -> (Self, String) {
        let receiver = Self::default();
        receiver
            .script
            .lock()
            .unwrap()
            .extend(script.iter().copied());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `count` requests came (at most 20 s).
    async fn wait_for(&self, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {count} requests came",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
    receiver.received.lock().unwrap().push(Received {
        headers,
        body,
        at: Instant::now(),
    });
    let answer = receiver
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or(Answer::Status(200));
    match answer {
        Answer::Status(code) => StatusCode::from_u16(code).unwrap(),
        Answer::Hang => std::future::pending().await,
    }
}

/// The loopback receiver is a private address: allowed here as an operator would allow it.
fn loopback_policy() -> UrlPolicy {
    UrlPolicy::new(&["127.0.0.1".into()])
}

async fn api_allowing_loopback() -> (TestApi, tempfile::TempDir) {
    let (mut api, dir) = TestApi::sqlite().await;
    api.state.config.url_policy = loopback_policy();
    api.router = api::router(api.state.clone());
    (api, dir)
}

fn delivery_config(max_attempts: i32, retry_base: Duration, lease: Duration) -> DeliveryConfig {
    DeliveryConfig {
        max_attempts,
        retry_base,
        timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(20),
        lease,
        policy: loopback_policy(),
    }
}

/// Claims the queued job and ends its attempt as succeeded, as a worker does.
async fn succeed_job(store: &dyn Store) -> Uuid {
    let job = store
        .claim_next("worker", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a queued job");
    let lease = Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: "worker".into(),
    };
    store
        .finish_attempt(
            &lease,
            AttemptOutcome::Succeeded {
                result: json!({"metrics": {}}),
            },
        )
        .await
        .unwrap();
    job.id
}

/// Creates a job whose spec has one webhook to `url`; returns its id and the signing secret.
async fn job_with_webhook(api: &TestApi, webhook: Value) -> (Uuid, String) {
    let mut spec = api.spec();
    spec["webhooks"] = json!([webhook]);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let secret = reply.body["webhook_secret"].as_str().unwrap().to_owned();
    (reply.body["id"].as_str().unwrap().parse().unwrap(), secret)
}

/// `v1,` + base64 HMAC-SHA256 of `id.timestamp.body`, computed here, not by compressd.
fn expected_signature(secret: &str, received: &Received) -> String {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").expect("whsec_ prefix"))
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(
        format!(
            "{}.{}.{}",
            received.header("webhook-id"),
            received.header("webhook-timestamp"),
            received.body
        )
        .as_bytes(),
    );
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

async fn deliveries_of_job(api: &TestApi, job: Uuid) -> Vec<Value> {
    let reply = api.get(&format!("/v1/jobs/{job}/webhook-deliveries")).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    reply.body["deliveries"].as_array().unwrap().clone()
}

/// Waits until the job's first delivery is no longer pending (at most 20 s).
async fn settled_delivery(api: &TestApi, job: Uuid) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let deliveries = deliveries_of_job(api, job).await;
        if let Some(first) = deliveries.first().filter(|d| d["status"] != "pending") {
            return first.clone();
        }
        assert!(Instant::now() < deadline, "still pending: {deliveries:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn attempt_codes(delivery: &Value) -> Vec<Value> {
    delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status_code"].clone())
        .collect()
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

#[tokio::test]
async fn a_job_webhook_is_delivered_signed_and_logged() {
    let (api, _dir) = api_allowing_loopback().await;
    let (receiver, url) = Receiver::start(&[]).await;
    let (job, secret) = job_with_webhook(&api, json!({"url": url})).await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    // The secret is answered once; the stored spec shows the default (terminal) events.
    let read = api.get(&format!("/v1/jobs/{job}")).await;
    assert!(read.body.get("webhook_secret").is_none(), "{:?}", read.body);
    assert_eq!(
        read.body["spec"]["webhooks"][0]["events"],
        json!(["job.succeeded", "job.failed", "job.cancelled"])
    );

    succeed_job(&*api.state.store).await;
    let metrics = &api.state.metrics.webhooks;
    let config = delivery_config(3, Duration::from_millis(100), Duration::from_secs(30));
    let claimed = deliver_due(&*api.state.store, &config, metrics, "loop")
        .await
        .unwrap();
    assert_eq!(
        claimed, 1,
        "job.started is not subscribed: only job.succeeded"
    );

    let received = receiver.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.header("content-type"), "application/json");
    assert!(request.header("webhook-id").starts_with("msg_"));
    let timestamp: i64 = request.header("webhook-timestamp").parse().unwrap();
    assert!((chrono::Utc::now().timestamp() - timestamp).abs() < 60);
    assert_eq!(
        request.header("webhook-signature"),
        expected_signature(&secret, request)
    );
    let body = request.json();
    assert_eq!(body["type"], "job.succeeded");
    assert_eq!(body["data"]["job_id"], job.to_string());
    assert_eq!(body["data"]["status"], "succeeded");

    let delivery = settled_delivery(&api, job).await;
    assert_eq!(delivery["status"], "delivered");
    assert_eq!(delivery["message_id"], request.header("webhook-id"));
    assert_eq!(delivery["event"], "job.succeeded");
    assert_eq!(delivery["url"], url);
    assert_eq!(attempt_codes(&delivery), [json!(200)]);
    assert!(delivery["attempts"][0]["error"].is_null());
    assert!(delivery.get("secret").is_none());

    let text = api.get("/metrics").await.body;
    let text = text.as_str().unwrap();
    assert_eq!(
        metric(
            text,
            "compressd_webhook_deliveries_total{outcome=\"succeeded\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(metric(text, "compressd_webhook_outbox_depth"), Some(0.0));
}

#[tokio::test]
async fn failed_attempts_are_retried_with_growing_waits_and_the_same_id() {
    let (api, _dir) = api_allowing_loopback().await;
    let (receiver, url) = Receiver::start(&[Answer::Status(500), Answer::Status(503)]).await;
    // A tenant webhook this time: it gets every job's subscribed events.
    let created = api
        .post_json(
            "/v1/webhooks",
            &json!({"url": url, "events": ["job.succeeded"]}),
            &[],
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap().to_owned();
    let webhook = created.body["id"].as_str().unwrap().to_owned();
    api.create_job().await;
    let job = succeed_job(&*api.state.store).await;

    let base = Duration::from_millis(300);
    let stop = CancellationToken::new();
    let delivering = tokio::spawn(run(
        api.state.store.clone(),
        delivery_config(5, base, Duration::from_secs(30)),
        api.state.metrics.webhooks.clone(),
        stop.clone(),
    ));
    let received = receiver.wait_for(3).await;
    let delivery = settled_delivery(&api, job).await;
    stop.cancel();
    delivering.await.unwrap();

    assert_eq!(delivery["status"], "delivered");
    assert_eq!(
        attempt_codes(&delivery),
        [json!(500), json!(503), json!(200)]
    );
    let errors: Vec<&Value> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["error"])
        .collect();
    assert_eq!(errors[0], "the target answered HTTP 500");
    assert!(errors[2].is_null());
    // Exponential: the second wait is twice the first.
    assert!(received[1].at - received[0].at >= base, "{received:?}");
    assert!(received[2].at - received[1].at >= base * 2, "{received:?}");
    for request in &received {
        assert_eq!(request.header("webhook-id"), delivery["message_id"]);
        assert_eq!(request.body, received[0].body);
        assert_eq!(
            request.header("webhook-signature"),
            expected_signature(&secret, request)
        );
    }
    let metrics = &api.state.metrics.webhooks;
    use compressd::webhooks::metrics::Outcome;
    assert_eq!(
        (
            metrics.count(Outcome::Retried),
            metrics.count(Outcome::Succeeded)
        ),
        (2, 1)
    );
    // The webhook's own log shows the same delivery.
    let by_webhook = api.get(&format!("/v1/webhooks/{webhook}/deliveries")).await;
    assert_eq!(by_webhook.body["deliveries"][0]["id"], delivery["id"]);
}

#[tokio::test]
async fn a_delivery_is_given_up_when_the_budget_is_spent() {
    let (api, _dir) = api_allowing_loopback().await;
    let (receiver, url) = Receiver::start(&[Answer::Status(500); 10]).await;
    job_with_webhook(&api, json!({"url": url})).await;
    let job = succeed_job(&*api.state.store).await;
    let metrics = WebhookMetrics::default();
    let stop = CancellationToken::new();
    let delivering = tokio::spawn(run(
        api.state.store.clone(),
        delivery_config(2, Duration::from_millis(50), Duration::from_secs(30)),
        metrics.clone(),
        stop.clone(),
    ));
    let delivery = settled_delivery(&api, job).await;
    // Nothing more comes once it failed for good.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    delivering.await.unwrap();
    assert_eq!(delivery["status"], "failed");
    assert!(delivery["next_attempt_at"].is_null());
    assert_eq!(attempt_codes(&delivery), [json!(500), json!(500)]);
    assert_eq!(receiver.received().len(), 2);
    use compressd::webhooks::metrics::Outcome;
    assert_eq!(
        (
            metrics.count(Outcome::Retried),
            metrics.count(Outcome::Failed)
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn a_loop_dropped_mid_delivery_loses_nothing() {
    let (api, _dir) = api_allowing_loopback().await;
    // The first request hangs: the loop making it is dropped (as a killed process would be)
    // while it waits. The next answer is 200.
    let (receiver, url) = Receiver::start(&[Answer::Hang]).await;
    let (_, secret) = job_with_webhook(&api, json!({"url": url})).await;
    let job = succeed_job(&*api.state.store).await;
    let lease = Duration::from_secs(1);
    let first_loop = tokio::spawn(run(
        api.state.store.clone(),
        delivery_config(5, Duration::from_millis(50), lease),
        WebhookMetrics::default(),
        CancellationToken::new(),
    ));
    receiver.wait_for(1).await;
    first_loop.abort();
    assert!(first_loop.await.unwrap_err().is_cancelled());
    let pending = deliveries_of_job(&api, job).await;
    assert_eq!(pending[0]["status"], "pending", "{pending:?}");

    let stop = CancellationToken::new();
    let second_loop = tokio::spawn(run(
        api.state.store.clone(),
        delivery_config(5, Duration::from_millis(50), lease),
        WebhookMetrics::default(),
        stop.clone(),
    ));
    let delivery = settled_delivery(&api, job).await;
    // Nothing else comes: exactly the one event, twice, under one id.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    second_loop.await.unwrap();
    let received = receiver.received();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(delivery["status"], "delivered");
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    assert_eq!(received[1].header("webhook-id"), delivery["message_id"]);
    assert_eq!(received[0].body, received[1].body);
    assert_eq!(
        received[1].header("webhook-signature"),
        expected_signature(&secret, &received[1])
    );
    // Not reclaimed before its lease passed (counted from the claim, a little before the first
    // request arrived, hence the margin).
    assert!(
        received[1].at - received[0].at >= lease - Duration::from_millis(100),
        "{received:?}"
    );
    // The dropped attempt left no record; the one that answered is attempt 2.
    let attempts: Vec<(Value, Value)> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["attempt"].clone(), a["status_code"].clone()))
        .collect();
    assert_eq!(attempts, [(json!(2), json!(200))]);
}

fn assert_refused(reply: &Reply, pointer: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        reply.body
    );
    assert_eq!(reply.pointer(), pointer, "{:?}", reply.body);
    assert_eq!(reply.content_type(), "application/problem+json");
}

#[tokio::test]
async fn private_targets_and_bad_webhooks_are_refused_at_submission() {
    // Default settings: no private network allowed.
    let (api, _dir) = TestApi::sqlite().await;
    for url in [
        "http://127.0.0.1:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.7/hook",
        "http://[::1]/hook",
        "ftp://8.8.8.8/hook",
        "http://user:pw@8.8.8.8/hook",
    ] {
        let mut spec = api.spec();
        spec["webhooks"] = json!([{"url": "https://8.8.8.8/fine"}, {"url": url}]);
        let reply = api.post_json("/v1/jobs", &spec, &[]).await;
        assert_refused(&reply, "/webhooks/1/url");
        assert!(
            reply.body["detail"]
                .as_str()
                .unwrap()
                .contains("not allowed"),
            "{:?}",
            reply.body
        );
        let reply = api
            .post_json("/v1/webhooks", &json!({"url": url}), &[])
            .await;
        assert_refused(&reply, "/url");
    }
    let mut spec = api.spec();
    spec["webhooks"] = json!([{"url": "https://8.8.8.8/hook", "events": ["job.exploded"]}]);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_refused(&reply, "/webhooks/0/events/0");
    spec["webhooks"] = json!([{"url": "https://8.8.8.8/hook", "events": []}]);
    assert_refused(
        &api.post_json("/v1/jobs", &spec, &[]).await,
        "/webhooks/0/events",
    );
    spec["webhooks"] = json!(vec![json!({"url": "https://8.8.8.8/hook"}); 9]);
    assert_refused(&api.post_json("/v1/jobs", &spec, &[]).await, "/webhooks");
    let bad_event = json!({"url": "https://8.8.8.8/hook", "events": ["job.started", 3]});
    assert_refused(
        &api.post_json("/v1/webhooks", &bad_event, &[]).await,
        "/events/1",
    );
    let empty = json!({"url": "https://8.8.8.8/hook", "events": []});
    assert_refused(&api.post_json("/v1/webhooks", &empty, &[]).await, "/events");
    let unknown = json!({"url": "https://8.8.8.8/hook", "secret": "mine"});
    assert!(api
        .post_json("/v1/webhooks", &unknown, &[])
        .await
        .status
        .is_client_error());
    // Nothing was stored.
    assert_eq!(api.get("/v1/webhooks").await.body["webhooks"], json!([]));
    assert_eq!(api.get("/v1/jobs").await.body["jobs"], json!([]));
}

#[tokio::test]
async fn a_target_refused_at_delivery_time_is_not_contacted() {
    // Accepted while loopback was allowed; the delivering process's policy no longer allows it
    // (a name may resolve elsewhere by then, too): the attempt fails without a request.
    let (api, _dir) = api_allowing_loopback().await;
    let (receiver, url) = Receiver::start(&[]).await;
    job_with_webhook(&api, json!({"url": url})).await;
    let job = succeed_job(&*api.state.store).await;
    let strict = DeliveryConfig {
        policy: UrlPolicy::default(),
        ..delivery_config(1, Duration::from_millis(50), Duration::from_secs(30))
    };
    deliver_due(
        &*api.state.store,
        &strict,
        &WebhookMetrics::default(),
        "loop",
    )
    .await
    .unwrap();
    let delivery = settled_delivery(&api, job).await;
    assert_eq!(delivery["status"], "failed");
    let error = delivery["attempts"][0]["error"].as_str().unwrap();
    assert!(error.contains("not allowed"), "{error}");
    assert!(receiver.received().is_empty());
}

#[tokio::test]
async fn webhooks_are_listed_and_deleted_per_tenant() {
    let (api, _dir) = TestApi::sqlite().await;
    let created = api
        .post_json("/v1/webhooks", &json!({"url": "https://8.8.8.8/hook"}), &[])
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let id = created.body["id"].as_str().unwrap();
    assert_eq!(
        created.headers["location"].to_str().unwrap(),
        format!("/v1/webhooks/{id}")
    );
    assert_eq!(
        created.body["events"],
        json!(["job.succeeded", "job.failed", "job.cancelled"])
    );
    let listed = api.get("/v1/webhooks").await;
    assert_eq!(listed.body["webhooks"][0]["id"], id);
    assert!(listed.body["webhooks"][0].get("secret").is_none());
    assert_eq!(
        api.delete(&format!("/v1/webhooks/{id}")).await.status,
        StatusCode::NO_CONTENT
    );
    let again = api.delete(&format!("/v1/webhooks/{id}")).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(again.slug(), "webhook-not-found");
    assert_eq!(
        api.delete("/v1/webhooks/nope").await.slug(),
        "invalid-webhook-id"
    );
    // A tenant may have at most MAX_TENANT_WEBHOOKS.
    let limit = compressd::api::webhooks::MAX_TENANT_WEBHOOKS;
    for i in 0..limit {
        let hook = json!({"url": format!("https://8.8.8.8/hook/{i}")});
        let reply = api.post_json("/v1/webhooks", &hook, &[]).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{i}: {:?}", reply.body);
    }
    let over = api
        .post_json(
            "/v1/webhooks",
            &json!({"url": "https://8.8.8.8/one-more"}),
            &[],
        )
        .await;
    assert_eq!(over.status, StatusCode::CONFLICT, "{:?}", over.body);
    assert_eq!(over.slug(), "webhook-limit");
    assert_eq!(
        api.get("/v1/webhooks").await.body["webhooks"]
            .as_array()
            .unwrap()
            .len(),
        limit
    );
    // A job's own webhook is not managed here.
    let mut spec = api.spec();
    spec["webhooks"] = json!([{"url": "https://8.8.8.8/own"}]);
    let job = api.post_json("/v1/jobs", &spec, &[]).await;
    let job_id: Uuid = job.body["id"].as_str().unwrap().parse().unwrap();
    let own = api
        .state
        .store
        .list_webhooks("default", Some(job_id))
        .await
        .unwrap();
    assert_eq!(
        api.delete(&format!("/v1/webhooks/{}", own[0].id))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    // A replay of the create (same idempotency key) answers the same secret.
    let first = api
        .post_json("/v1/jobs", &spec, &[("idempotency-key", "k")])
        .await;
    let replay = api
        .post_json("/v1/jobs", &spec, &[("idempotency-key", "k")])
        .await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body["webhook_secret"], first.body["webhook_secret"]);
    assert!(first.body["webhook_secret"]
        .as_str()
        .unwrap()
        .starts_with("whsec_"));
}

/// The `standardwebhooks` package verifies what compressd sends, and refuses a tampered body.
#[tokio::test]
#[ignore = "needs the standardwebhooks package: COMPRESSD_INTEROP_PYTHON=/root/.cache/compressd-pyenv/bin/python cargo test --test api -- --ignored webhooks::standardwebhooks"]
async fn standardwebhooks_verifies_the_signature() {
    let python = std::env::var("COMPRESSD_INTEROP_PYTHON")
        .expect("COMPRESSD_INTEROP_PYTHON names a Python with standardwebhooks");
    let (api, _dir) = api_allowing_loopback().await;
    let (receiver, url) = Receiver::start(&[]).await;
    let (_, secret) = job_with_webhook(&api, json!({"url": url})).await;
    succeed_job(&*api.state.store).await;
    let config = delivery_config(3, Duration::from_millis(100), Duration::from_secs(30));
    deliver_due(
        &*api.state.store,
        &config,
        &WebhookMetrics::default(),
        "loop",
    )
    .await
    .unwrap();
    let request = receiver.wait_for(1).await.remove(0);
    let headers: serde_json::Map<String, Value> =
        ["webhook-id", "webhook-timestamp", "webhook-signature"]
            .into_iter()
            .map(|name| (name.to_owned(), Value::from(request.header(name))))
            .collect();
    let input = json!({"secret": secret, "body": request.body, "headers": headers});
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
request = json.load(sys.stdin)
webhook = Webhook(request["secret"])
payload = webhook.verify(request["body"], request["headers"])
try:
    webhook.verify(request["body"].replace("succeeded", "failed"), request["headers"])
    sys.exit("a tampered body verified")
except WebhookVerificationError:
    pass
print(json.dumps(payload))
"#;
    let mut child = std::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python starts");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "standardwebhooks refused the delivery: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let payload: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(payload, request.json());
    assert_eq!(payload["type"], "job.succeeded");
}

/// `docker/grafana-dashboard.json` queries only metrics `/metrics` exports.
#[tokio::test]
async fn the_sample_dashboard_uses_real_metric_names() {
    let (api, _dir) = TestApi::sqlite().await;
    let exported = api.get("/metrics").await.body;
    let exported = exported.as_str().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docker/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queried.extend(
                expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|word| word.starts_with("compressd_"))
                    .map(str::to_owned),
            );
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    for name in &queried {
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            exported.contains(&format!("# TYPE {base} ")),
            "the dashboard queries {name}, which /metrics does not export"
        );
    }
    for family in [
        "compressd_webhook_deliveries_total",
        "compressd_webhook_outbox_depth",
        "compressd_jobs",
    ] {
        assert!(
            queried.iter().any(|q| q == family),
            "{family} is not on the dashboard"
        );
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Seconds one attempt may take in the killed-server test; a claim's lease is twice that plus 5.
const SERVER_WEBHOOK_TIMEOUT_SECS: u64 = 2;

/// A real `compressd serve` (API and delivery loop, no worker) on `data_dir`, allowed to reach
/// the loopback receiver.
async fn start_server(data_dir: &std::path::Path) -> (std::process::Child, String) {
    let port = free_port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_compressd"))
        .args(["serve", "--no-worker"])
        .env("COMPRESSD_DATA_DIR", data_dir)
        .env("COMPRESSD_LISTEN", format!("127.0.0.1:{port}"))
        .env("COMPRESSD_ALLOWED_PRIVATE_NETWORKS", "127.0.0.1")
        .env(
            "COMPRESSD_WEBHOOK_TIMEOUT_SECS",
            SERVER_WEBHOOK_TIMEOUT_SECS.to_string(),
        )
        .env("COMPRESSD_WEBHOOK_RETRY_BASE_MS", "100")
        .env("COMPRESSD_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (child, base)
}

/// The issue's check: a `compressd` process killed (SIGKILL) while a delivery is in flight loses
/// nothing: the next process delivers it, once more, under the same `webhook-id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_server_loses_no_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (receiver, url) = Receiver::start(&[Answer::Hang]).await;
    let (mut first, base) = start_server(dir.path()).await;
    // Inputs registered, and the job run, straight in the server's database (as a worker would).
    let store: Arc<dyn Store> = Arc::new(
        compressd::store::SqliteStore::open_file(&dir.path().join("compressd.db"), 2)
            .await
            .unwrap(),
    );
    let (model, dataset) =
        crate::common::register_inputs(&*store, &compressd::clock::SystemClock).await;
    let mut spec = crate::common::spec_json(model, dataset);
    spec["webhooks"] = json!([{"url": url}]);
    let client = reqwest::Client::new();
    let created: Value = client
        .post(format!("{base}/v1/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["webhook_secret"].as_str().unwrap().to_owned();
    let job = succeed_job(&*store).await;

    receiver.wait_for(1).await;
    first.kill().unwrap();
    first.wait().unwrap();
    let killed_at = Instant::now();
    let (mut second, base) = start_server(dir.path()).await;
    let received = receiver.wait_for(2).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let delivery = loop {
        let log: Value = client
            .get(format!("{base}/v1/jobs/{job}/webhook-deliveries"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let delivery = log["deliveries"][0].clone();
        if delivery["status"] == "delivered" {
            break delivery;
        }
        assert!(Instant::now() < deadline, "not delivered: {log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Nothing more comes: the one event, twice, under one id.
    tokio::time::sleep(Duration::from_millis(700)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(second.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    second.wait().unwrap();

    assert_eq!(receiver.received().len(), 2);
    assert_eq!(
        received[0].header("webhook-id"),
        received[1].header("webhook-id")
    );
    assert_eq!(received[1].header("webhook-id"), delivery["message_id"]);
    assert_eq!(received[0].body, received[1].body);
    assert_eq!(received[1].json()["type"], "job.succeeded");
    assert_eq!(
        received[1].header("webhook-signature"),
        expected_signature(&secret, &received[1])
    );
    assert!(received[1].at > killed_at);
    let attempts: Vec<(Value, Value)> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["attempt"].clone(), a["status_code"].clone()))
        .collect();
    assert_eq!(attempts, [(json!(2), json!(200))]);
}
