//! Experiment tracking: each job an MLflow run, logged by the worker that runs it.
//!
//! Where a job is tracked comes from its spec (`mlflow.tracking_uri`, `mlflow.experiment`), else
//! from the settings (`mlflow_tracking_uri`, `mlflow_experiment`); with neither it is not tracked.
//! A URI from a spec is a user's URL: it is checked against the URL policy when the job is
//! submitted and again when the worker connects (and the connection pinned to the checked
//! addresses), and it never gets the operator's MLflow credentials.
//!
//! Tracking is best effort: MLflow being down or refusing is logged and retried, and never fails
//! or delays a job's outcome (see [`run`]).

pub mod mlflow;
pub mod run;

use std::time::Duration;

use serde_json::Value;
use url::Url;

use crate::net_guard::UrlPolicy;

/// The experiment of runs when neither the spec nor the settings name one.
pub const DEFAULT_EXPERIMENT: &str = "compressd";

/// The worker's tracking settings.
#[derive(Clone, Debug)]
pub struct TrackingDefaults {
    /// The operator's tracking server, used for jobs whose spec names none.
    pub tracking_uri: Option<String>,
    /// The experiment for jobs whose spec names none.
    pub experiment: String,
    /// The policy a spec's tracking URI must pass.
    pub policy: UrlPolicy,
    /// How long the end of an attempt waits for MLflow (the last metrics, artifacts, status)
    /// before giving up on it; the job's own outcome is recorded before this wait.
    pub finish_timeout: Duration,
}

impl Default for TrackingDefaults {
    fn default() -> Self {
        Self {
            tracking_uri: None,
            experiment: DEFAULT_EXPERIMENT.to_owned(),
            policy: UrlPolicy::default(),
            finish_timeout: Duration::from_secs(120),
        }
    }
}

impl TrackingDefaults {
    /// The tracking part of the settings.
    pub fn from_settings(settings: &crate::settings::Settings) -> Self {
        Self {
            tracking_uri: settings.mlflow_tracking_uri.clone(),
            experiment: settings.mlflow_experiment.clone(),
            policy: UrlPolicy::new(&settings.allowed_private_networks),
            ..Self::default()
        }
    }

    /// Where the job with `spec` (as stored) is tracked, or `None` when it is not.
    pub fn target(&self, spec: &Value) -> Option<Target> {
        let from_spec = spec
            .pointer("/mlflow/tracking_uri")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let experiment = spec
            .pointer("/mlflow/experiment")
            .and_then(Value::as_str)
            .unwrap_or(&self.experiment)
            .to_owned();
        let (uri, users) = match from_spec {
            Some(uri) => (uri, true),
            None => (self.tracking_uri.clone()?, false),
        };
        Some(Target {
            uri,
            experiment,
            users,
        })
    }
}

/// Where one job is tracked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The tracking server.
    pub uri: String,
    /// The experiment's name.
    pub experiment: String,
    /// Whether the URI came from the job's spec (a user's URL) rather than the settings.
    pub users: bool,
}

impl Target {
    /// A client for this target: a user's URI is checked against `policy` and pinned to the
    /// addresses checked, without credentials; the operator's gets MLflow's credential variables.
    ///
    /// # Errors
    /// When the URI is refused or does not parse.
    pub async fn client(&self, policy: &UrlPolicy) -> anyhow::Result<mlflow::MlflowClient> {
        let base = Url::parse(&self.uri)?;
        if self.users {
            let addresses = policy.check_url(&self.uri).await?;
            mlflow::MlflowClient::new(base, Some(&addresses), mlflow::Credentials::Anonymous)
        } else {
            mlflow::MlflowClient::new(base, None, mlflow::Credentials::from_env())
        }
    }
}

/// Longest param value MLflow takes (6000 characters since MLflow 2.x).
const MAX_PARAM_VALUE_CHARS: usize = 6000;
/// Longest param key MLflow takes.
const MAX_PARAM_KEY_CHARS: usize = 250;

/// The spec flattened into MLflow params: nested keys joined with `.`, list items by index
/// (`pipeline.0.type = finetune`); `null`s are left out (the spec is also logged whole as the
/// `spec.json` artifact).
pub fn spec_params(spec: &Value) -> Vec<(String, String)> {
    let mut params = Vec::new();
    flatten(spec, String::new(), &mut params);
    params
}

fn flatten(value: &Value, prefix: String, out: &mut Vec<(String, String)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        Value::Null => {}
        Value::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                flatten(value, join(key), out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (index, value) in items.iter().enumerate() {
                flatten(value, join(&index.to_string()), out);
            }
        }
        other => {
            let text = match other {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            if prefix.chars().count() <= MAX_PARAM_KEY_CHARS {
                out.push((prefix, text.chars().take(MAX_PARAM_VALUE_CHARS).collect()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_spec_flattens_into_dotted_params_without_nulls() {
        let spec = json!({
            "name": "n", "seed": 42, "dry_run": false, "acceptance": null,
            "pipeline": [{"type": "finetune", "epochs": 2, "freeze": []}],
            "task": {"type": "text_classification", "max_length": null},
        });
        let params = spec_params(&spec);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("name"), Some("n"));
        assert_eq!(get("seed"), Some("42"));
        assert_eq!(get("dry_run"), Some("false"));
        assert_eq!(get("pipeline.0.type"), Some("finetune"));
        assert_eq!(get("pipeline.0.epochs"), Some("2"));
        assert_eq!(get("pipeline.0.freeze"), Some("[]"));
        assert_eq!(get("task.type"), Some("text_classification"));
        assert_eq!(get("acceptance"), None);
        assert_eq!(get("task.max_length"), None);
    }

    #[test]
    fn the_spec_overrides_the_settings_and_no_uri_means_no_tracking() {
        let defaults = TrackingDefaults {
            tracking_uri: Some("http://mlflow.internal:5000".into()),
            experiment: "team".into(),
            ..TrackingDefaults::default()
        };
        assert_eq!(
            defaults.target(&json!({"mlflow": null})),
            Some(Target {
                uri: "http://mlflow.internal:5000".into(),
                experiment: "team".into(),
                users: false
            })
        );
        assert_eq!(
            defaults.target(
                &json!({"mlflow": {"tracking_uri": "https://ml.example", "experiment": "x"}})
            ),
            Some(Target {
                uri: "https://ml.example".into(),
                experiment: "x".into(),
                users: true
            })
        );
        assert_eq!(TrackingDefaults::default().target(&json!({})), None);
        assert_eq!(
            TrackingDefaults::default().target(&json!({"mlflow": {"experiment": "x"}})),
            None
        );
    }
}
