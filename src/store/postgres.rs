//! The PostgreSQL backend of [`Store`].

mod access;
mod queue;
mod rows;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;
use tracing::field::Empty;
use uuid::Uuid;

use super::shared::{
    artifact_from_row, artifact_insert_error, cancel_event, dataset_from_row, event_from_row,
    job_from_row, job_not_found, job_refused, missing_job, model_from_row, queued_event,
    record_claim, replay, scoped_idempotency_key, ARTIFACT_COLUMNS, DATASET_COLUMNS, DELETE_ACTION,
    EVENT_COLUMNS, JOB_COLUMNS, MODEL_COLUMNS,
};
use super::{
    clamp_limit, constraint, expect_one_row, Artifact, Backend, Created, Dataset, Job, JobEvent,
    JobFilter, Model, NewEvent, NewJob, Page, Store,
};
use super::{ApiKey, AuditEntry, AuditFilter, TenantUsage};
use super::{AttemptOutcome, JobProgress, JobStatus, Lease, LeaseState, Reaped};
use super::{DeliveryAttempt, DeliveryFilter, DeliveryLog, DeliveryNext, Webhook, WebhookDelivery};
use crate::error::{Error, Result};
use crate::events::hub::EventHub;
use crate::events::listener::{spawn_listener, ListenerTask};

/// Embedded migrations of this backend.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a request waits for a free pooled connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

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
        .map_err(|e| missing_job(e, event.job_id))?;
    event_from_row(&row)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
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
        let mut tx = self.pool.begin().await?;
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
                Some(key) => sqlx::query("SELECT 1 FROM jobs WHERE idempotency_key = $1")
                    .bind(key)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some(),
                None => false,
            };
            if !replay {
                // One creator per tenant at a time counts and inserts (the lock ends with the
                // transaction), so concurrent requests cannot pass the quota together.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
                    .bind(format!("compressd.tenant_active_jobs.{}", job.tenant))
                    .execute(&mut *tx)
                    .await?;
                let active: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status IN ('queued', 'running')",
                )
                .bind(&job.tenant)
                .fetch_one(&mut *tx)
                .await?;
                super::access::check_active_jobs(limit, active)?;
            }
        }
        let sql = format!(
            "INSERT INTO jobs (id, name, status, spec, model_id, dataset_id, priority, max_attempts, run_after, \
             idempotency_key, request_hash, created_at, updated_at, tenant) \
             VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10, $8, $8, $11) \
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
            insert_event(&mut *tx, &queued_event(&created, job.created_at)).await?;
            tx.commit().await?;
            return Ok(Created::New(created));
        }
        // Only an idempotency-key conflict makes the insert do nothing: the key is set.
        let (key, hash) = (key.unwrap_or_default(), hash.unwrap_or_default());
        let sql =
            format!("SELECT {JOB_COLUMNS}, request_hash FROM jobs WHERE idempotency_key = $1");
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
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_jobs", skip_all)]
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::text IS NULL OR status = $1) AND ($2::uuid IS NULL OR id < $2) \
             AND ($4::text IS NULL OR tenant = $4) ORDER BY id DESC LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.status.map(|s| s.as_str()))
            .bind(filter.after)
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
            return Err(job_refused(id, self.get_job(id).await?, "cancel"));
        };
        let job = job_from_row(&row)?;
        insert_event(&mut *tx, &cancel_event(&job, now)).await?;
        tx.commit().await?;
        Ok(job)
    }

    #[tracing::instrument(name = "db.delete_job", skip_all, fields(job_id = %id))]
    async fn delete_job(&self, id: Uuid) -> Result<Vec<Artifact>> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM jobs WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let status: super::JobStatus = status.ok_or_else(|| job_not_found(id))?.parse()?;
        if !status.is_finished() {
            return Err(Error::JobState {
                id,
                status: status.to_string(),
                action: DELETE_ACTION,
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

    #[tracing::instrument(name = "db.append_event", skip_all, fields(job_id = %event.job_id, attempt = event.attempt))]
    async fn append_event(&self, event: NewEvent) -> Result<JobEvent> {
        insert_event(&self.pool, &event).await
    }

    #[tracing::instrument(name = "db.list_events", skip_all, fields(job_id = %job_id))]
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

    #[tracing::instrument(name = "db.insert_model", skip_all, fields(model_id = %model.id))]
    async fn insert_model(&self, model: &Model) -> Result<()> {
        let done = sqlx::query(
            "INSERT INTO models (id, name, architecture, format, uri, bytes, sha256, metadata, created_at, tenant) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
        .bind(&model.tenant)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("model {} already exists", model.id)))?;
        expect_one_row(done.rows_affected(), "insert model")
    }

    #[tracing::instrument(name = "db.get_model", skip_all, fields(model_id = %id))]
    async fn get_model(&self, id: Uuid) -> Result<Option<Model>> {
        let sql = format!("SELECT {MODEL_COLUMNS} FROM models WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(model_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_models", skip_all)]
    async fn list_models(&self, page: Page) -> Result<Vec<Model>> {
        let sql = format!(
            "SELECT {MODEL_COLUMNS} FROM models WHERE ($1::uuid IS NULL OR id < $1) \
             AND ($3::text IS NULL OR tenant = $3) ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(page.after)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
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
        .bind(&dataset.tenant)
        .execute(&self.pool)
        .await
        .map_err(|e| constraint(e, || format!("dataset {} already exists", dataset.id)))?;
        expect_one_row(done.rows_affected(), "insert dataset")
    }

    #[tracing::instrument(name = "db.get_dataset", skip_all, fields(dataset_id = %id))]
    async fn get_dataset(&self, id: Uuid) -> Result<Option<Dataset>> {
        let sql = format!("SELECT {DATASET_COLUMNS} FROM datasets WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dataset_from_row).transpose()
    }

    #[tracing::instrument(name = "db.list_datasets", skip_all)]
    async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>> {
        let sql = format!(
            "SELECT {DATASET_COLUMNS} FROM datasets WHERE ($1::uuid IS NULL OR id < $1) \
             AND ($3::text IS NULL OR tenant = $3) ORDER BY id DESC LIMIT $2"
        );
        let rows = sqlx::query(&sql)
            .bind(page.after)
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
        .map_err(|e| artifact_insert_error(e, artifact))?;
        expect_one_row(done.rows_affected(), "insert artifact")
    }

    #[tracing::instrument(name = "db.list_artifacts", skip_all, fields(job_id = %job_id))]
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

    #[tracing::instrument(name = "db.claim_next", skip_all, fields(owner = %owner, job_id = Empty, attempt = Empty))]
    async fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Job>> {
        let job = queue::claim_next(&self.pool, owner, lease).await?;
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
        payload: serde_json::Value,
    ) -> Result<JobEvent> {
        queue::append_fenced_event(&self.pool, lease, event_type, &payload).await
    }

    #[tracing::instrument(name = "db.update_progress", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn update_progress(&self, lease: &Lease, progress: &JobProgress) -> Result<JobEvent> {
        queue::update_progress(&self.pool, lease, progress).await
    }

    #[tracing::instrument(name = "db.finish_attempt", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn finish_attempt(&self, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus> {
        queue::finish_attempt(&self.pool, lease, outcome).await
    }

    #[tracing::instrument(name = "db.reap_expired", skip_all, fields(limit = limit))]
    async fn reap_expired(&self, limit: u32, backoff: Duration) -> Result<Vec<Reaped>> {
        queue::reap_expired(&self.pool, limit, backoff).await
    }

    #[tracing::instrument(name = "db.commit_artifact", skip_all, fields(job_id = %lease.job_id, attempt = lease.attempt))]
    async fn commit_artifact(&self, lease: &Lease, artifact: &Artifact) -> Result<()> {
        queue::commit_artifact(&self.pool, lease, artifact).await
    }

    #[tracing::instrument(name = "db.count_jobs_by_status", skip_all)]
    async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>> {
        queue::count_by_status(&self.pool).await
    }

    // Access: implemented in `postgres/access.rs`.

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
        // This process's own key cache is stale at once, without waiting for the notification.
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

    // Webhooks: implemented in `postgres/webhooks.rs`.

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
