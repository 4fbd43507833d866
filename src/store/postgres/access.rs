//! API keys, the audit log and tenant usage on PostgreSQL.

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;

use crate::error::{Error, Result};
use crate::store::access::{scopes_from_text, scopes_to_text};
use crate::store::{clamp_limit, constraint, expect_one_row};
use crate::store::{ApiKey, AuditEntry, AuditFilter, TenantUsage};

const KEY_COLUMNS: &str = "id, tenant, scopes, secret_hash, created_at, revoked_at";
const AUDIT_COLUMNS: &str = "seq, at, tenant, key_id, method, path, status, request_id";

fn key_from_row(row: &PgRow) -> Result<ApiKey> {
    Ok(ApiKey {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        scopes: scopes_from_text(&row.try_get::<String, _>("scopes")?)
            .map_err(|e| Error::Corrupt(e.to_string()))?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: row.try_get("created_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

fn audit_from_row(row: &PgRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        seq: row.try_get("seq")?,
        at: row.try_get("at")?,
        tenant: row.try_get("tenant")?,
        key_id: row.try_get("key_id")?,
        method: row.try_get("method")?,
        path: row.try_get("path")?,
        status: row.try_get("status")?,
        request_id: row.try_get("request_id")?,
    })
}

pub(super) async fn insert_api_key(pool: &PgPool, key: &ApiKey) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO api_keys (id, tenant, scopes, secret_hash, created_at, revoked_at) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&key.id)
    .bind(&key.tenant)
    .bind(scopes_to_text(&key.scopes))
    .bind(&key.secret_hash)
    .bind(key.created_at)
    .bind(key.revoked_at)
    .execute(pool)
    .await
    .map_err(|e| constraint(e, || format!("API key {} already exists", key.id)))?;
    expect_one_row(done.rows_affected(), "insert API key")
}

pub(super) async fn get_api_key(pool: &PgPool, id: &str) -> Result<Option<ApiKey>> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1");
    let row = sqlx::query(&sql).bind(id).fetch_optional(pool).await?;
    row.as_ref().map(key_from_row).transpose()
}

pub(super) async fn list_api_keys(pool: &PgPool) -> Result<Vec<ApiKey>> {
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_at, id");
    let rows = sqlx::query(&sql).fetch_all(pool).await?;
    rows.iter().map(key_from_row).collect()
}

pub(super) async fn revoke_api_key(pool: &PgPool, id: &str, now: DateTime<Utc>) -> Result<ApiKey> {
    let sql = format!(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1 RETURNING {KEY_COLUMNS}"
    );
    // One transaction: the notification goes out when (and only if) the revocation commits, to
    // every process listening (their key caches drop what they hold).
    let mut tx = pool.begin().await?;
    let row = sqlx::query(&sql)
        .bind(id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
    if row.is_some() {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(crate::events::hub::KEYS_CHANNEL)
            .bind(id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    match row {
        Some(row) => key_from_row(&row),
        None => Err(Error::NotFound {
            kind: "API key",
            id: id.to_owned(),
        }),
    }
}

pub(super) async fn insert_audit(pool: &PgPool, entry: &AuditEntry) -> Result<()> {
    let done = sqlx::query(
        "INSERT INTO audit_log (at, tenant, key_id, method, path, status, request_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(entry.at)
    .bind(&entry.tenant)
    .bind(&entry.key_id)
    .bind(&entry.method)
    .bind(&entry.path)
    .bind(entry.status)
    .bind(&entry.request_id)
    .execute(pool)
    .await?;
    expect_one_row(done.rows_affected(), "insert audit entry")
}

pub(super) async fn list_audit(pool: &PgPool, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE ($1::text IS NULL OR tenant = $1) AND seq > $2 \
         ORDER BY seq LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(filter.tenant.as_deref())
        .bind(filter.after.unwrap_or(0))
        .bind(clamp_limit(filter.limit))
        .fetch_all(pool)
        .await?;
    rows.iter().map(audit_from_row).collect()
}

pub(super) async fn tenant_usage(pool: &PgPool, tenant: &str) -> Result<TenantUsage> {
    let row = sqlx::query(
        "SELECT \
           (SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status IN ('queued', 'running')) AS active_jobs, \
           (SELECT COALESCE(SUM(bytes), 0)::bigint FROM models WHERE tenant = $1) \
           + (SELECT COALESCE(SUM(bytes), 0)::bigint FROM datasets WHERE tenant = $1) \
           + (SELECT COALESCE(SUM(a.bytes), 0)::bigint FROM artifacts a JOIN jobs j ON j.id = a.job_id WHERE j.tenant = $1) \
             AS stored_bytes",
    )
    .bind(tenant)
    .fetch_one(pool)
    .await?;
    Ok(TenantUsage {
        active_jobs: row.try_get("active_jobs")?,
        stored_bytes: row.try_get("stored_bytes")?,
    })
}
