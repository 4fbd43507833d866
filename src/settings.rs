//! Layered configuration: built-in defaults (`config/default.toml`), then an optional `--config`
//! file, then `COMPRESSD_*` environment variables, each overriding the one before.
//!
//! [`Settings`] implements `Debug` with secrets redacted, so the effective configuration can be
//! logged at start. A bad value stops the process with an [`Error::Config`] naming the setting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

use crate::error::Error;

mod lists;

/// The defaults, documented; compiled in so the binary needs no file beside it.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "COMPRESSD_";

/// The effective configuration of a compressd process. See `config/default.toml` for every key.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address the HTTP API binds.
    pub listen: SocketAddr,
    /// Folder of the embedded database and the default artifact folder.
    pub data_dir: PathBuf,
    /// `postgres://…` or `sqlite://…`; `None` means SQLite in `data_dir`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub database_url: Option<String>,
    /// Pool size.
    pub database_max_connections: u32,
    /// Apply migrations when `serve` or `worker` starts.
    pub migrate_on_start: bool,
    /// Artifact location; `None` means `data_dir/artifacts`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub artifacts_url: Option<String>,
    /// Per-request time limit in seconds.
    pub request_timeout_secs: u64,
    /// Largest JSON request body in bytes.
    pub json_body_limit_bytes: usize,
    /// Origins allowed by CORS; `["*"]` allows any.
    #[serde(deserialize_with = "lists::comma_separated")]
    pub cors_allowed_origins: Vec<String>,
    /// Grace period for in-flight requests at shutdown, in seconds.
    pub shutdown_grace_secs: u64,
    /// tracing filter directive.
    pub log: String,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Jobs one worker process runs at once.
    pub worker_concurrency: usize,
    /// Seconds between a worker's heartbeats.
    pub worker_heartbeat_secs: f64,
    /// Seconds a worker's lease lasts without a heartbeat.
    pub worker_lease_secs: f64,
    /// Seconds an idle worker waits between polls when no notification wakes it.
    pub worker_poll_interval_secs: f64,
    /// Seconds a stopped job process gets between SIGTERM and SIGKILL.
    pub worker_stop_grace_secs: f64,
    /// Seconds before a job's second attempt (doubled for each further one).
    pub worker_retry_backoff_secs: f64,
    /// Events buffered per event stream before a client that does not read is dropped.
    pub events_stream_buffer: usize,
    /// Seconds a full stream buffer may stay full before its client is dropped.
    pub events_slow_client_timeout_secs: f64,
    /// Seconds between keep-alive comments on an idle event stream.
    pub events_keepalive_secs: f64,
    /// Endpoint of an S3-compatible server for `s3://` artifact URLs; unset: AWS (or `AWS_ENDPOINT`).
    #[serde(default, deserialize_with = "empty_is_none")]
    pub s3_endpoint: Option<String>,
    /// S3 region; unset: `AWS_REGION` / `AWS_DEFAULT_REGION`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub s3_region: Option<String>,
    /// S3 access key id; unset: `AWS_ACCESS_KEY_ID`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret key (redacted in logs); unset: `AWS_SECRET_ACCESS_KEY`.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub s3_secret_access_key: Option<String>,
    /// Allow plain-HTTP S3 endpoints (local S3 servers).
    pub s3_allow_http: bool,
    /// Bytes per multipart upload part.
    pub upload_part_size_bytes: usize,
    /// Parts of one upload in flight at once.
    pub upload_max_inflight_parts: usize,
    /// Largest model upload (all files together), in bytes.
    pub model_upload_max_bytes: u64,
    /// Largest dataset upload, in bytes.
    pub dataset_upload_max_bytes: u64,
    /// Folders `file://` model and dataset references may point into.
    #[serde(deserialize_with = "lists::path_list")]
    pub allowed_file_roots: Vec<PathBuf>,
    /// Answer artifact downloads from S3 with a 302 to a presigned URL.
    pub redirect_downloads: bool,
    /// Lifetime of presigned download URLs, in seconds.
    pub presign_ttl_secs: u64,
    /// Objects no row refers to are swept once older than this many seconds.
    pub orphan_sweep_age_secs: u64,
    /// Seconds between orphan sweeps; 0 turns the sweeper off.
    pub orphan_sweep_interval_secs: u64,
    /// Never contact the Hugging Face Hub for `hf://` references: serve them from the local cache
    /// only. Unset: `HF_HUB_OFFLINE`.
    #[serde(default)]
    pub hf_offline: Option<bool>,
    /// Base URL of the Hugging Face Hub (or a mirror); unset: `HF_ENDPOINT`, else huggingface.co.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub hf_endpoint: Option<String>,
    /// The Hugging Face cache folder; unset: `HF_HUB_CACHE`, `HF_HOME/hub`, `~/.cache/huggingface/hub`.
    #[serde(default)]
    pub hf_cache_dir: Option<PathBuf>,
    /// Token for private or gated repositories (redacted in logs); unset: `HF_TOKEN`, else the
    /// cache's `token` file.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub hf_token: Option<String>,
    /// How `/v1` requests are authenticated: `auto`, `keys` or `none`.
    pub auth: AuthSetting,
    /// Requests one API key may make per second (sustained); 0 turns the limit off.
    pub rate_limit_per_key_per_sec: u32,
    /// Requests one API key may make in a burst above its rate.
    pub rate_limit_burst: u32,
    /// Queued plus running jobs one tenant may have; 0 is no limit.
    pub tenant_max_active_jobs: u64,
    /// Bytes of models, datasets and artifacts one tenant may store; 0 is no limit.
    pub tenant_max_stored_bytes: u64,
    /// Hosts, addresses and CIDR ranges that user-given URLs may reach although they are
    /// loopback, link-local or private (see `crate::net_guard`).
    #[serde(deserialize_with = "lists::comma_separated")]
    pub allowed_private_networks: Vec<String>,
    /// Attempts at one webhook delivery before it is given up (at least 1).
    pub webhook_max_attempts: u32,
    /// Wait after a delivery's first failed attempt, in milliseconds; doubled after each further
    /// failure, at most an hour.
    pub webhook_retry_base_ms: u64,
    /// Time limit of one webhook delivery attempt, in seconds.
    pub webhook_timeout_secs: u64,
    /// MLflow tracking server every job is logged to as a run; `None`: only jobs whose spec
    /// names one (`mlflow.tracking_uri`) are tracked.
    #[serde(default, deserialize_with = "empty_is_none")]
    pub mlflow_tracking_uri: Option<String>,
    /// Experiment of the runs when the spec names none.
    pub mlflow_experiment: String,
}

/// The `auth` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthSetting {
    /// API keys when the database holds any; else no auth, and the API listens on loopback only.
    Auto,
    /// Always API keys.
    Keys,
    /// No auth on any address (logs a warning when not on loopback).
    None,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Settings {
    /// Loads defaults, then `config_file` when given, then `COMPRESSD_*` variables from the process
    /// environment.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first setting that is missing, of the wrong type or invalid,
    /// or the config file that cannot be read.
    pub fn load(config_file: Option<&Path>) -> Result<Self, Error> {
        Self::from_figment(Self::figment(config_file)?)
    }

    /// The layered sources, for callers (tests) that want to add their own on top.
    ///
    /// # Errors
    /// [`Error::Config`] when `config_file` does not exist.
    pub fn figment(config_file: Option<&Path>) -> Result<Figment, Error> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = config_file {
            if !path.is_file() {
                return Err(Error::Config {
                    setting: "--config".into(),
                    message: format!("{} is not a readable file", path.display()),
                });
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only known keys are taken from the environment: other COMPRESSD_* variables (test
        // harness settings, COMPRESSD_SHARED) belong to other tools.
        let known = Self::keys();
        Ok(figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(move |key| known.contains(&key.as_str().to_ascii_lowercase().as_str())),
        ))
    }

    /// Extracts and checks settings from any figment.
    ///
    /// # Errors
    /// [`Error::Config`] naming the offending setting.
    pub fn from_figment(figment: Figment) -> Result<Self, Error> {
        let settings: Settings = figment.extract().map_err(config_error)?;
        settings.check()?;
        Ok(settings)
    }

    /// Every key `config/default.toml` documents, lower case; each is also read from
    /// `COMPRESSD_<KEY>`.
    pub fn keys() -> Vec<&'static str> {
        DEFAULT_TOML
            .lines()
            .map(|line| line.trim_start_matches("# ").trim())
            .filter_map(|line| line.split_once(" = ").map(|(key, _)| key.trim()))
            .filter(|key| {
                // Digits too: `s3_endpoint` and the other S3 keys have one.
                !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .collect()
    }

    fn check(&self) -> Result<(), Error> {
        if let Some(url) = &self.database_url {
            let scheme = url.split("://").next().unwrap_or_default();
            if !url.contains("://") || !matches!(scheme, "postgres" | "postgresql" | "sqlite") {
                return Err(invalid(
                    "database_url",
                    "must start with postgres://, postgresql:// or sqlite://",
                ));
            }
        }
        crate::artifacts::StoreConfig::from_settings(self).check()?;
        if self.presign_ttl_secs == 0 || self.presign_ttl_secs > 7 * 24 * 3600 {
            return Err(invalid(
                "presign_ttl_secs",
                "must be between 1 and 604800 (S3's limit)",
            ));
        }
        if self.upload_max_inflight_parts == 0 {
            return Err(invalid("upload_max_inflight_parts", "must be at least 1"));
        }
        for origin in &self.cors_allowed_origins {
            let valid = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && origin.is_ascii());
            if !valid {
                return Err(invalid(
                    "cors_allowed_origins",
                    &format!("`{origin}` is not an http(s) origin or \"*\""),
                ));
            }
        }
        if self.database_max_connections == 0 {
            return Err(invalid("database_max_connections", "must be at least 1"));
        }
        if self.request_timeout_secs == 0 {
            return Err(invalid("request_timeout_secs", "must be at least 1"));
        }
        for network in &self.allowed_private_networks {
            if crate::net_guard::AllowedNetwork::parse(network).is_none() {
                return Err(invalid(
                    "allowed_private_networks",
                    &format!("`{network}` is not a host name, an IP address or a CIDR range"),
                ));
            }
        }
        if self.webhook_max_attempts == 0 {
            return Err(invalid("webhook_max_attempts", "must be at least 1"));
        }
        if !(1..=3600).contains(&self.webhook_timeout_secs) {
            return Err(invalid("webhook_timeout_secs", "must be 1 to 3600 seconds"));
        }
        if let Some(uri) = &self.mlflow_tracking_uri {
            if let Err(error) = crate::net_guard::parse_http_url(uri) {
                return Err(invalid("mlflow_tracking_uri", &error.to_string()));
            }
        }
        if self.mlflow_experiment.trim().is_empty() {
            return Err(invalid("mlflow_experiment", "must not be empty"));
        }
        if self.json_body_limit_bytes < 1024 {
            return Err(invalid("json_body_limit_bytes", "must be at least 1024"));
        }
        self.check_worker()
    }

    fn check_worker(&self) -> Result<(), Error> {
        let positive = [
            ("worker_heartbeat_secs", self.worker_heartbeat_secs),
            ("worker_lease_secs", self.worker_lease_secs),
            ("worker_poll_interval_secs", self.worker_poll_interval_secs),
            (
                "events_slow_client_timeout_secs",
                self.events_slow_client_timeout_secs,
            ),
            ("events_keepalive_secs", self.events_keepalive_secs),
        ];
        for (setting, value) in positive {
            // Also bounds the value so Duration::from_secs_f64 cannot panic on it.
            if !(value > 0.0 && value <= 1e9) {
                return Err(invalid(setting, "must be a number of seconds above 0"));
            }
        }
        for (setting, value) in [
            ("worker_stop_grace_secs", self.worker_stop_grace_secs),
            ("worker_retry_backoff_secs", self.worker_retry_backoff_secs),
        ] {
            if !(0.0..=1e9).contains(&value) {
                return Err(invalid(setting, "must be a number of seconds, 0 or more"));
            }
        }
        // A heartbeat must land well inside the lease, or a healthy worker loses its jobs.
        if self.worker_heartbeat_secs * 2.0 > self.worker_lease_secs {
            return Err(invalid(
                "worker_heartbeat_secs",
                "must be at most half of worker_lease_secs",
            ));
        }
        if self.worker_concurrency == 0 {
            return Err(invalid("worker_concurrency", "must be at least 1"));
        }
        if self.events_stream_buffer == 0 {
            return Err(invalid("events_stream_buffer", "must be at least 1"));
        }
        Ok(())
    }

    /// Where the artifacts live when `artifacts_url` is unset.
    pub fn default_artifacts_dir(&self) -> PathBuf {
        self.data_dir.join("artifacts")
    }
}

fn invalid(setting: &str, message: &str) -> Error {
    Error::Config {
        setting: format!("{setting} ({ENV_PREFIX}{})", setting.to_uppercase()),
        message: message.into(),
    }
}

fn config_error(error: figment::Error) -> Error {
    let path = error.path.join(".");
    let setting = if path.is_empty() {
        "configuration".to_owned()
    } else {
        format!("{path} ({ENV_PREFIX}{})", path.to_uppercase())
    };
    let source = error
        .metadata
        .as_ref()
        .map(|m| format!(" (from {})", m.name))
        .unwrap_or_default();
    Error::Config {
        setting,
        message: format!("{}{source}", error.kind),
    }
}

fn empty_is_none<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let value = Option::<String>::deserialize(deserializer)?;
    Ok(value.filter(|s| !s.trim().is_empty()))
}

/// Replaces the password of a URL with `***`, leaving the rest readable.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // set_password only fails for URLs that cannot have credentials, which this one has.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) => url.to_owned(),
        Err(_) => "<unparsable URL, redacted>".to_owned(),
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(redact_url),
            )
            .field("database_max_connections", &self.database_max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .field(
                "artifacts_url",
                &self.artifacts_url.as_deref().map(redact_url),
            )
            .field("request_timeout_secs", &self.request_timeout_secs)
            .field("json_body_limit_bytes", &self.json_body_limit_bytes)
            .field("cors_allowed_origins", &self.cors_allowed_origins)
            .field("shutdown_grace_secs", &self.shutdown_grace_secs)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .field("worker_concurrency", &self.worker_concurrency)
            .field("worker_heartbeat_secs", &self.worker_heartbeat_secs)
            .field("worker_lease_secs", &self.worker_lease_secs)
            .field("worker_poll_interval_secs", &self.worker_poll_interval_secs)
            .field("worker_stop_grace_secs", &self.worker_stop_grace_secs)
            .field("worker_retry_backoff_secs", &self.worker_retry_backoff_secs)
            .field("events_stream_buffer", &self.events_stream_buffer)
            .field(
                "events_slow_client_timeout_secs",
                &self.events_slow_client_timeout_secs,
            )
            .field("events_keepalive_secs", &self.events_keepalive_secs)
            .field("s3_endpoint", &self.s3_endpoint)
            .field("s3_region", &self.s3_region)
            .field("s3_access_key_id", &self.s3_access_key_id)
            .field(
                "s3_secret_access_key",
                &self.s3_secret_access_key.as_ref().map(|_| "***"),
            )
            .field("s3_allow_http", &self.s3_allow_http)
            .field("upload_part_size_bytes", &self.upload_part_size_bytes)
            .field("upload_max_inflight_parts", &self.upload_max_inflight_parts)
            .field("model_upload_max_bytes", &self.model_upload_max_bytes)
            .field("dataset_upload_max_bytes", &self.dataset_upload_max_bytes)
            .field("allowed_file_roots", &self.allowed_file_roots)
            .field("redirect_downloads", &self.redirect_downloads)
            .field("presign_ttl_secs", &self.presign_ttl_secs)
            .field("orphan_sweep_age_secs", &self.orphan_sweep_age_secs)
            .field(
                "orphan_sweep_interval_secs",
                &self.orphan_sweep_interval_secs,
            )
            .field("hf_offline", &self.hf_offline)
            .field("hf_endpoint", &self.hf_endpoint)
            .field("hf_cache_dir", &self.hf_cache_dir)
            .field("hf_token", &self.hf_token.as_ref().map(|_| "***"))
            .field(
                "mlflow_tracking_uri",
                &self.mlflow_tracking_uri.as_deref().map(redact_url),
            )
            .field("mlflow_experiment", &self.mlflow_experiment)
            .field("auth", &self.auth)
            .field(
                "rate_limit_per_key_per_sec",
                &self.rate_limit_per_key_per_sec,
            )
            .field("rate_limit_burst", &self.rate_limit_burst)
            .field("tenant_max_active_jobs", &self.tenant_max_active_jobs)
            .field("tenant_max_stored_bytes", &self.tenant_max_stored_bytes)
            .field("allowed_private_networks", &self.allowed_private_networks)
            .field("webhook_max_attempts", &self.webhook_max_attempts)
            .field("webhook_retry_base_ms", &self.webhook_retry_base_ms)
            .field("webhook_timeout_secs", &self.webhook_timeout_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::Serialized;

    fn with(key: &str, value: &str) -> Result<Settings, Error> {
        Settings::from_figment(
            Settings::figment(None)
                .unwrap()
                .merge(Serialized::default(key, value)),
        )
    }

    #[test]
    fn defaults_come_from_the_documented_file() {
        let settings = Settings::from_figment(Figment::from(Toml::string(DEFAULT_TOML))).unwrap();
        assert_eq!(settings.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(settings.data_dir, PathBuf::from("./data"));
        assert_eq!(settings.database_url, None);
        assert_eq!(settings.json_body_limit_bytes, 1 << 20);
    }

    #[test]
    fn every_documented_key_is_known() {
        let keys = Settings::keys();
        for key in [
            "listen",
            "data_dir",
            "database_url",
            "artifacts_url",
            "log_format",
            "cors_allowed_origins",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn a_bad_value_names_the_setting() {
        let err = with("listen", "not-an-address").unwrap_err().to_string();
        assert!(err.contains("listen (COMPRESSD_LISTEN)"), "{err}");
        let err = with("database_url", "mysql://x").unwrap_err().to_string();
        assert!(
            err.contains("database_url (COMPRESSD_DATABASE_URL)"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_a_config_file_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "lisen = \"0.0.0.0:1\"\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn debug_redacts_database_passwords() {
        let settings = with("database_url", "postgres://app:hunter2@db:5432/compressd").unwrap();
        let shown = format!("{settings:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres://app:***@db:5432/compressd"),
            "{shown}"
        );
    }

    #[test]
    fn list_settings_take_a_separated_string_or_an_array() {
        let roots = |value: &str| {
            with("allowed_file_roots", value)
                .unwrap()
                .allowed_file_roots
        };
        assert_eq!(roots("/data/models"), vec![PathBuf::from("/data/models")]);
        assert_eq!(
            roots("/data/models, /srv/m:/opt/x"),
            ["/data/models", "/srv/m", "/opt/x"].map(PathBuf::from)
        );
        assert!(roots("").is_empty());
        let array = Settings::from_figment(
            Settings::figment(None)
                .unwrap()
                .merge(Toml::string("allowed_file_roots = [\"/a\", \"/b\"]")),
        )
        .unwrap();
        assert_eq!(array.allowed_file_roots, ["/a", "/b"].map(PathBuf::from));

        let origins = with(
            "cors_allowed_origins",
            "https://a.example,http://b.example:8080",
        )
        .unwrap()
        .cors_allowed_origins;
        assert_eq!(origins, ["https://a.example", "http://b.example:8080"]);
        assert_eq!(
            with("cors_allowed_origins", "*")
                .unwrap()
                .cors_allowed_origins,
            ["*"]
        );
    }

    #[test]
    fn a_list_of_the_wrong_type_names_the_setting() {
        let err = Settings::from_figment(
            Settings::figment(None)
                .unwrap()
                .merge(Serialized::default("allowed_file_roots", 7)),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("allowed_file_roots (COMPRESSD_ALLOWED_FILE_ROOTS)"),
            "{err}"
        );
    }

    #[test]
    fn keys_with_digits_are_read_from_the_environment() {
        let keys = Settings::keys();
        for key in [
            "s3_endpoint",
            "s3_region",
            "s3_access_key_id",
            "s3_allow_http",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
    }

    #[test]
    fn an_empty_database_url_means_the_default() {
        assert_eq!(with("database_url", "").unwrap().database_url, None);
    }
}
