//! `GET /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`, `DELETE /v1/jobs/{id}`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Extension;
use axum::Json;

use super::JobView;
use crate::api::access::owned_job;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::JobId;
use crate::api::state::AppState;
use crate::auth::Caller;

/// One job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = JobView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    let job = owned_job(&state, &caller, id).await?;
    Ok(Json(job.into()))
}

/// Cancel a job: a queued job is cancelled at once, a running one is asked to stop.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled, or cancel requested (`cancel_requested`)", body = JobView),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job already finished", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(id): JobId,
) -> Result<Json<JobView>, ApiError> {
    owned_job(&state, &caller, id).await?;
    let job = state.store.request_cancel(id, state.clock.now()).await?;
    tracing::info!(job.id = %id, job.status = %job.status, "cancel requested");
    Ok(Json(job.into()))
}

/// Delete a finished job with its events and artifacts.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The job is queued or running", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(id): JobId,
) -> Result<StatusCode, ApiError> {
    owned_job(&state, &caller, id).await?;
    let artifacts = state.store.delete_job(id).await?;
    // The rows are gone; a file that cannot be removed now is an orphan to sweep, not a failed delete.
    for artifact in &artifacts {
        if let Err(error) = state.artifacts.delete(&artifact.uri).await {
            tracing::warn!(job.id = %id, artifact = %artifact.name, error = %error, "artifact file left behind");
        }
    }
    tracing::info!(job.id = %id, artifacts = artifacts.len(), "job deleted");
    Ok(StatusCode::NO_CONTENT)
}
