//! The worker side of the PostgreSQL backend: claims, heartbeats, fenced writes, reaping.
//!
//! Times come from the database clock (`now()`), so workers on machines with skewed clocks agree
//! on when a lease lapses. Every fenced statement matches the job row on (id, attempt,
//! lease_owner, status = running) and locks it before inserting an event; that lock is also what
//! makes one job's events commit in `seq` order, which event streams rely on.

use std::time::Duration;

use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};

use super::{event_from_row, job_from_row, EVENT_COLUMNS, JOB_COLUMNS};
use crate::error::Result;
use crate::store::constraint;
use crate::store::lease::{decide, final_decision, Decision};
use crate::store::shared::{
    artifact_exists, artifact_refused, lease_expired, lease_lost, status_count,
};
use crate::store::{
    Artifact, AttemptOutcome, Job, JobEvent, JobProgress, JobStatus, Lease, LeaseState, Reaped,
    EVENT_STATUS,
};

/// The fence every worker write is conditioned on; `$1` job id, `$2` attempt, `$3` owner.
const FENCE: &str = "id = $1 AND attempt = $2 AND lease_owner = $3 AND status = 'running'";

pub(super) async fn claim_next(pool: &PgPool, owner: &str, lease: Duration) -> Result<Option<Job>> {
    // One statement, so one round trip: pick (SKIP LOCKED: concurrent claimers each take a
    // different row instead of queueing on one), claim, and record the `status` event.
    let sql = format!(
        "WITH next AS ( \
           SELECT id FROM jobs WHERE status = 'queued' AND run_after <= now() \
           ORDER BY priority DESC, run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED), \
         claimed AS ( \
           UPDATE jobs SET status = 'running', attempt = jobs.attempt + 1, lease_owner = $1, \
             lease_expires_at = now() + make_interval(secs => $2), started_at = now(), updated_at = now() \
           FROM next WHERE jobs.id = next.id RETURNING {}), \
         event AS ( \
           INSERT INTO job_events (job_id, attempt, type, payload, created_at) \
           SELECT id, attempt, '{EVENT_STATUS}', \
             jsonb_build_object('status', 'running', 'attempt', attempt, 'worker', $1::text), now() \
           FROM claimed) \
         SELECT {JOB_COLUMNS} FROM claimed",
        prefixed(JOB_COLUMNS, "jobs.")
    );
    let row = sqlx::query(&sql)
        .bind(owner)
        .bind(lease.as_secs_f64())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(job_from_row).transpose()
}

/// `JOB_COLUMNS` qualified with a table name, for statements that join.
fn prefixed(columns: &str, prefix: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{prefix}{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job,
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<JobEvent> {
    let sql = format!(
        "INSERT INTO job_events (job_id, attempt, type, payload, created_at) VALUES ($1, $2, $3, $4, now()) \
         RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(job.id)
        .bind(job.attempt)
        .bind(event_type)
        .bind(payload)
        .fetch_one(&mut **tx)
        .await?;
    event_from_row(&row)
}

pub(super) async fn heartbeat(
    pool: &PgPool,
    lease: &Lease,
    duration: Duration,
) -> Result<Option<LeaseState>> {
    let sql = format!(
        "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $4), updated_at = now() \
         WHERE {FENCE} RETURNING cancel_requested"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(duration.as_secs_f64())
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(LeaseState {
            cancel_requested: r.try_get("cancel_requested")?,
        })
    })
    .transpose()
}

pub(super) async fn append_fenced_event(
    pool: &PgPool,
    lease: &Lease,
    event_type: &str,
    payload: &serde_json::Value,
) -> Result<JobEvent> {
    let sql = format!(
        "WITH fence AS (SELECT id FROM jobs WHERE {FENCE} FOR UPDATE) \
         INSERT INTO job_events (job_id, attempt, type, payload, created_at) \
         SELECT id, $2, $4, $5, now() FROM fence RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(event_type)
        .bind(payload)
        .fetch_optional(pool)
        .await?;
    row.as_ref()
        .map(event_from_row)
        .transpose()?
        .ok_or_else(|| lease_lost(lease))
}

pub(super) async fn update_progress(
    pool: &PgPool,
    lease: &Lease,
    progress: &JobProgress,
) -> Result<JobEvent> {
    let sql = format!(
        "WITH fence AS (UPDATE jobs SET progress = $4, updated_at = now() WHERE {FENCE} RETURNING id) \
         INSERT INTO job_events (job_id, attempt, type, payload, created_at) \
         SELECT id, $2, 'progress', $4, now() FROM fence RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(Json(progress))
        .fetch_optional(pool)
        .await?;
    row.as_ref()
        .map(event_from_row)
        .transpose()?
        .ok_or_else(|| lease_lost(lease))
}

pub(super) async fn finish_attempt(
    pool: &PgPool,
    lease: &Lease,
    outcome: AttemptOutcome,
) -> Result<JobStatus> {
    match final_decision(lease.attempt, outcome.clone()) {
        Some(decision) => finish_final(pool, lease, decision).await,
        None => finish_retry(pool, lease, outcome).await,
    }
}

/// Ends the job (succeeded, failed, cancelled) in one fenced statement: the decision does not
/// depend on the row, so there is nothing to read first.
async fn finish_final(pool: &PgPool, lease: &Lease, decision: Decision) -> Result<JobStatus> {
    let sql = format!(
        "WITH done AS ( \
           UPDATE jobs SET status = $4, result = $5, error = $6, lease_owner = NULL, lease_expires_at = NULL, \
             finished_at = now(), updated_at = now() WHERE {FENCE} RETURNING id, attempt) \
         INSERT INTO job_events (job_id, attempt, type, payload, created_at) \
         SELECT id, attempt, $7, $8, now() FROM done RETURNING seq"
    );
    let inserted = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(decision.status.as_str())
        .bind(decision.result.as_ref())
        .bind(decision.error.as_ref().map(Json))
        .bind(decision.event_type)
        .bind(&decision.payload)
        .fetch_optional(pool)
        .await?;
    inserted
        .map(|_| decision.status)
        .ok_or_else(|| lease_lost(lease))
}

/// A retry depends on the row (attempts left, a pending cancel): read it locked, then settle.
async fn finish_retry(pool: &PgPool, lease: &Lease, outcome: AttemptOutcome) -> Result<JobStatus> {
    let mut tx = pool.begin().await?;
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {FENCE} FOR UPDATE");
    let row = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .fetch_optional(&mut *tx)
        .await?;
    let job = job_from_row(&row.ok_or_else(|| lease_lost(lease))?)?;
    let status = settle(&mut tx, &job, outcome).await?;
    tx.commit().await?;
    Ok(status)
}

/// Writes the end of `job`'s current attempt (its row locked by the caller) and its event.
async fn settle(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job,
    outcome: AttemptOutcome,
) -> Result<JobStatus> {
    let decision = decide(job, outcome);
    let sql = "UPDATE jobs SET status = $2, result = $3, error = $4, lease_owner = NULL, lease_expires_at = NULL, \
               run_after = now() + make_interval(secs => $5), \
               finished_at = CASE WHEN $2 IN ('succeeded', 'failed', 'cancelled') THEN now() END, updated_at = now() \
               WHERE id = $1";
    let updated = sqlx::query(sql)
        .bind(job.id)
        .bind(decision.status.as_str())
        .bind(decision.result.as_ref())
        .bind(decision.error.as_ref().map(Json))
        .bind(decision.run_after.as_secs_f64())
        .execute(&mut **tx)
        .await?;
    crate::store::expect_one_row(updated.rows_affected(), "finish attempt")?;
    insert_event(tx, job, decision.event_type, &decision.payload).await?;
    Ok(decision.status)
}

pub(super) async fn reap_expired(
    pool: &PgPool,
    limit: u32,
    backoff: Duration,
) -> Result<Vec<Reaped>> {
    let mut tx = pool.begin().await?;
    let sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'running' AND lease_expires_at < now() \
         ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED"
    );
    let rows = sqlx::query(&sql)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    let mut reaped = Vec::with_capacity(rows.len());
    for row in &rows {
        let job = job_from_row(row)?;
        let error = lease_expired(&job);
        let backoff = crate::store::retry_backoff(backoff, job.attempt + 1);
        let status = settle(&mut tx, &job, AttemptOutcome::Retry { error, backoff }).await?;
        reaped.push(Reaped::from_status(job.id, job.attempt, status));
    }
    tx.commit().await?;
    Ok(reaped)
}

/// Counts jobs by status, for the queue-depth gauge.
pub(super) async fn count_by_status(pool: &PgPool) -> Result<Vec<(JobStatus, i64)>> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        .fetch_all(pool)
        .await?;
    rows.iter().map(status_count).collect()
}

/// Records an artifact of the leased attempt; the fence row is locked so a concurrent reclaim
/// waits for (or beats) the insert. Nothing is recorded when the lease was lost.
pub(super) async fn commit_artifact(
    pool: &PgPool,
    lease: &Lease,
    artifact: &Artifact,
) -> Result<()> {
    let sql = format!(
        "WITH fence AS (SELECT id FROM jobs WHERE {FENCE} FOR UPDATE) \
         INSERT INTO artifacts (job_id, attempt, name, kind, format, bytes, sha256, uri, created_at) \
         SELECT id, $2, $4, $5, $6, $7, $8, $9, $10 FROM fence \
         ON CONFLICT (job_id, name) DO UPDATE SET attempt = EXCLUDED.attempt, kind = EXCLUDED.kind, \
         format = EXCLUDED.format, bytes = EXCLUDED.bytes, sha256 = EXCLUDED.sha256, uri = EXCLUDED.uri, \
         created_at = EXCLUDED.created_at WHERE artifacts.attempt < EXCLUDED.attempt"
    );
    let done = sqlx::query(&sql)
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(&artifact.name)
        .bind(&artifact.kind)
        .bind(&artifact.format)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.uri)
        .bind(artifact.created_at)
        .execute(pool)
        .await
        .map_err(|e| constraint(e, || artifact_exists(lease.job_id, &artifact.name)))?;
    if done.rows_affected() == 0 {
        // Nothing written: either the lease is gone or this attempt already has the name.
        let held = sqlx::query(&format!("SELECT 1 FROM jobs WHERE {FENCE}"))
            .bind(lease.job_id)
            .bind(lease.attempt)
            .bind(&lease.owner)
            .fetch_optional(pool)
            .await?
            .is_some();
        return Err(artifact_refused(held, lease, &artifact.name));
    }
    Ok(())
}
