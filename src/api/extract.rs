//! Request extractors that answer bad input with problem+json instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde_json::Value;
use uuid::Uuid;

use super::error::ApiError;
use super::state::AppState;

/// A JSON request body, checked in order: declared as JSON (else 415), within the body limit
/// (else 413), syntactically valid (else 400). Its meaning is checked by the handler (422).
#[derive(Debug)]
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = request
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("<not text>").to_owned());
        if !content_type.as_deref().is_some_and(is_json) {
            return Err(ApiError::unsupported_media_type(content_type.as_deref()));
        }
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::body_too_large(state.config.json_body_limit_bytes)
                } else {
                    ApiError::bad_request("unreadable-body", rejection.body_text())
                }
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ApiError::malformed_json(e.to_string()))
    }
}

/// `application/json` or any `application/*+json`, parameters (charset) ignored.
fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A job id from the path; a malformed one is a 400, not a routing miss or a 500.
#[derive(Debug, Clone, Copy)]
pub struct JobId(pub Uuid);

impl FromRequestParts<AppState> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::bad_request("invalid-job-id", rejection.body_text()))?;
        Uuid::parse_str(&raw).map(JobId).map_err(|_| {
            ApiError::bad_request(
                "invalid-job-id",
                format!("`{raw}` is not a job id (a UUID)"),
            )
        })
    }
}

/// The raw query string as key-value pairs, for handlers that check each parameter themselves
/// (so the answer can name the parameter).
#[derive(Debug, Default)]
pub struct QueryPairs(pub Vec<(String, String)>);

impl FromRequestParts<AppState> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        serde_urlencoded::from_str(query)
            .map(QueryPairs)
            .map_err(|e| {
                ApiError::bad_request("invalid-query", format!("malformed query string: {e}"))
            })
    }
}

impl QueryPairs {
    /// The single value of `name`, if given.
    ///
    /// # Errors
    /// 400 when the parameter is repeated or not one of `allowed`.
    pub fn one(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self
            .0
            .iter()
            .filter(|(key, _)| key == name)
            .map(|(_, value)| value.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::bad_request(
                "invalid-query",
                format!("query parameter `{name}` is given more than once"),
            ));
        }
        Ok(first)
    }

    /// Fails on parameters outside `allowed`, so typos are not silently ignored.
    ///
    /// # Errors
    /// 400 naming the unknown parameter.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self
            .0
            .iter()
            .find(|(key, _)| !allowed.contains(&key.as_str()))
        {
            Some((key, _)) => Err(ApiError::bad_request(
                "invalid-query",
                format!(
                    "unknown query parameter `{key}` (known: {})",
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_json;

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(is_json("application/merge-patch+json"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/jsonx"));
    }
}
