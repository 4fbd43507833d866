//! `hf://` references: models and datasets on the Hugging Face Hub (or any server speaking its
//! API, named by `hf_endpoint` / `HF_ENDPOINT`), fetched through the local Hugging Face cache.
//!
//! A reference is `hf://[datasets/]org/name[@revision][/path]` — the form `huggingface_hub`'s
//! `HfFileSystem` uses; the revision defaults to `main` and may be a branch, tag or commit (`/` in
//! a branch name written `%2F`). Online, the repository's file list is read at that revision and
//! pinned to its commit, so every file comes from the same commit; [`hf_select`] picks the files
//! the input needs, and each is downloaded only when the registration reaches it (a broken config
//! fails before the weights are fetched). Offline (`hf_offline` / `HF_HUB_OFFLINE=1`), only the
//! files already in the cache are used and nothing is contacted.
//!
//! Mistakes of the client (no such repository or revision, a private repository without a token)
//! are rejections (4xx); a Hub that fails or cannot be reached is [`Error::Upstream`] (502).

use std::path::{Path, PathBuf};
use std::time::Duration;

use hf_hub::api::tokio::{ApiBuilder, ApiError as HubError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use serde::Deserialize;

use super::hf_select::{self, InputKind, RepoFile, Selected};
use crate::error::{Error, Result};
use crate::inputs::model::check_file_name;
use crate::inputs::Rejection;

pub use super::hf_config::{HfConfig, DEFAULT_ENDPOINT};

/// Longest wait for a repository's file list; downloads themselves are not limited, they may
/// be gigabytes.
const LISTING_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest organisation or repository name the Hub allows.
const MAX_NAME: usize = 96;

/// A parsed `hf://` reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfReference {
    /// A dataset repository (`hf://datasets/…`) rather than a model repository.
    pub dataset_repo: bool,
    /// `org/name`.
    pub repo_id: String,
    /// Branch, tag or commit; `main` when the URI names none.
    pub revision: String,
    /// A file or folder inside the repository.
    pub path: Option<String>,
}

impl HfReference {
    /// The repository and revision as a URI, for messages.
    pub fn shown(&self) -> String {
        let kind = if self.dataset_repo { "datasets/" } else { "" };
        format!("hf://{kind}{}@{}", self.repo_id, self.revision)
    }

    /// A display name for what the reference brings: the last part of its path, else the
    /// repository's name (never the `@revision`).
    pub fn default_name(&self) -> String {
        let path_tail = self.path.as_deref().and_then(|p| p.rsplit('/').next());
        let repo_name = self.repo_id.rsplit('/').next().unwrap_or(&self.repo_id);
        path_tail.unwrap_or(repo_name).to_owned()
    }

    fn repo(&self, revision: &str) -> Repo {
        let kind = if self.dataset_repo {
            RepoType::Dataset
        } else {
            RepoType::Model
        };
        Repo::with_revision(self.repo_id.clone(), kind, revision.to_owned())
    }
}

fn invalid(uri: &str, why: &str) -> Rejection {
    Rejection::new(
        "invalid-uri",
        format!("{uri} is not hf://[datasets/]org/name[@revision][/path]: {why}"),
    )
}

/// Parses `hf://[datasets/|models/]org/name[@revision][/path]`.
///
/// # Errors
/// An `invalid-uri` [`Rejection`] saying what is wrong.
pub fn parse(uri: &str) -> Result<HfReference, Rejection> {
    let rest = uri
        .strip_prefix("hf://")
        .ok_or_else(|| invalid(uri, "it does not start with hf://"))?;
    let mut parts: Vec<&str> = rest.split('/').collect();
    let dataset_repo = match parts.first().copied() {
        Some("spaces") => return Err(invalid(uri, "Spaces hold no models or datasets")),
        Some(kind @ ("datasets" | "models")) => {
            parts.remove(0);
            kind == "datasets"
        }
        _ => false,
    };
    let [org, name_at_revision, path @ ..] = parts.as_slice() else {
        return Err(invalid(uri, "it must name org/name"));
    };
    let (name, revision) = match name_at_revision.split_once('@') {
        Some((name, revision)) => (name, revision.replace("%2F", "/").replace("%2f", "/")),
        None => (*name_at_revision, "main".to_owned()),
    };
    check_name(uri, org)?;
    check_name(uri, name)?;
    check_revision(uri, &revision)?;
    let path: Vec<&str> = path.iter().copied().filter(|p| !p.is_empty()).collect();
    if path
        .iter()
        .any(|p| *p == "." || *p == ".." || p.contains('\\'))
    {
        return Err(invalid(uri, "'.' and '..' are not allowed in the path"));
    }
    Ok(HfReference {
        dataset_repo,
        repo_id: format!("{org}/{name}"),
        revision,
        path: (!path.is_empty()).then(|| path.join("/")),
    })
}

fn check_name(uri: &str, part: &str) -> Result<(), Rejection> {
    let ok = !part.is_empty()
        && part.len() <= MAX_NAME
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !part.starts_with(['.', '-'])
        && !part.ends_with('.')
        && !part.contains("..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            uri,
            &format!("`{part}` is not a valid organisation or repository name"),
        ))
    }
}

fn check_revision(uri: &str, revision: &str) -> Result<(), Rejection> {
    let ok = !revision.is_empty()
        && revision.len() <= 255
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && !revision
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..");
    if ok {
        Ok(())
    } else {
        Err(invalid(
            uri,
            &format!("`{revision}` is not a valid revision"),
        ))
    }
}

/// A repository pinned to one commit, and how to get its files.
pub struct HfSnapshot {
    /// Downloads at the pinned commit; `None` offline.
    api: Option<ApiRepo>,
    /// `{cache}/models--org--name`.
    repo_dir: PathBuf,
    commit: String,
    shown: String,
}

/// Lists `reference`'s repository and picks the files a `kind` input needs.
///
/// # Errors
/// Rejections for a bad reference, a missing repository, revision or file, or nothing cached
/// offline; [`Error::Upstream`] when the Hub fails or cannot be reached.
pub async fn resolve(
    reference: &HfReference,
    config: &HfConfig,
    kind: InputKind,
) -> Result<(HfSnapshot, Vec<Selected>)> {
    let repo = reference.repo(&reference.revision);
    let repo_dir = config.cache_dir.join(repo.folder_name());
    let shown = reference.shown();
    let (api, commit, files) = if config.offline {
        let (commit, files) =
            cached_listing(&repo_dir, &reference.revision, &shown, config).await?;
        (None, commit, files)
    } else {
        let api = client(config)?;
        let listing = hub_listing(&api.repo(repo.clone()), &shown, config).await?;
        // Like huggingface_hub, remember which commit the revision named, so that an offline
        // process later finds these files under `main` too.
        if let Err(error) = Cache::new(config.cache_dir.clone())
            .repo(repo)
            .create_ref(&listing.sha)
        {
            tracing::warn!(%error, cache = %config.cache_dir.display(), "cannot write to the Hugging Face cache");
        }
        let pinned = api.repo(reference.repo(&listing.sha));
        (Some(pinned), listing.sha, listing.files)
    };
    let selected =
        hf_select::select(&files, reference.path.as_deref(), kind, &shown).map_err(|mut r| {
            if config.offline {
                r.message
                    .push_str(" (offline: only files already in the local cache were considered)");
            }
            r
        })?;
    let snapshot = HfSnapshot {
        api,
        repo_dir,
        commit,
        shown,
    };
    Ok((snapshot, selected))
}

fn client(config: &HfConfig) -> Result<hf_hub::api::tokio::Api> {
    let mut builder = ApiBuilder::from_cache(Cache::new(config.cache_dir.clone()))
        .with_endpoint(config.endpoint.clone())
        .with_progress(false);
    if let Some(token) = &config.token {
        builder = builder.with_token(Some(token.clone()));
    }
    builder.build().map_err(|e| Error::Config {
        setting: "hf_token (COMPRESSD_HF_TOKEN, HF_TOKEN)".into(),
        message: format!("cannot set up the Hugging Face client: {e}"),
    })
}

/// What `GET /api/models/{id}/revision/{rev}?blobs=true` answers, as far as it matters here.
#[derive(Deserialize)]
struct HubRepoInfo {
    sha: String,
    siblings: Vec<HubSibling>,
}

#[derive(Deserialize)]
struct HubSibling {
    rfilename: String,
    size: Option<u64>,
}

struct Listing {
    sha: String,
    files: Vec<RepoFile>,
}

async fn hub_listing(repo: &ApiRepo, shown: &str, config: &HfConfig) -> Result<Listing> {
    let endpoint = &config.endpoint;
    let request = repo.info_request().query(&[("blobs", "true")]).send();
    let response = tokio::time::timeout(LISTING_TIMEOUT, request)
        .await
        .map_err(|_| {
            Error::Upstream(format!(
                "the Hugging Face Hub at {endpoint} did not answer within {} s",
                LISTING_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| {
            Error::Upstream(format!(
                "cannot reach the Hugging Face Hub at {endpoint}: {e}"
            ))
        })?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        let code = response
            .headers()
            .get("x-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return Err(listing_error(status, code, shown, config.token.is_some()));
    }
    let info: HubRepoInfo = response.json().await.map_err(|e| {
        Error::Upstream(format!(
            "the Hugging Face Hub at {endpoint} sent an unreadable file list for {shown}: {e}"
        ))
    })?;
    if !is_commit(&info.sha) {
        return Err(Error::Upstream(format!(
            "the Hugging Face Hub at {endpoint} named no valid commit for {shown}"
        )));
    }
    // The names become cache paths: a server must not lead them out of the snapshot.
    let files = info
        .siblings
        .into_iter()
        .filter(|s| check_file_name(&s.rfilename).is_ok())
        .map(|s| RepoFile {
            path: s.rfilename,
            size: s.size,
        })
        .collect();
    Ok(Listing {
        sha: info.sha,
        files,
    })
}

/// A commit hash as the Hub and the cache write it (hex; checked because it becomes a path).
fn is_commit(sha: &str) -> bool {
    !sha.is_empty() && sha.len() <= 64 && sha.chars().all(|c| c.is_ascii_alphanumeric())
}

/// The Hub answers 401 for a missing repository when asked without a token (so private names
/// do not leak) and says which case it is in `X-Error-Code`.
fn listing_error(status: u16, code: &str, shown: &str, has_token: bool) -> Error {
    let token_hint = if has_token {
        "the configured token cannot read it"
    } else {
        "a private one needs hf_token or HF_TOKEN"
    };
    let rejection = match (code, status) {
        ("RevisionNotFound", _) => Rejection::new(
            "uri-not-found",
            format!("{shown}: the repository has no such revision"),
        ),
        ("GatedRepo", _) => Rejection::new(
            "uri-not-allowed",
            format!("{shown}: the repository is gated; accept its terms on the Hub and set a token that may read it"),
        ),
        ("RepoNotFound", _) | (_, 401 | 404) => Rejection::new(
            "uri-not-found",
            format!("{shown}: no such repository on the Hub ({token_hint})"),
        ),
        (_, 403) => Rejection::new(
            "uri-not-allowed",
            format!("{shown}: access denied ({token_hint})"),
        ),
        (_, 400) => Rejection::new(
            "invalid-uri",
            format!("{shown}: the Hub refused the repository name or revision"),
        ),
        _ => {
            return Error::Upstream(format!(
                "the Hugging Face Hub answered {status} when listing {shown}"
            ))
        }
    };
    rejection.into()
}

fn not_cached(shown: &str, config: &HfConfig, what: &str) -> Error {
    Rejection::new(
        "uri-not-cached",
        format!(
            "{shown}: {what} is not in the local Hugging Face cache at {}, and hf_offline (or HF_HUB_OFFLINE) forbids downloading it",
            config.cache_dir.display()
        ),
    )
    .into()
}

/// The commit a revision names in the cache (`refs/{revision}`, or a commit's own snapshot) and
/// the files of that snapshot.
async fn cached_listing(
    repo_dir: &Path,
    revision: &str,
    shown: &str,
    config: &HfConfig,
) -> Result<(String, Vec<RepoFile>)> {
    let (repo_dir, revision) = (repo_dir.to_path_buf(), revision.to_owned());
    let found = tokio::task::spawn_blocking(move || {
        let named = std::fs::read_to_string(repo_dir.join("refs").join(&revision))
            .map(|commit| commit.trim().to_owned())
            .unwrap_or(revision);
        if !is_commit(&named) {
            return None;
        }
        let snapshot = repo_dir.join("snapshots").join(&named);
        let mut files = Vec::new();
        snapshot
            .is_dir()
            .then(|| walk(&snapshot, "", &mut files))
            .map(|()| (named, files))
    })
    .await
    // A panicked or cancelled read is the server's fault, not the Hub's: a 500 whose detail
    // (the panic message) goes to the log only.
    .map_err(|e| Error::io("the Hugging Face cache", std::io::Error::other(e)))?;
    found.ok_or_else(|| not_cached(shown, config, "the repository"))
}

/// Files below `dir` (the cache's snapshot entries are links to blobs; broken ones are skipped).
fn walk(dir: &Path, prefix: &str, out: &mut Vec<RepoFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        match std::fs::metadata(entry.path()) {
            Ok(meta) if meta.is_dir() => walk(&entry.path(), &format!("{name}/"), out),
            Ok(meta) => out.push(RepoFile {
                path: name,
                size: Some(meta.len()),
            }),
            Err(_) => {}
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
}

impl HfSnapshot {
    /// The commit the reference's revision named when it was resolved.
    pub fn commit(&self) -> &str {
        &self.commit
    }

    /// The local copy of `path`: from the cache when it is there, else downloaded into it.
    ///
    /// # Errors
    /// `uri-not-cached` offline; [`Error::Upstream`] when the download fails; [`Error::Io`]
    /// when the cache cannot be written.
    pub async fn fetch(&self, path: &str) -> Result<PathBuf> {
        let cached = self
            .repo_dir
            .join("snapshots")
            .join(&self.commit)
            .join(path);
        if tokio::fs::metadata(&cached)
            .await
            .is_ok_and(|m| m.is_file())
        {
            return Ok(cached);
        }
        let Some(api) = &self.api else {
            return Err(Rejection::new(
                "uri-not-cached",
                format!("{}: {path} is not in the local Hugging Face cache and hf_offline forbids downloading it", self.shown),
            )
            .into());
        };
        tracing::info!(uri = %self.shown, file = %path, "downloading from the Hugging Face Hub");
        api.download(path)
            .await
            .map_err(|e| self.download_error(path, e))
    }

    fn download_error(&self, path: &str, error: HubError) -> Error {
        match error {
            HubError::IoError(source) => Error::io(&self.repo_dir, source),
            HubError::LockAcquisition(lock) => Error::Conflict(format!(
                "{path} of {} is being downloaded by another request (lock {}); retry shortly",
                self.shown,
                lock.display()
            )),
            HubError::RequestError(e)
                if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) =>
            {
                Rejection::new(
                    "uri-not-allowed",
                    format!("{}: the Hub refused to serve {path} ({e})", self.shown),
                )
                .into()
            }
            other => Error::Upstream(format!(
                "downloading {path} of {} from the Hugging Face Hub failed: {other}",
                self.shown
            )),
        }
    }
}

#[cfg(test)]
#[path = "hf_tests.rs"]
mod tests;
