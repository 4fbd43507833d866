//! `GET /v1/models`, `GET /v1/models/{id}`, `DELETE /v1/models/{id}`, and the model's JSON view.
//! Registration (`POST /v1/models`) is in `models_create.rs`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::api::access::owned_model;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::QueryPairs;
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::inputs::model::FileRecord;
use crate::store::{Model, Page, MAX_PAGE};

/// Page size when the client gives none.
const DEFAULT_LIMIT: u32 = 20;

/// A registered model.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelView {
    pub id: Uuid,
    pub name: String,
    /// `bert` or `llama`.
    pub architecture: String,
    /// `safetensors` or `gguf`.
    pub format: String,
    /// Weight elements (floating-point tensors only).
    pub parameters: u64,
    /// Total bytes of all files.
    pub bytes: i64,
    /// sha256 of the file list (`name sha256` lines, sorted by name).
    pub sha256: String,
    /// Every file with its size and sha256.
    #[schema(value_type = Vec<Object>)]
    pub files: Vec<FileRecord>,
    /// `upload`, or the URI it was registered from.
    pub source: String,
    /// The commit an `hf://` reference's revision resolved to when it was registered: register
    /// `…@<this>` to fetch exactly the same files again. Absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<Model> for ModelView {
    fn from(model: Model) -> Self {
        let meta = &model.metadata;
        Self {
            parameters: meta
                .get("parameters")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or_default(),
            files: meta
                .get("files")
                .and_then(|f| serde_json::from_value(f.clone()).ok())
                .unwrap_or_default(),
            source: meta
                .get("source")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            source_revision: meta
                .get("source_revision")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned),
            id: model.id,
            name: model.name,
            architecture: model.architecture,
            format: model.format,
            bytes: model.bytes,
            sha256: model.sha256,
            created_at: model.created_at,
        }
    }
}

/// A page of models.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Newest first.
    pub models: Vec<ModelView>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<Uuid>,
}

/// List models, newest first.
#[utoipa::path(get, path = "/v1/models", tag = "models",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)"),
        ("after" = Option<Uuid>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = ModelList),
        (status = 400, description = "Malformed query parameter", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: QueryPairs,
) -> Result<Json<ModelList>, ApiError> {
    let page = page(&query, &caller)?;
    let limit = page.limit as usize;
    let models = state.store.list_models(page).await?;
    let next = if models.len() == limit {
        models.last().map(|m| m.id)
    } else {
        None
    };
    Ok(Json(ModelList {
        models: models.into_iter().map(ModelView::from).collect(),
        next,
    }))
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "models",
    params(("id" = Uuid, Path, description = "Model id")),
    responses(
        (status = 200, body = ModelView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such model", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_model(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    let id = parse_id("model", &raw)?;
    let model = owned_model(&state, &caller, id).await?;
    Ok(Json(model.into()))
}

/// Delete a model and its files; refused while a queued or running job uses it.
#[utoipa::path(delete, path = "/v1/models/{id}", tag = "models",
    params(("id" = Uuid, Path, description = "Model id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such model", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A queued or running job uses it", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_model(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("model", &raw)?;
    let model = owned_model(&state, &caller, id).await?;
    state.store.delete_model(id).await?;
    // The row is gone; files that cannot be removed now are orphans for the sweeper.
    if let Err(error) = state.artifacts.delete_prefix(&model.uri).await {
        tracing::warn!(model.id = %id, %error, "model files left behind");
    }
    tracing::info!(model.id = %id, "model deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A resource id from the path; malformed is a 400 (`invalid-model-id`), never a 500.
pub(crate) fn parse_id(kind: &'static str, raw: &str) -> Result<Uuid, ApiError> {
    let slug = match kind {
        "model" => "invalid-model-id",
        _ => "invalid-dataset-id",
    };
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::bad_request(slug, format!("`{raw}` is not a {kind} id (a UUID)")))
}

/// `limit` and `after` query parameters, over the caller's tenant.
pub(crate) fn page(query: &QueryPairs, caller: &Caller) -> Result<Page, ApiError> {
    query.only(&["limit", "after"])?;
    let limit = match query.one("limit")? {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-query",
                    format!("limit must be an integer from 1 to {MAX_PAGE}, got `{raw}`"),
                )
            })?,
    };
    let after = query
        .one("after")?
        .map(|raw| {
            Uuid::parse_str(raw).map_err(|_| {
                ApiError::bad_request("invalid-query", format!("after `{raw}` is not an id"))
            })
        })
        .transpose()?;
    Ok(Page {
        tenant: Some(caller.tenant.clone()),
        after,
        limit,
    })
}
