//! The artifact store: one wrapper over `object_store` for everything compressd keeps in object
//! storage — uploaded models and datasets, and what jobs produce.
//!
//! Where it points is one URL (`artifacts_url`): unset → a folder under the data dir,
//! `file:///path`, `s3://bucket/prefix` (endpoint, region and credentials from settings or the
//! standard `AWS_*` variables; plain-HTTP endpoints allowed for local S3 servers), or
//! `memory://` for tests. Keys are `/`-separated paths relative to the store's root:
//! `models/{id}/…`, `datasets/{id}/…`, `jobs/{id}/attempt-{n}/…`; the `uri` of a stored row is
//! such a key.

mod config;
pub mod ingest;
pub mod sources;
pub mod sweep;
pub mod tar;
mod writer;

use std::fmt;
use std::ops::Range;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::aws::AmazonS3;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, PutPayload, WriteMultipart};

use crate::error::{Error, Result};

pub use config::{S3Config, StoreConfig, MIN_PART_SIZE};
pub use writer::{ObjectWriter, WrittenObject};

/// Where the store's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// A local folder.
    Local(PathBuf),
    /// An S3 bucket.
    S3 { bucket: String },
    /// Process memory (tests).
    Memory,
}

/// A handle on the artifact store; cheap to clone.
#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// The S3 client again, typed, for presigning.
    signer: Option<Arc<AmazonS3>>,
    /// Key prefix inside the bucket (`s3://bucket/prefix`).
    root: Path,
    backend: Backend,
    part_size: usize,
    max_inflight_parts: usize,
}

impl fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("backend", &self.backend)
            .field("root", &self.root)
            .finish()
    }
}

/// An opened store: the object store, its URL signer (S3 only), the key prefix and the backend.
type Opened = (Arc<dyn ObjectStore>, Option<Arc<AmazonS3>>, Path, Backend);

impl ArtifactStore {
    /// The store the service settings name.
    ///
    /// # Errors
    /// As [`ArtifactStore::open`].
    pub fn from_settings(settings: &crate::settings::Settings) -> Result<Self> {
        Self::open(&StoreConfig::from_settings(settings))
    }

    /// Opens the store the configuration names, creating a local folder if needed.
    ///
    /// # Errors
    /// [`Error::Config`] for an unsupported URL or bad part settings; [`Error::Io`] when the local
    /// folder cannot be created.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        config.check()?;
        let (store, signer, root, backend): (Arc<dyn ObjectStore>, _, _, _) = match config
            .url
            .as_deref()
        {
            None => Self::local(&config.default_dir)?,
            Some(url) if url.starts_with("file://") => Self::local(&config::file_url_path(url)?)?,
            Some("memory://") => (
                Arc::new(InMemory::new()),
                None,
                Path::default(),
                Backend::Memory,
            ),
            Some(url) => {
                let (s3, root, bucket) = config::open_s3(url, &config.s3)?;
                let s3 = Arc::new(s3);
                (s3.clone(), Some(s3), root, Backend::S3 { bucket })
            }
        };
        Ok(Self {
            store,
            signer,
            root,
            backend,
            part_size: config.part_size_bytes,
            max_inflight_parts: config.max_inflight_parts.max(1),
        })
    }

    fn local(dir: &FsPath) -> Result<Opened> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let dir = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
        let store = LocalFileSystem::new_with_prefix(&dir)?;
        Ok((Arc::new(store), None, Path::default(), Backend::Local(dir)))
    }

    /// The same store with its object store wrapped by `wrap` (fault injection in tests,
    /// instrumentation); keys, prefix and backend stay as they are.
    #[must_use]
    pub fn map_object_store(
        mut self,
        wrap: impl FnOnce(Arc<dyn ObjectStore>) -> Arc<dyn ObjectStore>,
    ) -> Self {
        self.store = wrap(self.store);
        self
    }

    /// Where the bytes are.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The full object path of a key (under the store's prefix).
    fn path(&self, key: &str) -> Path {
        key.split('/')
            .filter(|p| !p.is_empty())
            .fold(self.root.clone(), |path, part| path.child(part))
    }

    /// A key relative to the root, back from a full path.
    fn key_of(&self, path: &Path) -> String {
        let parts: Vec<String> = path
            .prefix_match(&self.root)
            .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect())
            .unwrap_or_default();
        parts.join("/")
    }

    /// The local file behind a key, when the store is a local folder (lets the engine read
    /// weights in place instead of copying them).
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        match &self.backend {
            Backend::Local(dir) => Some(
                key.split('/')
                    .filter(|p| !p.is_empty())
                    .fold(dir.clone(), |p, c| p.join(c)),
            ),
            _ => None,
        }
    }

    /// Starts a streaming upload to `key`; nothing is visible there until it finishes.
    ///
    /// # Errors
    /// The store's error when the upload cannot be started.
    pub async fn writer(&self, key: &str) -> Result<ObjectWriter> {
        let upload = self.store.put_multipart(&self.path(key)).await?;
        Ok(ObjectWriter::new(
            WriteMultipart::new_with_chunk_size(upload, self.part_size),
            self.max_inflight_parts,
        ))
    }

    /// Writes a small object in one request (reports, manifests).
    ///
    /// # Errors
    /// The store's error.
    pub async fn put_small(&self, key: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&self.path(key), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    /// Size, modification time and ETag of an object.
    ///
    /// # Errors
    /// `ObjectStore(NotFound)` when there is no such object.
    pub async fn head(&self, key: &str) -> Result<ObjectMeta> {
        Ok(self.store.head(&self.path(key)).await?)
    }

    /// Streams an object, or a byte range of it, without loading it whole.
    ///
    /// # Errors
    /// The store's error, e.g. `NotFound`, or a range past the end.
    pub async fn read(
        &self,
        key: &str,
        range: Option<Range<u64>>,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        let result = self.store.get_opts(&self.path(key), options).await?;
        Ok(result.into_stream().map_err(Error::from).boxed())
    }

    /// Deletes an object by key (a stored row's `uri`); a missing one is not an error.
    ///
    /// # Errors
    /// The store's error.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object under `prefix` (a folder-like key); returns how many.
    ///
    /// # Errors
    /// The store's error.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let objects = self.list(prefix).await?;
        for object in &objects {
            self.delete(&object.key).await?;
        }
        Ok(objects.len())
    }

    /// Lists the objects under `prefix`, with keys relative to the store's root.
    ///
    /// # Errors
    /// The store's error.
    pub async fn list(&self, prefix: &str) -> Result<Vec<StoredObject>> {
        let mut stream = self.store.list(Some(&self.path(prefix)));
        let mut out = Vec::new();
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            out.push(StoredObject {
                key: self.key_of(&meta.location),
                bytes: meta.size,
                modified: meta.last_modified,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// A short-lived URL a client can GET the object from directly, on S3; `None` elsewhere.
    ///
    /// # Errors
    /// The signer's error.
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> Result<Option<url::Url>> {
        match &self.signer {
            Some(s3) => Ok(Some(
                s3.signed_url(axum::http::Method::GET, &self.path(key), ttl)
                    .await?,
            )),
            None => Ok(None),
        }
    }

    /// Checks the store answers (for `/readyz`): a lookup of a key that need not exist must come
    /// back found or not-found, not with a transport error.
    ///
    /// # Errors
    /// [`Error::Io`] when a local folder is gone; the store's error when it does not answer.
    pub async fn check(&self) -> Result<()> {
        if let Backend::Local(dir) = &self.backend {
            if !dir.is_dir() {
                let gone =
                    std::io::Error::new(std::io::ErrorKind::NotFound, "artifact folder is gone");
                return Err(Error::io(dir, gone));
            }
        }
        match self.store.head(&self.path(".readiness-probe")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// One object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    /// Key relative to the store's root.
    pub key: String,
    pub bytes: u64,
    pub modified: chrono::DateTime<chrono::Utc>,
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
