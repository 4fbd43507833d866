//! The disk filling during a stage: the job's checkpoint file is made to point at `/dev/full`
//! (every write to it fails with ENOSPC, as on a full disk) before a real `compressd worker`
//! runs it. The job fails once, for good, with an error that says the disk is full and names the
//! file; the worker goes on to run the next job to success. In a real pipeline whose second stage
//! hits the full disk, the first stage's model is kept as artifacts, whole.

use crate::scheduler_support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use compressd::store::JobStatus;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, terminal_count};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_the_job_naming_the_path_and_the_worker_runs_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let database_url = scheduler_support::backends::postgres_url().await;
    let store = scheduler_support::backends::postgres_at(&database_url).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    // Higher priority: claimed first.
    let full = queue_job(&*store, &inputs, dry_run_spec(&inputs, "full"), 10, 3).await;
    let next = queue_job(&*store, &inputs, dry_run_spec(&inputs, "next"), 0, 3).await;
    let work = dir.path().join("work").join(full.id.to_string());
    std::fs::create_dir_all(&work).unwrap();
    let checkpoint = work.join("dry_run.checkpoint");
    std::os::unix::fs::symlink("/dev/full", &checkpoint).unwrap();

    let mut worker = Command::new(env!("CARGO_BIN_EXE_compressd"))
        .arg("worker")
        .env("COMPRESSD_DATABASE_URL", &database_url)
        .env("COMPRESSD_DATA_DIR", dir.path())
        .env("COMPRESSD_WORKER_CONCURRENCY", "1")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env("COMPRESSD_WORKER_RETRY_BACKOFF_SECS", "0")
        .env("COMPRESSD_TEST_DRY_RUN_SLEEP_MS", "500")
        .env("COMPRESSD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = store.get_job(full.id).await.unwrap().unwrap();
        let b = store.get_job(next.id).await.unwrap().unwrap();
        if a.status.is_finished() && b.status.is_finished() {
            break;
        }
        assert!(Instant::now() < deadline, "timed out: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.kill().unwrap();
    worker.wait().unwrap();

    let failed = store.get_job(full.id).await.unwrap().unwrap();
    assert_eq!((failed.status, failed.attempt), (JobStatus::Failed, 1));
    let error = failed.error.expect("a reason");
    assert_eq!(error.code, "disk_full", "{error:?}");
    assert!(
        error.message.contains("disk is full")
            && error.message.contains(&checkpoint.display().to_string()),
        "{}",
        error.message
    );
    assert_eq!(terminal_count(&all_events(&*store, full.id).await), 1);

    let served = store.get_job(next.id).await.unwrap().unwrap();
    assert_eq!(served.status, JobStatus::Succeeded, "{:?}", served.error);
    assert_eq!(terminal_count(&all_events(&*store, next.id).await), 1);
}

/// The disk filling in a pipeline's second stage of a real job: the job fails naming the file,
/// and the first stage's model, already made, is kept as artifacts that download whole, instead
/// of being removed with the work folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_in_a_later_stage_keeps_the_earlier_stages_models() {
    use crate::api_models_support;
    use crate::mlflow::upload_tiny_inputs;
    use crate::pipeline::{download, wait_until_finished};
    use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
    use serde_json::json;
    use sha2::{Digest, Sha256};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;

    let server = api_models_support::start(&[]).await;
    let inputs = tempfile::tempdir().unwrap();
    let (model, dataset) = upload_tiny_inputs(&server, inputs.path()).await;
    let spec = json!({
        "name": "fills-the-disk",
        "model": model["id"], "task": {"type": "text_classification", "dataset": dataset["id"]},
        "pipeline": [
            {"type": "finetune", "epochs": 1, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "scheme": "int8"}
        ]
    });
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();

    let mut settings = WorkerSettings::with_defaults(server.dir.path()).unwrap();
    settings.executable = env!("CARGO_BIN_EXE_compressd").into();
    settings.poll_interval = Duration::from_millis(200);
    // The second stage's record, written once its model is saved, lands on a full disk.
    let second_stage = settings
        .work_dir
        .join(&job_id)
        .join("stages")
        .join("1-quantize");
    std::fs::create_dir_all(&second_stage).unwrap();
    let full_file = second_stage.join("stage.json");
    std::os::unix::fs::symlink("/dev/full", &full_file).unwrap();

    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&server.state.store),
        server.state.artifacts.clone(),
        settings,
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));
    let job = wait_until_finished(&server, &job_id, Duration::from_secs(300)).await;
    shutdown.cancel();
    worker.await.unwrap();

    assert_eq!(job["status"], "failed", "{job:#}");
    assert_eq!(job["attempt"], 1, "a full disk is not retried: {job:#}");
    assert_eq!(job["error"]["code"], "disk_full", "{job:#}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("disk is full") && message.contains(&full_file.display().to_string()),
        "{message}"
    );
    assert!(message.contains("stages/0-finetune"), "{message}");

    let (status, listing) = server.get(&format!("/v1/jobs/{job_id}/artifacts")).await;
    assert_eq!(status, 200, "{listing}");
    let artifacts = listing["artifacts"].as_array().unwrap();
    let names: Vec<&str> = artifacts
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    for expected in [
        "stages/0-finetune/model.safetensors",
        "stages/0-finetune/config.json",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    assert!(
        !names.iter().any(|n| n.starts_with("stages/1-quantize")),
        "the unfinished stage is not published: {names:?}"
    );
    for artifact in artifacts {
        let name = artifact["name"].as_str().unwrap();
        let bytes = download(&server, &job_id, name).await;
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            artifact["sha256"].as_str().unwrap(),
            "{name}"
        );
    }
    let weights = download(&server, &job_id, "stages/0-finetune/model.safetensors").await;
    // Whole: the header's length prefix and JSON index, and every tensor's bytes within the file.
    let header_len = usize::try_from(u64::from_le_bytes(weights[..8].try_into().unwrap())).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
    let body = weights.len() - 8 - header_len;
    let tensors: Vec<_> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .collect();
    assert!(tensors.len() > 4, "{} tensors", tensors.len());
    for (name, tensor) in tensors {
        let end = tensor["data_offsets"][1].as_u64().unwrap();
        assert!(end as usize <= body, "{name} ends at {end}, past {body}");
    }
    let id = uuid::Uuid::parse_str(&job_id).unwrap();
    let terminal = server.state.store.list_events(id, 0, 1000).await.unwrap();
    assert_eq!(scheduler_support::terminal_count(&terminal), 1);

    // Each kept file is one object, listed once; after the sweeper nothing else is left.
    let store = Arc::clone(&server.state.store);
    let cutoff = chrono::Utc::now() + chrono::Duration::seconds(1);
    compressd::artifacts::sweep::sweep(&server.state.artifacts, &["jobs/"], cutoff, |key| {
        let store = Arc::clone(&store);
        async move { compressd::artifacts::sweep::is_referenced(&*store, &key).await }
    })
    .await
    .unwrap();
    let mut rows: Vec<String> = store
        .list_artifacts(id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.uri)
        .collect();
    rows.sort();
    let mut objects: Vec<String> = server
        .state
        .artifacts
        .list(&format!("jobs/{id}/"))
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    objects.sort();
    assert_eq!(objects, rows, "no orphan and no double");
    assert_eq!(rows.len(), artifacts.len());
}
