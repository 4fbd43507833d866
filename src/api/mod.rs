//! The HTTP API: routes, middleware, and the error mapping.
//!
//! This module only wires; each resource's handlers sit in their own module with their request and
//! response types and OpenAPI annotations.

pub mod access;
pub mod artifacts;
pub mod artifacts_range;
pub mod audit;
pub mod datasets;
pub mod datasets_create;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod jobs;
pub mod metrics;
pub mod models;
pub mod models_create;
mod models_register;
pub mod openapi;
mod problem_id;
pub mod state;
pub mod ui;
pub mod webhooks;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use error::ApiError;
pub use state::{ApiConfig, AppState};

/// Header carrying the request id, taken from the client or made here, and echoed in the response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The complete application: routes, then middleware (outermost first: request id, tracing,
/// CORS, metrics, access (auth, rate limit, scope, audit), then timeout and body limit on every
/// route but the uploads).
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route(
            "/v1/jobs",
            post(jobs::create::create_job).get(jobs::list::list_jobs),
        )
        .route(
            "/v1/jobs/{id}",
            get(jobs::manage::get_job).delete(jobs::manage::delete_job),
        )
        .route("/v1/jobs/{id}/cancel", post(jobs::manage::cancel_job))
        .route("/v1/jobs/{id}/events", get(events::job_events))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/ui", get(ui::ui_index))
        .route("/ui/", get(ui::ui_index))
        .route("/ui/{asset}", get(ui::ui_asset))
        .route("/v1/models", get(models::list_models))
        .route(
            "/v1/models/{id}",
            get(models::get_model).delete(models::delete_model),
        )
        .route("/v1/datasets", get(datasets::list_datasets))
        .route(
            "/v1/datasets/{id}",
            get(datasets::get_dataset).delete(datasets::delete_dataset),
        )
        .route("/v1/jobs/{id}/artifacts", get(artifacts::list_artifacts))
        .route("/v1/audit", get(audit::list_audit))
        .route(
            "/v1/webhooks",
            post(webhooks::create_webhook).get(webhooks::list_webhooks),
        )
        .route(
            "/v1/webhooks/{id}",
            axum::routing::delete(webhooks::delete_webhook),
        )
        .route(
            "/v1/webhooks/{id}/deliveries",
            get(webhooks::webhook_deliveries),
        )
        .route(
            "/v1/jobs/{id}/webhook-deliveries",
            get(webhooks::job_webhook_deliveries),
        )
        .route(
            "/v1/jobs/{id}/artifacts/{*name}",
            get(artifacts::download_artifact),
        )
        .layer(DefaultBodyLimit::max(state.config.json_body_limit_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.config.request_timeout,
        ));
    // Uploads stream gigabytes: no request timeout and no body limit here; their handlers enforce
    // the upload size limits themselves while streaming.
    let uploads = Router::new()
        .route("/v1/models", post(models_create::create_model))
        .route("/v1/datasets", post(datasets_create::create_dataset))
        .layer(DefaultBodyLimit::disable());
    let routes = routes
        .merge(uploads)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::access,
        ))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            metrics::track,
        ));
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(TraceLayer::new_for_http().make_span_with(http_span))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(axum::middleware::from_fn(problem_id::problem_request_id))
        .layer(cors(&state.config.cors_allowed_origins));
    routes.layer(layers).with_state(state)
}

fn http_span(request: &Request) -> tracing::Span {
    let request_id = request
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    tracing::info_span!("http.request", method = %request.method(), path = %request.uri().path(), request_id = %request_id)
}

/// CORS from the configured origins: none allows no cross-origin calls, `*` any origin.
/// Origins that are not valid header values were rejected when the settings were loaded.
fn cors(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE])
        .allow_headers([
            axum::http::header::CONTENT_TYPE,
            axum::http::header::AUTHORIZATION,
            HeaderName::from_static("idempotency-key"),
            REQUEST_ID,
        ])
        .expose_headers([
            REQUEST_ID,
            axum::http::header::LOCATION,
            axum::http::header::RETRY_AFTER,
        ])
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}
