//! Prometheus metrics: the registry, the HTTP middleware that records requests, and `GET /metrics`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::scheduler::SchedulerMetrics;
use crate::webhooks::WebhookMetrics;

/// Labels of an HTTP request: the route template, not the raw path, to keep cardinality bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: String,
    /// Route template, e.g. `/v1/jobs/{id}`; `unmatched` for 404s.
    pub route: String,
    /// Response status code.
    pub status: u16,
}

/// The service's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    http_requests: Family<HttpLabels, Counter>,
    http_duration: Family<HttpLabels, Histogram>,
    /// Jobs accepted (not counting idempotent replays).
    pub jobs_created: Counter,
    /// Queue, worker and event-stream metrics.
    pub scheduler: SchedulerMetrics,
    /// Webhook deliveries and the outbox depth.
    pub webhooks: WebhookMetrics,
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("compressd");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered",
            http_requests.clone(),
        );
        // 0.5 ms to ~8 s: API calls are fast; anything slower is an outlier worth seeing.
        let http_duration = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 15))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests",
            http_duration.clone(),
        );
        let jobs_created = Counter::default();
        registry.register(
            "jobs_created",
            "Jobs accepted by the API",
            jobs_created.clone(),
        );
        let scheduler = SchedulerMetrics::default();
        scheduler.register(&mut registry);
        let webhooks = WebhookMetrics::default();
        webhooks.register(&mut registry);
        Self {
            registry,
            http_requests,
            http_duration,
            jobs_created,
            scheduler,
            webhooks,
        }
    }

    /// The registry, to add metrics owned by other parts (the scheduler's queue gauges) before
    /// the state is shared.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("encoding metrics into a String");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Middleware: counts and times every request by route.
pub async fn track(State(metrics): State<Arc<Metrics>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let labels = HttpLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    metrics.http_requests.get_or_create(&labels).inc();
    metrics
        .http_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "OpenMetrics text exposition (Prometheus scrapes it)", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(state): State<super::state::AppState>) -> impl IntoResponse {
    // Queue depth is read from the database at scrape time, so every replica reports the same.
    match state.store.count_jobs_by_status().await {
        Ok(counts) => state.metrics.scheduler.set_queue_depth(&counts),
        Err(error) => tracing::warn!(%error, "could not count jobs for the queue-depth gauge"),
    }
    match state.store.count_pending_webhook_deliveries().await {
        Ok(pending) => state.metrics.webhooks.set_outbox_depth(pending),
        Err(error) => tracing::warn!(%error, "could not count pending webhook deliveries"),
    }
    let content_type =
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, content_type)],
        state.metrics.encode(),
    )
}
