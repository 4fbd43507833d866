//! What both backends share: the column lists, the row-to-domain mapping (over [`StoredRow`],
//! which each backend implements for its row type), the events they record and the errors they
//! return. The SQL itself stays in each backend; only its placeholders and types differ.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use uuid::Uuid;

use super::{
    Artifact, Created, Dataset, Job, JobError, JobEvent, JobStatus, Lease, Model, NewEvent,
    EVENT_CANCELLED, EVENT_CANCEL_REQUESTED, EVENT_QUEUED,
};
use crate::error::{Error, Result};

/// The jobs table's columns, in the order the mapping reads them.
pub(super) const JOB_COLUMNS: &str = "id, tenant, name, status, spec, model_id, dataset_id, priority, attempt, max_attempts, run_after, \
    lease_owner, lease_expires_at, cancel_requested, idempotency_key, progress, result, error, created_at, \
    started_at, finished_at, updated_at";
/// The models table's columns.
pub(super) const MODEL_COLUMNS: &str =
    "id, tenant, name, architecture, format, uri, bytes, sha256, metadata, created_at";
/// The datasets table's columns.
pub(super) const DATASET_COLUMNS: &str =
    "id, tenant, name, format, uri, bytes, sha256, rows, metadata, created_at";
/// The artifacts table's columns.
pub(super) const ARTIFACT_COLUMNS: &str =
    "job_id, attempt, name, kind, format, bytes, sha256, uri, created_at";
/// The job_events table's columns.
pub(super) const EVENT_COLUMNS: &str = "seq, job_id, attempt, type, payload, created_at";

/// A result row of either backend, read as the domain's types (each backend converts its own
/// storage of ids, times and JSON).
pub(super) trait StoredRow {
    /// A text column.
    fn text(&self, column: &str) -> Result<String>;
    /// A nullable text column.
    fn opt_text(&self, column: &str) -> Result<Option<String>>;
    /// A 32-bit integer column.
    fn int(&self, column: &str) -> Result<i32>;
    /// A 64-bit integer column.
    fn big(&self, column: &str) -> Result<i64>;
    /// A boolean column.
    fn flag(&self, column: &str) -> Result<bool>;
    /// An id column.
    fn id(&self, column: &str) -> Result<Uuid>;
    /// A nullable id column.
    fn opt_id(&self, column: &str) -> Result<Option<Uuid>>;
    /// A time column.
    fn time(&self, column: &str) -> Result<DateTime<Utc>>;
    /// A nullable time column.
    fn opt_time(&self, column: &str) -> Result<Option<DateTime<Utc>>>;
    /// A JSON column (SQL NULL reads as JSON null).
    fn json(&self, column: &str) -> Result<Value>;
    /// A nullable JSON column decoded into `T`.
    fn opt_json<T: DeserializeOwned>(&self, column: &str) -> Result<Option<T>>;
}

/// A job from a row with [`JOB_COLUMNS`].
pub(super) fn job_from_row(row: &impl StoredRow) -> Result<Job> {
    Ok(Job {
        id: row.id("id")?,
        tenant: row.text("tenant")?,
        name: row.text("name")?,
        status: row.text("status")?.parse()?,
        spec: row.json("spec")?,
        model_id: row.opt_id("model_id")?,
        dataset_id: row.opt_id("dataset_id")?,
        priority: row.int("priority")?,
        attempt: row.int("attempt")?,
        max_attempts: row.int("max_attempts")?,
        run_after: row.time("run_after")?,
        lease_owner: row.opt_text("lease_owner")?,
        lease_expires_at: row.opt_time("lease_expires_at")?,
        cancel_requested: row.flag("cancel_requested")?,
        idempotency_key: row
            .opt_text("idempotency_key")?
            .map(|stored| unscoped_idempotency_key(&stored).to_owned()),
        progress: row.opt_json("progress")?,
        result: row.opt_json("result")?,
        error: row.opt_json("error")?,
        created_at: row.time("created_at")?,
        started_at: row.opt_time("started_at")?,
        finished_at: row.opt_time("finished_at")?,
        updated_at: row.time("updated_at")?,
    })
}

/// The stored form of a tenant's idempotency key: `<tenant>/<key>`. Tenant names hold no `/`
/// (see [`crate::auth::valid_tenant`]), so the encoding is unambiguous, and the column's
/// uniqueness becomes uniqueness per tenant.
pub(super) fn scoped_idempotency_key(tenant: &str, key: &str) -> String {
    format!("{tenant}/{key}")
}

/// The client's key from its stored form.
fn unscoped_idempotency_key(stored: &str) -> &str {
    stored.split_once('/').map_or(stored, |(_, key)| key)
}

/// A model from a row with [`MODEL_COLUMNS`].
pub(super) fn model_from_row(row: &impl StoredRow) -> Result<Model> {
    Ok(Model {
        id: row.id("id")?,
        tenant: row.text("tenant")?,
        name: row.text("name")?,
        architecture: row.text("architecture")?,
        format: row.text("format")?,
        uri: row.text("uri")?,
        bytes: row.big("bytes")?,
        sha256: row.text("sha256")?,
        metadata: row.json("metadata")?,
        created_at: row.time("created_at")?,
    })
}

/// A dataset from a row with [`DATASET_COLUMNS`].
pub(super) fn dataset_from_row(row: &impl StoredRow) -> Result<Dataset> {
    Ok(Dataset {
        id: row.id("id")?,
        tenant: row.text("tenant")?,
        name: row.text("name")?,
        format: row.text("format")?,
        uri: row.text("uri")?,
        bytes: row.big("bytes")?,
        sha256: row.text("sha256")?,
        rows: row.big("rows")?,
        metadata: row.json("metadata")?,
        created_at: row.time("created_at")?,
    })
}

/// An artifact from a row with [`ARTIFACT_COLUMNS`].
pub(super) fn artifact_from_row(row: &impl StoredRow) -> Result<Artifact> {
    Ok(Artifact {
        job_id: row.id("job_id")?,
        attempt: row.int("attempt")?,
        name: row.text("name")?,
        kind: row.text("kind")?,
        format: row.text("format")?,
        bytes: row.big("bytes")?,
        sha256: row.text("sha256")?,
        uri: row.text("uri")?,
        created_at: row.time("created_at")?,
    })
}

/// An event from a row with [`EVENT_COLUMNS`].
pub(super) fn event_from_row(row: &impl StoredRow) -> Result<JobEvent> {
    Ok(JobEvent {
        seq: row.big("seq")?,
        job_id: row.id("job_id")?,
        attempt: row.int("attempt")?,
        event_type: row.text("type")?,
        payload: row.json("payload")?,
        created_at: row.time("created_at")?,
    })
}

/// A `(status, n)` row of the count-by-status query.
pub(super) fn status_count(row: &impl StoredRow) -> Result<(JobStatus, i64)> {
    Ok((row.text("status")?.parse()?, row.big("n")?))
}

/// The `queued` event recorded with a new job.
pub(super) fn queued_event(job: &Job, at: DateTime<Utc>) -> NewEvent {
    NewEvent {
        job_id: job.id,
        attempt: 0,
        event_type: EVENT_QUEUED.into(),
        payload: json!({"priority": job.priority}),
        created_at: at,
    }
}

/// The event a cancel request records: `cancelled` when it ended a queued job, else
/// `cancel_requested` for the worker running it.
pub(super) fn cancel_event(job: &Job, now: DateTime<Utc>) -> NewEvent {
    let event_type = if job.status.is_finished() {
        EVENT_CANCELLED
    } else {
        EVENT_CANCEL_REQUESTED
    };
    NewEvent {
        job_id: job.id,
        attempt: job.attempt,
        event_type: event_type.into(),
        payload: json!({}),
        created_at: now,
    }
}

/// The answer to a create that hit a stored idempotency key: the stored job when the request
/// hashes match, else a conflict.
pub(super) fn replay(
    stored_hash: Option<&str>,
    key: String,
    hash: &str,
    job: Job,
) -> Result<Created> {
    if stored_hash == Some(hash) {
        Ok(Created::Existing(job))
    } else {
        Err(Error::IdempotencyConflict { key })
    }
}

/// "No such job".
pub(super) fn job_not_found(id: Uuid) -> Error {
    Error::NotFound {
        kind: "job",
        id: id.to_string(),
    }
}

/// Why `action` did not change job `id`: it does not exist (`None`), or its status forbids it.
pub(super) fn job_refused(id: Uuid, job: Option<Job>, action: &'static str) -> Error {
    match job {
        None => job_not_found(id),
        Some(job) => Error::JobState {
            id,
            status: job.status.to_string(),
            action,
        },
    }
}

/// The action named when a job that is not finished is asked to be deleted.
pub(super) const DELETE_ACTION: &str = "delete (only finished jobs can be deleted)";

/// Maps a foreign-key violation of a row that references a job to "this job does not exist".
pub(super) fn missing_job(error: sqlx::Error, job_id: Uuid) -> Error {
    match &error {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => job_not_found(job_id),
        _ => Error::Database(error),
    }
}

/// An artifact insert's error: its job missing, a second artifact of its name, or the database's.
pub(super) fn artifact_insert_error(error: sqlx::Error, artifact: &Artifact) -> Error {
    match &error {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            missing_job(error, artifact.job_id)
        }
        _ => super::constraint(error, || artifact_exists(artifact.job_id, &artifact.name)),
    }
}

/// The conflict of a second artifact of one name in one job.
pub(super) fn artifact_exists(job_id: Uuid, name: &str) -> String {
    format!("job {job_id} already has an artifact named {name}")
}

/// Why a fenced artifact commit wrote nothing: `held` says whether the lease still holds the job
/// (then the attempt already has an artifact of that name).
pub(super) fn artifact_refused(held: bool, lease: &Lease, name: &str) -> Error {
    if held {
        Error::Conflict(artifact_exists(lease.job_id, name))
    } else {
        lease_lost(lease)
    }
}

/// The error of a write whose lease is no longer the job's.
pub(super) fn lease_lost(lease: &Lease) -> Error {
    Error::LeaseLost {
        job_id: lease.job_id,
        attempt: lease.attempt,
    }
}

/// The error a reaped attempt ends with.
pub(super) fn lease_expired(job: &Job) -> JobError {
    JobError {
        code: "lease_expired".into(),
        message: format!(
            "the worker running attempt {} stopped heartbeating",
            job.attempt
        ),
    }
}

/// Records the claimed job's id and attempt on the current `db.claim_next` span.
pub(super) fn record_claim(job: Option<&Job>) {
    if let Some(job) = job {
        let span = tracing::Span::current();
        span.record("job_id", tracing::field::display(job.id));
        span.record("attempt", job.attempt);
    }
}

/// Pairs deliveries (in id order) with their attempts; attempts of deliveries not in the list
/// (another job's, between the first and last id) are dropped.
pub(super) fn group_attempts(
    deliveries: Vec<super::WebhookDelivery>,
    attempts: Vec<super::DeliveryAttempt>,
) -> Vec<super::DeliveryLog> {
    let mut by_delivery: std::collections::HashMap<i64, Vec<super::DeliveryAttempt>> =
        std::collections::HashMap::new();
    for attempt in attempts {
        by_delivery
            .entry(attempt.delivery_id)
            .or_default()
            .push(attempt);
    }
    deliveries
        .into_iter()
        .map(|delivery| super::DeliveryLog {
            attempts: by_delivery.remove(&delivery.id).unwrap_or_default(),
            delivery,
        })
        .collect()
}
