//! `GET /v1/jobs/{id}/artifacts` and `GET /v1/jobs/{id}/artifacts/{name}`: what a job produced,
//! and streaming downloads with `ETag` (the sha256), `Range` and `Content-Length`, never holding
//! a file in memory. `{name}.tar` of a folder of artifacts (`model/…`) streams them as one tar.
//! With S3 and `redirect_downloads`, downloads answer 302 to a short-lived presigned URL.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::{
    ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_NONE_MATCH, LOCATION,
    RANGE,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::artifacts_range::{parse_range, RangeRequest};
use crate::api::access::owned_job;
use crate::api::error::{ApiError, Problem};
use crate::api::extract::JobId;
use crate::api::state::AppState;
use crate::artifacts::tar::{tar_len, tar_stream, TarMember};
use crate::auth::Caller;
use crate::error::Error;
use crate::store::Artifact;

/// One artifact of a job.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArtifactView {
    pub name: String,
    /// `model`, `report`, `checkpoint` or `log`.
    pub kind: String,
    /// `safetensors`, `gguf`, `json`, `markdown`, …
    pub format: String,
    pub bytes: i64,
    pub sha256: String,
    /// The attempt that produced it.
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
}

impl From<Artifact> for ArtifactView {
    fn from(a: Artifact) -> Self {
        Self {
            name: a.name,
            kind: a.kind,
            format: a.format,
            bytes: a.bytes,
            sha256: a.sha256,
            attempt: a.attempt,
            created_at: a.created_at,
        }
    }
}

/// A job's artifacts.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArtifactList {
    pub artifacts: Vec<ArtifactView>,
}

/// List a job's artifacts.
#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts", tag = "artifacts",
    params(("id" = uuid::Uuid, Path, description = "Job id")),
    responses(
        (status = 200, body = ArtifactList),
        (status = 400, description = "Malformed id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list_artifacts(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    JobId(id): JobId,
) -> Result<Json<ArtifactList>, ApiError> {
    owned_job(&state, &caller, id).await?;
    let artifacts = state.store.list_artifacts(id).await?;
    Ok(Json(ArtifactList {
        artifacts: artifacts.into_iter().map(ArtifactView::from).collect(),
    }))
}

/// Download an artifact (or `{folder}.tar` of a folder of them).
#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts/{name}", tag = "artifacts",
    params(("id" = uuid::Uuid, Path, description = "Job id"), ("name" = String, Path, description = "Artifact name")),
    responses(
        (status = 200, description = "The file", content_type = "application/octet-stream"),
        (status = 206, description = "The requested byte range", content_type = "application/octet-stream"),
        (status = 302, description = "Redirect to a presigned URL (S3 with redirect_downloads)"),
        (status = 304, description = "If-None-Match matched the ETag"),
        (status = 400, description = "Malformed job id", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such job or artifact", body = Problem, content_type = "application/problem+json"),
        (status = 416, description = "Range not satisfiable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn download_artifact(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((raw_id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = uuid::Uuid::parse_str(&raw_id).map_err(|_| {
        ApiError::bad_request(
            "invalid-job-id",
            format!("`{raw_id}` is not a job id (a UUID)"),
        )
    })?;
    // Another tenant's job is "no such job", before any artifact name is looked at.
    owned_job(&state, &caller, id).await?;
    let artifacts = state.store.list_artifacts(id).await?;
    if let Some(artifact) = artifacts.iter().find(|a| a.name == name) {
        return download_one(&state, artifact, &headers).await;
    }
    let folder = name.strip_suffix(".tar").map(|stem| format!("{stem}/"));
    let members: Vec<&Artifact> = match &folder {
        Some(folder) => artifacts
            .iter()
            .filter(|a| a.name.starts_with(folder.as_str()))
            .collect(),
        None => Vec::new(),
    };
    if members.is_empty() {
        return Err(Error::NotFound {
            kind: "artifact",
            id: format!("{id}/{name}"),
        }
        .into());
    }
    download_tar(&state, &members)
}

async fn download_one(
    state: &AppState,
    artifact: &Artifact,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let etag = format!("\"{}\"", artifact.sha256);
    if headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(ETAG, etag)]).into_response());
    }
    let inputs = &state.config.inputs;
    if inputs.redirect_downloads {
        if let Some(url) = state
            .artifacts
            .presigned_get(&artifact.uri, inputs.presigned_url_ttl)
            .await?
        {
            return Ok((StatusCode::FOUND, [(LOCATION, url.to_string())]).into_response());
        }
    }
    let size = u64::try_from(artifact.bytes).unwrap_or_default();
    let range = match headers.get(RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(raw) => match parse_range(raw, size) {
            RangeRequest::Satisfiable(range) => Some(range),
            RangeRequest::Ignored => None,
            RangeRequest::Unsatisfiable => {
                let mut response = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range-not-satisfiable",
                    "Range not satisfiable",
                    format!("`{raw}` is outside the artifact's {size} bytes"),
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(CONTENT_RANGE, header(&format!("bytes */{size}")));
                return Ok(response);
            }
        },
    };
    let body = state.artifacts.read(&artifact.uri, range.clone()).await?;
    let mut response = Response::new(Body::from_stream(body));
    let out = response.headers_mut();
    out.insert(ETAG, header(&etag));
    out.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    out.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(content_type(&artifact.format)),
    );
    match range {
        Some(range) => {
            *response.status_mut() = StatusCode::PARTIAL_CONTENT;
            let out = response.headers_mut();
            out.insert(
                CONTENT_LENGTH,
                header(&(range.end - range.start).to_string()),
            );
            out.insert(
                CONTENT_RANGE,
                header(&format!("bytes {}-{}/{size}", range.start, range.end - 1)),
            );
        }
        None => {
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, header(&size.to_string()));
        }
    }
    Ok(response)
}

fn download_tar(state: &AppState, members: &[&Artifact]) -> Result<Response, ApiError> {
    let members: Vec<TarMember> = members
        .iter()
        .map(|a| TarMember {
            path: a.name.clone(),
            key: a.uri.clone(),
            bytes: u64::try_from(a.bytes).unwrap_or_default(),
        })
        .collect();
    // The archive's identity is its members' identities, in order.
    let mut digest = Sha256::new();
    for a in &members {
        digest.update(format!("{} {}\n", a.path, a.key));
    }
    let len = tar_len(&members);
    let body = tar_stream(state.artifacts.clone(), members)?;
    let mut response = Response::new(Body::from_stream(body));
    let out = response.headers_mut();
    out.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-tar"));
    out.insert(CONTENT_LENGTH, header(&len.to_string()));
    out.insert(
        ETAG,
        header(&format!("W/\"{}\"", hex::encode(digest.finalize()))),
    );
    Ok(response)
}

/// Header values made here are ASCII digits, hex and quotes; a failure would be a bug.
fn header(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn content_type(format: &str) -> &'static str {
    match format {
        "json" => "application/json",
        "markdown" => "text/markdown; charset=utf-8",
        "log" | "text" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}
