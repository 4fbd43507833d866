//! Unit tests of [`ArtifactStore`] on the in-memory and local-folder backends. S3 behaviour is
//! covered by `tests/artifacts_s3.rs` against a local S3 server.

use super::sweep::sweep;
use super::*;

fn config(url: Option<String>, dir: &FsPath) -> StoreConfig {
    StoreConfig {
        url,
        default_dir: dir.to_path_buf(),
        s3: S3Config::default(),
        part_size_bytes: MIN_PART_SIZE,
        max_inflight_parts: 2,
    }
}

async fn read_all(store: &ArtifactStore, key: &str, range: Option<Range<u64>>) -> Vec<u8> {
    let chunks: Vec<Bytes> = store
        .read(key, range)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

/// 12 MiB in 1 MiB chunks: more than two 5 MiB parts, so the multipart path is exercised.
fn payload() -> Vec<Bytes> {
    (0..12u8).map(|i| Bytes::from(vec![i; 1 << 20])).collect()
}

async fn round_trip(store: &ArtifactStore) {
    let mut writer = store.writer("jobs/j1/attempt-1/model.bin").await.unwrap();
    for chunk in payload() {
        writer.write(chunk).await.unwrap();
    }
    assert!(
        store.head("jobs/j1/attempt-1/model.bin").await.is_err(),
        "visible before finish"
    );
    let written = writer.finish().await.unwrap();
    let all: Vec<u8> = payload().concat();
    assert_eq!(written.bytes, all.len() as u64);
    assert_eq!(
        written.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&all))
    );
    assert_eq!(
        store
            .head("jobs/j1/attempt-1/model.bin")
            .await
            .unwrap()
            .size,
        all.len() as u64
    );
    assert_eq!(
        read_all(store, "jobs/j1/attempt-1/model.bin", None).await,
        all
    );
    let range = (5 << 20) - 3..(5 << 20) + 5;
    assert_eq!(
        read_all(store, "jobs/j1/attempt-1/model.bin", Some(range.clone())).await,
        all[range.start as usize..range.end as usize]
    );
    let listed = store.list("jobs/j1").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].key, "jobs/j1/attempt-1/model.bin");
    assert_eq!(store.delete_prefix("jobs/j1").await.unwrap(), 1);
    assert!(store.list("jobs").await.unwrap().is_empty());
}

async fn aborted_and_dropped_uploads_leave_nothing(store: &ArtifactStore) {
    let mut writer = store.writer("models/m/a.bin").await.unwrap();
    writer.write(Bytes::from(vec![1u8; 6 << 20])).await.unwrap();
    writer.abort().await.unwrap();
    let mut writer = store.writer("models/m/b.bin").await.unwrap();
    writer.write(Bytes::from(vec![1u8; 6 << 20])).await.unwrap();
    drop(writer);
    // The drop guard aborts on a spawned task; give it a moment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(store.list("models").await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_store_round_trips_and_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&config(Some("memory://".into()), dir.path())).unwrap();
    assert_eq!(store.backend(), &Backend::Memory);
    round_trip(&store).await;
    aborted_and_dropped_uploads_leave_nothing(&store).await;
}

#[tokio::test]
async fn local_store_round_trips_and_leaves_no_staging_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&config(None, &dir.path().join("artifacts"))).unwrap();
    round_trip(&store).await;
    aborted_and_dropped_uploads_leave_nothing(&store).await;
    let leftovers: Vec<_> = walk(&dir.path().join("artifacts"));
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let url = format!("file://{}", dir.path().join("other").display());
    let other = ArtifactStore::open(&config(Some(url), dir.path())).unwrap();
    other
        .put_small("a/b.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(
        other.local_path("a/b.json").unwrap(),
        dir.path().join("other/a/b.json").canonicalize().unwrap()
    );
}

fn walk(dir: &FsPath) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

#[test]
fn refuses_bad_urls_and_part_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let err = ArtifactStore::open(&config(Some("ftp://x".into()), dir.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("artifacts_url"), "{err}");
    let mut small = config(None, dir.path());
    small.part_size_bytes = 1024;
    assert!(ArtifactStore::open(&small)
        .unwrap_err()
        .to_string()
        .contains("upload_part_size_bytes"));
    assert!(ArtifactStore::open(&config(Some("s3:///nobucket".into()), dir.path())).is_err());
}

#[tokio::test]
async fn sweeper_deletes_only_old_unreferenced_objects() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&config(Some("memory://".into()), dir.path())).unwrap();
    for key in [
        "jobs/a/attempt-1/x",
        "jobs/b/attempt-1/x",
        "models/c/config.json",
    ] {
        store
            .put_small(key, Bytes::from_static(b"1"))
            .await
            .unwrap();
    }
    let future = chrono::Utc::now() + chrono::Duration::seconds(60);
    let report = sweep(&store, &["jobs", "models"], future, |key| async move {
        Ok(key.starts_with("jobs/a/"))
    })
    .await
    .unwrap();
    assert_eq!((report.examined, report.deleted), (3, 2));
    let past = chrono::Utc::now() - chrono::Duration::seconds(60);
    let report = sweep(&store, &["jobs"], past, |_| async { Ok(false) })
        .await
        .unwrap();
    assert_eq!(report.deleted, 0, "objects newer than the cutoff are kept");
    assert_eq!(store.list("").await.unwrap().len(), 1);
}

#[tokio::test]
async fn presigning_is_s3_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(&config(Some("memory://".into()), dir.path())).unwrap();
    assert!(store
        .presigned_get("a", Duration::from_secs(60))
        .await
        .unwrap()
        .is_none());
    let s3 = StoreConfig {
        s3: S3Config {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            allow_http: true,
        },
        ..config(Some("s3://bucket/pre".into()), dir.path())
    };
    let store = ArtifactStore::open(&s3).unwrap();
    let url = store
        .presigned_get("jobs/x/a b.bin", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    assert!(
        url.as_str()
            .starts_with("http://127.0.0.1:9/bucket/pre/jobs/x/a%20b.bin?"),
        "{url}"
    );
    assert!(url.query().unwrap().contains("X-Amz-Signature="));
}
