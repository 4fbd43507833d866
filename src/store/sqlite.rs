//! The SQLite backend of [`Store`]: the embedded default, one file in the data dir.
//!
//! Ids are stored as hyphenated text, times as fixed-width UTC text and JSON as text (see the
//! migration's header); this module converts at the boundary. Write transactions start with their
//! write, so SQLite takes the write lock up front and the busy timeout, not an error, settles
//! contention between connections.

mod access;
mod queue;
mod rows;
mod webhooks;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::Row;
use tracing::field::Empty;
use uuid::Uuid;

use super::shared::{
    artifact_from_row, artifact_insert_error, cancel_event, dataset_from_row, event_from_row,
    job_from_row, job_refused, missing_job, model_from_row, queued_event, record_claim, replay,
    scoped_idempotency_key, ARTIFACT_COLUMNS, DATASET_COLUMNS, DELETE_ACTION, EVENT_COLUMNS,
    JOB_COLUMNS, MODEL_COLUMNS,
};
use super::{
    clamp_limit, constraint, expect_one_row, Artifact, Backend, Created, Dataset, Job, JobEvent,
    JobFilter, JobStatus, Model, NewEvent, NewJob, Page, Store,
};
use super::{ApiKey, AuditEntry, AuditFilter, TenantUsage};
use super::{AttemptOutcome, JobProgress, Lease, LeaseState, Reaped};
use super::{DeliveryAttempt, DeliveryFilter, DeliveryLog, DeliveryNext, Webhook, WebhookDelivery};
use crate::error::{Error, Result};
use crate::events::hub::{EventHub, Notice};

use rows::json_text;
pub(crate) use rows::to_text;

/// Embedded migrations of this backend.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a statement waits for another connection's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

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

    #[tracing::instrument(name = "db.migrate", skip_all)]
    async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(name = "db.ping", skip_all)]
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    #[tracing::instrument(name = "db.create_job", skip_all, fields(job_id = %job.id))]
    async fn create_job(&self, job: NewJob) -> Result<Created> {
        // With a quota, the transaction takes the write lock first (waiting up to the busy
        // timeout), so its count and insert are not interleaved with another writer's.
        let mut tx = if job.max_active_jobs.is_some() {
            self.pool.begin_with("BEGIN IMMEDIATE").await?
        } else {
            self.pool.begin().await?
        };
        let (key, hash) = job
            .idempotency
            .as_ref()
            .map(|i| {
                (
                    scoped_idempotency_key(&job.tenant, &i.key),
                    i.request_hash.clone(),
                )
            })
            .unzip();
        if let Some(limit) = job.max_active_jobs {
            let replay = match &key {
                Some(key) => sqlx::query("SELECT 1 FROM jobs WHERE idempotency_key = ?1")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some(),
                None => false,
            };
            if !replay {
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE tenant = ?1 AND status IN ('queued', 'running')",
                )
                .bind(&job.tenant)
                .fetch_one(&mut *tx)
                .await?;
                super::access::check_active_jobs(limit, active)?;
            }
        }
        let created_at = to_text(job.created_at);
        let sql = format!(
            "INSERT INTO jobs (id, name, status, spec, model_id, dataset_id, priority, max_attempts, run_after, \
             idempotency_key, request_hash, created_at, updated_at, tenant) \
             VALUES (?1, ?2, 'queued', ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?8, ?8, ?11) \
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
            .bind(&job.tenant)
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
            for webhook in &job.webhooks {
                webhooks::insert_webhook(&mut *tx, webhook).await?;
            }
            let event = insert_event(&mut *tx, &queued_event(&created, job.created_at)).await?;
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
        let client_key = job.idempotency.map(|i| i.key).unwrap_or_default();
        replay(
            stored_hash.as_deref(),
            client_key,
            &hash,
            job_from_row(&row)?,
        )
    }

    #[tracing::instrument(name = "db.get_job", skip_all, fields(job_id = %id))]
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_jobs", skip_all)]
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR id < ?2) \
             AND (?4 IS NULL OR tenant = ?4) ORDER BY id DESC LIMIT ?3"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.after.map(|id| id.to_string()))
            .bind(clamp_limit(filter.limit))
            .bind(filter.tenant.as_deref())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }

    #[tracing::instrument(name = "db.request_cancel", skip_all, fields(job_id = %id))]
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
            return Err(job_refused(id, self.get_job(id).await?, "cancel"));
        };
        let job = job_from_row(&row)?;
        let event = insert_event(&mut *tx, &cancel_event(&job, now)).await?;
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

    #[tracing::instrument(name = "db.delete_job", skip_all, fields(job_id = %id))]
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
        Err(job_refused(id, self.get_job(id).await?, DELETE_ACTION))
    }

    #[tracing::instrument(name = "db.append_event", skip_all, fields(job_id = %event.job_id, attempt = event.attempt))]
    async fn append_event(&self, event: NewEvent) -> Result<JobEvent> {
        let event = insert_event(&self.pool, &event).await?;
        self.hub.publish(Notice::Event {
            job_id: event.job_id,
            seq: event.seq,
        });
        Ok(event)
    }

    #[tracing::instrument(name = "db.list_events", skip_all, fields(job_id = %job_id))]
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

    #[tracing::instrument(name = "db.insert_model", skip_all, fields(model_id = %model.id))]
    async fn insert_model(&self, model: &Model) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO models (id, name, architecture, format, uri, bytes, sha256, metadata, created_at, tenant) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(&model.tenant)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("model {} already exists", model.id)))?;
        expect_one_row(done.rows_affected(), "insert model")
    }

    #[tracing::instrument(name = "db.get_model", skip_all, fields(model_id = %id))]
    async fn get_model(&self, id: Uuid) -> Result<Option<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_models", skip_all)]
    async fn list_models(&self, page: Page) -> Result<Vec<Model>> {
        let sql = format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE (?1 IS NULL OR id < ?1) \
             AND (?3 IS NULL OR tenant = ?3) ORDER BY id DESC LIMIT ?2"
        );
        let rows = sqlx::query(&sql)
            .bind(page.after.map(|id| id.to_string()))
            .bind(clamp_limit(page.limit))
            .bind(page.tenant.as_deref())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(model_from_row).collect()
    }

    #[tracing::instrument(name = "db.delete_model", skip_all, fields(model_id = %id))]
    async fn delete_model(&self, id: Uuid) -> Result<()> {
        self.delete_input("models", "model_id", "model", id).await
    }

    #[tracing::instrument(name = "db.insert_dataset", skip_all, fields(dataset_id = %dataset.id))]
    async fn insert_dataset(&self, dataset: &Dataset) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO datasets (id, name, format, uri, bytes, sha256, rows, metadata, created_at, tenant) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .bind(&dataset.tenant)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("dataset {} already exists", dataset.id)))?;
        expect_one_row(done.rows_affected(), "insert dataset")
    }

    #[tracing::instrument(name = "db.get_dataset", skip_all, fields(dataset_id = %id))]
    async fn get_dataset(&self, id: Uuid) -> Result<Option<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_datasets", skip_all)]
    async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>> {
        let sql = format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE (?1 IS NULL OR id < ?1) \
             AND (?3 IS NULL OR tenant = ?3) ORDER BY id DESC LIMIT ?2"
        );
        let rows = sqlx::query(&sql)
            .bind(page.after.map(|id| id.to_string()))
            .bind(clamp_limit(page.limit))
            .bind(page.tenant.as_deref())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(dataset_from_row).collect()
    }

    #[tracing::instrument(name = "db.delete_dataset", skip_all, fields(dataset_id = %id))]
    async fn delete_dataset(&self, id: Uuid) -> Result<()> {
        self.delete_input("datasets", "dataset_id", "dataset", id)
            .await
    }

    #[tracing::instrument(name = "db.insert_artifact", skip_all, fields(job_id = %artifact.job_id, attempt = artifact.attempt))]
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
        .map_err(|e| artifact_insert_error(e, artifact))?;
        expect_one_row(done.rows_affected(), "insert artifact")
    }

    #[tracing::instrument(name = "db.list_artifacts", skip_all, fields(job_id = %job_id))]
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

    #[tracing::instrument(name = "db.claim_next", skip_all, fields(owner = %owner, job_id = Empty, attempt = Empty))]
    async fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Job>> {
        let job = queue::claim_next(&self.pool, &self.hub, owner, lease).await?;
        record_claim(job.as_ref());
        Ok(job)
    }

    #[tracing::instrument(name = "db.heartbeat", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<Option<LeaseState>> {
        queue::heartbeat(&self.pool, lease, duration).await
    }

    #[tracing::instrument(name = "db.append_fenced_event", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt, event_type))]
    async fn append_fenced_event(
        &self,
        lease: &Lease,
        event_type: &str,
        payload: Value,
    ) -> Result<JobEvent> {
        queue::append_fenced_event(&self.pool, &self.hub, lease, event_type, &payload).await
    }

    #[tracing::instrument(name = "db.update_progress", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn update_progress(&self, lease: &Lease, progress: &JobProgress) -> Result<JobEvent> {
        queue::update_progress(&self.pool, &self.hub, lease, progress).await
    }

    #[tracing::instrument(name = "db.finish_attempt", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn finish_attempt(&self, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus> {
        queue::finish_attempt(&self.pool, &self.hub, lease, outcome).await
    }

    #[tracing::instrument(name = "db.reap_expired", skip_all, fields(limit = limit))]
    async fn reap_expired(&self, limit: u32, backoff: Duration) -> Result<Vec<Reaped>> {
        queue::reap_expired(&self.pool, &self.hub, limit, backoff).await
    }

    #[tracing::instrument(name = "db.commit_artifact", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn commit_artifact(&self, lease: &Lease, artifact: &Artifact) -> Result<()> {
        queue::commit_artifact(&self.pool, lease, artifact).await
    }

    #[tracing::instrument(name = "db.count_jobs_by_status", skip_all)]
    async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        queue::count_by_status(&self.pool).await
    }

    // Access: implemented in `sqlite/access.rs`.

    #[tracing::instrument(name = "db.insert_api_key", skip_all, fields(key_id = %key.id))]
    async fn insert_api_key(&self, key: &ApiKey) -> Result<()> {
        access::insert_api_key(&self.pool, key).await
    }

    #[tracing::instrument(name = "db.get_api_key", skip_all, fields(key_id = %id))]
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>> {
        access::get_api_key(&self.pool, id).await
    }

    #[tracing::instrument(name = "db.list_api_keys", skip_all)]
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>> {
        access::list_api_keys(&self.pool).await
    }

    #[tracing::instrument(name = "db.revoke_api_key", skip_all, fields(key_id = %id))]
    async fn revoke_api_key(&self, id: &str, now: DateTime<Utc>) -> Result<ApiKey> {
        let revoked = access::revoke_api_key(&self.pool, id, now).await;
        self.hub.key_changed();
        revoked
    }

    #[tracing::instrument(name = "db.insert_audit", skip_all)]
    async fn insert_audit(&self, entry: &AuditEntry) -> Result<()> {
        access::insert_audit(&self.pool, entry).await
    }

    #[tracing::instrument(name = "db.list_audit", skip_all)]
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        access::list_audit(&self.pool, filter).await
    }

    #[tracing::instrument(name = "db.tenant_usage", skip_all, fields(tenant = %tenant))]
    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        access::tenant_usage(&self.pool, tenant).await
    }

    // Webhooks: implemented in `sqlite/webhooks.rs`.

    #[tracing::instrument(name = "db.insert_webhook", skip_all, fields(webhook_id = %webhook.id))]
    async fn insert_webhook(&self, webhook: &Webhook) -> Result<()> {
        webhooks::insert_webhook(&self.pool, webhook).await
    }

    #[tracing::instrument(name = "db.get_webhook", skip_all, fields(webhook_id = %id))]
    async fn get_webhook(&self, id: Uuid) -> Result<Option<Webhook>> {
        webhooks::get_webhook(&self.pool, id).await
    }

    #[tracing::instrument(name = "db.list_webhooks", skip_all, fields(tenant = %tenant))]
    async fn list_webhooks(&self, tenant: &str, job_id: Option<Uuid>) -> Result<Vec<Webhook>> {
        webhooks::list_webhooks(&self.pool, tenant, job_id).await
    }

    #[tracing::instrument(name = "db.delete_webhook", skip_all, fields(webhook_id = %id))]
    async fn delete_webhook(&self, id: Uuid) -> Result<()> {
        webhooks::delete_webhook(&self.pool, id).await
    }

    #[tracing::instrument(name = "db.claim_webhook_deliveries", skip_all, fields(owner = %owner))]
    async fn claim_webhook_deliveries(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        webhooks::claim_deliveries(&self.pool, owner, lease, limit).await
    }

    #[tracing::instrument(name = "db.record_webhook_attempt", skip_all, fields(delivery_id = claimed.id, attempt = attempt.attempt))]
    async fn record_webhook_attempt(
        &self,
        claimed: &WebhookDelivery,
        attempt: &DeliveryAttempt,
        next: DeliveryNext,
    ) -> Result<bool> {
        webhooks::record_attempt(&self.pool, claimed, attempt, next).await
    }

    #[tracing::instrument(name = "db.list_webhook_deliveries", skip_all)]
    async fn list_webhook_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliveryLog>> {
        webhooks::list_deliveries(&self.pool, filter).await
    }

    #[tracing::instrument(name = "db.count_pending_webhook_deliveries", skip_all)]
    async fn count_pending_webhook_deliveries(&self) -> Result<i64> {
        webhooks::count_pending(&self.pool).await
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
