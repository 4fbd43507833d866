//! `GET /v1/datasets`, `GET /v1/datasets/{id}`, `DELETE /v1/datasets/{id}`, and the dataset's
//! JSON view. Registration (`POST /v1/datasets`) is in `datasets_create.rs`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Extension;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::models::{page, parse_id};
use crate::api::access::owned_dataset;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::QueryPairs;
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::inputs::RejectedRow;
use crate::store::Dataset;

/// A registered dataset.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetView {
    pub id: Uuid,
    pub name: String,
    /// `jsonl`, `csv` or `text`.
    pub format: String,
    /// Usable rows.
    pub rows: i64,
    /// Rows per label (empty for text).
    pub label_counts: BTreeMap<String, u64>,
    /// Rows per split.
    pub splits: BTreeMap<String, u64>,
    /// Rows skipped (only with `strict=false`).
    pub rejected: u64,
    /// The first skipped rows with their line numbers.
    #[schema(value_type = Vec<Object>)]
    pub rejected_rows: Vec<RejectedRow>,
    pub text_field: String,
    pub label_field: String,
    pub bytes: i64,
    pub sha256: String,
    /// `upload`, or the URI it was registered from.
    pub source: String,
    /// The commit an `hf://` reference's revision resolved to when it was registered: register
    /// `…@<this>` to fetch exactly the same files again. Absent for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_revision: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl From<Dataset> for DatasetView {
    fn from(d: Dataset) -> Self {
        let meta = &d.metadata;
        let text = |key: &str| {
            meta.get(key)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        Self {
            label_counts: meta_field(meta, "label_counts"),
            splits: meta_field(meta, "splits"),
            rejected: meta
                .get("rejected")
                .and_then(Value::as_u64)
                .unwrap_or_default(),
            rejected_rows: meta_field(meta, "rejected_rows"),
            text_field: text("text_field"),
            label_field: text("label_field"),
            source: text("source"),
            source_revision: meta
                .get("source_revision")
                .and_then(Value::as_str)
                .map(str::to_owned),
            id: d.id,
            name: d.name,
            format: d.format,
            rows: d.rows,
            bytes: d.bytes,
            sha256: d.sha256,
            created_at: d.created_at,
        }
    }
}

/// A typed field of the record's metadata; absent or malformed reads as empty.
fn meta_field<T: serde::de::DeserializeOwned + Default>(meta: &Value, key: &str) -> T {
    meta.get(key)
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// A page of datasets.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DatasetList {
    /// Newest first.
    pub datasets: Vec<DatasetView>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<Uuid>,
}

/// List datasets, newest first.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)"),
        ("after" = Option<Uuid>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = DatasetList),
        (status = 400, description = "Malformed query parameter", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_datasets(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: QueryPairs,
) -> Result<Json<DatasetList>, ApiError> {
    let page = page(&query, &caller)?;
    let limit = page.limit as usize;
    let datasets = state.store.list_datasets(page).await?;
    let next = if datasets.len() == limit {
        datasets.last().map(|d| d.id)
    } else {
        None
    };
    Ok(Json(DatasetList {
        datasets: datasets.into_iter().map(DatasetView::from).collect(),
        next,
    }))
}

/// One dataset.
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets",
    params(("id" = Uuid, Path, description = "Dataset id")),
    responses(
        (status = 200, body = DatasetView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dataset", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_dataset(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<Json<DatasetView>, ApiError> {
    let id = parse_id("dataset", &raw)?;
    let dataset = owned_dataset(&state, &caller, id).await?;
    Ok(Json(dataset.into()))
}

/// Delete a dataset and its file; refused while a queued or running job uses it.
#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets",
    params(("id" = Uuid, Path, description = "Dataset id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such dataset", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A queued or running job uses it", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_dataset(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id("dataset", &raw)?;
    let dataset = owned_dataset(&state, &caller, id).await?;
    state.store.delete_dataset(id).await?;
    if let Err(error) = state
        .artifacts
        .delete_prefix(&format!("datasets/{id}/"))
        .await
    {
        tracing::warn!(dataset.id = %id, uri = %dataset.uri, %error, "dataset file left behind");
    }
    tracing::info!(dataset.id = %id, "dataset deleted");
    Ok(StatusCode::NO_CONTENT)
}
