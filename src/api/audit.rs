//! `GET /v1/audit`: the record of a tenant's state-changing requests, for its keys with the
//! `admin` scope. Like every other resource it is the caller's tenant's only.

use axum::extract::State;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::api::error::{ApiError, Problem};
use crate::api::extract::QueryPairs;
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::store::{AuditEntry, AuditFilter, MAX_PAGE};

/// Page size when the client gives none.
const DEFAULT_LIMIT: u32 = 50;

/// A page of audit entries.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditList {
    /// Oldest first.
    pub entries: Vec<AuditEntryView>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next: Option<i64>,
}

/// One recorded request: who (key, tenant), what (method, path), when and the result (status).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntryView {
    /// Order of recording; the cursor.
    pub seq: i64,
    /// When it was answered.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The tenant it acted for.
    pub tenant: String,
    /// The API key's id; `null` when the server runs without auth.
    pub key_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// HTTP status answered.
    pub status: i32,
    /// The request id (`x-request-id`), to find the request in the logs.
    pub request_id: Option<String>,
}

impl From<AuditEntry> for AuditEntryView {
    fn from(e: AuditEntry) -> Self {
        Self {
            seq: e.seq,
            at: e.at,
            tenant: e.tenant,
            key_id: e.key_id,
            method: e.method,
            path: e.path,
            status: e.status,
            request_id: e.request_id,
        }
    }
}

/// The caller's tenant's audit log, oldest first: every POST and DELETE on `/v1` (answered or refused).
#[utoipa::path(get, path = "/v1/audit", tag = "audit",
    params(
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 50)"),
        ("after" = Option<i64>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = AuditList),
        (status = 400, description = "Malformed query parameter", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_audit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: QueryPairs,
) -> Result<Json<AuditList>, ApiError> {
    query.only(&["limit", "after"])?;
    let limit = parse_number(&query, "limit")?.map_or(Ok(DEFAULT_LIMIT), |limit| {
        u32::try_from(limit)
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "invalid-query",
                    format!("limit must be an integer from 1 to {MAX_PAGE}"),
                )
            })
    })?;
    let filter = AuditFilter {
        tenant: Some(caller.tenant),
        after: parse_number(&query, "after")?,
        limit,
    };
    let entries = state.store.list_audit(&filter).await?;
    let next = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.seq))
        .flatten();
    Ok(Json(AuditList {
        entries: entries.into_iter().map(AuditEntryView::from).collect(),
        next,
    }))
}

fn parse_number(query: &QueryPairs, name: &str) -> Result<Option<i64>, ApiError> {
    query
        .one(name)?
        .map(|raw| {
            raw.parse::<i64>().map_err(|_| {
                ApiError::bad_request("invalid-query", format!("{name} `{raw}` is not an integer"))
            })
        })
        .transpose()
}
