//! `POST/GET /v1/webhooks`, `DELETE /v1/webhooks/{id}`, and the delivery logs
//! `GET /v1/webhooks/{id}/deliveries` and `GET /v1/jobs/{id}/webhook-deliveries`.
//!
//! A tenant's webhooks get every event they name of every job of the tenant; a job's own (its
//! spec's `webhooks`) only that job's. Each is signed with its secret, `whsec_` + base64, shown
//! once: in the answer that creates the webhook (or, for a job's own, the job).

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use compressd_engine::spec::WebhookEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::access::owned_job;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::{JobId, JsonBody, QueryPairs};
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::error::Error;
use crate::store::{
    DeliveryAttempt, DeliveryFilter, DeliveryLog, DeliveryStatus, Webhook, MAX_PAGE,
};
use crate::webhooks::signing::new_secret;

const DEFAULT_LIMIT: u32 = 20;

/// The most webhooks one tenant may register: every job event fans out to each of them.
pub const MAX_TENANT_WEBHOOKS: usize = 50;

/// A webhook as the API shows it (never with its secret, but once).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookView {
    /// UUID v7.
    pub id: Uuid,
    /// Where deliveries are posted.
    pub url: String,
    /// The events sent.
    #[schema(schema_with = event_list)]
    pub events: Vec<WebhookEvent>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

impl From<Webhook> for WebhookView {
    fn from(webhook: Webhook) -> Self {
        Self {
            id: webhook.id,
            url: webhook.url,
            events: webhook.events,
            created_at: webhook.created_at,
        }
    }
}

/// A list of webhook events: the job spec's `WebhookEvent` schema, which the engine defines.
fn event_list() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(utoipa::openapi::Ref::from_schema_name("WebhookEvent"))
        .build()
}

/// A webhook to register.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewWebhookRequest {
    /// An `http` or `https` URL; loopback, link-local and private addresses are refused unless
    /// the operator allowed them (`allowed_private_networks`).
    pub url: String,
    /// The events to send: `job.started`, `stage.completed`, `job.succeeded`, `job.failed`,
    /// `job.cancelled`; by default the last three.
    #[serde(default = "WebhookEvent::terminal")]
    #[schema(schema_with = event_list)]
    pub events: Vec<WebhookEvent>,
}

/// The answer to a create: the webhook and its signing secret, shown this once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedWebhook {
    /// The webhook.
    #[serde(flatten)]
    pub webhook: WebhookView,
    /// The signing secret (`whsec_` + base64), for verifying `webhook-signature`; not shown again.
    pub secret: String,
}

/// A tenant's webhooks.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebhookList {
    /// Oldest first.
    pub webhooks: Vec<WebhookView>,
}

/// One attempt at a delivery.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptView {
    /// From 1.
    pub attempt: i32,
    /// When the request started.
    pub started_at: DateTime<Utc>,
    /// When the answer (or the error) came.
    pub finished_at: DateTime<Utc>,
    /// The HTTP status the target answered; absent when none came.
    pub status_code: Option<i32>,
    /// What went wrong; absent on a 2xx.
    pub error: Option<String>,
}

impl From<DeliveryAttempt> for AttemptView {
    fn from(a: DeliveryAttempt) -> Self {
        Self {
            attempt: a.attempt,
            started_at: a.started_at,
            finished_at: a.finished_at,
            status_code: a.status_code,
            error: a.error,
        }
    }
}

/// One event sent to one webhook, with its attempts.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// The delivery's number; the cursor of the next page.
    pub id: i64,
    /// The `webhook-id` header of every attempt (`msg_<id>`), for deduplicating.
    pub message_id: String,
    /// The webhook.
    pub webhook_id: Uuid,
    /// The job.
    pub job_id: Uuid,
    /// The event, e.g. `job.succeeded`.
    pub event: String,
    /// The job event it reports (its `seq` in the job's event stream).
    pub event_seq: i64,
    /// The target.
    pub url: String,
    /// `pending`, `delivered` or `failed` (the attempts were used up).
    #[schema(value_type = String)]
    pub status: DeliveryStatus,
    /// When the next attempt is due, while pending.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// When the event was recorded.
    pub created_at: DateTime<Utc>,
    /// Attempts so far, oldest first.
    pub attempts: Vec<AttemptView>,
}

impl From<DeliveryLog> for DeliveryView {
    fn from(log: DeliveryLog) -> Self {
        let d = log.delivery;
        Self {
            message_id: d.message_id(),
            id: d.id,
            webhook_id: d.webhook_id,
            job_id: d.job_id,
            event: d.event_type,
            event_seq: d.event_seq,
            url: d.url,
            status: d.status,
            next_attempt_at: (d.status == DeliveryStatus::Pending).then_some(d.next_attempt_at),
            created_at: d.created_at,
            attempts: log.attempts.into_iter().map(AttemptView::from).collect(),
        }
    }
}

/// A page of deliveries.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Oldest first.
    pub deliveries: Vec<DeliveryView>,
    /// The `after` of the next page, when there may be one.
    pub next: Option<i64>,
}

/// Registers a webhook for every job of the caller's tenant.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks",
    request_body(content = NewWebhookRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "Registered; `secret` is shown this once", body = CreatedWebhook),
        (status = 400, description = "Malformed JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The tenant already has the most webhooks allowed (50)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A bad field, or a URL the network policy refuses; `pointer` names it", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_webhook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let spec: NewWebhookRequest = serde_path_to_error::deserialize(&body).map_err(|e| {
        let pointer: String = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Seq { index } => Some(format!("/{index}")),
                serde_path_to_error::Segment::Map { key } => Some(format!("/{key}")),
                _ => None,
            })
            .collect();
        ApiError::invalid_request(pointer, e.into_inner().to_string())
    })?;
    if spec.events.is_empty() {
        return Err(ApiError::invalid_request(
            "/events",
            "must name at least one event (leave it out for the terminal ones)",
        ));
    }
    check_target(&state, &spec.url, "/url").await?;
    let registered = state.store.list_webhooks(&caller.tenant, None).await?.len();
    if registered >= MAX_TENANT_WEBHOOKS {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "webhook-limit",
            "Too many webhooks",
            format!(
                "tenant {} has {registered} webhooks, the most allowed is {MAX_TENANT_WEBHOOKS}; \
                 delete one first",
                caller.tenant
            ),
        ));
    }
    let webhook = Webhook {
        id: state.clock.new_id(),
        tenant: caller.tenant.clone(),
        job_id: None,
        url: spec.url,
        events: spec.events,
        secret: new_secret(),
        created_at: state.clock.now(),
    };
    state.store.insert_webhook(&webhook).await?;
    tracing::info!(webhook.id = %webhook.id, tenant = %webhook.tenant, "webhook registered");
    let location = HeaderValue::from_str(&format!("/v1/webhooks/{}", webhook.id))
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let secret = webhook.secret.clone();
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(CreatedWebhook {
            webhook: webhook.into(),
            secret,
        }),
    )
        .into_response())
}

/// Checks a webhook target against the network policy: a 422 at `pointer` when refused.
///
/// # Errors
/// 422 (`invalid-request`) naming why the URL is refused.
pub async fn check_target(state: &AppState, url: &str, pointer: &str) -> Result<(), ApiError> {
    match state.config.url_policy.check_url(url).await {
        Ok(_) => Ok(()),
        Err(Error::Rejected(rejection)) => {
            Err(ApiError::invalid_request(pointer, rejection.message))
        }
        Err(other) => Err(other.into()),
    }
}

/// The caller's tenant's webhooks (a job's own are listed with the job's spec).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    responses((status = 200, body = WebhookList)))]
pub async fn list_webhooks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<WebhookList>, ApiError> {
    let webhooks = state.store.list_webhooks(&caller.tenant, None).await?;
    Ok(Json(WebhookList {
        webhooks: webhooks.into_iter().map(WebhookView::from).collect(),
    }))
}

/// Deletes a webhook; its deliveries not yet made are dropped, the log of the others stays.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = Uuid, Path, description = "Webhook id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such webhook", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_webhook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let webhook = owned_webhook(&state, &caller, &raw).await?;
    state.store.delete_webhook(webhook.id).await?;
    tracing::info!(webhook.id = %webhook.id, "webhook deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A webhook's deliveries, oldest first.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(
        ("id" = Uuid, Path, description = "Webhook id"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)"),
        ("after" = Option<i64>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "Malformed id or query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such webhook", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn webhook_deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    query: QueryPairs,
) -> Result<Json<DeliveryList>, ApiError> {
    let webhook = owned_webhook(&state, &caller, &raw).await?;
    let filter = DeliveryFilter {
        webhook_id: Some(webhook.id),
        ..delivery_page(&query, &caller)?
    };
    list_deliveries(&state, filter).await
}

/// A job's webhook deliveries (its own webhooks' and its tenant's), oldest first.
#[utoipa::path(get, path = "/v1/jobs/{id}/webhook-deliveries", tag = "jobs",
    params(
        ("id" = Uuid, Path, description = "Job id"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)"),
        ("after" = Option<i64>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "Malformed id or query parameter", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn job_webhook_deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(id): JobId,
    query: QueryPairs,
) -> Result<Json<DeliveryList>, ApiError> {
    owned_job(&state, &caller, id).await?;
    let filter = DeliveryFilter {
        job_id: Some(id),
        ..delivery_page(&query, &caller)?
    };
    list_deliveries(&state, filter).await
}

async fn list_deliveries(
    state: &AppState,
    filter: DeliveryFilter,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = filter.limit as usize;
    let logs = state.store.list_webhook_deliveries(&filter).await?;
    let next = if logs.len() == limit {
        logs.last().map(|l| l.delivery.id)
    } else {
        None
    };
    Ok(Json(DeliveryList {
        deliveries: logs.into_iter().map(DeliveryView::from).collect(),
        next,
    }))
}

/// The caller's tenant webhook `raw` (404 for another tenant's, or a job's own).
async fn owned_webhook(state: &AppState, caller: &Caller, raw: &str) -> Result<Webhook, ApiError> {
    let id = Uuid::parse_str(raw).map_err(|_| {
        ApiError::bad_request(
            "invalid-webhook-id",
            format!("`{raw}` is not a webhook id (a UUID)"),
        )
    })?;
    match state.store.get_webhook(id).await? {
        Some(webhook) if webhook.tenant == caller.tenant && webhook.job_id.is_none() => Ok(webhook),
        _ => Err(Error::NotFound {
            kind: "webhook",
            id: id.to_string(),
        }
        .into()),
    }
}

/// `limit` and `after` of a delivery list, over the caller's tenant.
fn delivery_page(query: &QueryPairs, caller: &Caller) -> Result<DeliveryFilter, ApiError> {
    query.only(&["limit", "after"])?;
    let invalid = |message: String| ApiError::bad_request("invalid-query", message);
    let limit = match query.one("limit")? {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                invalid(format!(
                    "limit must be an integer from 1 to {MAX_PAGE}, got `{raw}`"
                ))
            })?,
    };
    let after = query
        .one("after")?
        .map(|raw| {
            raw.parse::<i64>()
                .map_err(|_| invalid(format!("after `{raw}` is not a delivery id")))
        })
        .transpose()?;
    Ok(DeliveryFilter {
        tenant: caller.tenant.clone(),
        job_id: None,
        webhook_id: None,
        after,
        limit,
    })
}
