//! Access control: API keys and scopes, tenant isolation over every `/v1` route of the OpenAPI
//! document (on both backends), quotas, rate limits and the audit log.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use chrono::Utc;
use compressd::api::access::{AuthMode, KeyRateLimiter, Quotas};
use compressd::api::{self};
use compressd::auth;
use compressd::store::{Artifact, Scope, Store};
use rand::SeedableRng;
use serde_json::Value;
use uuid::Uuid;

use crate::common::api::{Reply, TestApi};
use crate::common::{self};

/// A test API that requires keys, with `tenant`'s key made by [`key`].
async fn keyed(store: Arc<dyn Store>) -> TestApi {
    let mut api = TestApi::new(store).await;
    api.state.config.access.mode = AuthMode::Keys;
    api.state.config.access.limiter = None;
    api.router = api::router(api.state.clone());
    api
}

/// Stores a key for `tenant` with `scopes` and returns its bearer header value.
async fn key(api: &TestApi, tenant: &str, scopes: &[Scope]) -> (String, String) {
    let mut rng = rand::rngs::StdRng::from_entropy();
    let made = auth::generate_key(&mut rng, tenant, scopes.to_vec(), Utc::now()).unwrap();
    api.state.store.insert_api_key(&made.key).await.unwrap();
    (format!("Bearer {}", made.token), made.key.id)
}

async fn call(
    api: &TestApi,
    method: Method,
    uri: &str,
    bearer: &str,
    body: Option<&Value>,
) -> Reply {
    let mut headers = vec![("authorization", bearer)];
    let body = match body {
        Some(json) => {
            headers.push(("content-type", "application/json"));
            Body::from(json.to_string())
        }
        None => Body::empty(),
    };
    api.send(method, uri, &headers, body).await
}

fn assert_problem(reply: &Reply, status: StatusCode, slug: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.slug(), slug, "{:?}", reply.body);
    assert_eq!(reply.content_type(), "application/problem+json");
}

#[tokio::test]
async fn requests_without_a_valid_key_or_scope_get_problems_never_data() {
    let (store, _dir) = common::sqlite_store().await;
    let api = keyed(store).await;
    let (writer, writer_id) = key(&api, "default", &[Scope::Read, Scope::Write]).await;
    let (reader, _) = key(&api, "default", &[Scope::Read]).await;

    let none = api.get("/v1/jobs").await;
    assert_problem(&none, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(none.headers.contains_key("www-authenticate"));
    for bad in [
        "Bearer nonsense",
        "Basic abc",
        "Bearer cpd_000000000000_0000000000000000000000000000000000000000000000000000000000000000",
    ] {
        let reply = call(&api, Method::GET, "/v1/models", bad, None).await;
        assert_problem(&reply, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    // Right id, wrong secret.
    let forged = format!(
        "{}{}",
        &writer[..writer.len() - 1],
        if writer.ends_with('0') { "1" } else { "0" }
    );
    assert_problem(
        &call(&api, Method::GET, "/v1/jobs", &forged, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );

    assert_eq!(
        call(&api, Method::GET, "/v1/jobs", &reader, None)
            .await
            .status,
        StatusCode::OK
    );
    let refused = call(&api, Method::POST, "/v1/jobs", &reader, Some(&api.spec())).await;
    assert_problem(&refused, StatusCode::FORBIDDEN, "insufficient-scope");
    let audit = call(&api, Method::GET, "/v1/audit", &writer, None).await;
    assert_problem(&audit, StatusCode::FORBIDDEN, "insufficient-scope");
    let created = call(&api, Method::POST, "/v1/jobs", &writer, Some(&api.spec())).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);

    // Revocation holds from the very next request (the key is read per request, no cache).
    api.state
        .store
        .revoke_api_key(&writer_id, Utc::now())
        .await
        .unwrap();
    let revoked = call(&api, Method::GET, "/v1/jobs", &writer, None).await;
    assert_problem(&revoked, StatusCode::UNAUTHORIZED, "unauthorized");

    // Probes and the contract stay open.
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(api.get("/openapi.json").await.status, StatusCode::OK);
    // The dashboard's files are static: the key is entered on the page and sent by its scripts.
    assert_eq!(api.get("/ui").await.status, StatusCode::OK);
    assert_eq!(api.get("/ui/app.js").await.status, StatusCode::OK);
    assert_problem(
        &api.get("/ui/nope.js").await,
        StatusCode::NOT_FOUND,
        "not-found",
    );
}

/// The owner's resources, made through the API (and an artifact and events through the store).
struct Owned {
    job: Uuid,
    artifact: &'static str,
    webhook: Uuid,
}

async fn make_owned(api: &TestApi, owner: &str) -> Owned {
    let created = call(api, Method::POST, "/v1/jobs", owner, Some(&api.spec())).await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let job: Uuid = created.body["id"].as_str().unwrap().parse().unwrap();
    let artifact = "report.json";
    api.state
        .store
        .insert_artifact(&Artifact {
            job_id: job,
            attempt: 0,
            name: artifact.into(),
            kind: "report".into(),
            format: "json".into(),
            bytes: 2,
            sha256: "0".repeat(64),
            uri: format!("jobs/{job}/{artifact}"),
            created_at: Utc::now(),
        })
        .await
        .unwrap();
    // A public address literal: the network policy needs no DNS to accept it.
    let webhook = call(
        api,
        Method::POST,
        "/v1/webhooks",
        owner,
        Some(&serde_json::json!({"url": "https://8.8.8.8/hook"})),
    )
    .await;
    assert_eq!(webhook.status, StatusCode::CREATED, "{:?}", webhook.body);
    let webhook = webhook.body["id"].as_str().unwrap().parse().unwrap();
    Owned {
        job,
        artifact,
        webhook,
    }
}

/// Every `/v1` operation of the OpenAPI document, as another tenant: a resource of the owner's
/// answers 404 (never 403, never data), a listing shows none of them, and the owner's resources
/// are untouched afterwards.
async fn other_tenants_see_nothing(store: Arc<dyn Store>) {
    let api = keyed(store).await;
    let (owner, _) = key(&api, "default", &[Scope::Admin]).await;
    let (other, _) = key(&api, "other", &[Scope::Admin]).await;
    let owned = make_owned(&api, &owner).await;
    let owner_ids = [
        owned.job.to_string(),
        api.model.to_string(),
        api.dataset.to_string(),
        owned.webhook.to_string(),
    ];

    let document = api::openapi::document();
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        if !path.starts_with("/v1/") {
            continue;
        }
        for method in ["get", "post", "delete"] {
            if item.get(method).is_none() {
                continue;
            }
            let uri = path
                .replace("/v1/jobs/{id}", &format!("/v1/jobs/{}", owned.job))
                .replace("/v1/models/{id}", &format!("/v1/models/{}", api.model))
                .replace(
                    "/v1/datasets/{id}",
                    &format!("/v1/datasets/{}", api.dataset),
                )
                .replace(
                    "/v1/webhooks/{id}",
                    &format!("/v1/webhooks/{}", owned.webhook),
                )
                .replace("{name}", owned.artifact);
            let verb = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let reply = match (method, path.as_str()) {
                // Creating: naming the owner's model and dataset is naming unknown ones.
                ("post", "/v1/jobs") => {
                    let reply = call(&api, verb, &uri, &other, Some(&api.spec())).await;
                    assert_eq!(
                        reply.status,
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "{uri}: {:?}",
                        reply.body
                    );
                    assert_eq!(reply.pointer(), "/model", "{uri}");
                    reply
                }
                // Registering makes the caller's own model or dataset; an empty body is refused
                // before anything is read.
                ("post", "/v1/models" | "/v1/datasets" | "/v1/webhooks") => {
                    let reply = call(&api, verb, &uri, &other, Some(&serde_json::json!({}))).await;
                    assert!(reply.status.is_client_error(), "{uri}: {:?}", reply.body);
                    reply
                }
                // Listings: 200 with none of the owner's rows.
                (
                    "get",
                    "/v1/jobs" | "/v1/models" | "/v1/datasets" | "/v1/audit" | "/v1/webhooks",
                ) => {
                    let reply = call(&api, verb, &uri, &other, None).await;
                    assert_eq!(reply.status, StatusCode::OK, "{uri}: {:?}", reply.body);
                    reply
                }
                (_, p) if p.contains('{') => {
                    let reply = call(&api, verb, &uri, &other, None).await;
                    assert_eq!(
                        reply.status,
                        StatusCode::NOT_FOUND,
                        "{method} {uri}: {:?}",
                        reply.body
                    );
                    assert_eq!(reply.content_type(), "application/problem+json", "{uri}");
                    reply
                }
                _ => panic!("{method} {path} is not covered by the isolation test: add it"),
            };
            let text = reply.body.to_string();
            for id in &owner_ids {
                assert!(
                    // A problem may echo the id the caller sent; only answers with data matter.
                    !text.contains(id.as_str()) || reply.status.is_client_error(),
                    "{method} {uri} shows the owner's {id}: {text}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} operations checked");
    // Nothing the other tenant did touched the owner's resources.
    for uri in [
        format!("/v1/jobs/{}", owned.job),
        format!("/v1/models/{}", api.model),
        format!("/v1/datasets/{}", api.dataset),
    ] {
        let reply = call(&api, Method::GET, &uri, &owner, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{uri}: {:?}", reply.body);
    }
    let job = call(
        &api,
        Method::GET,
        &format!("/v1/jobs/{}", owned.job),
        &owner,
        None,
    )
    .await;
    assert_eq!(
        job.body["status"], "queued",
        "the other tenant's cancel reached the job"
    );
    let listed = call(&api, Method::GET, "/v1/jobs", &owner, None).await;
    assert!(listed.body.to_string().contains(&owned.job.to_string()));
    let webhooks = call(&api, Method::GET, "/v1/webhooks", &owner, None).await;
    assert!(
        webhooks
            .body
            .to_string()
            .contains(&owned.webhook.to_string()),
        "the other tenant's delete reached the webhook: {:?}",
        webhooks.body
    );
}

#[tokio::test]
async fn other_tenants_see_nothing_on_sqlite() {
    let (store, _dir) = common::sqlite_store().await;
    other_tenants_see_nothing(store).await;
}

#[tokio::test]
async fn other_tenants_see_nothing_on_postgres() {
    other_tenants_see_nothing(common::pg_store().await).await;
}

#[tokio::test]
async fn idempotency_keys_are_per_tenant() {
    let (store, _dir) = common::sqlite_store().await;
    let api = keyed(store).await;
    let (owner, _) = key(&api, "default", &[Scope::Read, Scope::Write]).await;
    let (other, _) = key(&api, "other", &[Scope::Read, Scope::Write]).await;
    let clock = &*api.state.clock;
    let (mut model, mut dataset) = (common::model(clock), common::dataset(clock));
    model.tenant = "other".into();
    dataset.tenant = "other".into();
    api.state.store.insert_model(&model).await.unwrap();
    api.state.store.insert_dataset(&dataset).await.unwrap();
    let send = |bearer: String, spec: Value| {
        let api = &api;
        async move {
            let headers = [
                ("authorization", bearer.as_str()),
                ("content-type", "application/json"),
                ("idempotency-key", "k1"),
            ];
            api.send(Method::POST, "/v1/jobs", &headers, spec.to_string())
                .await
        }
    };
    let first = send(owner.clone(), api.spec()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    // The same key from another tenant makes that tenant's own job, not a replay or a 409.
    let theirs = send(other, common::spec_json(model.id, dataset.id)).await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{:?}", theirs.body);
    assert_ne!(theirs.body["id"], first.body["id"]);
    let replay = send(owner, api.spec()).await;
    assert_eq!(replay.status, StatusCode::OK);
    assert_eq!(replay.body["id"], first.body["id"]);
}

#[tokio::test]
async fn quotas_and_rate_limits_answer_with_the_limit_and_the_use() {
    let (store, _dir) = common::sqlite_store().await;
    let mut api = keyed(store).await;
    api.state.config.access.quotas = Quotas {
        max_active_jobs: 1,
        max_stored_bytes: 1,
    };
    api.router = api::router(api.state.clone());
    let (writer, _) = key(&api, "default", &[Scope::Read, Scope::Write]).await;
    let first = call(&api, Method::POST, "/v1/jobs", &writer, Some(&api.spec())).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = call(&api, Method::POST, "/v1/jobs", &writer, Some(&api.spec())).await;
    assert_problem(&second, StatusCode::TOO_MANY_REQUESTS, "quota-exceeded");
    let detail = second.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("tenant_max_active_jobs")
            && detail.contains("is 1")
            && detail.contains("use 2"),
        "{detail}"
    );
    // Quotas count each tenant's own use: another tenant, with nothing queued, is not refused
    // because this one is at its limit.
    let (other, _) = key(&api, "other", &[Scope::Read, Scope::Write]).await;
    let clock = &*api.state.clock;
    let (mut model, mut dataset) = (common::model(clock), common::dataset(clock));
    model.tenant = "other".into();
    dataset.tenant = "other".into();
    model.bytes = 0;
    dataset.bytes = 0;
    api.state.store.insert_model(&model).await.unwrap();
    api.state.store.insert_dataset(&dataset).await.unwrap();
    let theirs = call(
        &api,
        Method::POST,
        "/v1/jobs",
        &other,
        Some(&common::spec_json(model.id, dataset.id)),
    )
    .await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{:?}", theirs.body);
    let theirs_again = call(
        &api,
        Method::POST,
        "/v1/jobs",
        &other,
        Some(&common::spec_json(model.id, dataset.id)),
    )
    .await;
    assert_problem(
        &theirs_again,
        StatusCode::TOO_MANY_REQUESTS,
        "quota-exceeded",
    );
    // The fixtures' model and dataset already hold more than 1 byte.
    let upload = call(
        &api,
        Method::POST,
        "/v1/models",
        &writer,
        Some(&serde_json::json!({"uri": "s3://b/m/"})),
    )
    .await;
    assert_problem(&upload, StatusCode::INSUFFICIENT_STORAGE, "quota-exceeded");
    assert!(upload.body["detail"]
        .as_str()
        .unwrap()
        .contains("tenant_max_stored_bytes"));

    api.state.config.access.limiter = KeyRateLimiter::new(1, 2);
    api.router = api::router(api.state.clone());
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let reply = call(&api, Method::GET, "/v1/jobs", &writer, None).await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(reply.slug(), "rate-limited");
            let retry: u64 = reply.headers["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
        statuses.push(reply.status);
    }
    assert_eq!(&statuses[..2], &[StatusCode::OK, StatusCode::OK]);
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS);

    // A change refused by the rate limit is in the audit log as a 429, with its key.
    let path = format!("/v1/jobs/{}/cancel", Uuid::now_v7());
    let refused = call(&api, Method::POST, &path, &writer, None).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let filter = compressd::store::AuditFilter {
        tenant: Some("default".into()),
        after: None,
        limit: 100,
    };
    let entries = api.state.store.list_audit(&filter).await.unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e.path == path && e.status == 429 && e.key_id.is_some()),
        "{entries:?}"
    );
}

#[tokio::test]
async fn state_changing_requests_are_audited_for_admins_of_the_tenant() {
    let (store, _dir) = common::sqlite_store().await;
    let api = keyed(store).await;
    let (admin, admin_id) = key(&api, "default", &[Scope::Admin]).await;
    let (reader, reader_id) = key(&api, "default", &[Scope::Read]).await;
    let (other_admin, _) = key(&api, "other", &[Scope::Admin]).await;
    let created = call(&api, Method::POST, "/v1/jobs", &admin, Some(&api.spec())).await;
    let job = created.body["id"].as_str().unwrap().to_owned();
    call(
        &api,
        Method::POST,
        &format!("/v1/jobs/{job}/cancel"),
        &reader,
        None,
    )
    .await;
    call(&api, Method::GET, "/v1/jobs", &admin, None).await; // reads are not audited

    let log = call(&api, Method::GET, "/v1/audit", &admin, None).await;
    assert_eq!(log.status, StatusCode::OK, "{:?}", log.body);
    let entries = log.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{entries:?}");
    assert_eq!(entries[0]["key_id"], admin_id.as_str());
    assert_eq!(entries[0]["method"], "POST");
    assert_eq!(entries[0]["path"], "/v1/jobs");
    assert_eq!(entries[0]["status"], 201);
    assert_eq!(entries[0]["tenant"], "default");
    assert_eq!(entries[1]["key_id"], reader_id.as_str());
    assert_eq!(entries[1]["status"], 403);
    assert!(entries[0]["at"].is_string());
    // Another tenant's admin sees none of it.
    let theirs = call(&api, Method::GET, "/v1/audit", &other_admin, None).await;
    assert_eq!(theirs.body["entries"], serde_json::json!([]));
}

#[tokio::test]
async fn without_keys_the_api_is_open_as_the_default_tenant() {
    let (api, _dir) = TestApi::sqlite().await;
    let job = api.create_job().await;
    let reply = api.get(&format!("/v1/jobs/{job}")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let stored = api.state.store.get_job(job).await.unwrap().unwrap();
    assert_eq!(stored.tenant, "default");
}

/// Two API replicas on one PostgreSQL database, each with its key cache: a key revoked through one
/// is refused by it on the next request, and by the other as soon as the revocation's `NOTIFY`
/// arrives; meanwhile a cached key is served without a lookup (a row changed behind the cache's
/// back, with no notification, is not seen until a key changes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_every_replicas_key_cache() {
    let url = crate::common::pg::fresh_database_url().await;
    let open = |url: String| async move {
        let store = compressd::store::PgStore::connect(&url, 4).await.unwrap();
        store.migrate().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        store
    };
    let (first, second) = (open(url.clone()).await, open(url.clone()).await);
    // Each replica hears key changes once its listener is up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !(first.hub().key_changes_heard() && second.hub().key_changes_heard()) {
        assert!(std::time::Instant::now() < deadline, "listeners not up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let a = keyed(first).await;
    let b = a.replica(second);
    let (writer, writer_id) = key(&a, "default", &[Scope::Read, Scope::Write]).await;
    for api in [&a, &b] {
        let reply = call(api, Method::GET, "/v1/jobs", &writer, None).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    }

    // Cached: a scope dropped in the row without a notification is not seen yet.
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    sqlx::query("UPDATE api_keys SET scopes = 'read' WHERE id = $1")
        .bind(&writer_id)
        .execute(&pool)
        .await
        .unwrap();
    let cached = call(
        &b,
        Method::POST,
        "/v1/jobs/00000000-0000-0000-0000-000000000000/cancel",
        &writer,
        None,
    )
    .await;
    assert_ne!(cached.status, StatusCode::FORBIDDEN, "{:?}", cached.body);

    // Revoked through the first replica: refused there at once, and by the second once the
    // notification arrives.
    a.state
        .store
        .revoke_api_key(&writer_id, Utc::now())
        .await
        .unwrap();
    let here = call(&a, Method::GET, "/v1/jobs", &writer, None).await;
    assert_problem(&here, StatusCode::UNAUTHORIZED, "unauthorized");
    let started = std::time::Instant::now();
    loop {
        let there = call(&b, Method::GET, "/v1/jobs", &writer, None).await;
        if there.status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "the other replica still takes the revoked key: {:?}",
            there.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    eprintln!(
        "the revocation reached the other replica in {:?}",
        started.elapsed()
    );
}
