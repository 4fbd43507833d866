//! The object store failing mid-upload and mid-commit while a worker publishes a job's outputs.
//!
//! A wrapper injects failures into the real (local) store's multipart uploads: a part upload
//! that fails, a completion that fails. Publishing retries with backoff and succeeds when the
//! faults pass; when completion keeps failing it gives up after its budget, the attempt is
//! failed as retryable, nothing is left visible or on disk once the sweeper has run, and the next
//! attempt publishes every artifact exactly once.

use crate::scheduler_support;

use std::fmt;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use compressd::artifacts::sweep::{is_referenced, sweep};
use compressd::artifacts::ArtifactStore;
use compressd::scheduler::protocol::OutputFile;
use compressd::scheduler::publish::{publish, PUBLISH_TRIES};
use compressd::scheduler::{SchedulerMetrics, WorkerContext, WorkerSettings};
use compressd::store::{AttemptOutcome, JobError, JobStatus, Lease};
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use scheduler_support::{dry_run_spec, local_artifacts, queue_job, seed_inputs, SharedStore};

/// How many of the next part uploads and completions fail, and how many were tried.
#[derive(Debug, Default)]
struct Faults {
    parts_to_fail: AtomicU32,
    /// Completions that succeed before `completions_to_fail` applies.
    completions_to_pass: AtomicU32,
    completions_to_fail: AtomicU32,
    completions_tried: AtomicU32,
    /// Single-request uploads that fail.
    puts_to_fail: AtomicU32,
}

impl Faults {
    fn take(counter: &AtomicU32) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn injected() -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: "injected fault: connection reset".into(),
    }
}

/// An object store whose multipart uploads fail as `faults` says; everything else passes through.
#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<Faults>,
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<Faults>,
}

#[async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        if Faults::take(&self.faults.parts_to_fail) {
            return Box::pin(async { Err(injected()) });
        }
        self.inner.put_part(data)
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        self.faults.completions_tried.fetch_add(1, Ordering::SeqCst);
        if !Faults::take(&self.faults.completions_to_pass)
            && Faults::take(&self.faults.completions_to_fail)
        {
            return Err(injected());
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.inner.abort().await
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if Faults::take(&self.faults.puts_to_fail) {
            return Err(injected());
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            faults: Arc::clone(&self.faults),
        }))
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// Files under `dir`, recursively (staging files of unfinished uploads included).
fn files_under(dir: &FsPath) -> Vec<String> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            if entry.path().is_dir() {
                folders.push(entry.path());
            } else {
                found.push(entry.path().display().to_string());
            }
        }
    }
    found.sort();
    found
}

/// Claims `job_id`'s next attempt as this test's worker.
async fn claim(store: &SharedStore, owner: &str) -> Lease {
    let job = store
        .claim_next(owner, Duration::from_secs(60))
        .await
        .unwrap()
        .expect("a claimable job");
    Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: owner.into(),
    }
}

/// Writes an attempt's outputs: a 12 MiB "model" (three parts of 5 MiB) and a small report.
fn write_outputs(work_dir: &FsPath) -> Vec<OutputFile> {
    std::fs::create_dir_all(work_dir).unwrap();
    let model: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(work_dir.join("model.safetensors"), model).unwrap();
    std::fs::write(work_dir.join("report.json"), br#"{"ok": true}"#).unwrap();
    vec![
        OutputFile {
            name: "model.safetensors".into(),
            path: "model.safetensors".into(),
            kind: "model".into(),
            format: "safetensors".into(),
        },
        OutputFile {
            name: "report.json".into(),
            path: "report.json".into(),
            kind: "report".into(),
            format: "json".into(),
        },
    ]
}

async fn object_keys(artifacts: &ArtifactStore, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = artifacts
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn publishing_survives_store_faults_and_gives_up_cleanly_after_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let faults = Arc::new(Faults::default());
    let artifacts = local_artifacts(dir.path()).map_object_store(|inner| {
        Arc::new(FaultyStore {
            inner,
            faults: Arc::clone(&faults),
        })
    });
    let settings = WorkerSettings::with_defaults(dir.path()).unwrap();
    let ctx = WorkerContext::new(
        Arc::clone(&store),
        artifacts.clone(),
        store.hub().clone(),
        settings,
        SchedulerMetrics::default(),
    );
    let owner = "faulty-worker";
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "faults"), 0, 3).await;
    let prefix = format!("jobs/{}/", job.id);

    // Attempt 1: every completion fails, so publishing gives up after its tries.
    let first = claim(&store, owner).await;
    let work = dir.path().join("work-1");
    let outputs = write_outputs(&work);
    faults.completions_to_fail.store(u32::MAX, Ordering::SeqCst);
    let failed = publish(&ctx, &first, &work, &outputs).await;
    assert!(failed.is_err(), "{failed:?}");
    assert_eq!(
        faults.completions_tried.load(Ordering::SeqCst),
        PUBLISH_TRIES,
        "retried with backoff up to the budget"
    );
    let status = store
        .finish_attempt(
            &first,
            AttemptOutcome::Retry {
                error: JobError {
                    code: "publish_failed".into(),
                    message: format!("{}", failed.unwrap_err()),
                },
                backoff: Duration::ZERO,
            },
        )
        .await
        .unwrap();
    assert_eq!(status, JobStatus::Queued, "the failure is retryable");
    assert!(store.list_artifacts(job.id).await.unwrap().is_empty());
    assert!(object_keys(&artifacts, &prefix).await.is_empty());

    // Attempt 2: a part upload and then a completion fail once each; retries get through.
    faults.completions_to_fail.store(1, Ordering::SeqCst);
    faults.parts_to_fail.store(1, Ordering::SeqCst);
    let second = claim(&store, owner).await;
    assert_eq!(second.attempt, 2);
    let work = dir.path().join("work-2");
    let outputs = write_outputs(&work);
    let published = publish(&ctx, &second, &work, &outputs).await.unwrap();
    assert_eq!(published.len(), 2);
    let status = store
        .finish_attempt(
            &second,
            AttemptOutcome::Succeeded {
                result: serde_json::json!({"artifacts": published}),
            },
        )
        .await
        .unwrap();
    assert_eq!(status, JobStatus::Succeeded);
    let events = scheduler_support::all_events(&*store, job.id).await;
    assert_eq!(scheduler_support::terminal_count(&events), 1);

    // The sweeper leaves exactly the committed artifacts: one object each, nothing else on disk.
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(1);
    sweep(&artifacts, &["jobs/"], cutoff, |key| {
        let store = Arc::clone(&store);
        async move { is_referenced(&*store, &key).await }
    })
    .await
    .unwrap();
    let committed = store.list_artifacts(job.id).await.unwrap();
    let mut uris: Vec<String> = committed.iter().map(|a| a.uri.clone()).collect();
    uris.sort();
    assert_eq!(
        uris,
        vec![
            format!("{prefix}attempt-2/model.safetensors"),
            format!("{prefix}attempt-2/report.json"),
        ]
    );
    assert_eq!(object_keys(&artifacts, &prefix).await, uris);
    // Aborted uploads' staging files are removed in the background; give them a moment.
    let jobs_dir = dir.path().join("artifacts").join("jobs");
    let mut on_disk = files_under(&jobs_dir);
    for _ in 0..50 {
        if on_disk.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        on_disk = files_under(&jobs_dir);
    }
    assert_eq!(
        on_disk.len(),
        2,
        "no staging file or orphan left: {on_disk:?}"
    );
    let model = committed
        .iter()
        .find(|a| a.name == "model.safetensors")
        .unwrap();
    assert_eq!(model.bytes, 12 << 20);
}

/// A publish cut off half way: the first output is committed, the second never gets through. The
/// attempt fails as retryable; the next publishes both, its rows replace the first attempt's, and
/// the sweeper removes the first attempt's committed object, now referenced by nothing.
#[tokio::test]
async fn a_half_published_attempt_leaves_no_double_and_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let faults = Arc::new(Faults::default());
    let artifacts = local_artifacts(dir.path()).map_object_store(|inner| {
        Arc::new(FaultyStore {
            inner,
            faults: Arc::clone(&faults),
        })
    });
    let ctx = WorkerContext::new(
        Arc::clone(&store),
        artifacts.clone(),
        store.hub().clone(),
        WorkerSettings::with_defaults(dir.path()).unwrap(),
        SchedulerMetrics::default(),
    );
    let owner = "half-worker";
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "half"), 0, 3).await;
    let prefix = format!("jobs/{}/", job.id);

    // Attempt 1: the model's upload completes; the report's never does.
    faults.completions_to_pass.store(1, Ordering::SeqCst);
    faults.completions_to_fail.store(u32::MAX, Ordering::SeqCst);
    faults.puts_to_fail.store(u32::MAX, Ordering::SeqCst);
    let first = claim(&store, owner).await;
    let work = dir.path().join("work-1");
    let failed = publish(&ctx, &first, &work, &write_outputs(&work)).await;
    assert!(failed.is_err(), "{failed:?}");
    let half: Vec<String> = store
        .list_artifacts(job.id)
        .await
        .unwrap()
        .iter()
        .map(|a| a.uri.clone())
        .collect();
    assert_eq!(half, vec![format!("{prefix}attempt-1/model.safetensors")]);
    store
        .finish_attempt(
            &first,
            AttemptOutcome::Retry {
                error: JobError {
                    code: "publish_failed".into(),
                    message: "cut off".into(),
                },
                backoff: Duration::ZERO,
            },
        )
        .await
        .unwrap();

    // Attempt 2: no faults; both outputs published, each listed once.
    faults.completions_to_fail.store(0, Ordering::SeqCst);
    faults.puts_to_fail.store(0, Ordering::SeqCst);
    let second = claim(&store, owner).await;
    assert_eq!(second.attempt, 2);
    let work = dir.path().join("work-2");
    let published = publish(&ctx, &second, &work, &write_outputs(&work))
        .await
        .unwrap();
    store
        .finish_attempt(
            &second,
            AttemptOutcome::Succeeded {
                result: serde_json::json!({"metrics": {}, "acceptance_met": null, "artifacts": published}),
            },
        )
        .await
        .unwrap();
    let mut uris: Vec<String> = store
        .list_artifacts(job.id)
        .await
        .unwrap()
        .iter()
        .map(|a| a.uri.clone())
        .collect();
    uris.sort();
    let expected = vec![
        format!("{prefix}attempt-2/model.safetensors"),
        format!("{prefix}attempt-2/report.json"),
    ];
    assert_eq!(
        uris, expected,
        "each output once, from the attempt that succeeded"
    );
    // Before the sweep, the first attempt's model is still there, referenced by nothing.
    assert!(object_keys(&artifacts, &prefix)
        .await
        .contains(&format!("{prefix}attempt-1/model.safetensors")));
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(1);
    sweep(&artifacts, &["jobs/"], cutoff, |key| {
        let store = Arc::clone(&store);
        async move { is_referenced(&*store, &key).await }
    })
    .await
    .unwrap();
    assert_eq!(
        object_keys(&artifacts, &prefix).await,
        expected,
        "no orphan left"
    );
}
