//! An in-process API for tests: the real router over a real store, driven with `oneshot`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, StatusCode};
use axum::Router;
use compressd::api::metrics::Metrics;
use compressd::api::{self, ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::clock::ManualClock;
use compressd::settings::Settings;
use compressd::store::Store;
use figment::providers::Serialized;
use http_body_util::BodyExt;
use serde_json::Value;
use tempfile::TempDir;
use tower::ServiceExt;
use uuid::Uuid;

/// The router, its state and the temp dir holding its files.
pub struct TestApi {
    /// The application.
    pub router: Router,
    /// Its state (store, clock).
    pub state: AppState,
    /// A registered model id.
    pub model: Uuid,
    /// A registered dataset id.
    pub dataset: Uuid,
    /// The server's data folder (`data_dir`; its artifacts are under `artifacts/`).
    pub data_dir: TempDir,
}

/// A response, decoded.
#[derive(Debug)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// JSON body (`Null` when empty, a string when not JSON).
    pub body: Value,
}

impl Reply {
    /// The problem `type` slug (after `urn:compressd:problem:`).
    pub fn slug(&self) -> &str {
        self.body["type"]
            .as_str()
            .and_then(|t| t.strip_prefix(api::error::PROBLEM_TYPE_PREFIX))
            .unwrap_or("<none>")
    }

    /// The problem's first pointer.
    pub fn pointer(&self) -> &str {
        self.body["pointer"].as_str().unwrap_or("<none>")
    }

    /// The Content-Type header.
    pub fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

impl TestApi {
    /// An API over `store`, with inputs registered, default settings and a manual clock.
    pub async fn new(store: Arc<dyn Store>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let figment = Settings::figment(None)
            .expect("defaults")
            .merge(Serialized::default("data_dir", dir.path()));
        let settings = Settings::from_figment(figment).expect("settings");
        let clock = Arc::new(ManualClock::default());
        let (model, dataset) = super::register_inputs(&*store, &*clock).await;
        let state = AppState {
            store,
            artifacts: ArtifactStore::from_settings(&settings).expect("artifact folder"),
            clock,
            metrics: Arc::new(Metrics::new()),
            config: ApiConfig::from_settings(&settings),
        };
        Self {
            router: api::router(state.clone()),
            state,
            model,
            dataset,
            data_dir: dir,
        }
    }

    /// Another replica of this API over `store` (the same database reached by another pool):
    /// the same settings and registered inputs, its own caches.
    pub fn replica(&self, store: Arc<dyn Store>) -> Self {
        let mut state = self.state.clone();
        state.store = store;
        state.config.access.keys = Arc::default();
        Self {
            router: api::router(state.clone()),
            state,
            model: self.model,
            dataset: self.dataset,
            data_dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// An API over a fresh SQLite store.
    pub async fn sqlite() -> (Self, TempDir) {
        let (store, dir) = super::sqlite_store().await;
        (Self::new(store).await, dir)
    }

    /// A valid spec for the registered inputs.
    pub fn spec(&self) -> Value {
        super::spec_json(self.model, self.dataset)
    }

    /// Sends a request with a raw body and headers.
    pub async fn send(
        &self,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body.into()).expect("request"))
            .await
            .expect("infallible router");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status,
            headers,
            body,
        }
    }

    /// GET.
    pub async fn get(&self, uri: &str) -> Reply {
        self.send(Method::GET, uri, &[], Body::empty()).await
    }

    /// POST a JSON value.
    pub async fn post_json(&self, uri: &str, body: &Value, headers: &[(&str, &str)]) -> Reply {
        let mut all = vec![("content-type", "application/json")];
        all.extend_from_slice(headers);
        self.send(Method::POST, uri, &all, body.to_string()).await
    }

    /// POST with no body.
    pub async fn post_empty(&self, uri: &str) -> Reply {
        self.send(Method::POST, uri, &[], Body::empty()).await
    }

    /// DELETE.
    pub async fn delete(&self, uri: &str) -> Reply {
        self.send(Method::DELETE, uri, &[], Body::empty()).await
    }

    /// Creates a job from the default spec, returning its id.
    pub async fn create_job(&self) -> Uuid {
        let reply = self.post_json("/v1/jobs", &self.spec(), &[]).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        reply.body["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("job id")
    }
}
