//! The orphan sweeper: removes objects no database row refers to, once they are old enough that
//! no upload or job attempt can still be about to commit them.
//!
//! Orphans come from a crash between writing objects and committing their row, from attempts
//! that were reclaimed or cancelled, and from registrations that failed after their cleanup
//! could run. The age threshold is what keeps the sweeper from racing a live writer.

use std::future::Future;

use chrono::{DateTime, Utc};

use super::ArtifactStore;
use crate::error::Result;
use crate::store::JobStatus;

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Objects looked at.
    pub examined: usize,
    /// Objects deleted.
    pub deleted: usize,
}

/// Deletes every object under `prefixes` last modified before `cutoff` for which
/// `is_referenced(key)` answers `false`.
///
/// # Errors
/// The store's or the callback's first error; objects deleted before it stay deleted.
pub async fn sweep<F, Fut>(
    store: &ArtifactStore,
    prefixes: &[&str],
    cutoff: DateTime<Utc>,
    mut is_referenced: F,
) -> Result<SweepReport>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let mut report = SweepReport::default();
    for prefix in prefixes {
        for object in store.list(prefix).await? {
            report.examined += 1;
            if object.modified >= cutoff || is_referenced(object.key.clone()).await? {
                continue;
            }
            tracing::info!(key = %object.key, bytes = object.bytes, "sweeping orphaned object");
            store.delete(&object.key).await?;
            report.deleted += 1;
        }
    }
    Ok(report)
}

/// Whether the database still refers to the object at `key`: `models/{id}/…` and
/// `datasets/{id}/…` belong to their rows; `jobs/{id}/…` objects to an artifact row with that
/// `uri`, or to the attempt still running (it may yet commit them, however long it has run).
/// An attempt that ended without committing owns nothing. Unknown layouts are kept.
///
/// # Errors
/// The database's error.
pub async fn is_referenced(db: &dyn crate::store::Store, key: &str) -> Result<bool> {
    let mut parts = key.splitn(3, '/');
    let (Some(kind), Some(id)) = (parts.next(), parts.next()) else {
        return Ok(true);
    };
    let Ok(id) = uuid::Uuid::parse_str(id) else {
        return Ok(true);
    };
    Ok(match kind {
        "models" => db.get_model(id).await?.is_some(),
        "datasets" => db.get_dataset(id).await?.is_some(),
        "jobs" => {
            db.list_artifacts(id).await?.iter().any(|a| a.uri == key)
                || db.get_job(id).await?.is_some_and(|job| {
                    job.status == JobStatus::Running
                        && key.starts_with(&format!("jobs/{id}/attempt-{}/", job.attempt))
                })
        }
        _ => true,
    })
}

/// The newest modification time an object may have to be swept now; `None` when `min_age`
/// reaches before the calendar's start (nothing is old enough).
pub fn cutoff(now: DateTime<Utc>, min_age: std::time::Duration) -> Option<DateTime<Utc>> {
    chrono::Duration::from_std(min_age)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
}

/// Runs [`sweep`] over models, datasets and job outputs every `interval`, removing unreferenced
/// objects older than `min_age`. Errors are logged and the next round tries again.
pub fn spawn_sweeper(
    store: ArtifactStore,
    db: std::sync::Arc<dyn crate::store::Store>,
    min_age: std::time::Duration,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // `interval` panics on zero; the setting's 0 means "off" and never gets here.
        let mut ticks = tokio::time::interval(interval.max(std::time::Duration::from_secs(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            // Subtracting an age past the calendar's start would panic the task for good.
            let Some(cutoff) = cutoff(Utc::now(), min_age) else {
                continue;
            };
            let db = db.clone();
            let result = sweep(&store, &["models", "datasets", "jobs"], cutoff, |key| {
                let db = db.clone();
                async move { is_referenced(&*db, &key).await }
            })
            .await;
            match result {
                Ok(report) => tracing::info!(
                    examined = report.examined,
                    deleted = report.deleted,
                    "orphan sweep done"
                ),
                Err(error) => tracing::warn!(%error, "orphan sweep failed"),
            }
        }
    })
}
