//! The orphan sweeper end to end: a real `ArtifactStore` on a local folder and a migrated
//! SQLite database. Objects older than the configured age that no row owns — under `models/`,
//! `datasets/` and `jobs/` — are deleted; objects of registered models and datasets, committed
//! artifacts, the running attempt's uploads, and young objects are kept. Ages are made by
//! back-dating the files' modification times, as a crash a day ago would have left them.

use crate::common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use chrono::Utc;
use compressd::artifacts::sweep::{cutoff, is_referenced, spawn_sweeper, sweep};
use compressd::artifacts::{ArtifactStore, S3Config, StoreConfig, MIN_PART_SIZE};
use compressd::clock::Clock;
use compressd::store::{Artifact, JobStatus, Store};
use uuid::Uuid;

/// `orphan_sweep_age_secs`' default.
const MIN_AGE: Duration = Duration::from_secs(24 * 3600);

fn local_store(dir: &std::path::Path) -> ArtifactStore {
    ArtifactStore::open(&StoreConfig {
        url: Some(format!("file://{}", dir.display())),
        default_dir: dir.to_path_buf(),
        s3: S3Config::default(),
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 1,
    })
    .expect("local artifact store")
}

/// Writes `key`, then sets its modification time `age` in the past.
async fn put(store: &ArtifactStore, key: &str, age: Duration) {
    store
        .put_small(key, Bytes::from_static(b"bytes"))
        .await
        .expect("put");
    let path = store.local_path(key).expect("a local store");
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_modified(SystemTime::now() - age))
        .expect("back-date");
}

async fn keys(store: &ArtifactStore) -> Vec<String> {
    let mut keys = Vec::new();
    for prefix in ["models", "datasets", "jobs"] {
        keys.extend(store.list(prefix).await.unwrap().into_iter().map(|o| o.key));
    }
    keys
}

/// The rows: a registered model and dataset; job A claimed (running attempt 1); job B queued
/// with one committed artifact from an earlier attempt.
struct Rows {
    model: Uuid,
    dataset: Uuid,
    running: Uuid,
    finished: Uuid,
}

async fn rows(db: &dyn Store, clock: &dyn Clock) -> Rows {
    let (model, dataset) = common::register_inputs(db, clock).await;
    let running = db
        .create_job(common::new_job(clock, model, dataset))
        .await
        .unwrap();
    let finished = db
        .create_job(common::new_job(clock, model, dataset))
        .await
        .unwrap();
    let claimed = db
        .claim_next("sweep-test", Duration::from_secs(600))
        .await
        .unwrap()
        .expect("a job to claim");
    assert_eq!(claimed.status, JobStatus::Running);
    let (running, finished) = if claimed.id == running.job().id {
        (running.job().id, finished.job().id)
    } else {
        (finished.job().id, running.job().id)
    };
    let artifact = Artifact {
        job_id: finished,
        attempt: 1,
        name: "report.json".into(),
        kind: "report".into(),
        format: "json".into(),
        bytes: 5,
        sha256: "ab".repeat(32),
        uri: format!("jobs/{finished}/attempt-1/report.json"),
        created_at: clock.now(),
    };
    db.insert_artifact(&artifact).await.unwrap();
    Rows {
        model,
        dataset,
        running,
        finished,
    }
}

#[tokio::test]
async fn old_orphans_go_and_everything_owned_or_young_stays() {
    let (db, _db_dir) = common::sqlite_store().await;
    let clock = common::clock();
    let Rows {
        model,
        dataset,
        running,
        finished,
    } = rows(&*db, &*clock).await;
    let folder = tempfile::tempdir().unwrap();
    let store = local_store(folder.path());
    let (old, young) = (MIN_AGE * 2, Duration::from_secs(60));
    let ghost = Uuid::now_v7();
    let kept = [
        format!("models/{model}/config.json"),
        format!("datasets/{dataset}/news.jsonl"),
        format!("jobs/{finished}/attempt-1/report.json"),
        format!("jobs/{running}/attempt-1/model.safetensors"),
        "models/not-a-uuid/readme".to_owned(),
    ];
    let swept = [
        format!("models/{ghost}/config.json"),
        format!("datasets/{ghost}/news.jsonl"),
        format!("jobs/{finished}/attempt-1/partial.bin"),
        format!("jobs/{finished}/attempt-2/model.safetensors"),
        format!("jobs/{ghost}/attempt-1/model.safetensors"),
    ];
    for key in kept.iter().chain(&swept) {
        put(&store, key, old).await;
    }
    let young_orphan = format!("models/{ghost}/tokenizer.json");
    put(&store, &young_orphan, young).await;

    let limit = cutoff(Utc::now(), MIN_AGE).expect("a day ago is in range");
    let report = sweep(&store, &["models", "datasets", "jobs"], limit, |key| {
        let db = db.clone();
        async move { is_referenced(&*db, &key).await }
    })
    .await
    .unwrap();
    assert_eq!(report.examined, kept.len() + swept.len() + 1);
    assert_eq!(report.deleted, swept.len());
    let mut left = keys(&store).await;
    left.sort();
    let mut expected: Vec<String> = kept.to_vec();
    expected.push(young_orphan);
    expected.sort();
    assert_eq!(left, expected);
}

#[tokio::test]
async fn the_spawned_sweeper_runs_at_once_and_survives_an_age_past_the_calendar() {
    let (db, _db_dir) = common::sqlite_store().await;
    let clock = common::clock();
    let (model, _) = common::register_inputs(&*db, &*clock).await;
    let folder = tempfile::tempdir().unwrap();
    let store = local_store(folder.path());
    let orphan = format!("models/{}/config.json", Uuid::now_v7());
    let owned = format!("models/{model}/config.json");
    put(&store, &orphan, MIN_AGE * 2).await;
    put(&store, &owned, MIN_AGE * 2).await;

    // An age no clock can subtract: the sweeper must skip the round, not panic its task.
    let forever = spawn_sweeper(
        store.clone(),
        db.clone(),
        Duration::from_secs(u64::MAX / 4),
        Duration::from_secs(3600),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!forever.is_finished(), "the sweeper task died");
    forever.abort();
    assert_eq!(keys(&store).await.len(), 2, "nothing is old enough");

    let sweeper = spawn_sweeper(
        store.clone(),
        Arc::clone(&db),
        MIN_AGE,
        Duration::from_secs(3600),
    );
    let mut left = keys(&store).await;
    for _ in 0..50 {
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = keys(&store).await;
    }
    sweeper.abort();
    assert_eq!(left, [owned]);
}

#[tokio::test]
async fn on_s3_only_old_unowned_objects_are_swept() {
    let moto = super::artifacts_s3::local_s3().await;
    let bucket = format!("sweep{}", Uuid::now_v7().simple());
    let created = reqwest::Client::new()
        .put(format!("{}/{bucket}", moto.endpoint))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    let store = ArtifactStore::open(&StoreConfig {
        url: Some(format!("s3://{bucket}/pre")),
        default_dir: std::env::temp_dir(),
        s3: S3Config {
            endpoint: Some(moto.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            allow_http: true,
        },
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 1,
    })
    .unwrap();
    let (db, _db_dir) = common::sqlite_store().await;
    let (model, _) = common::register_inputs(&*db, &*common::clock()).await;
    // S3 sets the modification time itself: age the first objects by waiting past the cutoff
    // (over a second, as listings may keep whole seconds).
    let (owned, old_orphan) = (
        format!("models/{model}/config.json"),
        format!("jobs/{}/attempt-1/x.bin", Uuid::now_v7()),
    );
    for key in [&owned, &old_orphan] {
        store
            .put_small(key, Bytes::from_static(b"x"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let limit = Utc::now();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let young_orphan = format!("datasets/{}/d.jsonl", Uuid::now_v7());
    store
        .put_small(&young_orphan, Bytes::from_static(b"x"))
        .await
        .unwrap();
    let report = sweep(&store, &["models", "datasets", "jobs"], limit, |key| {
        let db = db.clone();
        async move { is_referenced(&*db, &key).await }
    })
    .await
    .unwrap();
    assert_eq!((report.examined, report.deleted), (3, 1));
    let mut left = keys(&store).await;
    left.sort();
    let mut expected = vec![young_orphan, owned];
    expected.sort();
    assert_eq!(left, expected);
}
