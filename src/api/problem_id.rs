//! Every problem body names its request: the middleware here adds the request's `x-request-id`
//! to each `application/problem+json` answer (whoever made it: a handler, an extractor, the
//! timeout or body-limit layer) and logs the problem under the request's span, so an operator
//! given the id finds the full story in the log while the body says only what went wrong.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::REQUEST_ID;

/// Problem bodies are a few hundred bytes; anything larger is passed on untouched.
const MAX_PROBLEM_BYTES: usize = 64 * 1024;

/// Adds `request_id` to problem+json bodies and logs each problem.
pub async fn problem_request_id(request: Request, next: Next) -> Response {
    let request_id = request.headers().get(REQUEST_ID).cloned();
    let response = next.run(request).await;
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    let Some(request_id) = request_id.filter(|_| is_problem) else {
        return response;
    };
    let (mut parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_PROBLEM_BYTES).await {
        Ok(bytes) => bytes,
        Err(error) => {
            tracing::warn!(%error, "a problem body could not be read to stamp its request id");
            return Response::from_parts(parts, Body::empty());
        }
    };
    let Ok(serde_json::Value::Object(mut problem)) = serde_json::from_slice(&bytes) else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let id = request_id.to_str().unwrap_or_default().to_owned();
    // 5xx causes were logged in full where the error was turned into a response; this line ties
    // every refusal, 4xx included, to the request's span (which carries the same id).
    tracing::info!(
        status = parts.status.as_u16(),
        problem = problem
            .get("type")
            .and_then(|t| t.as_str())
            .unwrap_or_default(),
        detail = problem
            .get("detail")
            .and_then(|t| t.as_str())
            .unwrap_or_default(),
        "request refused"
    );
    problem.insert("request_id".into(), id.into());
    let bytes = serde_json::to_vec(&problem).unwrap_or_else(|_| bytes.to_vec());
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Ok(length) = HeaderValue::try_from(bytes.len().to_string()) {
        parts.headers.insert(header::CONTENT_LENGTH, length);
    }
    Response::from_parts(parts, Body::from(bytes))
}
