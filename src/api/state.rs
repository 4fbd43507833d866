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
    /// Model and dataset registration, artifact downloads.
    pub inputs: InputsConfig,
    /// Authentication, rate limits and quotas.
    pub access: super::access::AccessConfig,
    /// What user-given URLs may reach (webhook targets, a job's MLflow tracking URI):
    /// `allowed_private_networks`.
    pub url_policy: crate::net_guard::UrlPolicy,
}

/// Limits and sources for registering models and datasets and serving artifacts.
#[derive(Clone, Debug)]
pub struct InputsConfig {
    /// Largest model upload, all files together.
    pub model_upload_max_bytes: u64,
    /// Largest dataset upload.
    pub dataset_upload_max_bytes: u64,
    /// Folders `file://` references may point into.
    pub allowed_file_roots: Vec<std::path::PathBuf>,
    /// Store settings, reused to read `s3://` references.
    pub store: crate::artifacts::StoreConfig,
    /// Answer S3 downloads with a 302 to a presigned URL.
    pub redirect_downloads: bool,
    /// Lifetime of presigned URLs.
    pub presigned_url_ttl: Duration,
    /// How `hf://` references reach the Hugging Face Hub.
    pub hf: crate::artifacts::sources::HfConfig,
}

impl InputsConfig {
    /// The inputs part of the settings.
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            model_upload_max_bytes: settings.model_upload_max_bytes,
            dataset_upload_max_bytes: settings.dataset_upload_max_bytes,
            allowed_file_roots: settings.allowed_file_roots.clone(),
            store: crate::artifacts::StoreConfig::from_settings(settings),
            redirect_downloads: settings.redirect_downloads,
            presigned_url_ttl: Duration::from_secs(settings.presign_ttl_secs),
            hf: crate::artifacts::sources::HfConfig::from_settings(settings),
        }
    }
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
            inputs: InputsConfig::from_settings(settings),
            access: super::access::AccessConfig::from_settings(settings),
            url_policy: crate::net_guard::UrlPolicy::new(&settings.allowed_private_networks),
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
