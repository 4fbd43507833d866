//! `jobs download`: a job's artifacts into a folder, each checked against the sha256 the server
//! lists, resumed with `Range` from a `.part` file left by an interrupted download.
//!
//! A file is only ever complete under its own name: bytes go to `NAME.part`, which is renamed once
//! its sha256 matches; a mismatch deletes it.

use std::path::{Component, Path, PathBuf};

use futures::StreamExt;
use reqwest::header::{ETAG, RANGE};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

use super::Client;
use crate::api::artifacts::{ArtifactList, ArtifactView};
use crate::error::{Error, Result};

/// What one artifact's download did.
#[derive(Debug, Serialize)]
pub struct Downloaded {
    /// The artifact's name.
    pub name: String,
    /// Where it is now.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// Its verified sha256.
    pub sha256: String,
    /// Bytes already on disk that were kept (a resumed or already complete download).
    pub resumed_from: u64,
}

/// The artifacts of `job` named in `names` (all when empty).
///
/// # Errors
/// The server's refusal, or [`Error::NotFound`] naming an artifact the job does not have.
pub async fn list(client: &Client, job: Uuid, names: &[String]) -> Result<Vec<ArtifactView>> {
    let listing = client
        .call(Method::GET, &format!("/v1/jobs/{job}/artifacts"), None)
        .await?;
    let listing: ArtifactList = serde_json::from_value(listing)
        .map_err(|e| Error::Corrupt(format!("the server's artifact list: {e}")))?;
    if names.is_empty() {
        return Ok(listing.artifacts);
    }
    let mut available = listing.artifacts;
    names
        .iter()
        .map(|name| {
            let index = available
                .iter()
                .position(|a| &a.name == name)
                .ok_or_else(|| Error::NotFound {
                    kind: "artifact",
                    id: format!("{job}/{name}"),
                })?;
            Ok(available.swap_remove(index))
        })
        .collect()
}

/// Downloads one artifact into `dir`, resuming a `.part` file and verifying the sha256;
/// `on_bytes` is told of every chunk written.
///
/// # Errors
/// [`Error::Corrupt`] when the name would leave `dir` or the sha256 does not match;
/// [`Error::Io`] when a file cannot be written; the server's answer when it refuses.
pub async fn download(
    client: &Client,
    job: Uuid,
    artifact: &ArtifactView,
    dir: &Path,
    on_bytes: &dyn Fn(u64),
) -> Result<Downloaded> {
    let target = dir.join(safe_relative(&artifact.name)?);
    let expected = artifact.sha256.to_ascii_lowercase();
    let size = u64::try_from(artifact.bytes).unwrap_or_default();
    if target.is_file() && sha256_of(&target).await? == expected {
        on_bytes(size);
        return Ok(done(artifact, target, size));
    }
    if let Some(parent) = target.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| Error::io(parent, e))?;
    }
    let part = part_path(&target);
    let (mut hasher, mut have) = hash_prefix(&part).await?;
    if have > size {
        have = 0;
        hasher = Sha256::new();
    }
    let mut request = client.request(
        Method::GET,
        &format!("/v1/jobs/{job}/artifacts/{}", artifact.name),
    );
    if have > 0 {
        request = request.header(RANGE, format!("bytes={have}-"));
    }
    let response = client.send(request).await?;
    // 206 continues the part file; a 200 (or a different ETag) is the whole file again.
    let same = response
        .headers()
        .get(ETAG)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|etag| etag.trim_matches('"').eq_ignore_ascii_case(&expected));
    let resumed = have > 0 && response.status() == StatusCode::PARTIAL_CONTENT && same;
    if !resumed {
        have = 0;
        hasher = Sha256::new();
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&part)
        .await
        .map_err(|e| Error::io(&part, e))?;
    on_bytes(have);
    let resumed_from = have;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| client.unreachable(&e))?;
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(|e| Error::io(&part, e))?;
        on_bytes(chunk.len() as u64);
    }
    file.flush().await.map_err(|e| Error::io(&part, e))?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(Error::Corrupt(format!(
            "{}: downloaded bytes have sha256 {actual}, the server lists {expected}; the partial file was removed, run the download again",
            artifact.name
        )));
    }
    tokio::fs::rename(&part, &target)
        .await
        .map_err(|e| Error::io(&target, e))?;
    let mut downloaded = done(artifact, target, size);
    downloaded.resumed_from = resumed_from;
    Ok(downloaded)
}

fn done(artifact: &ArtifactView, path: PathBuf, size: u64) -> Downloaded {
    Downloaded {
        name: artifact.name.clone(),
        path,
        bytes: size,
        sha256: artifact.sha256.clone(),
        resumed_from: size,
    }
}

/// `name` as a path that stays inside the download folder (artifact names are `a/b.c` paths).
fn safe_relative(name: &str) -> Result<PathBuf> {
    let path = Path::new(name);
    let normal = path.components().all(|c| matches!(c, Component::Normal(_)));
    if name.is_empty() || !normal {
        return Err(Error::Corrupt(format!(
            "the server named an artifact `{name}`, which is not a relative path"
        )));
    }
    Ok(path.to_path_buf())
}

fn part_path(target: &Path) -> PathBuf {
    let mut name = target.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    target.with_file_name(name)
}

/// The hasher fed with an existing part file, and its length (0 when there is none).
async fn hash_prefix(part: &Path) -> Result<(Sha256, u64)> {
    let mut hasher = Sha256::new();
    let mut file = match tokio::fs::File::open(part).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((hasher, 0)),
        Err(e) => return Err(Error::io(part, e)),
    };
    let mut buffer = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file
            .read(&mut buffer)
            .await
            .map_err(|e| Error::io(part, e))?;
        if n == 0 {
            return Ok((hasher, len));
        }
        hasher.update(&buffer[..n]);
        len += n as u64;
    }
}

async fn sha256_of(path: &Path) -> Result<String> {
    let (hasher, _) = hash_prefix(path).await?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_may_not_leave_the_folder() {
        assert!(safe_relative("model/model.safetensors").is_ok());
        for bad in ["../x", "/etc/passwd", "", "a/../../b"] {
            assert!(safe_relative(bad).is_err(), "{bad}");
        }
    }
}
