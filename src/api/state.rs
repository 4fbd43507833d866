//! The one `Clone` application state every handler gets.

use std::sync::Arc;
use std::time::Duration;

use crate::artifacts::ArtifactStore;
use crate::clock::Clock;
use crate::settings::Settings;
use crate::store::{Store, DEFAULT_MAX_ATTEMPTS};

use super::events::StreamConfig;
use super::metrics::Metrics;

/// What the API needs of the settings, fixed at start.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// Largest JSON body.
    pub json_body_limit_bytes: usize,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// CORS origins; `["*"]` allows any.
    pub cors_allowed_origins: Vec<String>,
    /// Attempts given to new jobs.
    pub max_attempts: i32,
    /// Event streams (`GET /v1/jobs/{id}/events`).
    pub events: StreamConfig,
}

impl ApiConfig {
    /// The API part of the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            json_body_limit_bytes: settings.json_body_limit_bytes,
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            cors_allowed_origins: settings.cors_allowed_origins.clone(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            events: StreamConfig::from_settings(settings),
        }
    }
}

/// Shared handles of the running service.
#[derive(Clone)]
pub struct AppState {
    /// Jobs, events, models, datasets, artifacts.
    pub store: Arc<dyn Store>,
    /// Artifact files.
    pub artifacts: ArtifactStore,
    /// Time and ids.
    pub clock: Arc<dyn Clock>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Request limits and CORS.
    pub config: ApiConfig,
}
