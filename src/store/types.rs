//! Domain types of the store: what a job, an event, a model, a dataset and an artifact are.
//!
//! They are independent of the database: each backend maps its rows to these.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::error::Error;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker holds its lease.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobStatus {
    /// Every status, in life order.
    pub const ALL: [JobStatus; 5] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    /// The name stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the job will never change again.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| Error::Corrupt(format!("unknown job status `{s}`")))
    }
}

/// Live progress of a running job.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobProgress {
    /// The running stage's type.
    pub stage: Option<String>,
    /// Its index in the pipeline.
    pub stage_index: Option<u32>,
    /// Stages in the pipeline.
    pub stages: u32,
    /// Share of the whole job done, 0 to 1.
    pub fraction: f64,
    /// Estimated seconds left.
    pub eta_seconds: Option<f64>,
    /// The latest human-readable step.
    pub message: Option<String>,
}

/// What a succeeded job produced.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    /// Metrics of the final model (and the baseline), by name.
    #[schema(value_type = Object)]
    pub metrics: Value,
    /// Whether the acceptance bar was kept; `null` when the spec set none.
    pub acceptance_met: Option<bool>,
    /// The stage whose model is kept as `best` (the last one that kept the contract), e.g.
    /// `1-prune`, or `baseline`; absent for dry runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<String>,
    /// The stage whose model is the final one.
    #[serde(default, rename = "final", skip_serializing_if = "Option::is_none")]
    pub final_stage: Option<String>,
    /// The stage the contract is measured against (`baseline`, or the last leading fine-tune).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Per stage: `label`, `acceptance_met`, `wall_seconds`, `peak_memory_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub stages: Option<Value>,
    /// The published artifacts: `name`, `kind`, `format`, `bytes`, `sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub artifacts: Option<Value>,
    /// A dry run's plan: per-stage time and peak-memory estimates; absent for real runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub plan: Option<Value>,
}

/// Why a job failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// A stable machine-readable code, e.g. `stage_not_implemented`.
    pub code: String,
    /// A human-readable explanation.
    pub message: String,
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// UUID v7: sorts by creation time.
    pub id: Uuid,
    /// The tenant that owns it (and its events and artifacts).
    pub tenant: String,
    /// The spec's name.
    pub name: String,
    /// Current status.
    pub status: JobStatus,
    /// The spec as accepted, defaults filled in.
    pub spec: Value,
    /// The model the spec names; `None` once the model was deleted.
    pub model_id: Option<Uuid>,
    /// The dataset the spec names; `None` once the dataset was deleted.
    pub dataset_id: Option<Uuid>,
    /// Higher runs first.
    pub priority: i32,
    /// Attempts started so far (0 while never claimed).
    pub attempt: i32,
    /// Attempts allowed before the job fails for good.
    pub max_attempts: i32,
    /// Not claimable before this time (retry back-off).
    pub run_after: DateTime<Utc>,
    /// The worker holding the lease, while running.
    pub lease_owner: Option<String>,
    /// When the lease lapses unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// A cancel was asked while the job ran; the worker stops it.
    pub cancel_requested: bool,
    /// The client's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// Live progress.
    pub progress: Option<JobProgress>,
    /// Outcome of a succeeded job.
    pub result: Option<JobResult>,
    /// Cause of a failed job.
    pub error: Option<JobError>,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Last change of the row.
    pub updated_at: DateTime<Utc>,
}

/// The client's idempotency key and a hash of what it asked, to tell a retry from a conflicting reuse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    /// The `Idempotency-Key` header.
    pub key: String,
    /// sha256 (hex) of the normalized request.
    pub request_hash: String,
}

/// A job to insert.
#[derive(Clone, Debug)]
pub struct NewJob {
    /// UUID v7 made by the caller's clock.
    pub id: Uuid,
    /// The owning tenant; its model and dataset must be this tenant's too.
    pub tenant: String,
    /// The spec's name.
    pub name: String,
    /// The normalized spec.
    pub spec: Value,
    /// The referenced model.
    pub model_id: Uuid,
    /// The referenced dataset.
    pub dataset_id: Uuid,
    /// Scheduling priority.
    pub priority: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// Set when the client sent an `Idempotency-Key` (unique per tenant).
    pub idempotency: Option<Idempotency>,
    /// Creation time from the caller's clock.
    pub created_at: DateTime<Utc>,
    /// The spec's own webhooks, with their secret, stored with the job (their `job_id` is the
    /// job's id).
    pub webhooks: Vec<super::Webhook>,
    /// The tenant's quota of queued plus running jobs (`tenant_max_active_jobs`), checked in the
    /// same transaction as the insert so that concurrent requests cannot pass it together;
    /// `None`: no quota. A replay of a stored idempotency key is answered, not counted.
    pub max_active_jobs: Option<u64>,
}

/// The outcome of [`crate::store::Store::create_job`].
#[derive(Clone, Debug, PartialEq)]
pub enum Created {
    /// A new job was inserted.
    New(Job),
    /// The idempotency key was seen before with the same request: this is that job.
    Existing(Job),
}

impl Created {
    /// The job, new or existing.
    pub fn job(&self) -> &Job {
        match self {
            Created::New(job) | Created::Existing(job) => job,
        }
    }
}

/// Which jobs to list: newest first, strictly older than `after`.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    /// Only this tenant's jobs (`None`: every tenant's, for operators and workers).
    pub tenant: Option<String>,
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// The cursor: the id of the last job of the previous page.
    pub after: Option<Uuid>,
    /// Most rows returned.
    pub limit: u32,
}

/// A page of models or datasets, newest first.
#[derive(Clone, Debug, Default)]
pub struct Page {
    /// Only this tenant's rows (`None`: every tenant's).
    pub tenant: Option<String>,
    /// The id of the last row of the previous page.
    pub after: Option<Uuid>,
    /// Most rows returned.
    pub limit: u32,
}

/// Something that happened to a job, in order (`seq` grows across all jobs).
#[derive(Clone, Debug, PartialEq)]
pub struct JobEvent {
    /// Global, increasing sequence number.
    pub seq: i64,
    /// The job.
    pub job_id: Uuid,
    /// The attempt it happened in (0 before the first claim).
    pub attempt: i32,
    /// What happened, e.g. `queued`, `cancel_requested`.
    pub event_type: String,
    /// Details, by event type.
    pub payload: Value,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
}

/// An event to append.
#[derive(Clone, Debug)]
pub struct NewEvent {
    /// The job.
    pub job_id: Uuid,
    /// The attempt.
    pub attempt: i32,
    /// What happened.
    pub event_type: String,
    /// Details.
    pub payload: Value,
    /// When.
    pub created_at: DateTime<Utc>,
}

/// A registered input model.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    /// UUID v7.
    pub id: Uuid,
    /// The owning tenant.
    pub tenant: String,
    /// Display name.
    pub name: String,
    /// Architecture family, e.g. `bert`, `llama`.
    pub architecture: String,
    /// Storage format, e.g. `safetensors`, `gguf`.
    pub format: String,
    /// Where its files are (artifact store URI).
    pub uri: String,
    /// Total size in bytes.
    pub bytes: i64,
    /// sha256 (hex) of the content.
    pub sha256: String,
    /// Facts found at registration (parameter count, config).
    pub metadata: Value,
    /// Registration time.
    pub created_at: DateTime<Utc>,
}

/// A registered dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    /// UUID v7.
    pub id: Uuid,
    /// The owning tenant.
    pub tenant: String,
    /// Display name.
    pub name: String,
    /// `jsonl`, `csv` or `text`.
    pub format: String,
    /// Where its file is.
    pub uri: String,
    /// Size in bytes.
    pub bytes: i64,
    /// sha256 (hex) of the content.
    pub sha256: String,
    /// Rows (or lines of text).
    pub rows: i64,
    /// Facts found at registration (labels, splits, fields).
    pub metadata: Value,
    /// Registration time.
    pub created_at: DateTime<Utc>,
}

/// A file a job attempt produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Artifact {
    /// The job.
    pub job_id: Uuid,
    /// The attempt that wrote it.
    pub attempt: i32,
    /// Unique within the job, e.g. `model.safetensors`, `report.json`.
    pub name: String,
    /// What it is: `model`, `report`, `checkpoint`, `log`.
    pub kind: String,
    /// File format.
    pub format: String,
    /// Size in bytes.
    pub bytes: i64,
    /// sha256 (hex) of the content.
    pub sha256: String,
    /// Where it is in the artifact store.
    pub uri: String,
    /// When it was committed.
    pub created_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
    }
}
