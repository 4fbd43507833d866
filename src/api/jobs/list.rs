//! `GET /v1/jobs`: newest first, cursor-paginated.

use axum::extract::State;
use axum::Extension;
use axum::Json;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::JobView;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::QueryPairs;
use crate::api::state::AppState;
use crate::auth::Caller;
use crate::store::{JobFilter, JobStatus, MAX_PAGE};

/// Page size when the client gives none.
const DEFAULT_LIMIT: u32 = 20;

/// A page of jobs.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    /// Newest first.
    pub jobs: Vec<JobView>,
    /// Pass as `after` for the next page; `null` when this page is the last.
    pub next: Option<Uuid>,
}

/// List jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    params(
        ("status" = Option<JobStatus>, Query, description = "Only jobs in this status"),
        ("limit" = Option<u32>, Query, description = "Page size, 1 to 100 (default 20)"),
        ("after" = Option<Uuid>, Query, description = "Cursor: the `next` of the previous page"),
    ),
    responses(
        (status = 200, body = JobList),
        (status = 400, description = "Malformed query parameter", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_jobs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: QueryPairs,
) -> Result<Json<JobList>, ApiError> {
    let filter = filter(&query, &caller)?;
    let jobs = state.store.list_jobs(&filter).await?;
    let full = jobs.len() == filter.limit as usize;
    let next = if full {
        jobs.last().map(|job| job.id)
    } else {
        None
    };
    Ok(Json(JobList {
        jobs: jobs.into_iter().map(JobView::from).collect(),
        next,
    }))
}

fn filter(query: &QueryPairs, caller: &Caller) -> Result<JobFilter, ApiError> {
    query.only(&["status", "limit", "after"])?;
    let status = query
        .one("status")?
        .map(|raw| {
            JobStatus::ALL
                .into_iter()
                .find(|s| s.as_str() == raw)
                .ok_or_else(|| {
                    let known: Vec<_> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
                    ApiError::bad_request(
                        "invalid-query",
                        format!("status `{raw}` is not one of {}", known.join(", ")),
                    )
                })
        })
        .transpose()?;
    let limit = match query.one("limit")? {
        None => DEFAULT_LIMIT,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|limit| (1..=MAX_PAGE).contains(limit))
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
                ApiError::bad_request("invalid-query", format!("after `{raw}` is not a job id"))
            })
        })
        .transpose()?;
    Ok(JobFilter {
        tenant: Some(caller.tenant.clone()),
        status,
        after,
        limit,
    })
}
