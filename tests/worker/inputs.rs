//! A worker finds a job's inputs: in place on a local-folder store, downloaded once into its
//! cache from a remote store (here an in-memory one, which, like S3, has no local path).

use crate::scheduler_support;

use std::sync::Arc;

use bytes::Bytes;
use chrono::Utc;
use compressd::artifacts::{ArtifactStore, S3Config, StoreConfig, MIN_PART_SIZE};
use compressd::scheduler::{inputs, SchedulerMetrics, WorkerContext, WorkerSettings};
use compressd::store::{Dataset, Model};
use scheduler_support::{dry_run_spec, local_artifacts, queue_job, Inputs};
use serde_json::json;
use uuid::Uuid;

fn memory_store(dir: &std::path::Path) -> ArtifactStore {
    ArtifactStore::open(&StoreConfig {
        url: Some("memory://".into()),
        default_dir: dir.to_path_buf(),
        s3: S3Config::default(),
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 2,
    })
    .unwrap()
}

/// Stores a model (`format`, with `files`) and a one-file dataset under their keys and registers
/// both with those keys as URIs, as the API does.
async fn register(
    ctx: &WorkerContext,
    format: &str,
    files: &[(&str, &[u8])],
    rows: &[u8],
) -> Inputs {
    let (model_id, dataset_id) = (Uuid::now_v7(), Uuid::now_v7());
    let model_prefix = format!("models/{model_id}/");
    for (name, bytes) in files {
        ctx.artifacts
            .put_small(
                &format!("{model_prefix}{name}"),
                Bytes::copy_from_slice(bytes),
            )
            .await
            .unwrap();
    }
    let dataset_key = format!("datasets/{dataset_id}/news.jsonl");
    ctx.artifacts
        .put_small(&dataset_key, Bytes::copy_from_slice(rows))
        .await
        .unwrap();
    let now = Utc::now();
    ctx.store
        .insert_model(&Model {
            tenant: "default".into(),
            id: model_id,
            name: "m".into(),
            architecture: "bert".into(),
            format: format.into(),
            uri: model_prefix,
            bytes: 1,
            sha256: "0".repeat(64),
            metadata: json!({}),
            created_at: now,
        })
        .await
        .unwrap();
    ctx.store
        .insert_dataset(&Dataset {
            tenant: "default".into(),
            id: dataset_id,
            name: "d".into(),
            format: "jsonl".into(),
            uri: dataset_key,
            bytes: rows.len() as i64,
            sha256: "0".repeat(64),
            rows: 2,
            metadata: json!({}),
            created_at: now,
        })
        .await
        .unwrap();
    Inputs {
        model_id,
        dataset_id,
    }
}

async fn context(dir: &std::path::Path, artifacts: ArtifactStore) -> WorkerContext {
    let store = scheduler_support::backends::sqlite(dir).await;
    WorkerContext::new(
        Arc::clone(&store),
        artifacts,
        store.hub().clone(),
        WorkerSettings::with_defaults(dir).unwrap(),
        SchedulerMetrics::default(),
    )
}

const ROWS: &[u8] = b"{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"y\"}\n";

#[tokio::test]
async fn remote_inputs_are_downloaded_once_into_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), memory_store(dir.path())).await;
    let files: &[(&str, &[u8])] = &[("config.json", b"{}"), ("sub/tokenizer.json", b"tok")];
    let registered = register(&ctx, "safetensors", files, ROWS).await;
    let job = queue_job(
        &*ctx.store,
        &registered,
        dry_run_spec(&registered, "j"),
        0,
        1,
    )
    .await;

    let resolved = inputs::resolve(&ctx, &job).await.unwrap();
    let model = resolved.model.expect("model resolved");
    let dataset = resolved.dataset.expect("dataset resolved");
    assert!(model.starts_with(ctx.settings.work_dir.join("inputs/models")));
    assert_eq!(std::fs::read(model.join("config.json")).unwrap(), b"{}");
    assert_eq!(
        std::fs::read(model.join("sub/tokenizer.json")).unwrap(),
        b"tok"
    );
    assert_eq!(std::fs::read(&dataset).unwrap(), ROWS);
    assert!(dataset.ends_with("news.jsonl"));

    // A second job on the same inputs uses the cached copy; no staging folder is left behind.
    std::fs::write(model.join("marker"), b"cached").unwrap();
    let again = inputs::resolve(&ctx, &job).await.unwrap();
    assert_eq!(again.model.as_deref(), Some(model.as_path()));
    assert!(model.join("marker").exists());
    let leftovers: Vec<_> = std::fs::read_dir(model.parent().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn a_gguf_model_resolves_to_its_file_and_local_stores_are_read_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let artifacts = local_artifacts(dir.path());
    let ctx = context(dir.path(), artifacts.clone()).await;
    let registered = register(&ctx, "gguf", &[("model.gguf", b"GGUF")], ROWS).await;
    let job = queue_job(
        &*ctx.store,
        &registered,
        dry_run_spec(&registered, "g"),
        0,
        1,
    )
    .await;

    let resolved = inputs::resolve(&ctx, &job).await.unwrap();
    let model = resolved.model.unwrap();
    assert_eq!(model.file_name().unwrap(), "model.gguf");
    assert!(
        model.starts_with(dir.path().join("artifacts")),
        "read in place, not copied: {}",
        model.display()
    );
    assert!(!ctx.settings.work_dir.join("inputs").exists());
}

#[tokio::test]
async fn a_remote_model_with_no_files_is_an_error_not_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path(), memory_store(dir.path())).await;
    let registered = register(&ctx, "safetensors", &[], ROWS).await;
    let job = queue_job(
        &*ctx.store,
        &registered,
        dry_run_spec(&registered, "e"),
        0,
        1,
    )
    .await;
    assert!(inputs::resolve(&ctx, &job).await.is_err());
    assert!(!ctx
        .settings
        .work_dir
        .join("inputs/models")
        .join(registered.model_id.to_string())
        .exists());
}
