//! Streaming writes into the artifact store: multipart uploads with a bounded number of parts in
//! flight, hashing as the bytes pass, and never a visible half-object.
//!
//! A write becomes visible only at [`ObjectWriter::finish`] (S3 completes the multipart upload;
//! the local store renames its staging file). A writer dropped before that — an error, a size
//! limit, a client that disconnected and took the request future with it — aborts the upload in
//! the background, so no partial object and no dangling S3 upload is left.

use bytes::Bytes;
use object_store::WriteMultipart;
use sha2::{Digest, Sha256};

use crate::error::Result;

/// Size and digest of a completed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenObject {
    pub bytes: u64,
    /// Lower-case hex sha256.
    pub sha256: String,
}

/// An upload in progress.
pub struct ObjectWriter {
    upload: Option<WriteMultipart>,
    hasher: Sha256,
    bytes: u64,
    max_inflight_parts: usize,
}

impl ObjectWriter {
    pub(super) fn new(upload: WriteMultipart, max_inflight_parts: usize) -> Self {
        Self {
            upload: Some(upload),
            hasher: Sha256::new(),
            bytes: 0,
            max_inflight_parts: max_inflight_parts.max(1),
        }
    }

    /// Bytes accepted so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends bytes, first waiting while the configured number of parts is in flight: that wait
    /// is the back-pressure that bounds memory to about (parts in flight + 1) × part size.
    ///
    /// # Errors
    /// The store's error when a part upload failed.
    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let upload = self.upload.as_mut().expect("writer used after finish");
        upload.wait_for_capacity(self.max_inflight_parts).await?;
        self.hasher.update(&chunk);
        self.bytes += chunk.len() as u64;
        upload.put(chunk);
        Ok(())
    }

    /// Uploads what is buffered and makes the object visible.
    ///
    /// # Errors
    /// The store's error; the upload is then aborted.
    pub async fn finish(mut self) -> Result<WrittenObject> {
        let mut upload = self.upload.take().expect("writer used after finish");
        // A part that failed in flight surfaces here; `WriteMultipart::finish` would return that
        // error without aborting, leaving an incomplete upload behind on S3.
        if let Err(error) = upload.wait_for_capacity(0).await {
            if let Err(abort) = upload.abort().await {
                tracing::warn!(error = %abort, "aborting a failed upload failed");
            }
            return Err(error.into());
        }
        // A failed completion is aborted by `finish` itself.
        upload.finish().await?;
        let sha256 = hex::encode(std::mem::take(&mut self.hasher).finalize());
        Ok(WrittenObject {
            bytes: self.bytes,
            sha256,
        })
    }

    /// Discards the upload; nothing becomes visible.
    ///
    /// # Errors
    /// The store's error when the abort itself failed (the object is still not visible).
    pub async fn abort(mut self) -> Result<()> {
        if let Some(upload) = self.upload.take() {
            upload.abort().await?;
        }
        Ok(())
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        let Some(upload) = self.upload.take() else {
            return;
        };
        // Dropped mid-upload (the request future was cancelled): abort off this stack frame.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(error) = upload.abort().await {
                    tracing::warn!(%error, "aborting an abandoned upload failed");
                }
            });
        }
    }
}
