//! Storage: one trait, [`Store`], with a PostgreSQL and an SQLite backend.
//!
//! Handlers and workers call its coarse methods and never see SQL (STYLE rule 4). Both backends pass
//! the same contract suite (`tests/store/contract.rs`). Rows made by callers carry ids and times from
//! the caller's [`crate::clock::Clock`], so tests are deterministic.
//!
//! Worker-side methods (claim, heartbeat, fenced writes, reaping) are added by the scheduler work;
//! the jobs table already has their columns.

pub mod access;
pub(crate) mod lease;
mod postgres;
mod shared;
mod sqlite;
mod types;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use access::{ApiKey, AuditEntry, AuditFilter, Scope, TenantUsage, DEFAULT_TENANT};
pub use lease::{
    retry_backoff, AttemptOutcome, Lease, LeaseState, Reaped, EVENT_FAILED, EVENT_STATUS,
    EVENT_SUCCEEDED,
};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use types::{
    Artifact, Created, Dataset, Idempotency, Job, JobError, JobEvent, JobFilter, JobProgress,
    JobResult, JobStatus, Model, NewEvent, NewJob, Page,
};
pub use webhooks::{
    events_from_text, events_to_text, DeliveryAttempt, DeliveryFilter, DeliveryLog, DeliveryNext,
    DeliveryStatus, Webhook, WebhookDelivery,
};

use crate::error::{Error, Result};
use crate::events::hub::EventHub;
use crate::settings::Settings;

/// Most rows any list method returns, whatever the caller asks.
pub const MAX_PAGE: u32 = 100;

/// Attempts a job gets unless configured otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 3;

/// Event type recorded when a job is accepted.
pub const EVENT_QUEUED: &str = "queued";
/// Event type recorded when a cancel of a running job is asked.
pub const EVENT_CANCEL_REQUESTED: &str = "cancel_requested";
/// Event type recorded when a job stops because it was cancelled.
pub const EVENT_CANCELLED: &str = "cancelled";

/// Which database a store talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

/// The storage interface of jobs, job events, models, datasets and artifacts.
///
/// Every method is one transaction: it either happens whole or not at all.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Which backend this is.
    fn backend(&self) -> Backend;

    /// Applies pending migrations of this backend.
    async fn migrate(&self) -> Result<()>;

    /// Checks the database answers.
    async fn ping(&self) -> Result<()>;

    /// Inserts a queued job and its `queued` event. When `job.idempotency` names a key seen before,
    /// returns that job if the request hash matches.
    ///
    /// # Errors
    /// [`Error::IdempotencyConflict`] when the key was used with a different request hash.
    async fn create_job(&self, job: NewJob) -> Result<Created>;

    /// The job, if it exists.
    async fn get_job(&self, id: Uuid) -> Result<Option<Job>>;

    /// Jobs newest first, after the filter's cursor, at most `min(filter.limit, MAX_PAGE)`.
    async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<Job>>;

    /// Cancels a queued job at once; marks a running one `cancel_requested` for its worker. Records
    /// the matching event. Asking again for a running job is harmless.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::JobState`] when the job is already finished.
    async fn request_cancel(&self, id: Uuid, now: DateTime<Utc>) -> Result<Job>;

    /// Deletes a finished job with its events and artifact rows, returning those artifacts so the
    /// caller can remove their files.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::JobState`] when the job is queued or running.
    async fn delete_job(&self, id: Uuid) -> Result<Vec<Artifact>>;

    /// Appends an event; the store assigns `seq`.
    ///
    /// # Errors
    /// [`Error::NotFound`] when the job does not exist.
    async fn append_event(&self, event: NewEvent) -> Result<JobEvent>;

    /// A job's events with `seq > after_seq`, oldest first, at most `min(limit, MAX_PAGE)`.
    async fn list_events(&self, job_id: Uuid, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>>;

    /// Registers a model.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the id exists.
    async fn insert_model(&self, model: &Model) -> Result<()>;

    /// The model, if registered.
    async fn get_model(&self, id: Uuid) -> Result<Option<Model>>;

    /// Models newest first.
    async fn list_models(&self, page: Page) -> Result<Vec<Model>>;

    /// Removes a model record.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Conflict`] while a queued or running job uses it.
    async fn delete_model(&self, id: Uuid) -> Result<()>;

    /// Registers a dataset.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the id exists.
    async fn insert_dataset(&self, dataset: &Dataset) -> Result<()>;

    /// The dataset, if registered.
    async fn get_dataset(&self, id: Uuid) -> Result<Option<Dataset>>;

    /// Datasets newest first.
    async fn list_datasets(&self, page: Page) -> Result<Vec<Dataset>>;

    /// Removes a dataset record.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Conflict`] while a queued or running job uses it.
    async fn delete_dataset(&self, id: Uuid) -> Result<()>;

    /// Records an artifact of a job attempt (unfenced; the scheduler's fenced commit builds on it).
    ///
    /// # Errors
    /// [`Error::NotFound`] when the job does not exist; [`Error::Conflict`] when the job already has
    /// an artifact of that name.
    async fn insert_artifact(&self, artifact: &Artifact) -> Result<()>;

    /// A job's artifacts by name.
    async fn list_artifacts(&self, job_id: Uuid) -> Result<Vec<Artifact>>;

    // ---- Worker side: leases and fenced writes (see `lease.rs` and the scheduler). ----

    /// The process's notification hub that this store's commits reach (through `LISTEN` on
    /// Postgres, directly on SQLite).
    fn hub(&self) -> &EventHub;

    /// Claims the next claimable job for `owner`: the highest priority, then the oldest
    /// `run_after`, among queued jobs whose `run_after` has passed. Sets it `running`, increments
    /// its `attempt`, stamps the lease and records a `status` event, in one transaction.
    async fn claim_next(&self, owner: &str, lease: Duration) -> Result<Option<Job>>;

    /// Extends the lease by `lease` from now. `None` when the lease is lost (the job moved on).
    async fn heartbeat(&self, lease: &Lease, duration: Duration) -> Result<Option<LeaseState>>;

    /// Appends an event to the leased attempt.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the job is no longer this attempt's.
    async fn append_fenced_event(
        &self,
        lease: &Lease,
        event_type: &str,
        payload: serde_json::Value,
    ) -> Result<JobEvent>;

    /// Stores the attempt's progress and records it as a `progress` event.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the job is no longer this attempt's.
    async fn update_progress(&self, lease: &Lease, progress: &JobProgress) -> Result<JobEvent>;

    /// Ends the leased attempt (see [`lease::decide`] for retries, cancels and the attempt limit)
    /// and records the matching event. Returns the job's new status.
    ///
    /// # Errors
    /// [`Error::LeaseLost`] when the job is no longer this attempt's.
    async fn finish_attempt(&self, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus>;

    /// Settles up to `limit` running jobs whose lease expired: requeued after
    /// [`retry_backoff`]`(backoff, next attempt)`, failed after `max_attempts`, or cancelled when a
    /// cancel was requested. Safe to call from many processes at once.
    async fn reap_expired(&self, limit: u32, backoff: Duration) -> Result<Vec<Reaped>>;

    /// Records an artifact of the leased attempt, fenced like every worker write: it is recorded
    /// only while (job, attempt, lease owner) still hold the running job, so a reclaimed or
    /// cancelled attempt never leaves a visible artifact. The artifact's job and attempt are the
    /// lease's. An artifact of the same name left by an earlier attempt (one that died while
    /// publishing) is replaced: the job's artifacts are those of the attempt that last wrote them.
    ///
    /// # Errors
    /// [`Error::LeaseLost`]; [`Error::Conflict`] when this attempt already has an artifact of
    /// that name.
    async fn commit_artifact(&self, lease: &Lease, artifact: &Artifact) -> Result<()>;

    /// How many jobs are in each status (statuses with none are left out).
    async fn count_jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>>;

    // ---- Access: API keys, the audit log, tenant usage (`sqlite/access.rs`, `postgres/access.rs`). ----

    /// Stores a new API key.
    ///
    /// # Errors
    /// [`Error::Conflict`] when the id exists.
    async fn insert_api_key(&self, key: &ApiKey) -> Result<()>;

    /// The key with this id, revoked or not. Read on every authenticated request (no cache), so a
    /// revocation holds from the next request on, on every replica.
    async fn get_api_key(&self, id: &str) -> Result<Option<ApiKey>>;

    /// Every key, oldest first.
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>>;

    /// Revokes a key (again is harmless) and returns it.
    ///
    /// # Errors
    /// [`Error::NotFound`] when no key has this id.
    async fn revoke_api_key(&self, id: &str, now: DateTime<Utc>) -> Result<ApiKey>;

    /// Records a state-changing request.
    async fn insert_audit(&self, entry: &AuditEntry) -> Result<()>;

    /// Audit entries oldest first, after the filter's cursor, at most `min(filter.limit, MAX_PAGE)`.
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>>;

    /// A tenant's queued and running jobs and stored bytes, for its quotas.
    async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage>;

    // ---- Webhooks: subscriptions and the delivery outbox (`sqlite/webhooks.rs`, `postgres/webhooks.rs`). ----

    /// Stores a tenant's webhook (a job's own are stored by [`Store::create_job`]).
    ///
    /// # Errors
    /// [`Error::Conflict`] when the id exists.
    async fn insert_webhook(&self, webhook: &Webhook) -> Result<()>;

    /// The webhook with this id, a tenant's or a job's.
    async fn get_webhook(&self, id: Uuid) -> Result<Option<Webhook>>;

    /// A tenant's own webhooks (`job_id` `None`) or one job's, oldest first.
    async fn list_webhooks(&self, tenant: &str, job_id: Option<Uuid>) -> Result<Vec<Webhook>>;

    /// Deletes a webhook and its deliveries not yet made; the log of finished ones stays.
    ///
    /// # Errors
    /// [`Error::NotFound`] when no webhook has this id.
    async fn delete_webhook(&self, id: Uuid) -> Result<()>;

    /// Claims up to `limit` due deliveries for `owner`: each one's `attempts` grows by one and it
    /// is not due again before `lease` has passed, so a claimer that dies loses nothing.
    async fn claim_webhook_deliveries(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>>;

    /// Records an attempt of a claimed delivery and what follows it, fenced on the claim (owner
    /// and attempt number). `false`, writing nothing, when the claim was lost (its lease passed
    /// and another loop claimed the delivery).
    async fn record_webhook_attempt(
        &self,
        claimed: &WebhookDelivery,
        attempt: &DeliveryAttempt,
        next: DeliveryNext,
    ) -> Result<bool>;

    /// Deliveries with their attempts, oldest first, at most `min(filter.limit, MAX_PAGE)`.
    async fn list_webhook_deliveries(&self, filter: &DeliveryFilter) -> Result<Vec<DeliveryLog>>;

    /// Deliveries still pending (the outbox depth).
    async fn count_pending_webhook_deliveries(&self) -> Result<i64>;
}

/// Opens the store the settings name: `database_url` unset means SQLite in the data dir.
///
/// # Errors
/// [`Error::Io`] when the data dir cannot be created; [`Error::Database`] when the database does not answer.
pub async fn connect(settings: &Settings) -> Result<Arc<dyn Store>> {
    let max = settings.database_max_connections;
    match settings.database_url.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Arc::new(PgStore::connect(url, max).await?))
        }
        Some(url) => Ok(Arc::new(SqliteStore::connect(url, max).await?)),
        None => {
            std::fs::create_dir_all(&settings.data_dir)
                .map_err(|e| Error::io(&settings.data_dir, e))?;
            let path = settings.data_dir.join("compressd.db");
            Ok(Arc::new(SqliteStore::open_file(&path, max).await?))
        }
    }
}

/// The effective page size.
fn clamp_limit(limit: u32) -> i64 {
    i64::from(limit.clamp(1, MAX_PAGE))
}

/// Maps unique and foreign-key violations to [`Error::Conflict`] with `what` as the message; other
/// database errors pass through. The one place constraint violations become domain errors.
fn constraint(error: sqlx::Error, what: impl FnOnce() -> String) -> Error {
    if let sqlx::Error::Database(db) = &error {
        if db.is_unique_violation() || db.is_foreign_key_violation() {
            return Error::Conflict(what());
        }
    }
    Error::Database(error)
}

/// Checks a single-row write changed exactly one row.
fn expect_one_row(rows_affected: u64, what: &str) -> Result<()> {
    if rows_affected == 1 {
        Ok(())
    } else {
        Err(Error::Corrupt(format!(
            "{what} changed {rows_affected} rows, expected 1"
        )))
    }
}
