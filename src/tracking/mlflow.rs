//! A small client of MLflow's REST API 2.0: the calls a job's run needs, nothing more.
//!
//! Experiments are found by name (`experiments/get-by-name`) and made when missing; a job's run is
//! found again by its `compressd.job_id` tag (`runs/search`), so a retried attempt continues the
//! same run; metrics, params and tags go in batches (`runs/log-batch`, at most 1000 metrics, 100
//! params and 100 tags a call, MLflow's limits); files go to the tracking server's artifact proxy
//! (`PUT /api/2.0/mlflow-artifacts/artifacts/<path>`, served by `mlflow server` unless started
//! with `--no-serve-artifacts`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde::Deserialize;
use serde_json::{json, Value};
use url::Url;

/// Time limit of one request (an artifact upload of a large model gets [`UPLOAD_TIMEOUT`]).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit of one artifact upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// MLflow's limits on one `runs/log-batch` call.
pub const MAX_BATCH_METRICS: usize = 1000;
/// See [`MAX_BATCH_METRICS`].
pub const MAX_BATCH_PARAMS: usize = 100;
/// See [`MAX_BATCH_METRICS`].
pub const MAX_BATCH_TAGS: usize = 100;

/// One metric value.
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    /// Its name, e.g. `train.loss`.
    pub key: String,
    /// Its value (finite).
    pub value: f64,
    /// Milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// The training step, 0 for measurements outside training.
    pub step: u64,
}

/// What compressd keeps of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInfo {
    /// The run's id.
    pub run_id: String,
    /// Its experiment.
    pub experiment_id: String,
    /// `RUNNING`, `FINISHED`, `FAILED`, `KILLED` or `SCHEDULED`.
    pub status: String,
    /// Where its artifacts live, e.g. `mlflow-artifacts:/1/<run>/artifacts`.
    pub artifact_uri: String,
}

#[derive(Deserialize)]
struct RawRunInfo {
    run_id: String,
    experiment_id: String,
    status: String,
    #[serde(default)]
    artifact_uri: String,
}

impl From<RawRunInfo> for RunInfo {
    fn from(raw: RawRunInfo) -> Self {
        Self {
            run_id: raw.run_id,
            experiment_id: raw.experiment_id,
            status: raw.status,
            artifact_uri: raw.artifact_uri,
        }
    }
}

/// How requests are authenticated (MLflow's own client variables).
#[derive(Clone, Debug, Default)]
pub enum Credentials {
    /// None.
    #[default]
    Anonymous,
    /// `Authorization: Bearer` (`MLFLOW_TRACKING_TOKEN`).
    Token(String),
    /// HTTP basic (`MLFLOW_TRACKING_USERNAME`, `MLFLOW_TRACKING_PASSWORD`).
    Basic(String, String),
}

impl Credentials {
    /// The credentials MLflow's own client would take from this process's environment.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        if let Some(token) = var("MLFLOW_TRACKING_TOKEN") {
            return Self::Token(token);
        }
        match (
            var("MLFLOW_TRACKING_USERNAME"),
            var("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(user), Some(password)) => Self::Basic(user, password),
            _ => Self::Anonymous,
        }
    }
}

/// A client of one tracking server.
#[derive(Clone, Debug)]
pub struct MlflowClient {
    http: reqwest::Client,
    base: Url,
    credentials: Credentials,
}

impl MlflowClient {
    /// A client of the server at `base`. With `pinned`, the host's name is resolved to those
    /// addresses only (the ones the URL policy checked) and redirects are not followed, so a
    /// user's URL cannot be turned towards an internal address after the check.
    ///
    /// # Errors
    /// When the HTTP client cannot be built.
    pub fn new(
        base: Url,
        pinned: Option<&[SocketAddr]>,
        credentials: Credentials,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("compressd/", env!("CARGO_PKG_VERSION")));
        if let Some(addresses) = pinned {
            builder = builder.redirect(reqwest::redirect::Policy::none());
            if let Some(host) = base.host_str() {
                builder = builder.resolve_to_addrs(host, addresses);
            }
        }
        let mut base = base;
        // `Url::join` replaces the last segment unless the path ends with a slash.
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self {
            http: builder.build().context("building the MLflow HTTP client")?,
            base,
            credentials,
        })
    }

    fn url(&self, path: &str) -> anyhow::Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("joining {path} to {}", self.base))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.credentials {
            Credentials::Anonymous => request,
            Credentials::Token(token) => request.bearer_auth(token),
            Credentials::Basic(user, password) => request.basic_auth(user, Some(password)),
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self
            .authorize(request)
            .send()
            .await
            .context("MLflow is unreachable")?;
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if !status.is_success() {
            let code = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error_code"].as_str().map(str::to_owned));
            return Err(ApiFailure {
                status: status.as_u16(),
                error_code: code,
                body: body.chars().take(500).collect(),
            }
            .into());
        }
        if body.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&body).context("MLflow answered with something other than JSON")
    }

    async fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let request = self
            .http
            .post(self.url(path)?)
            .timeout(REQUEST_TIMEOUT)
            .json(body);
        self.send(request).await
    }

    /// The id of the experiment named `name`, made when there is none.
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn experiment_id(&self, name: &str) -> anyhow::Result<String> {
        if let Some(id) = self.find_experiment(name).await? {
            return Ok(id);
        }
        match self
            .post(
                "api/2.0/mlflow/experiments/create",
                &json!({ "name": name }),
            )
            .await
        {
            Ok(created) => created["experiment_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("experiments/create answered without an id: {created}")),
            // Another worker made it meanwhile.
            Err(error) if error_code(&error) == Some("RESOURCE_ALREADY_EXISTS") => self
                .find_experiment(name)
                .await?
                .ok_or_else(|| anyhow!("experiment {name} exists but cannot be found")),
            Err(error) => Err(error),
        }
    }

    async fn find_experiment(&self, name: &str) -> anyhow::Result<Option<String>> {
        let mut url = self.url("api/2.0/mlflow/experiments/get-by-name")?;
        url.query_pairs_mut().append_pair("experiment_name", name);
        match self.send(self.http.get(url).timeout(REQUEST_TIMEOUT)).await {
            Ok(found) => {
                let experiment = &found["experiment"];
                if experiment["lifecycle_stage"] == "deleted" {
                    bail!(
                        "experiment {name} is deleted in MLflow; restore it or pick another name"
                    );
                }
                Ok(experiment["experiment_id"].as_str().map(str::to_owned))
            }
            Err(error) if error_code(&error) == Some("RESOURCE_DOES_NOT_EXIST") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The run whose tag `key` is `value` in `experiment_id`, if any (the oldest, should there be
    /// several).
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn find_run(
        &self,
        experiment_id: &str,
        key: &str,
        value: &str,
    ) -> anyhow::Result<Option<RunInfo>> {
        let filter = format!("tags.`{key}` = '{}'", value.replace('\'', "\\'"));
        let found = self
            .post(
                "api/2.0/mlflow/runs/search",
                &json!({
                    "experiment_ids": [experiment_id],
                    "filter": filter,
                    "max_results": 1,
                    "order_by": ["attributes.start_time ASC"],
                }),
            )
            .await?;
        let Some(run) = found["runs"].as_array().and_then(|runs| runs.first()) else {
            return Ok(None);
        };
        let info: RawRunInfo =
            serde_json::from_value(run["info"].clone()).context("runs/search answered oddly")?;
        Ok(Some(info.into()))
    }

    /// Starts a run.
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        start_time_ms: i64,
        tags: &[(String, String)],
    ) -> anyhow::Result<RunInfo> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(key, value)| json!({ "key": key, "value": value }))
            .collect();
        let created = self
            .post(
                "api/2.0/mlflow/runs/create",
                &json!({
                    "experiment_id": experiment_id,
                    "run_name": run_name,
                    "start_time": start_time_ms,
                    "tags": tags,
                }),
            )
            .await?;
        let info: RawRunInfo = serde_json::from_value(created["run"]["info"].clone())
            .context("runs/create answered oddly")?;
        Ok(info.into())
    }

    /// Logs metrics, params and tags in one call (each within MLflow's batch limits).
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> anyhow::Result<()> {
        let metrics: Vec<Value> = metrics
            .iter()
            .map(|m| {
                json!({ "key": m.key, "value": m.value, "timestamp": m.timestamp_ms, "step": m.step })
            })
            .collect();
        let pairs = |pairs: &[(String, String)]| -> Vec<Value> {
            pairs
                .iter()
                .map(|(key, value)| json!({ "key": key, "value": value }))
                .collect()
        };
        self.post(
            "api/2.0/mlflow/runs/log-batch",
            &json!({
                "run_id": run_id,
                "metrics": metrics,
                "params": pairs(params),
                "tags": pairs(tags),
            }),
        )
        .await
        .map(drop)
    }

    /// Sets a run's status (and end time, for a terminal status).
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn update_run(
        &self,
        run_id: &str,
        status: &str,
        end_time_ms: Option<i64>,
    ) -> anyhow::Result<()> {
        let mut body = json!({ "run_id": run_id, "status": status });
        if let Some(end) = end_time_ms {
            body["end_time"] = json!(end);
        }
        self.post("api/2.0/mlflow/runs/update", &body)
            .await
            .map(drop)
    }

    /// The version of registered model `name` made from `run_id`'s artifacts, made (with the
    /// registered model, when missing) unless one exists already, so that a retried attempt
    /// registers once. Returns the version number.
    ///
    /// # Errors
    /// When MLflow cannot be reached or refuses.
    pub async fn register_model_version(
        &self,
        name: &str,
        source: &str,
        run_id: &str,
    ) -> anyhow::Result<String> {
        if let Some(version) = self.find_model_version(name, run_id).await? {
            return Ok(version);
        }
        match self
            .post(
                "api/2.0/mlflow/registered-models/create",
                &json!({ "name": name }),
            )
            .await
        {
            Ok(_) => {}
            Err(error) if error_code(&error) == Some("RESOURCE_ALREADY_EXISTS") => {}
            Err(error) => return Err(error),
        }
        let created = self
            .post(
                "api/2.0/mlflow/model-versions/create",
                &json!({
                    "name": name,
                    "source": source,
                    "run_id": run_id,
                    "description": "Compressed by compressd",
                }),
            )
            .await?;
        created["model_version"]["version"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("model-versions/create answered without a version: {created}"))
    }

    async fn find_model_version(&self, name: &str, run_id: &str) -> anyhow::Result<Option<String>> {
        let mut url = self.url("api/2.0/mlflow/model-versions/search")?;
        let filter = format!(
            "name = '{}' and run_id = '{}'",
            name.replace('\'', "\\'"),
            run_id.replace('\'', "\\'")
        );
        url.query_pairs_mut().append_pair("filter", &filter);
        let found = self
            .send(self.http.get(url).timeout(REQUEST_TIMEOUT))
            .await?;
        Ok(found["model_versions"]
            .as_array()
            .and_then(|versions| versions.first())
            .and_then(|version| version["version"].as_str())
            .map(str::to_owned))
    }

    /// Uploads `file` as the run's artifact `path` through the server's artifact proxy.
    ///
    /// # Errors
    /// When the run's artifacts do not live behind the proxy (`mlflow-artifacts:`), or the upload
    /// fails.
    pub async fn upload_artifact(
        &self,
        run: &RunInfo,
        path: &str,
        file: &Path,
    ) -> anyhow::Result<()> {
        let handle = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("opening {}", file.display()))?;
        let length = handle.metadata().await?.len();
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(handle));
        self.put_artifact(run, path, body, length).await
    }

    /// Uploads `bytes` as the run's artifact `path`, as [`Self::upload_artifact`].
    ///
    /// # Errors
    /// As [`Self::upload_artifact`].
    pub async fn upload_bytes(
        &self,
        run: &RunInfo,
        path: &str,
        bytes: Vec<u8>,
    ) -> anyhow::Result<()> {
        let length = bytes.len() as u64;
        self.put_artifact(run, path, bytes.into(), length).await
    }

    async fn put_artifact(
        &self,
        run: &RunInfo,
        path: &str,
        body: reqwest::Body,
        length: u64,
    ) -> anyhow::Result<()> {
        let root = proxied_artifact_root(&run.artifact_uri).ok_or_else(|| {
            anyhow!(
                "the run's artifacts live at {}, not behind the tracking server's artifact proxy",
                run.artifact_uri
            )
        })?;
        let url = self.url(&format!("api/2.0/mlflow-artifacts/artifacts/{root}/{path}"))?;
        let request = self
            .http
            .put(url)
            .timeout(UPLOAD_TIMEOUT)
            .header(reqwest::header::CONTENT_LENGTH, length)
            .body(body);
        self.send(request).await.map(drop)
    }
}

/// The path under the artifact proxy of a run's `mlflow-artifacts:` URI, without the leading
/// slash (`mlflow-artifacts:/1/abc/artifacts` and `mlflow-artifacts://host:5000/1/abc/artifacts`
/// both give `1/abc/artifacts`); `None` for artifacts stored elsewhere.
pub fn proxied_artifact_root(artifact_uri: &str) -> Option<String> {
    let rest = artifact_uri.strip_prefix("mlflow-artifacts:")?;
    let path = match rest.strip_prefix("//") {
        Some(authority_and_path) => authority_and_path
            .split_once('/')
            .map_or("", |(_, path)| path),
        None => rest,
    };
    let path = path.trim_matches('/');
    (!path.is_empty()).then(|| path.to_owned())
}

/// An error answer of the tracking server.
#[derive(Debug, thiserror::Error)]
#[error("MLflow answered {status}: {body}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// MLflow's `error_code`, e.g. `RESOURCE_DOES_NOT_EXIST`.
    pub error_code: Option<String>,
    /// The start of the body.
    pub body: String,
}

/// MLflow's `error_code` of a failed call, if the server answered with one.
pub fn error_code(error: &anyhow::Error) -> Option<&str> {
    error
        .downcast_ref::<ApiFailure>()
        .and_then(|failure| failure.error_code.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxied_artifact_root_is_the_uris_path() {
        assert_eq!(
            proxied_artifact_root("mlflow-artifacts:/1/abc/artifacts").as_deref(),
            Some("1/abc/artifacts")
        );
        assert_eq!(
            proxied_artifact_root("mlflow-artifacts://mlflow:5000/7/r/artifacts").as_deref(),
            Some("7/r/artifacts")
        );
        assert_eq!(proxied_artifact_root("s3://bucket/1/abc/artifacts"), None);
        assert_eq!(proxied_artifact_root("/mlruns/1/abc/artifacts"), None);
        assert_eq!(proxied_artifact_root("mlflow-artifacts:"), None);
    }

    #[test]
    fn api_paths_join_under_a_prefix() {
        let client = MlflowClient::new(
            Url::parse("http://mlflow.test/prefix").unwrap(),
            None,
            Credentials::Anonymous,
        )
        .unwrap();
        assert_eq!(
            client.url("api/2.0/mlflow/runs/create").unwrap().as_str(),
            "http://mlflow.test/prefix/api/2.0/mlflow/runs/create"
        );
    }
}
