//! `POST /v1/jobs`: validate a spec, check its inputs exist, queue the job (idempotently).

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use compressd_engine::data::split::Split;
use compressd_engine::spec::{JobSpec, ModelState};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::JobView;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::JsonBody;
use crate::api::state::AppState;
use crate::api::webhooks::check_target;
use crate::auth::Caller;
use crate::job_spec;
use crate::store::{Created, Dataset, Idempotency, Model, NewJob, Webhook};
use crate::webhooks::signing::new_secret;

/// Header a client sets to make retries of a create safe.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest accepted idempotency key.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Queue a job.
///
/// With an `Idempotency-Key` header, repeating the same request returns the same job (200) instead
/// of creating another; reusing the key with a different body is a 409.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    params(("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[!-~][\t -~]*$", description = "Makes retries safe: same key and body, same job (1 to 255 visible ASCII characters)")),
    request_body(content = Object, description = "A job spec (v1); see the README", content_type = "application/json"),
    responses(
        (status = 201, description = "Queued; with `webhooks` in the spec, `webhook_secret` is their signing secret", body = JobView),
        (status = 200, description = "Replay of an earlier request with the same idempotency key", body = JobView),
        (status = 400, description = "Malformed JSON or header", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body over the limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid spec; `pointer` names the field", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The tenant's queued and running jobs are at `tenant_max_active_jobs`", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let spec = job_spec::accept(&body).map_err(ApiError::invalid)?;
    let (model, dataset) = resolve_inputs(&state, &caller, &spec).await?;
    let (model_id, dataset_id) = (model.id, dataset.id);
    let train_rows = train_rows(&dataset);
    // With the registered model known, each stage's preconditions are checked against it too
    // (models registered before the layer count was recorded leave it to the engine).
    let input = ModelState {
        layers: model
            .metadata
            .get("layers")
            .and_then(serde_json::Value::as_u64)
            .map(|l| l as usize),
        family: Some(model.architecture.clone()),
        // Recorded at registration (models registered before that leave LoRA's fit to the engine).
        linear_modules: model
            .metadata
            .get("linear_modules")
            .and_then(|m| serde_json::from_value(m.clone()).ok()),
        train_rows,
        ..ModelState::input(spec.task.task_type)
    };
    let violations = spec.validate_from(&input);
    if !violations.is_empty() {
        return Err(ApiError::invalid(violations));
    }
    super::named_models::check(&state, &caller, &spec, &model, &dataset).await?;
    check_tracking_uri(&state, &spec).await?;
    let spec_json = serde_json::to_value(&spec)
        .map_err(|e| crate::Error::Corrupt(format!("spec does not serialize: {e}")))?;
    let idempotency = key.map(|key| Idempotency {
        key,
        request_hash: request_hash(&spec_json),
    });
    for (index, webhook) in spec.webhooks.iter().enumerate() {
        check_target(&state, &webhook.url, &format!("/webhooks/{index}/url")).await?;
    }
    let job_id = state.clock.new_id();
    let new_job = NewJob {
        webhooks: job_webhooks(&state, &caller, job_id, &spec),
        id: job_id,
        tenant: caller.tenant.clone(),
        name: spec.name.clone(),
        spec: spec_json,
        model_id,
        dataset_id,
        priority: spec.priority,
        max_attempts: state.config.max_attempts,
        idempotency,
        created_at: state.clock.now(),
        // Checked by the store in the insert's transaction: concurrent requests cannot pass it.
        max_active_jobs: Some(state.config.access.quotas.max_active_jobs).filter(|&n| n > 0),
    };
    let (status, job) = match state.store.create_job(new_job).await? {
        Created::New(job) => {
            state.metrics.jobs_created.inc();
            tracing::info!(job.id = %job.id, job.name = %job.name, "job queued");
            (StatusCode::CREATED, job)
        }
        Created::Existing(job) => (StatusCode::OK, job),
    };
    let location = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id))
        .map_err(|e| crate::Error::Corrupt(e.to_string()))?;
    // The secret is stored with the job's webhooks; a replay answers it again, as the first
    // answer may be the one that was lost.
    let webhook_secret = if spec.webhooks.is_empty() {
        None
    } else {
        state
            .store
            .list_webhooks(&caller.tenant, Some(job.id))
            .await?
            .into_iter()
            .next()
            .map(|w| w.secret)
    };
    let view = JobView {
        webhook_secret,
        ..JobView::from(job)
    };
    Ok((status, [(header::LOCATION, location)], Json(view)).into_response())
}

/// The spec's webhooks as rows of the new job, all signed with one new secret.
fn job_webhooks(state: &AppState, caller: &Caller, job_id: Uuid, spec: &JobSpec) -> Vec<Webhook> {
    let secret = new_secret();
    spec.webhooks
        .iter()
        .map(|w| Webhook {
            id: state.clock.new_id(),
            tenant: caller.tenant.clone(),
            job_id: Some(job_id),
            url: w.url.clone(),
            events: w.events.clone(),
            secret: secret.clone(),
            created_at: state.clock.now(),
        })
        .collect()
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    // Checked before trimming too, as the document says: at most 255 characters as sent.
    if value.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(
            "invalid-idempotency-key",
            format!("Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    let key = value
        .to_str()
        .map_err(|_| {
            ApiError::bad_request(
                "invalid-idempotency-key",
                "Idempotency-Key must be visible ASCII",
            )
        })?
        .trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(ApiError::bad_request(
            "invalid-idempotency-key",
            format!("Idempotency-Key must have 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"),
        ));
    }
    Ok(Some(key.to_owned()))
}

/// sha256 of the normalized spec: bodies that differ only in key order, whitespace or spelled-out
/// defaults are the same request.
fn request_hash(spec: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(spec.to_string().as_bytes()))
}

/// A job's own MLflow tracking URI is a user's URL: it must pass the URL policy (no loopback,
/// link-local or private address unless allowed), or the job is a 422 at the field.
async fn check_tracking_uri(state: &AppState, spec: &JobSpec) -> Result<(), ApiError> {
    let Some(uri) = spec.mlflow.as_ref().and_then(|m| m.tracking_uri.as_deref()) else {
        return Ok(());
    };
    match state.config.url_policy.check_url(uri).await {
        Ok(_) => Ok(()),
        Err(crate::Error::Rejected(rejection)) => Err(ApiError::invalid_field(
            "/mlflow/tracking_uri",
            rejection.message,
        )),
        Err(other) => Err(other.into()),
    }
}

/// The records of the registered model and dataset the spec names, or a 422 pointing at the id.
async fn resolve_inputs(
    state: &AppState,
    caller: &Caller,
    spec: &JobSpec,
) -> Result<(Model, Dataset), ApiError> {
    let model_id = Uuid::parse_str(&spec.model).map_err(|_| {
        ApiError::invalid_field(
            "/model",
            format!("`{}` is not a model id (a UUID)", spec.model),
        )
    })?;
    let dataset_id = Uuid::parse_str(&spec.task.dataset).map_err(|_| {
        ApiError::invalid_field(
            "/task/dataset",
            format!("`{}` is not a dataset id (a UUID)", spec.task.dataset),
        )
    })?;
    // Another tenant's model or dataset is as unknown as one never registered.
    let model = state.store.get_model(model_id).await?;
    let Some(model) = model.filter(|m| m.tenant == caller.tenant) else {
        return Err(ApiError::invalid_field(
            "/model",
            format!("model {model_id} is not registered"),
        ));
    };
    let dataset = state.store.get_dataset(dataset_id).await?;
    let Some(dataset) = dataset.filter(|d| d.tenant == caller.tenant) else {
        return Err(ApiError::invalid_field(
            "/task/dataset",
            format!("dataset {dataset_id} is not registered"),
        ));
    };
    Ok((model, dataset))
}

/// Rows the engine trains on (split names as it reads them), when the dataset's registration
/// counted its splits; a record without split counts, or with a name the engine would refuse,
/// leaves the check to the engine.
fn train_rows(dataset: &Dataset) -> Option<u64> {
    dataset
        .metadata
        .get("splits")
        .and_then(serde_json::Value::as_object)
        .and_then(|splits| {
            splits
                .iter()
                .try_fold(0u64, |train, (name, rows)| match Split::parse(name)? {
                    Split::Train => Some(train + rows.as_u64()?),
                    Split::Validation | Split::Test => Some(train),
                })
        })
}
