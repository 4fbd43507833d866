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
