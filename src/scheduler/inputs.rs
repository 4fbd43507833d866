//! A job's model and dataset as local paths for its child process.
//!
//! Registered inputs live in the artifact store (`models/{id}/…`, `datasets/{id}/{file}`); rows
//! written by hand or by older versions may hold a `file://` URL or an absolute path. With a
//! local-folder store the child reads the stored files in place. With S3 the worker downloads them
//! once into a cache under its work folder (`inputs/models/{id}/`), into a staging folder that is
//! renamed when complete, so a crash mid-download never leaves a half copy that a later job would
//! trust. Registered inputs never change, so a cached copy never goes stale.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use compressd_engine::spec::JobSpec;
use futures::StreamExt;
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use super::protocol::ExecInputs;
use super::WorkerContext;
use crate::error::{Error, Result};
use crate::store::{Dataset, Job, Model};

/// The job's inputs as local paths; `None` for an input that is not registered (the child then
/// fails the job as bad input).
///
/// # Errors
/// Store errors and failed downloads: another attempt may succeed.
pub async fn resolve(ctx: &WorkerContext, job: &Job) -> Result<ExecInputs> {
    let model = match job.model_id {
        Some(id) => ctx.store.get_model(id).await?,
        None => None,
    };
    let dataset = match job.dataset_id {
        Some(id) => ctx.store.get_dataset(id).await?,
        None => None,
    };
    let mut models = BTreeMap::new();
    // A stored spec always parses (it was accepted); one that did not would name no model.
    let named = serde_json::from_value::<JobSpec>(job.spec.clone())
        .map(|spec| spec.named_models())
        .unwrap_or_default();
    for (_, id) in named {
        let named = match Uuid::parse_str(&id) {
            Ok(uuid) => ctx.store.get_model(uuid).await?,
            Err(_) => None,
        };
        // Another tenant's model is as unknown as one never registered (checked at submission
        // too; a spec stored before then must not reach across tenants either).
        if let Some(named) = named.filter(|m| m.tenant == job.tenant) {
            models.insert(id, model_path(ctx, &named).await?);
        }
    }
    Ok(ExecInputs {
        models,
        model: match model {
            Some(model) => Some(model_path(ctx, &model).await?),
            None => None,
        },
        dataset: match dataset {
            Some(dataset) => Some(dataset_path(ctx, &dataset).await?),
            None => None,
        },
    })
}

/// The model's folder, or its `.gguf` file for a GGUF model (the engine loads either).
async fn model_path(ctx: &WorkerContext, model: &Model) -> Result<PathBuf> {
    let folder = match local_uri(&model.uri) {
        Some(path) => path,
        None => {
            let cache = cache_dir(ctx, "models", &model.id.to_string());
            materialize(ctx, &model.uri, &cache).await?
        }
    };
    if model.format == "gguf" && folder.is_dir() {
        if let Some(file) = first_with_extension(&folder, "gguf") {
            return Ok(file);
        }
    }
    Ok(folder)
}

/// The dataset's file.
async fn dataset_path(ctx: &WorkerContext, dataset: &Dataset) -> Result<PathBuf> {
    if let Some(path) = local_uri(&dataset.uri) {
        return Ok(path);
    }
    let Some((prefix, file_name)) = dataset.uri.rsplit_once('/') else {
        return Err(Error::Corrupt(format!(
            "dataset {} has no file in its uri {:?}",
            dataset.id, dataset.uri
        )));
    };
    let cache = cache_dir(ctx, "datasets", &dataset.id.to_string());
    let folder = materialize(ctx, &format!("{prefix}/"), &cache).await?;
    Ok(folder.join(file_name))
}

fn cache_dir(ctx: &WorkerContext, kind: &str, id: &str) -> PathBuf {
    ctx.settings.work_dir.join("inputs").join(kind).join(id)
}

/// A local path for a `file://` URL or a plain absolute path; `None` for a store key.
fn local_uri(uri: &str) -> Option<PathBuf> {
    if let Ok(url) = url::Url::parse(uri) {
        return (url.scheme() == "file")
            .then(|| url.to_file_path().ok())
            .flatten();
    }
    let path = PathBuf::from(uri);
    path.is_absolute().then_some(path)
}

/// The local folder holding the objects under `prefix`: the store's own folder when it is local,
/// else `cache`, downloaded on first use.
async fn materialize(ctx: &WorkerContext, prefix: &str, cache: &Path) -> Result<PathBuf> {
    if let Some(path) = ctx.artifacts.local_path(prefix) {
        return Ok(path);
    }
    if cache.is_dir() {
        return Ok(cache.to_path_buf());
    }
    let parent = cache.parent().unwrap_or(cache);
    tokio::fs::create_dir_all(parent)
        .await
        .map_err(|e| Error::io(parent, e))?;
    let staging = parent.join(format!(".partial-{}", uuid::Uuid::new_v4().simple()));
    let downloaded = download_prefix(ctx, prefix, &staging).await;
    if let Err(error) = downloaded {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(error);
    }
    if let Err(error) = tokio::fs::rename(&staging, cache).await {
        // Another job on this worker finished the same download first: use its copy.
        let _ = tokio::fs::remove_dir_all(&staging).await;
        if !cache.is_dir() {
            return Err(Error::io(cache, error));
        }
    }
    Ok(cache.to_path_buf())
}

/// Streams every object under `prefix` into `dest`, keeping its path below the prefix.
async fn download_prefix(ctx: &WorkerContext, prefix: &str, dest: &Path) -> Result<()> {
    let objects = ctx.artifacts.list(prefix).await?;
    if objects.is_empty() {
        return Err(Error::Corrupt(format!("no stored files under {prefix:?}")));
    }
    for object in objects {
        let relative = object.key.strip_prefix(prefix).unwrap_or(&object.key);
        if relative
            .split('/')
            .any(|part| part.is_empty() || part == "..")
        {
            return Err(Error::Corrupt(format!(
                "unexpected stored key {:?}",
                object.key
            )));
        }
        let path = dest.join(relative);
        if let Some(folder) = path.parent() {
            tokio::fs::create_dir_all(folder)
                .await
                .map_err(|e| Error::io(folder, e))?;
        }
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| Error::io(&path, e))?;
        let mut body = ctx.artifacts.read(&object.key, None).await?;
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?)
                .await
                .map_err(|e| Error::io(&path, e))?;
        }
        file.sync_all().await.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

fn first_with_extension(folder: &Path, extension: &str) -> Option<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    files.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_urls_and_absolute_paths_are_local_and_keys_are_not() {
        assert_eq!(
            local_uri("file:///data/model/"),
            Some(PathBuf::from("/data/model/"))
        );
        assert_eq!(
            local_uri("/data/x.jsonl"),
            Some(PathBuf::from("/data/x.jsonl"))
        );
        assert_eq!(local_uri("models/0190/"), None);
        assert_eq!(local_uri("s3://bucket/models/0190/"), None);
    }
}
