//! Taking bytes in: a client's byte stream is copied into the store while an inspector checks
//! it, under a size budget, and whatever fails leaves nothing behind.
//!
//! [`ingest`] aborts its own upload on any error before returning, so a 413 or 422 answer is
//! sent only once the partial object is gone. [`PendingPrefix`] covers the files an unfinished
//! registration already completed: unless kept, they are deleted — awaited on the error paths,
//! and from `Drop` when the request future itself is dropped (a client that disconnected).

use std::fmt::Display;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::{ArtifactStore, WrittenObject};
use crate::error::{Error, Result};
use crate::inputs::Rejection;

/// Bytes a request may still bring in.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    what: &'static str,
    limit: u64,
    used: u64,
}

impl Budget {
    /// A budget of `limit` bytes for `what` (named in the 413 answer).
    pub fn new(what: &'static str, limit: u64) -> Self {
        Self {
            what,
            limit,
            used: 0,
        }
    }

    /// Spends `bytes`.
    ///
    /// # Errors
    /// [`Error::TooLarge`] once the total passes the limit.
    pub fn spend(&mut self, bytes: usize) -> Result<()> {
        self.used += bytes as u64;
        if self.used > self.limit {
            return Err(Error::TooLarge {
                what: self.what,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

/// Copies `source` to `key`, passing every chunk through `inspect` first. The object becomes
/// visible only when the whole stream was accepted.
///
/// # Errors
/// [`Error::BadUpload`] when the source stream fails, [`Error::TooLarge`], the inspector's
/// [`Error::Rejected`], or the store's error; the upload is aborted in every case.
pub async fn ingest<S, E>(
    store: &ArtifactStore,
    key: &str,
    source: S,
    budget: &mut Budget,
    mut inspect: impl FnMut(&[u8]) -> std::result::Result<(), Rejection>,
) -> Result<WrittenObject>
where
    S: Stream<Item = std::result::Result<Bytes, E>>,
    E: Display,
{
    let mut writer = store.writer(key).await?;
    let mut source = std::pin::pin!(source);
    let copied: Result<()> = async {
        while let Some(chunk) = source.next().await {
            let chunk = chunk.map_err(|e| Error::BadUpload(e.to_string()))?;
            budget.spend(chunk.len())?;
            inspect(&chunk)?;
            writer.write(chunk).await?;
        }
        Ok(())
    }
    .await;
    match copied {
        Ok(()) => writer.finish().await,
        Err(error) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(%key, error = %abort, "aborting a refused upload failed");
            }
            Err(error)
        }
    }
}

/// Objects under a prefix that belong to a registration not yet committed.
pub struct PendingPrefix {
    store: ArtifactStore,
    prefix: String,
    armed: bool,
}

impl PendingPrefix {
    /// Starts tracking `prefix` (e.g. `models/{id}/`).
    pub fn new(store: ArtifactStore, prefix: String) -> Self {
        Self {
            store,
            prefix,
            armed: true,
        }
    }

    /// The registration was committed: keep the objects.
    pub fn keep(mut self) {
        self.armed = false;
    }

    /// The registration failed: delete its objects now.
    pub async fn discard(mut self) {
        self.armed = false;
        if let Err(error) = self.store.delete_prefix(&self.prefix).await {
            tracing::warn!(prefix = %self.prefix, %error, "objects of a failed registration left for the sweeper");
        }
    }
}

impl Drop for PendingPrefix {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, prefix) = (self.store.clone(), std::mem::take(&mut self.prefix));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = store.delete_prefix(&prefix).await {
                    tracing::warn!(%prefix, %error, "objects of an abandoned registration left for the sweeper");
                }
            });
        }
    }
}

/// An infallible stream of one in-memory buffer, for tests and small inputs.
pub fn once(
    bytes: Bytes,
) -> impl Stream<Item = std::result::Result<Bytes, std::convert::Infallible>> {
    futures::stream::iter([Ok(bytes)])
}
