//! Publishing a finished attempt's outputs as the job's artifacts.
//!
//! Each file of the child's `outputs` is streamed from the work folder into the artifact store
//! under `jobs/{id}/attempt-{n}/{name}` (the upload becomes visible only once complete, see
//! [`crate::artifacts::ObjectWriter`]) and then recorded with a fenced commit, so an attempt that
//! lost its lease publishes nothing visible; its uploaded objects become orphans for the sweeper.

use std::path::{Component, Path};
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use super::protocol::OutputFile;
use super::WorkerContext;
use crate::artifacts::sources::open_local;
use crate::error::{Error, Result};
use crate::store::{Artifact, Lease};

/// Uploads and commits every output; returns the committed artifacts (name, kind, format, bytes,
/// sha256) for the job's result.
///
/// # Errors
/// [`Error::LeaseLost`] when the attempt no longer holds the job; I/O and store errors (another
/// attempt may succeed).
pub async fn publish(
    ctx: &WorkerContext,
    lease: &Lease,
    work_dir: &Path,
    outputs: &[OutputFile],
) -> Result<Vec<serde_json::Value>> {
    let mut published = Vec::with_capacity(outputs.len());
    for output in outputs {
        let path = inside(work_dir, &output.path)?;
        let key = format!(
            "jobs/{}/attempt-{}/{}",
            lease.job_id, lease.attempt, output.name
        );
        let written = with_retries("uploading an output", || upload(ctx, &path, &key)).await?;
        let artifact = Artifact {
            job_id: lease.job_id,
            attempt: lease.attempt,
            name: output.name.clone(),
            kind: output.kind.clone(),
            format: output.format.clone(),
            bytes: i64::try_from(written.bytes).unwrap_or(i64::MAX),
            sha256: written.sha256,
            uri: key,
            // Both databases keep microseconds.
            created_at: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6),
        };
        with_retries("committing an output", || {
            ctx.store.commit_artifact(lease, &artifact)
        })
        .await?;
        published.push(json!({
            "name": artifact.name,
            "kind": artifact.kind,
            "format": artifact.format,
            "bytes": artifact.bytes,
            "sha256": artifact.sha256,
        }));
    }
    Ok(published)
}

/// Tries each upload and each commit gets before the attempt fails (the job may then be retried
/// as a new attempt, by its retry policy).
pub const PUBLISH_TRIES: u32 = 4;
/// Wait after the first failed try; it doubles for each further one (0.25 + 0.5 + 1 s in all).
const PUBLISH_FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// Runs `operation` until it succeeds, fails for a reason that another try cannot fix, or has
/// failed [`PUBLISH_TRIES`] times, waiting with exponential backoff between tries. Only the object
/// store's and the database's errors are worth another try; a lost lease never is. A failed
/// upload leaves nothing visible (the writer aborts it) and a re-upload overwrites the same key,
/// so a try after a failure cannot double an artifact.
async fn with_retries<T, F, Fut>(what: &str, mut operation: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut backoff = PUBLISH_FIRST_BACKOFF;
    let mut tries = 1;
    loop {
        match operation().await {
            Err(error @ (Error::ObjectStore(_) | Error::Database(_))) if tries < PUBLISH_TRIES => {
                tracing::warn!(%error, tries, retry_in_s = backoff.as_secs_f64(), "{what} failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                tries += 1;
            }
            other => return other,
        }
    }
}

/// `relative` under `work_dir`; the child names only files inside its work folder.
fn inside(work_dir: &Path, relative: &Path) -> Result<std::path::PathBuf> {
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(Error::Corrupt(format!(
            "the job's process named an output outside its work folder: {}",
            relative.display()
        )));
    }
    Ok(work_dir.join(relative))
}

async fn upload(
    ctx: &WorkerContext,
    path: &Path,
    key: &str,
) -> Result<crate::artifacts::WrittenObject> {
    let mut chunks = open_local(path.to_path_buf()).await?;
    let mut writer = ctx.artifacts.writer(key).await?;
    while let Some(chunk) = chunks.next().await {
        // A failed read or write drops the writer, which aborts the upload.
        writer.write(chunk?).await?;
    }
    writer.finish().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_must_stay_inside_the_work_folder() {
        let work = Path::new("/work/job");
        assert_eq!(
            inside(work, Path::new("final/model.safetensors")).unwrap(),
            Path::new("/work/job/final/model.safetensors")
        );
        assert!(inside(work, Path::new("../other/secret")).is_err());
        assert!(inside(work, Path::new("/etc/passwd")).is_err());
    }
}
