//! The SQLite backend of [`Store`]: the embedded default, one file in the data dir.
//!
//! Ids are stored as hyphenated text, times as fixed-width UTC text and JSON as text (see the
//! migration's header); this module converts at the boundary. Write transactions start with their
//! write, so SQLite takes the write lock up front and the busy timeout, not an error, settles
//! contention between connections.

mod queue;
mod rows;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use uuid::Uuid;

use super::{
    clamp_limit, constraint, expect_one_row, Artifact, Backend, Created, Dataset, Job, JobEvent,
    JobFilter, JobStatus, Model, NewEvent, NewJob, Page, Store, EVENT_CANCELLED,
    EVENT_CANCEL_REQUESTED, EVENT_QUEUED,
};
use super::{AttemptOutcome, JobProgress, Lease, LeaseState, Reaped};
use crate::error::{Error, Result};
use crate::events::hub::{EventHub, Notice};

pub(crate) use rows::to_text;
use rows::{
    artifact_from_row, dataset_from_row, event_from_row, job_from_row, json_text, model_from_row,
};

/// Embedded migrations of this backend.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

const JOB_COLUMNS: &str = "id, name, status, spec, model_id, dataset_id, priority, attempt, max_attempts, run_after, \
    lease_owner, lease_expires_at, cancel_requested, idempotency_key, progress, result, error, created_at, \
    started_at, finished_at, updated_at";
const MODEL_COLUMNS: &str =
    "id, name, architecture, format, uri, bytes, sha256, metadata, created_at";
const DATASET_COLUMNS: &str = "id, name, format, uri, bytes, sha256, rows, metadata, created_at";
const ARTIFACT_COLUMNS: &str =
    "job_id, attempt, name, kind, format, bytes, sha256, uri, created_at";
const EVENT_COLUMNS: &str = "seq, job_id, attempt, type, payload, created_at";

/// A [`Store`] on an SQLite file.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Told after each commit that workers or event streams care about (SQLite has no NOTIFY).
    hub: EventHub,
}

impl SqliteStore {
    /// Opens (creating if missing) the database a `sqlite://` URL names.
    ///
    /// # Errors
    /// [`Error::Database`] when the URL is malformed or the file cannot be opened.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        Self::open(SqliteConnectOptions::from_str(url)?, max_connections).await
    }

    /// Opens (creating if missing) the database file at `path`.
    ///
    /// # Errors
    /// [`Error::Database`] when the file cannot be opened.
    pub async fn open_file(path: &Path, max_connections: u32) -> Result<Self> {
        Self::open(SqliteConnectOptions::new().filename(path), max_connections).await
    }

    async fn open(options: SqliteConnectOptions, max_connections: u32) -> Result<Self> {
        let options = options
            .create_if_missing(true)
            // WAL lets readers run while one connection writes.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            hub: EventHub::new(),
        })
    }

    /// The pool, for backend-specific code in this crate (the scheduler's queue queries).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

/// Maps a foreign-key violation to "this job does not exist".
fn missing_job(error: sqlx::Error, job_id: Uuid) -> Error {
    match &error {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::NotFound {
            kind: "job",
            id: job_id.to_string(),
        },
        _ => Error::Database(error),
    }
}

async fn insert_event<'e, E: sqlx::SqliteExecutor<'e>>(
    executor: E,
    event: &NewEvent,
) -> Result<JobEvent> {
    let sql = format!(
        "INSERT INTO job_events (job_id, attempt, type, payload, created_at) VALUES (?, ?, ?, ?, ?) RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(event.job_id.to_string())
        .bind(event.attempt)
        .bind(&event.event_type)
        .bind(json_text(&event.payload))
        .bind(to_text(event.created_at))
        .fetch_one(executor)
        .await
        .map_err(|e| missing_job(e, event.job_id))?;
    event_from_row(&row)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_job(&self, job: NewJob) -> Result<Created> {
        let mut tx = self.pool.begin().await?;
        let (key, hash) = job
            .idempotency
            .as_ref()
            .map(|i| (i.key.clone(), i.request_hash.clone()))
            .unzip();
        let created_at = to_text(job.created_at);
        let sql = format!(
            "INSERT INTO jobs (id, name, status, spec, model_id, dataset_id, priority, max_attempts, run_after, \
             idempotency_key, request_hash, created_at, updated_at) \
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?8, ?8) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {JOB_COLUMNS}"
        );
        let inserted = sqlx::query(&sql)
            .bind(job.id.to_string())
            .bind(&job.name)
            .bind(json_text(&job.spec))
            .bind(job.model_id.to_string())
            .bind(job.dataset_id.to_string())
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(&created_at)
            .bind(&key)
            .bind(&hash)
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| {
                constraint(e, || {
                    format!(
                        "job {} or its model or dataset conflicts with stored rows",
                        job.id
                    )
                })
            })?;
        if let Some(row) = inserted {
            let created = job_from_row(&row)?;
            let event = NewEvent {
                job_id: created.id,
                attempt: 0,
                event_type: EVENT_QUEUED.into(),
                payload: json!({"priority": created.priority}),
                created_at: job.created_at,
            };
            let event = insert_event(&mut *tx, &event).await?;
            tx.commit().await?;
            self.hub.publish(Notice::Event {
                job_id: event.job_id,
                seq: event.seq,
            });
            self.hub.publish(Notice::Queued);
            return Ok(Created::New(created));
        }
        // Only an idempotency-key conflict makes the insert do nothing: the key is set.
        let (key, hash) = (key.unwrap_or_default(), hash.unwrap_or_default());
        let sql = format!("SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = ?");
        let row = sqlx::query(&sql).bind(&key).fetch_one(&mut *tx).await?;
        let stored_hash: Option<String> = row.try_get("request_hash")?;
        if stored_hash.as_deref() == Some(hash.as_str()) {
            Ok(Created::Existing(job_from_row(&row)?))
        } else {
            Err(Error::IdempotencyConflict { key })
        }
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2) \
             ORDER BY id DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.after.map(|id| id.to_string()))
            .bind(clamp_limit(filter.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    async fn request_cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<Job> {
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE jobs SET \
               status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END, \
               finished_at = CASE WHEN status = 'queued' THEN ?2 ELSE finished_at END, \
               cancel_requested = 1, updated_at = ?2 \
             WHERE id = ?1 AND status IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
        );
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(to_text(now))
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(match self.get_job(id).await? {
                None => Error::NotFound {
                    kind: "job",
                    id: id.to_string(),
                },
                Some(job) => Error::JobState {
                    id,
                    status: job.status.to_string(),
                    action: "cancel",
                },
            });
        };
        let job = job_from_row(&row)?;
        let event_type = if job.status.is_finished() {
            EVENT_CANCELLED
        } else {
            EVENT_CANCEL_REQUESTED
        };
        let event = NewEvent {
            job_id: id,
            attempt: job.attempt,
            event_type: event_type.into(),
            payload: json!({}),
            created_at: now,
        };
        let event = insert_event(&mut *tx, &event).await?;
        tx.commit().await?;
        self.hub.publish(Notice::Event {
            job_id: event.job_id,
            seq: event.seq,
        });
        if !job.status.is_finished() {
            self.hub.publish(Notice::CancelRequested { job_id: id });
        }
        Ok(job)
    }

    async fn delete_job(&self, id: Uuid) -> Result<Vec<Artifact>> {
        // A finished job's artifacts no longer change, so reading them before the (conditional,
        // atomic) delete cannot miss one.
        let artifacts = self.list_artifacts(id).await?;
        let done = sqlx::query(
            "DELETE FROM jobs WHERE id = ? AND status IN ('succeeded', 'failed', 'cancelled')",
        )
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            return Ok(artifacts);
        }
        Err(match self.get_job(id).await? {
            None => Error::NotFound {
                kind: "job",
                id: id.to_string(),
            },
            Some(job) => Error::JobState {
                id,
                status: job.status.to_string(),
                action: "delete (only finished jobs can be deleted)",
            },
        })
    }

    async fn append_event(&self, event: NewEvent) -> Result<JobEvent> {
        let event = insert_event(&self.pool, &event).await?;
        self.hub.publish(Notice::Event {
            job_id: event.job_id,
            seq: event.seq,
        });
        Ok(event)
    }

    async fn list_events(&self, job_id: Uuid, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?");
        let rows = sqlx::query(&sql)
            .bind(job_id.to_string())
            .bind(after_seq)
            .bind(clamp_limit(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn insert_model(&self, model: &Model) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO models (id, name, architecture, format, uri, bytes, sha256, metadata, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(model.id.to_string())
        .bind(&model.name)
        .bind(&model.architecture)
        .bind(&model.format)
        .bind(&model.uri)
        .bind(model.bytes)
        .bind(&model.sha256)
        .bind(json_text(&model.metadata))
        .bind(to_text(model.created_at))
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("model {} already exists", model.id)))?;
        expect_one_row(done.rows_affected(), "insert model")
    }

    async fn get_model(&self, id: Uuid) -> Result<Option<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn list_models(&self, page: Page) -> Result<Vec<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2");
        let rows = sqlx::query(&sql)
            .bind(page.after.map(|id| id.to_string()))
            .bind(clamp_limit(page.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(model_from_row).collect()
    }

    async fn delete_model(&self, id: Uuid) -> Result<()> {
        self.delete_input("models", "model_id", "model", id).await
    }

    async fn insert_dataset(&self, dataset: &Dataset) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO datasets (id, name, format, uri, bytes, sha256, rows, metadata, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(dataset.id.to_string())
        .bind(&dataset.name)
        .bind(&dataset.format)
        .bind(&dataset.uri)
        .bind(dataset.bytes)
        .bind(&dataset.sha256)
        .bind(dataset.rows)
        .bind(json_text(&dataset.metadata))
        .bind(to_text(dataset.created_at))
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("dataset {} already exists", dataset.id)))?;
        expect_one_row(done.rows_affected(), "insert dataset")
    }

    async fn get_dataset(&self, id: Uuid) -> Result<Option<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2");
        let rows = sqlx::query(&sql)
            .bind(page.after.map(|id| id.to_string()))
            .bind(clamp_limit(page.limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(dataset_from_row).collect()
    }

    async fn delete_dataset(&self, id: Uuid) -> Result<()> {
        self.delete_input("datasets", "dataset_id", "dataset", id)
            .await
    }

    async fn insert_artifact(&self, artifact: &Artifact) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO artifacts (job_id, attempt, name, kind, format, bytes, sha256, uri, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(artifact.job_id.to_string())
        .bind(artifact.attempt)
        .bind(&artifact.name)
        .bind(&artifact.kind)
        .bind(&artifact.format)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.uri)
        .bind(to_text(artifact.created_at))
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => missing_job(e, artifact.job_id),
            _ => constraint(e, || format!("job {} already has an artifact named {}", artifact.job_id, artifact.name)),
        })?;
        expect_one_row(done.rows_affected(), "insert artifact")
    }

    async fn list_artifacts(&self, job_id: Uuid) -> Result<Vec<Artifact>> {
        let sql =
            format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = ? ORDER BY name");
        let rows = sqlx::query(&sql)
            .bind(job_id.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(artifact_from_row).collect()
    }

    // Worker side: implemented in `sqlite/queue.rs`.

    fn hub(&self) -> &EventHub {
        &self.hub
    }

    async fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Job>> {
        queue::claim_next(&self.pool, &self.hub, owner, lease).await
    }

    async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<Option<LeaseState>> {
        queue::heartbeat(&self.pool, lease, duration).await
    }

    async fn append_fenced_event(
        &self,
        lease: &Lease,
        event_type: &str,
        payload: Value,
    ) -> Result<JobEvent> {
        queue::append_fenced_event(&self.pool, &self.hub, lease, event_type, &payload).await
    }

    async fn update_progress(&self, lease: &Lease, progress: &JobProgress) -> Result<JobEvent> {
        queue::update_progress(&self.pool, &self.hub, lease, progress).await
    }

    async fn finish_attempt(&self, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus> {
        queue::finish_attempt(&self.pool, &self.hub, lease, outcome).await
    }

    async fn reap_expired(&self, limit: u32, backoff: Duration) -> Result<Vec<Reaped>> {
        queue::reap_expired(&self.pool, &self.hub, limit, backoff).await
    }

    async fn commit_artifact(&self, lease: &Lease, artifact: &Artifact) -> Result<()> {
        queue::commit_artifact(&self.pool, lease, artifact).await
    }

    async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        queue::count_by_status(&self.pool).await
    }
}

impl SqliteStore {
    /// Deletes a model or dataset unless a queued or running job uses it, in one statement so no
    /// job can be created against it in between.
    async fn delete_input(
        &self,
        table: &str,
        column: &str,
        kind: &'static str,
        id: Uuid,
    ) -> Result<()> {
        let sql = format!(
            "DELETE FROM {table} WHERE id = ?1 AND NOT EXISTS \
             (SELECT 1 FROM jobs WHERE {column} = ?1 AND status IN ('queued', 'running'))"
        );
        let done = sqlx::query(&sql)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        let exists: Option<String> =
            sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE id = ?"))
                .bind(id.to_string())
                .fetch_optional(&self.pool)
                .await?;
        Err(match exists {
            None => Error::NotFound {
                kind,
                id: id.to_string(),
            },
            Some(_) => Error::Conflict(format!("{kind} {id} is used by a queued or running job")),
        })
    }
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
