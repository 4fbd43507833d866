//! Access control of `/v1`: who is calling (API key or none), may they (scope, rate), what they
//! may see (their tenant's rows only; others' answer 404 as if absent), how much they may hold
//! (quotas), and the audit log of what they changed.

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use uuid::Uuid;

use super::error::ApiError;
use super::state::AppState;
use super::REQUEST_ID;
use crate::auth::{self, Caller};
use crate::error::Error;
use crate::settings::{AuthSetting, Settings};
use crate::store::{AuditEntry, Dataset, Job, Model, Scope};

/// How `/v1` requests are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMode {
    /// No auth: every request is [`Caller::anonymous`].
    Open,
    /// `Authorization: Bearer <key>` on every request.
    Keys,
}

/// Per-key request rate limiter.
#[derive(Clone)]
pub struct KeyRateLimiter(Arc<DefaultKeyedRateLimiter<String>>);

impl std::fmt::Debug for KeyRateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRateLimiter")
    }
}

impl KeyRateLimiter {
    /// `per_second` sustained with bursts of `burst`; `None` when `per_second` is 0 (no limit).
    pub fn new(per_second: u32, burst: u32) -> Option<Self> {
        let rate = NonZeroU32::new(per_second)?;
        let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Some(Self(Arc::new(RateLimiter::keyed(quota))))
    }

    /// `Ok` when `key_id` may make a request now, else the seconds to wait (at least 1).
    fn check(&self, key_id: &str) -> Result<(), u64> {
        self.0.check_key(&key_id.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
        })
    }
}

/// Per-tenant quotas; 0 is no limit.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quotas {
    /// Queued plus running jobs.
    pub max_active_jobs: u64,
    /// Bytes of models, datasets and artifacts.
    pub max_stored_bytes: u64,
}

/// API keys read from the database, kept while nothing says they changed, so that a request with
/// a key seen before costs no database round trip.
///
/// Only used where revocations made by other processes are heard
/// ([`crate::events::hub::EventHub::key_changes_heard`]:
/// PostgreSQL, while its `LISTEN` connection is up; never on SQLite, where `compressd keys revoke`
/// in another process changes the file unheard). Every entry carries the hub's key epoch it was
/// read under and is served only while the epoch is unchanged: a revocation in this process bumps
/// it at once, one in another replica when its `NOTIFY` arrives (milliseconds after the commit),
/// and a lost listener bumps it and turns the cache off until it is back.
#[derive(Debug, Default)]
pub struct KeyCache {
    entries: std::sync::Mutex<std::collections::HashMap<String, (u64, crate::store::ApiKey)>>,
}

/// Entries kept at most; past it the cache starts over (keys are few; this bounds a flood of ids).
const KEY_CACHE_MAX: usize = 10_000;

impl KeyCache {
    /// The key `id`, from the cache when it is still good, else from the store (and cached).
    async fn get(
        &self,
        store: &dyn crate::store::Store,
        id: &str,
    ) -> crate::error::Result<Option<crate::store::ApiKey>> {
        let hub = store.hub();
        if !hub.key_changes_heard() {
            return store.get_api_key(id).await;
        }
        // Read before the lookup: a change during it leaves the entry under an old epoch.
        let epoch = hub.keys_epoch();
        {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((read_at, key)) = entries.get(id) {
                if *read_at == epoch {
                    return Ok(Some(key.clone()));
                }
            }
        }
        let key = store.get_api_key(id).await?;
        if let Some(key) = &key {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            if entries.len() >= KEY_CACHE_MAX {
                entries.clear();
            }
            entries.insert(id.to_owned(), (epoch, key.clone()));
        }
        Ok(key)
    }
}

/// The access part of the API's configuration.
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// Keys or open.
    pub mode: AuthMode,
    /// Per-key rate limit; `None` is no limit.
    pub limiter: Option<KeyRateLimiter>,
    /// Per-tenant quotas.
    pub quotas: Quotas,
    /// Keys already read (see [`KeyCache`]).
    pub keys: Arc<KeyCache>,
}

impl AccessConfig {
    /// From the settings. `auth = "auto"` starts [`AuthMode::Open`]; the server turns it to
    /// [`AuthMode::Keys`] when the database holds keys (`server::build_state`).
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            mode: match settings.auth {
                AuthSetting::Keys => AuthMode::Keys,
                AuthSetting::Auto | AuthSetting::None => AuthMode::Open,
            },
            limiter: KeyRateLimiter::new(
                settings.rate_limit_per_key_per_sec,
                settings.rate_limit_burst,
            ),
            quotas: Quotas {
                max_active_jobs: settings.tenant_max_active_jobs,
                max_stored_bytes: settings.tenant_max_stored_bytes,
            },
            keys: Arc::default(),
        }
    }
}

/// The scope a request needs: `admin` for the audit log, `read` to look, `write` to change.
pub fn required_scope(method: &Method, path: &str) -> Scope {
    if path == "/v1/audit" || path.starts_with("/v1/audit/") {
        Scope::Admin
    } else if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        Scope::Read
    } else {
        Scope::Write
    }
}

/// The middleware on every route: authenticates `/v1` requests, applies the key's rate limit and
/// the route's scope, hands the [`Caller`] to the handler and records state-changing requests in
/// the audit log. Other paths (health, metrics, the OpenAPI document) pass untouched.
pub async fn access(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if !(path == "/v1" || path.starts_with("/v1/")) {
        return next.run(request).await;
    }
    let caller = match state.config.access.mode {
        AuthMode::Open => Caller::anonymous(),
        AuthMode::Keys => match authenticate(&state, request.headers()).await {
            Ok(caller) => caller,
            Err(error) => return error.into_response(),
        },
    };
    let rate_limited = match (&state.config.access.limiter, &caller.key_id) {
        (Some(limiter), Some(key_id)) => limiter.check(key_id).err(),
        _ => None,
    };
    let method = request.method().clone();
    let request_id = header_text(request.headers(), &REQUEST_ID);
    let needed = required_scope(&method, &path);
    // A refused change is recorded too (below); only a request with no valid key is not, as it
    // belongs to no tenant.
    let response = if let Some(wait_secs) = rate_limited {
        ApiError::rate_limited(wait_secs).into_response()
    } else if caller.can(needed) {
        request.extensions_mut().insert(caller.clone());
        next.run(request).await
    } else {
        ApiError::forbidden(format!("{method} {path} needs the `{needed}` scope")).into_response()
    };
    if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        let entry = AuditEntry {
            seq: 0,
            at: state.clock.now(),
            tenant: caller.tenant,
            key_id: caller.key_id,
            method: method.to_string(),
            path,
            status: i32::from(response.status().as_u16()),
            request_id,
        };
        if let Err(error) = state.store.insert_audit(&entry).await {
            // The change itself is done; losing its record is logged loudly, not answered as a failure.
            tracing::error!(%error, method = %entry.method, path = %entry.path, "audit entry not recorded");
        }
    }
    response
}

async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::unauthorized(
            "send an API key as `Authorization: Bearer <key>`",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be `Bearer <key>`"))?;
    let invalid = || ApiError::unauthorized("the API key is not valid (unknown or revoked)");
    let (id, secret) = auth::parse_token(token).ok_or_else(invalid)?;
    let key = state
        .config
        .access
        .keys
        .get(&*state.store, id)
        .await?
        .ok_or_else(invalid)?;
    if key.revoked_at.is_some() || !auth::secret_matches(&key, secret) {
        return Err(invalid());
    }
    Ok(Caller::from_key(&key))
}

fn header_text(headers: &HeaderMap, name: &axum::http::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn not_found(kind: &'static str, id: Uuid) -> ApiError {
    Error::NotFound {
        kind,
        id: id.to_string(),
    }
    .into()
}

/// The caller's job `id`; another tenant's answers 404 exactly as a missing one does.
///
/// # Errors
/// 404 (`job-not-found`); 5xx when the store fails.
pub async fn owned_job(state: &AppState, caller: &Caller, id: Uuid) -> Result<Job, ApiError> {
    match state.store.get_job(id).await? {
        Some(job) if job.tenant == caller.tenant => Ok(job),
        _ => Err(not_found("job", id)),
    }
}

/// The caller's model `id` (404 for another tenant's).
///
/// # Errors
/// 404 (`model-not-found`); 5xx when the store fails.
pub async fn owned_model(state: &AppState, caller: &Caller, id: Uuid) -> Result<Model, ApiError> {
    match state.store.get_model(id).await? {
        Some(model) if model.tenant == caller.tenant => Ok(model),
        _ => Err(not_found("model", id)),
    }
}

/// The caller's dataset `id` (404 for another tenant's).
///
/// # Errors
/// 404 (`dataset-not-found`); 5xx when the store fails.
pub async fn owned_dataset(
    state: &AppState,
    caller: &Caller,
    id: Uuid,
) -> Result<Dataset, ApiError> {
    match state.store.get_dataset(id).await? {
        Some(dataset) if dataset.tenant == caller.tenant => Ok(dataset),
        _ => Err(not_found("dataset", id)),
    }
}

/// Refuses to store `incoming` more bytes when the tenant would pass its storage quota, or is at
/// it already. Uploads call it before reading (with 0) and before recording (with the size).
///
/// # Errors
/// [`Error::Quota`] (`tenant_max_stored_bytes`, a 507) naming the use.
pub async fn check_storage_quota(
    state: &AppState,
    tenant: &str,
    incoming: u64,
) -> Result<(), Error> {
    let limit = state.config.access.quotas.max_stored_bytes;
    if limit == 0 {
        return Ok(());
    }
    let used = u64::try_from(state.store.tenant_usage(tenant).await?.stored_bytes).unwrap_or(0);
    let after = used.saturating_add(incoming);
    if after > limit || used >= limit {
        return Err(Error::Quota {
            quota: "tenant_max_stored_bytes",
            limit,
            used: after,
        });
    }
    Ok(())
}
