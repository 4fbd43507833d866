//! The worker side of the SQLite backend: claims, heartbeats, fenced writes, reaping.
//!
//! SQLite has one writer at a time, which gives the same guarantees Postgres gets from row locks
//! and `SKIP LOCKED`: every transaction here starts with its write, so it holds the write lock
//! from its first statement and two claimers can never take the same job. Times come from this
//! process's clock: an embedded database lives on one machine, so all its workers share it.
//! With no `NOTIFY` in SQLite, each write tells the process's [`EventHub`] after it commits.

use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use sqlx::sqlite::SqlitePool;
use sqlx::{Row, Sqlite, Transaction};

use super::{event_from_row, job_from_row, json_text, to_text, EVENT_COLUMNS, JOB_COLUMNS};
use crate::error::{Error, Result};
use crate::events::hub::{EventHub, Notice};
use crate::store::constraint;
use crate::store::lease::decide;
use crate::store::shared::{
    artifact_exists, artifact_refused, lease_expired, lease_lost, status_count,
};
use crate::store::{
    Artifact, AttemptOutcome, Job, JobEvent, JobProgress, JobStatus, Lease, LeaseState, NewEvent,
    Reaped, EVENT_STATUS,
};

/// The fence every worker write is conditioned on; `?1` job id, `?2` attempt, `?3` owner.
const FENCE: &str = "id = ?1 AND attempt = ?2 AND lease_owner = ?3 AND status = 'running'";

fn notice(event: &JobEvent) -> Notice {
    Notice::Event {
        job_id: event.job_id,
        seq: event.seq,
    }
}

/// `now + by`, as stored.
fn later(by: Duration) -> String {
    to_text(Utc::now() + chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX))
}

pub(super) async fn claim_next(
    pool: &SqlitePool,
    hub: &EventHub,
    owner: &str,
    lease: Duration,
) -> Result<Option<Job>> {
    let mut tx = pool.begin().await?;
    let now = to_text(Utc::now());
    let sql = format!(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_owner = ?1, lease_expires_at = ?2, \
           started_at = ?3, updated_at = ?3 \
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND run_after <= ?3 \
                     ORDER BY priority DESC, run_after, id LIMIT 1) \
         RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(owner)
        .bind(later(lease))
        .bind(&now)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let job = job_from_row(&row)?;
    let payload = json!({ "status": "running", "attempt": job.attempt, "worker": owner });
    let event = insert_event(&mut tx, &job, EVENT_STATUS, &payload).await?;
    tx.commit().await?;
    hub.publish(notice(&event));
    Ok(Some(job))
}

/// Records an event of `job`'s current attempt, stamped now, inside the caller's transaction.
async fn insert_event(
    tx: &mut Transaction<'_, Sqlite>,
    job: &Job,
    event_type: &str,
    payload: &Value,
) -> Result<JobEvent> {
    let event = NewEvent {
        job_id: job.id,
        attempt: job.attempt,
        event_type: event_type.into(),
        payload: payload.clone(),
        created_at: Utc::now(),
    };
    super::insert_event(&mut **tx, &event).await
}

pub(super) async fn heartbeat(
    pool: &SqlitePool,
    lease: &Lease,
    duration: Duration,
) -> Result<Option<LeaseState>> {
    let sql = format!("UPDATE jobs SET lease_expires_at = ?4, updated_at = ?5 WHERE {FENCE} RETURNING cancel_requested");
    let row = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(later(duration))
        .bind(to_text(Utc::now()))
        .fetch_optional(pool)
        .await?;
    row.map(|r| {
        Ok(LeaseState {
            cancel_requested: r.try_get::<bool, _>("cancel_requested")?,
        })
    })
    .transpose()
}

pub(super) async fn append_fenced_event(
    pool: &SqlitePool,
    hub: &EventHub,
    lease: &Lease,
    event_type: &str,
    payload: &Value,
) -> Result<JobEvent> {
    // One statement: the fence check and the insert happen under the same write lock.
    let sql = format!(
        "INSERT INTO job_events (job_id, attempt, type, payload, created_at) \
         SELECT ?1, ?2, ?4, ?5, ?6 WHERE EXISTS (SELECT 1 FROM jobs WHERE {FENCE}) RETURNING {EVENT_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(event_type)
        .bind(json_text(payload))
        .bind(to_text(Utc::now()))
        .fetch_optional(pool)
        .await?;
    let event = row
        .as_ref()
        .map(event_from_row)
        .transpose()?
        .ok_or_else(|| lease_lost(lease))?;
    hub.publish(notice(&event));
    Ok(event)
}

pub(super) async fn update_progress(
    pool: &SqlitePool,
    hub: &EventHub,
    lease: &Lease,
    progress: &JobProgress,
) -> Result<JobEvent> {
    let mut tx = pool.begin().await?;
    let progress = json_text(progress);
    let now = to_text(Utc::now());
    let sql = format!(
        "UPDATE jobs SET progress = ?4, updated_at = ?5 WHERE {FENCE} RETURNING {JOB_COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(&progress)
        .bind(&now)
        .fetch_optional(&mut *tx)
        .await?;
    let job = job_from_row(&row.ok_or_else(|| lease_lost(lease))?)?;
    let payload: Value =
        serde_json::from_str(&progress).map_err(|e| Error::Corrupt(e.to_string()))?;
    let event = insert_event(&mut tx, &job, "progress", &payload).await?;
    tx.commit().await?;
    hub.publish(notice(&event));
    Ok(event)
}

pub(super) async fn finish_attempt(
    pool: &SqlitePool,
    hub: &EventHub,
    lease: &Lease,
    outcome: AttemptOutcome,
) -> Result<JobStatus> {
    let mut tx = pool.begin().await?;
    // A no-op write first, so this transaction holds the write lock before it reads the row.
    let sql = format!("UPDATE jobs SET updated_at = ?4 WHERE {FENCE} RETURNING {JOB_COLUMNS}");
    let row = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(to_text(Utc::now()))
        .fetch_optional(&mut *tx)
        .await?;
    let job = job_from_row(&row.ok_or_else(|| lease_lost(lease))?)?;
    let (status, event) = settle(&mut tx, &job, outcome).await?;
    tx.commit().await?;
    announce(hub, status, &event);
    Ok(status)
}

/// Tells the hub about a committed settle: its event, and a claimable job when it was requeued.
fn announce(hub: &EventHub, status: JobStatus, event: &JobEvent) {
    hub.publish(notice(event));
    if status == JobStatus::Queued {
        hub.publish(Notice::Queued);
    }
}

/// Writes the end of `job`'s current attempt and its event, inside the caller's write transaction.
async fn settle(
    tx: &mut Transaction<'_, Sqlite>,
    job: &Job,
    outcome: AttemptOutcome,
) -> Result<(JobStatus, JobEvent)> {
    let decision = decide(job, outcome);
    let now = to_text(Utc::now());
    let finished_at = decision.status.is_finished().then(|| now.clone());
    let sql = "UPDATE jobs SET status = ?2, result = ?3, error = ?4, lease_owner = NULL, lease_expires_at = NULL, \
               run_after = ?5, finished_at = ?6, updated_at = ?7 WHERE id = ?1";
    let updated = sqlx::query(sql)
        .bind(job.id.to_string())
        .bind(decision.status.as_str())
        .bind(decision.result.as_ref().map(json_text))
        .bind(decision.error.as_ref().map(json_text))
        .bind(later(decision.run_after))
        .bind(finished_at)
        .bind(&now)
        .execute(&mut **tx)
        .await?;
    crate::store::expect_one_row(updated.rows_affected(), "finish attempt")?;
    let event = insert_event(tx, job, decision.event_type, &decision.payload).await?;
    Ok((decision.status, event))
}

pub(super) async fn reap_expired(
    pool: &SqlitePool,
    hub: &EventHub,
    limit: u32,
    backoff: Duration,
) -> Result<Vec<Reaped>> {
    let mut tx = pool.begin().await?;
    let now = to_text(Utc::now());
    // Mark the expired leases first (a write, taking the lock), then settle each.
    let sql = format!(
        "UPDATE jobs SET updated_at = ?1 WHERE id IN ( \
           SELECT id FROM jobs WHERE status = 'running' AND lease_expires_at < ?1 ORDER BY lease_expires_at LIMIT ?2) \
         RETURNING {JOB_COLUMNS}"
    );
    let rows = sqlx::query(&sql)
        .bind(&now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
    let mut settled = Vec::with_capacity(rows.len());
    for row in &rows {
        let job = job_from_row(row)?;
        let error = lease_expired(&job);
        let backoff = crate::store::retry_backoff(backoff, job.attempt + 1);
        let (status, event) =
            settle(&mut tx, &job, AttemptOutcome::Retry { error, backoff }).await?;
        settled.push((
            Reaped::from_status(job.id, job.attempt, status),
            status,
            event,
        ));
    }
    tx.commit().await?;
    Ok(settled
        .into_iter()
        .map(|(reaped, status, event)| {
            announce(hub, status, &event);
            reaped
        })
        .collect())
}

/// Counts jobs by status, for the queue-depth gauge.
pub(super) async fn count_by_status(pool: &SqlitePool) -> Result<Vec<(JobStatus, i64)>> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM jobs GROUP BY status")
        .fetch_all(pool)
        .await?;
    rows.iter().map(status_count).collect()
}

/// Records an artifact of the leased attempt in one statement, so the fence check and the insert
/// happen under the same write lock; nothing is recorded when the lease was lost.
pub(super) async fn commit_artifact(
    pool: &SqlitePool,
    lease: &Lease,
    artifact: &Artifact,
) -> Result<()> {
    let sql = format!(
        "INSERT INTO artifacts (job_id, attempt, name, kind, format, bytes, sha256, uri, created_at) \
         SELECT ?1, ?2, ?4, ?5, ?6, ?7, ?8, ?9, ?10 WHERE EXISTS (SELECT 1 FROM jobs WHERE {FENCE}) \
         ON CONFLICT (job_id, name) DO UPDATE SET attempt = excluded.attempt, kind = excluded.kind, \
         format = excluded.format, bytes = excluded.bytes, sha256 = excluded.sha256, uri = excluded.uri, \
         created_at = excluded.created_at WHERE artifacts.attempt < excluded.attempt"
    );
    let done = sqlx::query(&sql)
        .bind(lease.job_id.to_string())
        .bind(lease.attempt)
        .bind(&lease.owner)
        .bind(&artifact.name)
        .bind(&artifact.kind)
        .bind(&artifact.format)
        .bind(artifact.bytes)
        .bind(&artifact.sha256)
        .bind(&artifact.uri)
        .bind(to_text(artifact.created_at))
        .execute(pool)
        .await
        .map_err(|e| constraint(e, || artifact_exists(lease.job_id, &artifact.name)))?;
    if done.rows_affected() == 0 {
        // Nothing written: either the lease is gone or this attempt already has the name.
        let held = sqlx::query(&format!("SELECT 1 FROM jobs WHERE {FENCE}"))
            .bind(lease.job_id.to_string())
            .bind(lease.attempt)
            .bind(&lease.owner)
            .fetch_optional(pool)
            .await?
            .is_some();
        return Err(artifact_refused(held, lease, &artifact.name));
    }
    Ok(())
}
