//! The job resource: `POST/GET /v1/jobs`, `GET/DELETE /v1/jobs/{id}`, `POST /v1/jobs/{id}/cancel`.

pub mod create;
pub mod list;
pub mod manage;
mod named_models;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::store::{Job, JobError, JobProgress, JobResult, JobStatus};

/// A job as the API shows it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobView {
    /// UUID v7; sorts by creation time.
    pub id: Uuid,
    /// The spec's name.
    pub name: String,
    /// Where the job is in its life.
    pub status: JobStatus,
    /// The spec as accepted, with defaults filled in.
    #[schema(value_type = Object)]
    pub spec: Value,
    /// When the job was accepted.
    pub created_at: DateTime<Utc>,
    /// When the latest attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Attempts started so far.
    pub attempt: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// A cancel was asked and the worker has not stopped the job yet (or has).
    pub cancel_requested: bool,
    /// Live progress while running.
    pub progress: Option<JobProgress>,
    /// Outcome of a succeeded job.
    pub result: Option<JobResult>,
    /// Cause of a failed job.
    pub error: Option<JobError>,
    /// The signing secret (`whsec_` + base64) of the spec's `webhooks`: only in the answer to
    /// the create (and to its idempotent replays), never in later reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

impl From<Job> for JobView {
    fn from(job: Job) -> Self {
        Self {
            id: job.id,
            name: job.name,
            status: job.status,
            spec: job.spec,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            cancel_requested: job.cancel_requested,
            progress: job.progress,
            result: job.result,
            error: job.error,
            webhook_secret: None,
        }
    }
}
