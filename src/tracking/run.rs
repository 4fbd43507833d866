//! One attempt's MLflow run: a task beside the attempt that turns the child's messages into
//! batched MLflow calls.
//!
//! The attempt hands messages over without waiting ([`RunTracker::observe`]); the task logs them
//! every [`FLUSH_INTERVAL`] in `runs/log-batch` calls. When MLflow cannot be reached or refuses,
//! the task keeps what it has (up to [`MAX_PENDING_METRICS`]) and tries again with exponential
//! backoff; the job never waits for it and never fails because of it.
//!
//! Retries: a job is one run, whatever its attempts. An attempt finds the run an earlier attempt
//! made by its `compressd.job_id` tag and continues it (status back to `RUNNING`, the
//! `compressd.attempt` tag set to its number); the run ends only when the job does: `FINISHED`
//! when it succeeded, `FAILED` when it failed, `KILLED` when it was cancelled. An attempt that
//! ends in a retry leaves the run `RUNNING`. A resumed attempt skips the stages an earlier one
//! finished, so their metrics are not logged twice; the stage it resumes inside may log some
//! training steps again (MLflow keeps both values of such a step).
//!
//! At the end ([`RunTracker::finish`], after the job's outcome is recorded) the run gets the
//! result (headline metrics of the final and best models, whether the contract was kept), the
//! spec, the report and the final model as artifacts, and its status. Artifacts go through the
//! tracking server's artifact proxy; when the run's artifacts live elsewhere, the run keeps the
//! `compressd.artifacts` tag, the path of the job's artifacts in compressd, instead.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;
use uuid::Uuid;

use super::mlflow::{
    proxied_artifact_root, Metric, MlflowClient, RunInfo, MAX_BATCH_METRICS, MAX_BATCH_PARAMS,
    MAX_BATCH_TAGS,
};
use super::{spec_params, Target, TrackingDefaults};
use crate::scheduler::protocol::{ChildMessage, OutputFile};

/// Time between two batches while the job runs.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(2);
/// Metrics kept while MLflow is unreachable; past it the oldest are dropped (with a warning).
pub const MAX_PENDING_METRICS: usize = 100_000;
/// First wait after a failed call; doubled each time up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The tag that finds a job's run again.
pub const JOB_ID_TAG: &str = "compressd.job_id";
/// The tag holding the number of the attempt that last wrote to the run.
pub const ATTEMPT_TAG: &str = "compressd.attempt";

/// How the job stands after the attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Ending {
    /// The job's status after the attempt: `succeeded`, `failed`, `cancelled`, or anything else
    /// for a job that goes on (queued again, lease lost).
    pub job_status: String,
    /// The job's result, when it succeeded.
    pub result: Option<Value>,
    /// Why the attempt failed, when it did.
    pub error: Option<String>,
    /// The job's work folder, where the outputs still are.
    pub work_dir: PathBuf,
}

impl Ending {
    /// MLflow's terminal status for the job's, or `None` while the job goes on.
    pub fn run_status(&self) -> Option<&'static str> {
        match self.job_status.as_str() {
            "succeeded" => Some("FINISHED"),
            "failed" => Some("FAILED"),
            "cancelled" => Some("KILLED"),
            _ => None,
        }
    }
}

enum Update {
    Metric(Metric),
    Tag(String, String),
    Outputs(Vec<OutputFile>),
    Finish(Ending),
}

/// The tracking of one attempt. Dropping it without [`Self::finish`] stops the task.
pub struct RunTracker {
    updates: mpsc::UnboundedSender<Update>,
    task: JoinHandle<()>,
    finish_timeout: Duration,
}

/// What identifies the job to MLflow.
#[derive(Clone, Debug)]
pub struct JobIdentity {
    /// The job's id.
    pub id: Uuid,
    /// Its name (the run's name).
    pub name: String,
    /// This attempt's number.
    pub attempt: i32,
    /// The spec as stored.
    pub spec: Value,
}

impl RunTracker {
    /// Starts tracking an attempt of `job` to `target`.
    pub fn start(target: Target, defaults: &TrackingDefaults, job: JobIdentity) -> Self {
        let (updates, received) = mpsc::unbounded_channel();
        let span =
            tracing::info_span!("job.mlflow", uri = %target.uri, experiment = %target.experiment);
        let state = Tracking {
            target,
            policy: defaults.policy.clone(),
            job,
            client: None,
            run: None,
            metrics: VecDeque::new(),
            tags: Vec::new(),
            outputs: Vec::new(),
            uploaded: BTreeSet::new(),
            dropped_metrics: 0,
        };
        let task = tokio::spawn(state.run(received).instrument(span));
        Self {
            updates,
            task,
            finish_timeout: defaults.finish_timeout,
        }
    }

    /// Takes note of a message of the child (metrics, stage results, the outputs of success).
    pub fn observe(&self, message: &ChildMessage) {
        let now = now_ms();
        let updates: Vec<Update> = match message {
            ChildMessage::Metric { name, value, step } if value.is_finite() => {
                vec![Update::Metric(Metric {
                    key: name.clone(),
                    value: *value,
                    timestamp_ms: now,
                    step: step.unwrap_or(0),
                })]
            }
            ChildMessage::StageFinished {
                stage,
                index,
                report,
            } => {
                let label = format!("stage.{index}-{stage}");
                let mut updates = Vec::new();
                if let Some(wall) = report["wall_seconds"].as_f64().filter(|v| v.is_finite()) {
                    updates.push(Update::Metric(Metric {
                        key: format!("{label}.wall_seconds"),
                        value: wall,
                        timestamp_ms: now,
                        step: 0,
                    }));
                }
                if let Some(met) = report["acceptance_met"].as_bool() {
                    updates.push(Update::Tag(
                        format!("{label}.acceptance_met"),
                        met.to_string(),
                    ));
                }
                updates
            }
            ChildMessage::Succeeded { outputs, .. } => vec![Update::Outputs(outputs.clone())],
            _ => Vec::new(),
        };
        for update in updates {
            // The task only ends after `finish`, so a send cannot fail before it.
            let _ = self.updates.send(update);
        }
    }

    /// Logs the end of the attempt and waits (at most the finish timeout) for MLflow to have it
    /// all; on timeout the rest is given up, with a warning.
    pub async fn finish(mut self, ending: Ending) {
        let _ = self.updates.send(Update::Finish(ending));
        // On timeout, dropping `self` aborts the task.
        match tokio::time::timeout(self.finish_timeout, &mut self.task).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(
                    timeout_s = self.finish_timeout.as_secs_f64(),
                    "MLflow did not take the end of the run in time; giving up on it"
                );
            }
        }
    }
}

impl Drop for RunTracker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

struct Tracking {
    target: Target,
    policy: crate::net_guard::UrlPolicy,
    job: JobIdentity,
    client: Option<MlflowClient>,
    run: Option<RunInfo>,
    metrics: VecDeque<Metric>,
    tags: Vec<(String, String)>,
    outputs: Vec<OutputFile>,
    uploaded: BTreeSet<String>,
    dropped_metrics: u64,
}

impl Tracking {
    async fn run(mut self, mut updates: mpsc::UnboundedReceiver<Update>) {
        let mut backoff = FIRST_BACKOFF;
        let mut next_try = Instant::now();
        let ending = loop {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(Update::Finish(ending)) => break ending,
                    Some(update) => { self.apply(update); continue; }
                    None => return,
                },
                () = tokio::time::sleep(FLUSH_INTERVAL) => {}
            }
            if Instant::now() < next_try {
                continue;
            }
            match self.flush().await {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_s = backoff.as_secs_f64(),
                        "MLflow tracking failed; will retry"
                    );
                    next_try = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        // Whatever came before the end is applied (the channel is in order).
        while let Ok(update) = updates.try_recv() {
            self.apply(update);
        }
        loop {
            match self.end(&ending).await {
                Ok(()) => return,
                Err(error) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_s = backoff.as_secs_f64(),
                        "ending the MLflow run failed; will retry"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Metric(metric) => {
                if self.metrics.len() == MAX_PENDING_METRICS {
                    self.metrics.pop_front();
                    self.dropped_metrics += 1;
                    if self.dropped_metrics == 1 {
                        tracing::warn!(
                            "MLflow has been unreachable for long; dropping the oldest metrics"
                        );
                    }
                }
                self.metrics.push_back(metric);
            }
            Update::Tag(key, value) => self.tags.push((key, value)),
            Update::Outputs(outputs) => self.outputs = outputs,
            Update::Finish(_) => {}
        }
    }

    /// The client and the run, made on first use (and again after a failure).
    async fn connect(&mut self) -> anyhow::Result<(MlflowClient, RunInfo)> {
        if let (Some(client), Some(run)) = (&self.client, &self.run) {
            return Ok((client.clone(), run.clone()));
        }
        let client = match &self.client {
            Some(client) => client.clone(),
            None => {
                let client = self.target.client(&self.policy).await?;
                self.client = Some(client.clone());
                client
            }
        };
        let experiment = client.experiment_id(&self.target.experiment).await?;
        let job_id = self.job.id.to_string();
        let run = match client.find_run(&experiment, JOB_ID_TAG, &job_id).await? {
            Some(run) => {
                tracing::info!(run_id = %run.run_id, "continuing the job's MLflow run");
                if run.status != "RUNNING" {
                    client.update_run(&run.run_id, "RUNNING", None).await?;
                }
                run
            }
            None => {
                let tags = [
                    (JOB_ID_TAG.to_owned(), job_id.clone()),
                    ("mlflow.source.name".to_owned(), "compressd".to_owned()),
                    ("compressd.job".to_owned(), format!("/v1/jobs/{job_id}")),
                ];
                let run = client
                    .create_run(&experiment, &self.job.name, now_ms(), &tags)
                    .await?;
                tracing::info!(run_id = %run.run_id, "MLflow run created");
                run
            }
        };
        // Params cannot change once logged; the same values again are accepted, so a continued
        // run gets them again harmlessly (and a run whose first attempt died before logging them
        // gets them now).
        let params = spec_params(&self.job.spec);
        for chunk in params.chunks(MAX_BATCH_PARAMS) {
            client.log_batch(&run.run_id, &[], chunk, &[]).await?;
        }
        let attempt = [(ATTEMPT_TAG.to_owned(), self.job.attempt.to_string())];
        client.log_batch(&run.run_id, &[], &[], &attempt).await?;
        self.run = Some(run.clone());
        Ok((client, run))
    }

    /// Logs the pending metrics and tags; what was logged is removed from them.
    async fn flush(&mut self) -> anyhow::Result<()> {
        if self.metrics.is_empty() && self.tags.is_empty() && self.run.is_some() {
            return Ok(());
        }
        let (client, run) = self.connect().await?;
        while !self.tags.is_empty() {
            let n = self.tags.len().min(MAX_BATCH_TAGS);
            client
                .log_batch(&run.run_id, &[], &[], &self.tags[..n])
                .await?;
            self.tags.drain(..n);
        }
        while !self.metrics.is_empty() {
            let n = self.metrics.len().min(MAX_BATCH_METRICS);
            let batch: Vec<Metric> = self.metrics.iter().take(n).cloned().collect();
            client.log_batch(&run.run_id, &batch, &[], &[]).await?;
            self.metrics.drain(..n);
        }
        Ok(())
    }

    /// Everything of the end of the attempt; each finished part is not done again on a retry.
    async fn end(&mut self, ending: &Ending) -> anyhow::Result<()> {
        if !self.uploaded.contains("#result") {
            self.queue_result(ending);
            self.uploaded.insert("#result".into());
        }
        self.flush().await?;
        let Some(status) = ending.run_status() else {
            return Ok(());
        };
        let (client, run) = self.connect().await?;
        if status == "FINISHED" {
            self.upload_outputs(&client, &run, ending).await?;
            self.register_model(&client, &run, ending).await?;
        }
        client
            .update_run(&run.run_id, status, Some(now_ms()))
            .await?;
        tracing::info!(run_id = %run.run_id, status, "MLflow run ended");
        Ok(())
    }

    /// The result's headline numbers as `final.*` and `best.*` metrics, and the verdict as tags.
    fn queue_result(&mut self, ending: &Ending) {
        let now = now_ms();
        self.tags
            .push(("compressd.status".into(), ending.job_status.clone()));
        if let Some(error) = &ending.error {
            self.tags
                .push(("compressd.error".into(), error.chars().take(5000).collect()));
        }
        let Some(result) = &ending.result else { return };
        for key in ["acceptance_met", "best", "final", "reference"] {
            match &result[key] {
                Value::Null => {}
                Value::String(s) => self.tags.push((format!("compressd.{key}"), s.clone())),
                other => self
                    .tags
                    .push((format!("compressd.{key}"), other.to_string())),
            }
        }
        for model in ["final", "best"] {
            let Some(values) = result["metrics"][model].as_object() else {
                continue;
            };
            for (name, value) in values {
                if let Some(value) = value.as_f64().filter(|v| v.is_finite()) {
                    self.metrics.push_back(Metric {
                        key: format!("{model}.{name}"),
                        value,
                        timestamp_ms: now,
                        step: 0,
                    });
                }
            }
        }
    }

    /// The final model as a new version of the spec's `mlflow.registered_model`, when it names
    /// one and the contract held (or the job has none); the run is tagged with the version, or
    /// with why none was made.
    async fn register_model(
        &mut self,
        client: &MlflowClient,
        run: &RunInfo,
        ending: &Ending,
    ) -> anyhow::Result<()> {
        let Some(name) = self
            .job
            .spec
            .pointer("/mlflow/registered_model")
            .and_then(Value::as_str)
            .map(str::to_owned)
        else {
            return Ok(());
        };
        if self.uploaded.contains("#registered") {
            return Ok(());
        }
        let contract_held = ending
            .result
            .as_ref()
            .and_then(|r| r["acceptance_met"].as_bool())
            != Some(false);
        let has_model = self.outputs.iter().any(|o| o.name.starts_with("model/"));
        let tag = if !contract_held {
            tracing::info!(registered_model = %name, "the contract did not hold: no model version registered");
            "not registered: the accuracy contract did not hold".to_owned()
        } else if !has_model {
            "not registered: the job wrote no model".to_owned()
        } else if proxied_artifact_root(&run.artifact_uri).is_none() {
            "not registered: the run's artifacts are not behind MLflow's artifact proxy".to_owned()
        } else {
            let source = format!("{}/model", run.artifact_uri.trim_end_matches('/'));
            let version = client
                .register_model_version(&name, &source, &run.run_id)
                .await?;
            tracing::info!(registered_model = %name, %version, "MLflow model version registered");
            format!("{name}/{version}")
        };
        let tags = [("compressd.registered_model_version".to_owned(), tag)];
        client.log_batch(&run.run_id, &[], &[], &tags).await?;
        self.uploaded.insert("#registered".into());
        Ok(())
    }

    /// The spec, the report and the final model as the run's artifacts; when the run's artifacts
    /// are not behind the proxy, the path of compressd's own as a tag instead.
    async fn upload_outputs(
        &mut self,
        client: &MlflowClient,
        run: &RunInfo,
        ending: &Ending,
    ) -> anyhow::Result<()> {
        let artifacts_path = format!("/v1/jobs/{}/artifacts", self.job.id);
        if proxied_artifact_root(&run.artifact_uri).is_none() {
            tracing::warn!(artifact_uri = %run.artifact_uri, "the run's artifacts are not behind MLflow's artifact proxy; tagging the run with compressd's artifacts instead");
            let tag = [("compressd.artifacts".to_owned(), artifacts_path)];
            return client.log_batch(&run.run_id, &[], &[], &tag).await;
        }
        if !self.uploaded.contains("spec.json") {
            let spec = serde_json::to_vec_pretty(&self.job.spec)?;
            client.upload_bytes(run, "spec.json", spec).await?;
            self.uploaded.insert("spec.json".into());
        }
        let wanted: Vec<OutputFile> = self
            .outputs
            .iter()
            .filter(|o| o.kind == "report" || o.name.starts_with("model/"))
            .cloned()
            .collect();
        for output in wanted {
            if self.uploaded.contains(&output.name) {
                continue;
            }
            let file = ending.work_dir.join(&output.path);
            client.upload_artifact(run, &output.name, &file).await?;
            self.uploaded.insert(output.name.clone());
        }
        let tag = [("compressd.artifacts".to_owned(), artifacts_path)];
        client.log_batch(&run.run_id, &[], &[], &tag).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_status_follows_the_jobs() {
        let ending = |status: &str| Ending {
            job_status: status.into(),
            result: None,
            error: None,
            work_dir: PathBuf::new(),
        };
        assert_eq!(ending("succeeded").run_status(), Some("FINISHED"));
        assert_eq!(ending("failed").run_status(), Some("FAILED"));
        assert_eq!(ending("cancelled").run_status(), Some("KILLED"));
        assert_eq!(ending("queued").run_status(), None);
        assert_eq!(ending("lease_lost").run_status(), None);
    }
}
