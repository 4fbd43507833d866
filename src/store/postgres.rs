//! The PostgreSQL backend of [`Store`].

mod queue;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::types::Json;
use sqlx::Row;
use uuid::Uuid;

use super::{
    clamp_limit, constraint, expect_one_row, Artifact, Backend, Created, Dataset, Job, JobEvent,
    JobFilter, Model, NewEvent, NewJob, Page, Store, EVENT_CANCELLED, EVENT_CANCEL_REQUESTED,
    EVENT_QUEUED,
};
use super::{AttemptOutcome, JobProgress, JobStatus, Lease, LeaseState, Reaped};
use crate::error::{Error, Result};
use crate::events::hub::EventHub;
use crate::events::listener::{spawn_listener, ListenerTask};

/// Embedded migrations of this backend.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a request waits for a free pooled connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

const JOB_COLUMNS: &str = "id, name, status, spec, model_id, dataset_id, priority, attempt, max_attempts, run_after, \
    lease_owner, lease_expires_at, cancel_requested, idempotency_key, progress, result, error, created_at, \
    started_at, finished_at, updated_at";
const MODEL_COLUMNS: &str =
    "id, name, architecture, format, uri, bytes, sha256, metadata, created_at";
const DATASET_COLUMNS: &str = "id, name, format, uri, bytes, sha256, rows, metadata, created_at";
const ARTIFACT_COLUMNS: &str =
    "job_id, attempt, name, kind, format, bytes, sha256, uri, created_at";
const EVENT_COLUMNS: &str = "seq, job_id, attempt, type, payload, created_at";

/// A [`Store`] on PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgStore {
    pool: PgPool,
    /// Fed by this store's `LISTEN` connection (see `events::listener`).
    hub: EventHub,
    _listener: Arc<ListenerTask>,
}

impl PgStore {
    /// Connects a pool of at most `max_connections`.
    ///
    /// # Errors
    /// [`Error::Database`] when the server cannot be reached or refuses the login.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        let hub = EventHub::new();
        let listener = Arc::new(spawn_listener(pool.clone(), hub.clone()));
        Ok(Self {
            pool,
            hub,
            _listener: listener,
        })
    }

    /// The pool, for backend-specific code in this crate (the scheduler's queue queries).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn job_from_row(row: &PgRow) -> Result<Job> {
    let status: String = row.try_get("status")?;
    Ok(Job {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        status: status.parse()?,
        spec: row.try_get("spec")?,
        model_id: row.try_get("model_id")?,
        dataset_id: row.try_get("dataset_id")?,
        priority: row.try_get("priority")?,
        attempt: row.try_get("attempt")?,
        max_attempts: row.try_get("max_attempts")?,
        run_after: row.try_get("run_after")?,
        lease_owner: row.try_get("lease_owner")?,
        lease_expires_at: row.try_get("lease_expires_at")?,
        cancel_requested: row.try_get("cancel_requested")?,
        idempotency_key: row.try_get("idempotency_key")?,
        progress: row.try_get::<Option<Json<_>>, _>("progress")?.map(|j| j.0),
        result: row.try_get::<Option<Json<_>>, _>("result")?.map(|j| j.0),
        error: row.try_get::<Option<Json<_>>, _>("error")?.map(|j| j.0),
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn model_from_row(row: &PgRow) -> Result<Model> {
    Ok(Model {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        architecture: row.try_get("architecture")?,
        format: row.try_get("format")?,
        uri: row.try_get("uri")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
    })
}

fn dataset_from_row(row: &PgRow) -> Result<Dataset> {
    Ok(Dataset {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        format: row.try_get("format")?,
        uri: row.try_get("uri")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        rows: row.try_get("rows")?,
        metadata: row.try_get("metadata")?,
        created_at: row.try_get("created_at")?,
    })
}

fn artifact_from_row(row: &PgRow) -> Result<Artifact> {
    Ok(Artifact {
        job_id: row.try_get("job_id")?,
        attempt: row.try_get("attempt")?,
        name: row.try_get("name")?,
        kind: row.try_get("kind")?,
        format: row.try_get("format")?,
        bytes: row.try_get("bytes")?,
        sha256: row.try_get("sha256")?,
        uri: row.try_get("uri")?,
        created_at: row.try_get("created_at")?,
    })
}

fn event_from_row(row: &PgRow) -> Result<JobEvent> {
    Ok(JobEvent {
        seq: row.try_get("seq")?,
        job_id: row.try_get("job_id")?,
        attempt: row.try_get("attempt")?,
        event_type: row.try_get("type")?,
        payload: row.try_get("payload")?,
        created_at: row.try_get("created_at")?,
    })
}

/// Inserts an event inside the caller's transaction or on the pool.
async fn insert_event<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    event: &NewEvent,
) -> Result<JobEvent> {
    let sql = format!(
        "INSERT INTO job_events (job_id, attempt, type, payload, created_at) VALUES ($1, $2, $3, $4, $5) RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(event.job_id)
        .bind(event.attempt)
        .bind(&event.event_type)
        .bind(&event.payload)
        .bind(event.created_at)
        .fetch_one(executor)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => Error::NotFound {
                kind: "job",
                id: event.job_id.to_string(),
            },
            _ => Error::Database(e),
        })?;
    event_from_row(&row)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
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
        let sql = format!(
            "INSERT INTO jobs (id, name, status, spec, model_id, dataset_id, priority, max_attempts, run_after, \
             idempotency_key, request_hash, created_at, updated_at) \
             VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $8, $8) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING {JOB_COLUMNS}"
        );
        let inserted = sqlx::query(&sql)
            .bind(job.id)
            .bind(&job.name)
            .bind(&job.spec)
            .bind(job.model_id)
            .bind(job.dataset_id)
            .bind(job.priority)
            .bind(job.max_attempts)
            .bind(job.created_at)
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
            insert_event(&mut *tx, &event).await?;
            tx.commit().await?;
            return Ok(Created::New(created));
        }
        // Only an idempotency-key conflict makes the insert do nothing: the key is set.
        let (key, hash) = (key.unwrap_or_default(), hash.unwrap_or_default());
        let sql =
            format!("SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = $1");
        let row = sqlx::query(&sql).bind(&key).fetch_one(&mut *tx).await?;
        let stored_hash: Option<String> = row.try_get("request_hash")?;
        if stored_hash.as_deref() == Some(hash.as_str()) {
            Ok(Created::Existing(job_from_row(&row)?))
        } else {
            Err(Error::IdempotencyConflict { key })
        }
    }

    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.after)
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
               finished_at = CASE WHEN status = 'queued' THEN $2 ELSE finished_at END, \
               cancel_requested = true, updated_at = $2 \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING {JOB_COLUMNS}"
        );
        let Some(row) = sqlx::query(&sql)
            .bind(id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?
        else {
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
        insert_event(&mut *tx, &event).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn delete_job(&self, id: Uuid) -> Result<Vec<Artifact>> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let status: super::JobStatus = status
            .ok_or_else(|| Error::NotFound {
                kind: "job",
                id: id.to_string(),
            })?
            .parse()?;
        if !status.is_finished() {
            return Err(Error::JobState {
                id,
                status: status.to_string(),
                action: "delete (only finished jobs can be deleted)",
            });
        }
        let sql =
            format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = $1 ORDER BY name");
        let artifacts = sqlx::query(&sql).bind(id).fetch_all(&mut *tx).await?;
        let artifacts = artifacts
            .iter()
            .map(artifact_from_row)
            .collect::<Result<Vec<_>>>()?;
        let deleted = sqlx::query("DELETE FROM jobs WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        expect_one_row(deleted.rows_affected(), "delete job")?;
        tx.commit().await?;
        Ok(artifacts)
    }

    async fn append_event(&self, event: NewEvent) -> Result<JobEvent> {
        insert_event(&self.pool, &event).await
    }

    async fn list_events(&self, job_id: Uuid, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM job_events WHERE job_id = $1 AND seq > $2 ORDER BY seq LIMIT $3");
        let rows = sqlx::query(&sql)
            .bind(job_id)
            .bind(after_seq)
            .bind(clamp_limit(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event_from_row).collect()
    }

    async fn insert_model(&self, model: &Model) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO models (id, name, architecture, format, uri, bytes, sha256, metadata, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(model.id)
        .bind(&model.name)
        .bind(&model.architecture)
        .bind(&model.format)
        .bind(&model.uri)
        .bind(model.bytes)
        .bind(&model.sha256)
        .bind(&model.metadata)
        .bind(model.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("model {} already exists", model.id)))?;
        expect_one_row(done.rows_affected(), "insert model")
    }

    async fn get_model(&self, id: Uuid) -> Result<Option<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    async fn list_models(&self, page: Page) -> Result<Vec<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE ($1::uuid IS NULL OR id < $1) ORDER BY id DESC LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.after)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(dataset.id)
        .bind(&dataset.name)
        .bind(&dataset.format)
        .bind(&dataset.uri)
        .bind(dataset.bytes)
        .bind(&dataset.sha256)
        .bind(dataset.rows)
        .bind(&dataset.metadata)
        .bind(dataset.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("dataset {} already exists", dataset.id)))?;
        expect_one_row(done.rows_affected(), "insert dataset")
    }

    async fn get_dataset(&self, id: Uuid) -> Result<Option<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE ($1::uuid IS NULL OR id < $1) ORDER BY id DESC LIMIT $2");
        let rows = sqlx::query(&sql)
            .bind(page.after)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(artifact.job_id)
        .bind(artifact.attempt)
        .bind(&artifact.name)
        .bind(&artifact.kind)
        .bind(&artifact.format)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.uri)
        .bind(artifact.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                Error::NotFound { kind: "job", id: artifact.job_id.to_string() }
            }
            _ => constraint(e, || format!("job {} already has an artifact named {}", artifact.job_id, artifact.name)),
        })?;
        expect_one_row(done.rows_affected(), "insert artifact")
    }

    async fn list_artifacts(&self, job_id: Uuid) -> Result<Vec<Artifact>> {
        let sql =
            format!("SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE job_id = $1 ORDER BY name");
        let rows = sqlx::query(&sql).bind(job_id).fetch_all(&self.pool).await?;
        rows.iter().map(artifact_from_row).collect()
    }

    // Worker side: implemented in `postgres/queue.rs`.

    fn hub(&self) -> &EventHub {
        &self.hub
    }

    async fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Job>> {
        queue::claim_next(&self.pool, owner, lease).await
    }

    async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<Option<LeaseState>> {
        queue::heartbeat(&self.pool, lease, duration).await
    }

    async fn append_fenced_event(
        &self,
        lease: &Lease,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<JobEvent> {
        queue::append_fenced_event(&self.pool, lease, event_type, &payload).await
    }

    async fn update_progress(&self, lease: &Lease, progress: &JobProgress) -> Result<JobEvent> {
        queue::update_progress(&self.pool, lease, progress).await
    }

    async fn finish_attempt(&self, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus> {
        queue::finish_attempt(&self.pool, lease, outcome).await
    }

    async fn reap_expired(&self, limit: u32, backoff: Duration) -> Result<Vec<Reaped>> {
        queue::reap_expired(&self.pool, limit, backoff).await
    }

    async fn commit_artifact(&self, lease: &Lease, artifact: &Artifact) -> Result<()> {
        queue::commit_artifact(&self.pool, lease, artifact).await
    }

    async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        queue::count_by_status(&self.pool).await
    }
}

impl PgStore {
    /// Deletes a model or dataset unless a queued or running job uses it. The row lock keeps a
    /// job from being created against it between the check and the delete (the job's foreign key
    /// check needs a share lock on the same row).
    async fn delete_input(
        &self,
        table: &str,
        column: &str,
        kind: &'static str,
        id: Uuid,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let locked: Option<Uuid> =
            sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE id = $1 FOR UPDATE"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        if locked.is_none() {
            return Err(Error::NotFound {
                kind,
                id: id.to_string(),
            });
        }
        let active: Option<Uuid> = sqlx::query_scalar(&format!(
            "SELECT id FROM jobs WHERE {column} = $1 AND status IN ('queued', 'running') LIMIT 1"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(job) = active {
            return Err(Error::Conflict(format!(
                "{kind} {id} is used by job {job}, which is queued or running"
            )));
        }
        let done = sqlx::query(&format!("DELETE FROM {table} WHERE id = $1"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        expect_one_row(done.rows_affected(), "delete input")?;
        tx.commit().await?;
        Ok(())
    }
}
