//! Where referenced inputs come from: `file://` paths under the allowed roots, `s3://`
//! folders, and `hf://` repositories on the Hugging Face Hub ([`hf`]). A reference resolves to a
//! list of files, each opened as a byte stream, so a referenced model goes through exactly the
//! same checks and copy as an uploaded one.

pub mod hf;
mod hf_config;
mod hf_select;

use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};

use super::{ArtifactStore, StoreConfig};
use crate::error::{Error, Result};
use crate::inputs::Rejection;

pub use hf::{HfConfig, HfReference};
pub use hf_select::{select, InputKind, RepoFile, Selected};

/// Most files one reference may bring (a model folder has a handful).
const MAX_FILES: usize = 1000;
/// Read size for local files.
const READ_CHUNK: usize = 1 << 20;

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A local file or folder, canonical and inside an allowed root.
    Local(PathBuf),
    /// An `s3://bucket/prefix` folder or object.
    S3(String),
    /// A repository (and maybe a file or folder in it) on the Hugging Face Hub.
    Hf(HfReference),
}

/// Where references may read from.
#[derive(Debug, Clone, Copy)]
pub struct SourceConfig<'a> {
    /// Folders `file://` references may point into.
    pub allowed_roots: &'a [PathBuf],
    /// Connection settings reused for `s3://` references.
    pub store: &'a StoreConfig,
    /// How `hf://` references reach the Hub and its cache.
    pub hf: &'a HfConfig,
}

/// One file a reference brings, by its name inside the input.
pub struct SourceFile {
    /// Path inside the model folder (or the dataset's file name).
    pub name: String,
    /// Bytes, when the source says before the file is read.
    pub size: Option<u64>,
    location: Location,
}

enum Location {
    Local(PathBuf),
    S3 {
        store: ArtifactStore,
        key: String,
    },
    /// Fetched into the Hugging Face cache when opened, then read from there.
    Hf {
        snapshot: Arc<hf::HfSnapshot>,
        path: String,
    },
}

fn refuse(slug: &'static str, message: String) -> Error {
    Error::Rejected(Rejection::new(slug, message))
}

/// Parses a `uri` from a registration request.
///
/// # Errors
/// [`Error::Rejected`]: `uri-not-allowed` for a `file://` outside `allowed_roots` or with `..`,
/// `uri-not-found` for a path that does not exist, `invalid-uri` for a malformed `hf://` or
/// another scheme.
pub fn parse_reference(uri: &str, allowed_roots: &[PathBuf]) -> Result<Reference> {
    if uri.starts_with("hf://") {
        return Ok(Reference::Hf(hf::parse(uri)?));
    }
    if let Some(raw) = uri.strip_prefix("file://") {
        // `..` is refused outright, before any normalisation could hide it.
        if raw.split('/').any(|part| part == ".." || part == ".")
            || raw.contains("%2e%2e")
            || raw.contains("%2E%2E")
        {
            return Err(refuse(
                "uri-not-allowed",
                format!("{uri}: '..' and '.' are not allowed in file:// paths"),
            ));
        }
        let path = url::Url::parse(uri)
            .ok()
            .and_then(|u| u.to_file_path().ok())
            .ok_or_else(|| {
                refuse(
                    "invalid-uri",
                    format!("{uri} is not a file:///absolute/path URI"),
                )
            })?;
        let canonical = path.canonicalize().map_err(|_| {
            refuse(
                "uri-not-found",
                format!("{uri} does not exist or cannot be read"),
            )
        })?;
        check_allowed(uri, &canonical, allowed_roots)?;
        return Ok(Reference::Local(canonical));
    }
    if uri.starts_with("s3://") && uri.len() > "s3://".len() {
        return Ok(Reference::S3(uri.to_owned()));
    }
    Err(refuse(
        "invalid-uri",
        format!("{uri} is not a file://, s3:// or hf:// URI"),
    ))
}

/// Refuses a reference into the artifact store itself: it holds every tenant's models, datasets
/// and job outputs, which a registration would read with the service's own credentials, past the
/// tenant checks of the API. An `s3://` reference is refused when it and the store's location
/// overlap (one is inside the other); a `file://` one when it is inside the store's folder.
///
/// # Errors
/// [`Error::Rejected`] (`uri-not-allowed`).
pub fn check_outside_artifacts(
    uri: &str,
    reference: &Reference,
    store: &super::StoreConfig,
) -> Result<()> {
    let overlaps = match (reference, store.url.as_deref()) {
        (Reference::S3(reference), Some(artifacts)) if artifacts.starts_with("s3://") => {
            let (a, b) = (s3_location(reference), s3_location(artifacts));
            a.0 == b.0 && (within(&a.1, &b.1) || within(&b.1, &a.1))
        }
        (Reference::Local(path), artifacts) => {
            let folder = match artifacts {
                Some(url) if url.starts_with("file://") => super::config::file_url_path(url).ok(),
                Some(_) => None,
                None => Some(store.default_dir.clone()),
            };
            folder
                .and_then(|f| f.canonicalize().ok())
                .is_some_and(|folder| path.starts_with(folder))
        }
        _ => false,
    };
    if overlaps {
        return Err(refuse(
            "uri-not-allowed",
            format!("{uri} points into the service's own artifact store, which is not a source"),
        ));
    }
    Ok(())
}

/// The bucket and the key prefix (without surrounding slashes) of an `s3://` URL.
fn s3_location(url: &str) -> (String, String) {
    let rest = url.trim_start_matches("s3://");
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (bucket.to_owned(), prefix.trim_matches('/').to_owned())
}

/// Whether the key prefix `inner` is `outer` or inside it, by whole path segments.
fn within(inner: &str, outer: &str) -> bool {
    outer.is_empty()
        || inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn check_allowed(uri: &str, canonical: &FsPath, allowed_roots: &[PathBuf]) -> Result<()> {
    let inside = allowed_roots
        .iter()
        .filter_map(|root| root.canonicalize().ok())
        .any(|root| canonical.starts_with(root));
    if inside {
        return Ok(());
    }
    let roots: Vec<String> = allowed_roots
        .iter()
        .map(|r| r.display().to_string())
        .collect();
    let listed = if roots.is_empty() {
        "none are configured (allowed_file_roots)".to_owned()
    } else {
        roots.join(", ")
    };
    Err(refuse(
        "uri-not-allowed",
        format!("{uri} is outside the allowed file roots: {listed}"),
    ))
}

/// Lists the files a reference brings: everything under a `file://` or `s3://` location, sorted
/// by name; for `hf://`, the files a `kind` input needs, small ones first.
///
/// # Errors
/// [`Error::Rejected`] when it holds no files or too many, a symlink leads outside the
/// allowed roots, or an `hf://` repository, revision or file does not exist; [`Error::Io`], the
/// store's error or [`Error::Upstream`] when listing fails.
pub async fn list_files(
    reference: &Reference,
    config: &SourceConfig<'_>,
    kind: InputKind,
) -> Result<Vec<SourceFile>> {
    let files = match reference {
        Reference::Local(path) => {
            let (path, roots) = (path.clone(), config.allowed_roots.to_vec());
            tokio::task::spawn_blocking(move || local_files(&path, &roots))
                .await
                .map_err(|e| Error::BadUpload(format!("listing files failed: {e}")))??
        }
        Reference::S3(uri) => s3_files(uri, config.store).await?,
        Reference::Hf(reference) => hf_files(reference, config.hf, kind).await?,
    };
    if files.is_empty() {
        return Err(refuse(
            "invalid-model",
            "the referenced location holds no files".into(),
        ));
    }
    if files.len() > MAX_FILES {
        return Err(refuse(
            "invalid-model",
            format!("the referenced location holds more than {MAX_FILES} files"),
        ));
    }
    Ok(files)
}

fn local_files(path: &FsPath, allowed_roots: &[PathBuf]) -> Result<Vec<SourceFile>> {
    if path.is_file() {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return Ok(vec![SourceFile {
            name,
            size: path.metadata().ok().map(|m| m.len()),
            location: Location::Local(path.to_path_buf()),
        }]);
    }
    let mut out = Vec::new();
    walk(path, path, allowed_roots, &mut out)?;
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Collects regular files below `dir`, skipping hidden entries (`.git`, `.cache`).
fn walk(base: &FsPath, dir: &FsPath, roots: &[PathBuf], out: &mut Vec<SourceFile>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if entry.file_name().to_string_lossy().starts_with('.') || out.len() > MAX_FILES {
            continue;
        }
        let real = entry
            .path()
            .canonicalize()
            .map_err(|e| Error::io(entry.path(), e))?;
        check_allowed(&entry.path().display().to_string(), &real, roots)?;
        if real.is_dir() {
            walk(base, &entry.path(), roots, out)?;
        } else {
            let relative = entry
                .path()
                .strip_prefix(base)
                .unwrap_or(&entry.path())
                .to_path_buf();
            let name = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(SourceFile {
                name,
                size: real.metadata().ok().map(|m| m.len()),
                location: Location::Local(real),
            });
        }
    }
    Ok(())
}

async fn s3_files(uri: &str, base: &StoreConfig) -> Result<Vec<SourceFile>> {
    let store = ArtifactStore::open(&StoreConfig {
        url: Some(uri.to_owned()),
        ..base.clone()
    })?;
    let objects = store.list("").await?;
    Ok(objects
        .into_iter()
        .map(|o| SourceFile {
            name: o.key.clone(),
            size: Some(o.bytes),
            location: Location::S3 {
                store: store.clone(),
                key: o.key,
            },
        })
        .collect())
}

async fn hf_files(
    reference: &HfReference,
    config: &HfConfig,
    kind: InputKind,
) -> Result<Vec<SourceFile>> {
    let (snapshot, selected) = hf::resolve(reference, config, kind).await?;
    let snapshot = Arc::new(snapshot);
    Ok(selected
        .into_iter()
        .map(|file| SourceFile {
            name: file.name,
            size: file.size,
            location: Location::Hf {
                snapshot: snapshot.clone(),
                path: file.path,
            },
        })
        .collect())
}

impl SourceFile {
    /// The commit an `hf://` reference resolved to (a branch or tag pinned), for the record.
    pub fn revision(&self) -> Option<&str> {
        match &self.location {
            Location::Hf { snapshot, .. } => Some(snapshot.commit()),
            Location::Local(_) | Location::S3 { .. } => None,
        }
    }

    /// Opens the file as a stream of chunks (an `hf://` file is downloaded into the Hugging
    /// Face cache first, unless it is there already).
    ///
    /// # Errors
    /// [`Error::Io`], the store's error, or for `hf://` a rejection or [`Error::Upstream`].
    pub async fn open(&self) -> Result<BoxStream<'static, Result<Bytes>>> {
        match &self.location {
            Location::Local(path) => open_local(path.clone()).await,
            Location::S3 { store, key } => store.read(key, None).await,
            Location::Hf { snapshot, path } => open_local(snapshot.fetch(path).await?).await,
        }
    }
}

/// Streams a local file in chunks of [`READ_CHUNK`] bytes.
pub(crate) async fn open_local(path: PathBuf) -> Result<BoxStream<'static, Result<Bytes>>> {
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::io(&path, e))?;
    Ok(
        tokio_util::io::ReaderStream::with_capacity(file, READ_CHUNK)
            .map_err(move |e| Error::io(&path, e))
            .boxed(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_references_overlapping_the_artifact_store_are_refused() {
        let store = super::super::StoreConfig {
            url: Some("s3://shared-bucket/compressd/artifacts".into()),
            default_dir: PathBuf::from("/nonexistent"),
            s3: super::super::S3Config::default(),
            part_size_bytes: super::super::MIN_PART_SIZE,
            max_inflight_parts: 1,
        };
        let verdict = |uri: &str| {
            check_outside_artifacts(uri, &Reference::S3(uri.into()), &store).map_err(|e| match e {
                Error::Rejected(r) => r.slug,
                other => panic!("{other}"),
            })
        };
        for inside in [
            "s3://shared-bucket/compressd/artifacts",
            "s3://shared-bucket/compressd/artifacts/",
            "s3://shared-bucket/compressd/artifacts/models/0193/",
            "s3://shared-bucket/compressd",
            "s3://shared-bucket",
            "s3://shared-bucket/",
        ] {
            assert_eq!(verdict(inside), Err("uri-not-allowed"), "{inside}");
        }
        for outside in [
            "s3://shared-bucket/compressd/artifacts-old/m",
            "s3://shared-bucket/teams/a/model",
            "s3://other-bucket/compressd/artifacts",
        ] {
            assert_eq!(verdict(outside), Ok(()), "{outside}");
        }
    }

    #[test]
    fn file_references_must_stay_inside_the_allowed_roots() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("models/m");
        std::fs::create_dir_all(&inside).unwrap();
        let roots = vec![dir.path().join("models")];
        let ok = parse_reference(&format!("file://{}", inside.display()), &roots).unwrap();
        assert_eq!(ok, Reference::Local(inside.canonicalize().unwrap()));
        let slug = |r: Result<Reference>| match r {
            Err(Error::Rejected(r)) => r.slug,
            other => panic!("expected a rejection, got {other:?}"),
        };
        assert_eq!(
            slug(parse_reference(
                &format!("file://{}/../x", inside.display()),
                &roots
            )),
            "uri-not-allowed"
        );
        assert_eq!(
            slug(parse_reference(
                &format!("file://{}", dir.path().display()),
                &roots
            )),
            "uri-not-allowed"
        );
        assert_eq!(
            slug(parse_reference(
                &format!("file://{}", inside.display()),
                &[]
            )),
            "uri-not-allowed"
        );
        assert_eq!(
            slug(parse_reference(
                &format!("file://{}/missing", inside.display()),
                &roots
            )),
            "uri-not-found"
        );
        assert_eq!(slug(parse_reference("ftp://x/y", &roots)), "invalid-uri");
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn symlinks_out_of_the_roots_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::fs::write(root.join("config.json"), b"{}").unwrap();
        let roots = vec![root.clone()];
        let reference = parse_reference(&format!("file://{}", root.display()), &roots).unwrap();
        let config = StoreConfig {
            url: None,
            default_dir: dir.path().join("store"),
            s3: Default::default(),
            part_size_bytes: super::super::MIN_PART_SIZE,
            max_inflight_parts: 1,
        };
        let hf = HfConfig {
            endpoint: hf::DEFAULT_ENDPOINT.into(),
            cache_dir: dir.path().join("hf"),
            token: None,
            offline: true,
        };
        let sources = SourceConfig {
            allowed_roots: &roots,
            store: &config,
            hf: &hf,
        };
        let listed = list_files(&reference, &sources, InputKind::Model)
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, Some(2));
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        assert!(matches!(
            list_files(&reference, &sources, InputKind::Model).await,
            Err(Error::Rejected(_))
        ));
    }
}
