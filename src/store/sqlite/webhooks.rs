//! Webhook subscriptions and the delivery outbox on SQLite. The outbox rows themselves are
//! written by the `job_events_webhook_outbox` trigger (see the migration).

use std::time::Duration;

use chrono::Utc;
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::Row;
use uuid::Uuid;

use super::rows::{time, to_text, uuid};
use crate::error::{Error, Result};
use crate::store::{clamp_limit, constraint, expect_one_row};
use crate::store::{
    events_from_text, events_to_text, DeliveryAttempt, DeliveryFilter, DeliveryLog, DeliveryNext,
    DeliveryStatus, Webhook, WebhookDelivery,
};

const WEBHOOK_COLUMNS: &str = "id, tenant, job_id, url, events, secret, created_at";
const DELIVERY_COLUMNS: &str =
    "id, webhook_id, tenant, job_id, event_seq, event_type, url, secret, body, \
     status, attempts, next_attempt_at, lease_owner, created_at, updated_at";

fn webhook_from_row(row: &SqliteRow) -> Result<Webhook> {
    Ok(Webhook {
        id: uuid(row, "id")?,
        tenant: row.try_get("tenant")?,
        job_id: super::rows::opt_uuid(row, "job_id")?,
        url: row.try_get("url")?,
        events: events_from_text(&row.try_get::<String, _>("events")?)?,
        secret: row.try_get("secret")?,
        created_at: time(row, "created_at")?,
    })
}

fn delivery_from_row(row: &SqliteRow) -> Result<WebhookDelivery> {
    Ok(WebhookDelivery {
        id: row.try_get("id")?,
        webhook_id: uuid(row, "webhook_id")?,
        tenant: row.try_get("tenant")?,
        job_id: uuid(row, "job_id")?,
        event_seq: row.try_get("event_seq")?,
        event_type: row.try_get("event_type")?,
        url: row.try_get("url")?,
        secret: row.try_get("secret")?,
        body: row.try_get("body")?,
        status: DeliveryStatus::parse(&row.try_get::<String, _>("status")?)?,
        attempts: row.try_get("attempts")?,
        next_attempt_at: time(row, "next_attempt_at")?,
        lease_owner: row.try_get("lease_owner")?,
        created_at: time(row, "created_at")?,
        updated_at: time(row, "updated_at")?,
    })
}

fn attempt_from_row(row: &SqliteRow) -> Result<DeliveryAttempt> {
    Ok(DeliveryAttempt {
        delivery_id: row.try_get("delivery_id")?,
        attempt: row.try_get("attempt")?,
        started_at: time(row, "started_at")?,
        finished_at: time(row, "finished_at")?,
        status_code: row.try_get("status_code")?,
        error: row.try_get("error")?,
    })
}

/// Inserts a webhook with the caller's executor (a job's own, inside `create_job`'s transaction).
pub(super) async fn insert_webhook<'e, E: sqlx::SqliteExecutor<'e>>(
    executor: E,
    webhook: &Webhook,
) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO webhooks (id, tenant, job_id, url, events, secret, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(webhook.id.to_string())
    .bind(&webhook.tenant)
    .bind(webhook.job_id.map(|id| id.to_string()))
    .bind(&webhook.url)
    .bind(events_to_text(&webhook.events))
    .bind(&webhook.secret)
    .bind(to_text(webhook.created_at))
    .execute(executor)
    .await
    .map_err(|e| constraint(e, || format!("webhook {} already exists", webhook.id)))?;
    expect_one_row(done.rows_affected(), "insert webhook")
}

pub(super) async fn get_webhook(pool: &SqlitePool, id: Uuid) -> Result<Option<Webhook>> {
    let sql = format!("SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?");
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(webhook_from_row).transpose()
}

pub(super) async fn list_webhooks(
    pool: &SqlitePool,
    tenant: &str,
    job_id: Option<Uuid>,
) -> Result<Vec<Webhook>> {
    let sql = format!(
        "SELECT {WEBHOOK_COLUMNS} FROM webhooks WHERE tenant = ?1 AND job_id IS ?2 ORDER BY id"
    );
    let rows = sqlx::query(&sql)
        .bind(tenant)
        .bind(job_id.map(|id| id.to_string()))
        .fetch_all(pool)
        .await?;
    rows.iter().map(webhook_from_row).collect()
}

pub(super) async fn delete_webhook(pool: &SqlitePool, id: Uuid) -> Result<()> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query("DELETE FROM webhooks WHERE id = ?")
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        return Err(Error::NotFound {
            kind: "webhook",
            id: id.to_string(),
        });
    }
    sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = ? AND status = 'pending'")
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

pub(super) async fn claim_deliveries(
    pool: &SqlitePool,
    owner: &str,
    lease: Duration,
    limit: u32,
) -> Result<Vec<WebhookDelivery>> {
    let now = Utc::now();
    let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    // One statement: SQLite's single writer makes the pick and the claim atomic.
    let sql = format!(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_owner = ?1, next_attempt_at = ?2, \
           updated_at = ?3 \
         WHERE id IN (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= ?3 \
                      ORDER BY next_attempt_at, id LIMIT ?4) \
         RETURNING {DELIVERY_COLUMNS}"
    );
    let rows = sqlx::query(&sql)
        .bind(owner)
        .bind(to_text(until))
        .bind(to_text(now))
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
    let mut claimed = rows
        .iter()
        .map(delivery_from_row)
        .collect::<Result<Vec<_>>>()?;
    claimed.sort_by_key(|d| d.id);
    Ok(claimed)
}

pub(super) async fn record_attempt(
    pool: &SqlitePool,
    claimed: &WebhookDelivery,
    attempt: &DeliveryAttempt,
    next: DeliveryNext,
) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let now = Utc::now();
    let next_at = match next {
        DeliveryNext::RetryAt(at) => at,
        DeliveryNext::Delivered | DeliveryNext::GiveUp => now,
    };
    let done = sqlx::query(
        "UPDATE webhook_deliveries SET status = ?4, next_attempt_at = ?5, lease_owner = NULL, updated_at = ?6 \
         WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 AND status = 'pending'",
    )
    .bind(claimed.id)
    .bind(claimed.lease_owner.as_deref())
    .bind(claimed.attempts)
    .bind(next.status().as_str())
    .bind(to_text(next_at))
    .bind(to_text(now))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO webhook_attempts (delivery_id, attempt, started_at, finished_at, status_code, error) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(attempt.delivery_id)
    .bind(attempt.attempt)
    .bind(to_text(attempt.started_at))
    .bind(to_text(attempt.finished_at))
    .bind(attempt.status_code)
    .bind(attempt.error.as_deref())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

pub(super) async fn list_deliveries(
    pool: &SqlitePool,
    filter: &DeliveryFilter,
) -> Result<Vec<DeliveryLog>> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE tenant = ?1 \
         AND (?2 IS NULL OR job_id = ?2) AND (?3 IS NULL OR webhook_id = ?3) AND id > ?4 \
         ORDER BY id LIMIT ?5"
    );
    let rows = sqlx::query(&sql)
        .bind(&filter.tenant)
        .bind(filter.job_id.map(|id| id.to_string()))
        .bind(filter.webhook_id.map(|id| id.to_string()))
        .bind(filter.after.unwrap_or(0))
        .bind(clamp_limit(filter.limit))
        .fetch_all(pool)
        .await?;
    let deliveries = rows
        .iter()
        .map(delivery_from_row)
        .collect::<Result<Vec<_>>>()?;
    let (Some(first), Some(last)) = (deliveries.first(), deliveries.last()) else {
        return Ok(Vec::new());
    };
    let rows = sqlx::query(
        "SELECT delivery_id, attempt, started_at, finished_at, status_code, error FROM webhook_attempts \
         WHERE delivery_id BETWEEN ? AND ? ORDER BY delivery_id, attempt",
    )
    .bind(first.id)
    .bind(last.id)
    .fetch_all(pool)
    .await?;
    let attempts = rows
        .iter()
        .map(attempt_from_row)
        .collect::<Result<Vec<_>>>()?;
    Ok(crate::store::shared::group_attempts(deliveries, attempts))
}

pub(super) async fn count_pending(pool: &SqlitePool) -> Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries WHERE status = 'pending'")
            .fetch_one(pool)
            .await?,
    )
}
