//! Domain types of access control: API keys, their scopes, the audit log and a tenant's usage.
//!
//! The keys themselves (generation, hashing, parsing a bearer token) are `crate::auth`'s; the
//! store keeps only what it needs to check one: the tenant, the scopes and the secret's hash.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The tenant of everything made while the server runs without auth, and of rows made before
/// tenants existed.
pub const DEFAULT_TENANT: &str = "default";

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Read jobs, models, datasets, artifacts and events.
    Read,
    /// Create, cancel and delete jobs, models and datasets.
    Write,
    /// The tenant's audit log (and read and write).
    Admin,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    /// The scope's name as stored and typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        Scope::ALL
            .into_iter()
            .find(|scope| scope.as_str() == s.trim())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown scope `{s}` (expected read, write or admin)"
                ))
            })
    }
}

/// Scopes as stored: comma-separated names.
pub fn scopes_to_text(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

/// Scopes from their stored or typed form (`read,write`).
///
/// # Errors
/// [`Error::Invalid`] naming an unknown scope, or when there is none.
pub fn scopes_from_text(text: &str) -> Result<Vec<Scope>, Error> {
    let mut scopes = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Scope::from_str)
        .collect::<Result<Vec<_>, _>>()?;
    scopes.sort();
    scopes.dedup();
    if scopes.is_empty() {
        return Err(Error::Invalid("a key needs at least one scope".into()));
    }
    Ok(scopes)
}

/// A stored API key: everything but the secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    /// The public part of the key, shown by `keys list` and in the audit log.
    pub id: String,
    /// The tenant it acts for.
    pub tenant: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// sha256 (hex) of the secret part.
    pub secret_hash: String,
    /// When it was made.
    pub created_at: DateTime<Utc>,
    /// When it was revoked; a revoked key is refused.
    pub revoked_at: Option<DateTime<Utc>>,
}

/// One recorded state-changing request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Order of recording (assigned by the store; 0 on insert).
    pub seq: i64,
    /// When the request was answered.
    pub at: DateTime<Utc>,
    /// The tenant the request acted for.
    pub tenant: String,
    /// The key that made it; `null` when the server runs without auth.
    pub key_id: Option<String>,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// HTTP status answered.
    pub status: i32,
    /// The request id (`x-request-id`).
    pub request_id: Option<String>,
}

/// Which audit entries to list: oldest first, after the cursor.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    /// Only this tenant's entries.
    pub tenant: Option<String>,
    /// The cursor: the `seq` of the last entry of the previous page.
    pub after: Option<i64>,
    /// Most rows returned.
    pub limit: u32,
}

/// What a tenant holds, for its quotas.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    /// Its jobs that are queued or running.
    pub active_jobs: i64,
    /// Bytes of its models, datasets and job artifacts.
    pub stored_bytes: i64,
}

/// The active-job quota's verdict for a tenant that has `active` queued and running jobs and wants
/// one more: [`crate::error::Error::Quota`] (naming the use it would reach) at or past `limit`.
///
/// # Errors
/// As above.
pub(crate) fn check_active_jobs(limit: u64, active: i64) -> crate::error::Result<()> {
    let active = u64::try_from(active).unwrap_or(0);
    if active >= limit {
        return Err(crate::error::Error::Quota {
            quota: "tenant_max_active_jobs",
            limit,
            used: active.saturating_add(1),
        });
    }
    Ok(())
}
