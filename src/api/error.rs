//! Errors become HTTP here and only here: RFC 9457 `application/problem+json` bodies with a stable
//! `type` slug and, for bad input, the JSON pointer of the offending field.
//!
//! 5xx answers carry a generic message; the full error chain goes to the log with the request's span.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use compressd_engine::spec::Violation;
use serde::Serialize;

use crate::error::Error;

/// Prefix of every problem `type`: a URN, stable and not pretending to be a fetchable page.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:compressd:problem:";

/// The problem+json body, as documented in the OpenAPI contract.
#[derive(Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:compressd:problem:<slug>`, e.g. `urn:compressd:problem:invalid-spec`.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this request.
    pub detail: String,
    /// JSON pointer (RFC 6901) of the first offending request field, e.g. `/pipeline/1/sparsity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    /// Every offending field, for validation failures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
    /// This request's id (also the `x-request-id` header): the server log has the full detail of
    /// the failure under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// One offending field.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON pointer of the field.
    pub pointer: String,
    /// What is wrong with it.
    pub detail: String,
}

/// An error answer of the API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    slug: &'static str,
    title: &'static str,
    detail: String,
    errors: Vec<FieldError>,
    /// The cause of a 5xx, logged, never shown.
    internal: Option<Box<Error>>,
    /// Headers the answer needs (`WWW-Authenticate`, `Retry-After`).
    headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    /// A problem without field details.
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            status,
            slug,
            title,
            detail: detail.into(),
            errors: Vec::new(),
            internal: None,
            headers: Vec::new(),
        }
    }

    /// The same error, answered with `name: value` too.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 401: no usable API key (missing, malformed, unknown or revoked).
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            detail,
        )
        .with_header(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"compressd\""),
        )
    }

    /// 403: the key is valid but lacks the scope the route needs.
    pub fn forbidden(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "insufficient-scope",
            "The API key lacks the scope this needs",
            detail,
        )
    }

    /// 429: the key sent more requests than its rate allows; retry after `retry_after_secs`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("this API key's request rate is exceeded; retry in {retry_after_secs} s"),
        )
        .with_header(header::RETRY_AFTER, HeaderValue::from(retry_after_secs))
    }

    /// 400: the body is not JSON.
    pub fn malformed_json(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "Request body is not valid JSON",
            detail,
        )
    }

    /// 400: a header, query parameter or path segment is malformed.
    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, slug, "Bad request", detail)
    }

    /// 404 for a path no route matches.
    pub fn route_not_found(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no resource at {path}"),
        )
    }

    /// 415: the body is not declared as JSON.
    pub fn unsupported_media_type(found: Option<&str>) -> Self {
        let detail = match found {
            Some(found) => format!("expected Content-Type application/json, got {found}"),
            None => "expected Content-Type application/json, got none".to_owned(),
        };
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            detail,
        )
    }

    /// 413: the body is over the limit.
    pub fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body-too-large",
            "Request body too large",
            format!("the limit is {limit} bytes"),
        )
    }

    /// 422: the request is well-formed JSON but its content is invalid.
    pub fn invalid(violations: Vec<Violation>) -> Self {
        let detail = match violations.as_slice() {
            [one] => format!("{}: {}", one.pointer, one.message),
            many => format!(
                "{} problems, the first at {}: {}",
                many.len(),
                many[0].pointer,
                many[0].message
            ),
        };
        let errors = violations
            .into_iter()
            .map(|v| FieldError {
                pointer: v.pointer,
                detail: v.message,
            })
            .collect();
        Self {
            errors,
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-spec",
                "The job spec is invalid",
                detail,
            )
        }
    }

    /// A 422 about one field of a request body that is not a job spec (a model or dataset
    /// reference).
    pub fn invalid_request(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        let (pointer, message) = (pointer.into(), message.into());
        let detail = format!("{pointer}: {message}");
        Self {
            errors: vec![FieldError {
                pointer,
                detail: message,
            }],
            ..Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-request",
                "The request is invalid",
                detail,
            )
        }
    }

    /// A 422 about one field.
    pub fn invalid_field(pointer: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid(vec![Violation {
            pointer: pointer.into(),
            message: message.into(),
        }])
    }

    /// The same error, naming the request field it is about (`/uri`) as its JSON pointer.
    pub fn at_pointer(mut self, pointer: impl Into<String>) -> Self {
        self.errors = vec![FieldError {
            pointer: pointer.into(),
            detail: self.detail.clone(),
        }];
        self
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn internal(error: Error, status: StatusCode, slug: &'static str, title: &'static str) -> Self {
        Self {
            internal: Some(Box::new(error)),
            ..Self::new(status, slug, title, title)
        }
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        match error {
            Error::NotFound { kind, ref id } => {
                let slug = match kind {
                    "job" => "job-not-found",
                    "model" => "model-not-found",
                    "dataset" => "dataset-not-found",
                    "artifact" => "artifact-not-found",
                    "webhook" => "webhook-not-found",
                    _ => "not-found",
                };
                Self::new(
                    StatusCode::NOT_FOUND,
                    slug,
                    "Not found",
                    format!("{kind} {id} does not exist"),
                )
            }
            Error::JobState { .. } => Self::new(
                StatusCode::CONFLICT,
                "job-state-conflict",
                "Job state conflict",
                error.to_string(),
            ),
            Error::IdempotencyConflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "idempotency-key-reused",
                "Idempotency key reused",
                error.to_string(),
            ),
            Error::Rejected(rejection) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                rejection.slug,
                "Invalid input",
                rejection.to_string(),
            ),
            Error::TooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body-too-large",
                "Request body too large",
                error.to_string(),
            ),
            Error::Upstream(detail) => Self::new(
                StatusCode::BAD_GATEWAY,
                "upstream-failed",
                "A remote source failed",
                detail,
            ),
            Error::BadUpload(detail) => {
                Self::new(StatusCode::BAD_REQUEST, "bad-upload", "Bad upload", detail)
            }
            Error::Conflict(detail) => {
                Self::new(StatusCode::CONFLICT, "conflict", "Conflict", detail)
            }
            Error::InvalidSpec(violations) => Self::invalid(violations),
            Error::Quota { quota, .. } => Self::new(
                if quota == "tenant_max_stored_bytes" {
                    StatusCode::INSUFFICIENT_STORAGE
                } else {
                    StatusCode::TOO_MANY_REQUESTS
                },
                "quota-exceeded",
                "A tenant quota is used up",
                error.to_string(),
            ),
            Error::Invalid(detail) => Self::bad_request("invalid-request", detail),
            Error::NotImplemented(detail) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not-implemented",
                "Not implemented",
                detail,
            ),
            Error::Database(sqlx::Error::PoolTimedOut) => Self::internal(
                error,
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "The database is busy; retry later",
            ),
            other => Self::internal(
                other,
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal server error",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(error) = &self.internal {
            // {:#} would only show the top; walk the chain so the log has the root cause.
            let mut chain = error.to_string();
            let mut source = std::error::Error::source(&**error);
            while let Some(cause) = source {
                chain.push_str(": ");
                chain.push_str(&cause.to_string());
                source = cause.source();
            }
            tracing::error!(status = self.status.as_u16(), error = %chain, "request failed");
        }
        let body = Problem {
            problem_type: format!("{PROBLEM_TYPE_PREFIX}{}", self.slug),
            title: self.title.to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            pointer: self.errors.first().map(|e| e.pointer.clone()),
            errors: self.errors,
            // Stamped on the way out by `problem_request_id`, which knows the request.
            request_id: None,
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}
