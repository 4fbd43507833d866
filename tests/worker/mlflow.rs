//! MLflow tracking: a job is an MLflow run, read back with MLflow's own Python client from a real
//! `mlflow server` the test starts; MLflow being down never fails a job; a user's tracking URI is
//! held to the URL policy at submission.
//!
//! The run against a real server needs `mlflow` in the interop Python (`.ci/run` installs it):
//! `COMPRESSD_INTEROP_PYTHON=$HOME/.cache/compressd-pyenv/bin/python cargo test --test worker -- --ignored mlflow::`

use crate::api_models_support::{self, Server};
use crate::scheduler_support::{dry_run_spec, queue_job, seed_inputs};
use crate::tiny_task;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::net_guard::UrlPolicy;
use compressd::scheduler::{SchedulerMetrics, WorkerSettings};
use compressd::tracking::run::{Ending, JobIdentity, RunTracker};
use compressd::tracking::{Target, TrackingDefaults};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// A `mlflow server` on a free loopback port, its process group killed on drop.
struct MlflowServer {
    child: Child,
    uri: String,
    _dir: tempfile::TempDir,
}

impl MlflowServer {
    fn start(python: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = std::fs::File::create(dir.path().join("mlflow.log")).unwrap();
        let mut command = Command::new(python);
        command
            .args([
                "-m",
                "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--workers",
                "1",
            ])
            .args(["--port", &port.to_string()])
            .arg("--backend-store-uri")
            .arg(format!(
                "sqlite:///{}",
                dir.path().join("mlflow.db").display()
            ))
            .arg("--artifacts-destination")
            .arg(dir.path().join("artifacts"))
            .stdout(Stdio::null())
            .stderr(log);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("start mlflow server");
        let server = Self {
            child,
            uri: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        server.wait_until_healthy();
        server
    }

    fn wait_until_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let health = format!("{}/health", self.uri);
        loop {
            if http_probe::blocking_get_ok(&health) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mlflow server not healthy after 120 s: {}",
                std::fs::read_to_string(self._dir.path().join("mlflow.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

impl Drop for MlflowServer {
    fn drop(&mut self) {
        // The server runs its workers as children: end the whole group it leads.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = self.child.wait();
    }
}

/// A tiny HTTP GET without an async runtime (the health poll runs before the server's).
mod http_probe {
    use std::io::{Read, Write};

    pub fn blocking_get_ok(url: &str) -> bool {
        let rest = url.trim_start_matches("http://");
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let Ok(mut stream) = std::net::TcpStream::connect(authority) else {
            return false;
        };
        let request = format!("GET /{path} HTTP/1.0\r\nHost: {authority}\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200")
    }
}

fn interop_python() -> PathBuf {
    std::env::var_os("COMPRESSD_INTEROP_PYTHON")
        .map(PathBuf::from)
        .expect("set COMPRESSD_INTEROP_PYTHON to a Python with mlflow (see the module docs)")
}

/// What MLflow's own client says about the runs tagged with `job_id` in `experiment`.
fn read_back(python: &Path, uri: &str, experiment: &str, job_id: &str, out: &Path) -> Value {
    let script = r#"
import hashlib, json, os, sys
import mlflow
from mlflow.tracking import MlflowClient
uri, experiment, job_id, out = sys.argv[1:5]
mlflow.set_tracking_uri(uri)
client = MlflowClient(tracking_uri=uri)
exp = client.get_experiment_by_name(experiment)
runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`compressd.job_id` = '{job_id}'")
def walk(run_id, path):
    files = []
    for item in client.list_artifacts(run_id, path):
        files.extend(walk(run_id, item.path) if item.is_dir else [item.path])
    return files
result = []
for run in runs:
    rid = run.info.run_id
    history = {key: [[m.step, m.value] for m in client.get_metric_history(rid, key)]
               for key in run.data.metrics}
    artifacts = walk(rid, None)
    local = client.download_artifacts(rid, "model/model.safetensors", out) \
        if "model/model.safetensors" in artifacts else None
    versions = []
    for v in client.search_model_versions(f"run_id = '{rid}'"):
        # What a user does with a registered version: download it by its models:/ URI.
        folder = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{v.name}/{v.version}", dst_path=os.path.join(out, f"v{v.version}"))
        weights = os.path.join(folder, "model.safetensors")
        digest = hashlib.sha256(open(weights, "rb").read()).hexdigest() if os.path.exists(weights) else None
        versions.append({"name": v.name, "version": v.version, "source": v.source,
                         "files": sorted(os.listdir(folder)), "sha256": digest})
    result.append({"status": run.info.status, "params": run.data.params, "tags": run.data.tags,
                   "history": history, "artifacts": artifacts, "model": local,
                   "versions": versions})
print(json.dumps(result))
"#;
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .args([uri, experiment, job_id])
        .arg(out)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "MLflow's client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Writes the tiny BERT and its keyword dataset under `dir` and uploads both; returns their records.
pub(crate) async fn upload_tiny_inputs(server: &Server, dir: &Path) -> (Value, Value) {
    let model_dir = dir.join("model");
    tiny_task::write_model(&model_dir).unwrap();
    let data = dir.join("data.jsonl");
    tiny_task::write_data(&data).unwrap();
    let files: Vec<(&str, PathBuf)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .into_iter()
        .map(|f| (f, model_dir.join(f)))
        .collect();
    let (status, model) = server
        .upload("/v1/models", &[("name", "tiny")], &files)
        .await;
    assert_eq!(status, 201, "{model}");
    let (status, dataset) = server
        .upload("/v1/datasets", &[], &[("data.jsonl", data)])
        .await;
    assert_eq!(status, 201, "{dataset}");
    (model, dataset)
}

fn worker_settings(server: &Server, tracking: TrackingDefaults) -> WorkerSettings {
    let mut settings = WorkerSettings::with_defaults(server.dir.path()).unwrap();
    settings.executable = env!("CARGO_BIN_EXE_compressd").into();
    settings.poll_interval = Duration::from_millis(200);
    settings.tracking = tracking;
    settings
}

async fn wait_until_finished(server: &Server, job_id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, job) = server.get(&format!("/v1/jobs/{job_id}")).await;
        if ["succeeded", "failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            return job;
        }
        assert!(Instant::now() < deadline, "job unfinished: {job:#}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs mlflow: COMPRESSD_INTEROP_PYTHON=$HOME/.cache/compressd-pyenv/bin/python cargo test --test worker -- --ignored mlflow::"]
async fn a_job_is_an_mlflow_run_with_its_params_metric_steps_and_artifacts() {
    let python = interop_python();
    let mlflow = MlflowServer::start(&python);
    // The job names its own tracking server, a loopback one the operator allowed.
    let server =
        api_models_support::start(&[("allowed_private_networks", json!(["127.0.0.1"]))]).await;
    let inputs = tempfile::tempdir().unwrap();
    let (model, dataset) = upload_tiny_inputs(&server, inputs.path()).await;
    let spec = json!({
        "name": "tracked",
        "model": model["id"], "task": {"type": "text_classification", "dataset": dataset["id"]},
        "pipeline": [
            {"type": "finetune", "epochs": 2, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.2},
        "mlflow": {
            "tracking_uri": mlflow.uri,
            "experiment": "compressd-test",
            "registered_model": "tiny-classifier"
        }
    });
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let job_id = job["id"].as_str().unwrap().to_owned();

    let tracking = TrackingDefaults {
        policy: UrlPolicy::new(&["127.0.0.1".into()]),
        ..TrackingDefaults::default()
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&server.state.store),
        server.state.artifacts.clone(),
        worker_settings(&server, tracking),
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));
    let job = wait_until_finished(&server, &job_id, Duration::from_secs(300)).await;
    assert_eq!(job["status"], "succeeded", "{job:#}");
    // Stopping the worker waits for its attempt, which ends the run after recording the job.
    shutdown.cancel();
    worker.await.unwrap();

    let downloads = tempfile::tempdir().unwrap();
    let runs = read_back(
        &python,
        &mlflow.uri,
        "compressd-test",
        &job_id,
        downloads.path(),
    );
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "one run per job: {runs:#?}");
    let run = &runs[0];
    assert_eq!(run["status"], "FINISHED", "{run:#}");

    // The spec as params, flattened.
    assert_eq!(run["params"]["name"], "tracked");
    assert_eq!(run["params"]["pipeline.0.type"], "finetune");
    assert_eq!(run["params"]["pipeline.0.epochs"], "2");
    assert_eq!(run["params"]["pipeline.1.scheme"], "int8");
    assert_eq!(run["params"]["mlflow.experiment"], "compressd-test");

    // Every metric event of the job, with its step.
    let id = uuid::Uuid::parse_str(&job_id).unwrap();
    let events = server.state.store.list_events(id, 0, 10_000).await.unwrap();
    let logged: Vec<(String, u64, f64)> = events
        .iter()
        .filter(|e| e.event_type == "metric")
        .map(|e| {
            (
                e.payload["name"].as_str().unwrap().to_owned(),
                e.payload["step"].as_u64().unwrap_or(0),
                e.payload["value"].as_f64().unwrap(),
            )
        })
        .collect();
    assert!(
        logged
            .iter()
            .filter(|(name, ..)| name == "train.loss")
            .count()
            >= 2,
        "the tiny fine-tune logs its loss at several steps: {logged:?}"
    );
    for (name, step, value) in &logged {
        let history = run["history"][name]
            .as_array()
            .unwrap_or_else(|| panic!("{name} not in MLflow: {:#}", run["history"]));
        assert!(
            history.iter().any(|point| point[0].as_u64() == Some(*step)
                && (point[1].as_f64().unwrap() - value).abs() <= 1e-9 * value.abs().max(1.0)),
            "{name} at step {step} = {value} not in {history:?}"
        );
    }
    let steps: Vec<u64> = run["history"]["train.loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert!(
        steps.windows(2).all(|w| w[0] < w[1]) && steps[0] > 0,
        "{steps:?}"
    );

    // Stage results and the verdict.
    for key in [
        "stage.0-finetune.wall_seconds",
        "stage.1-quantize.wall_seconds",
        "final.accuracy",
        "best.size_on_disk_bytes",
        "1-quantize.accuracy",
    ] {
        assert!(
            run["history"][key].is_array(),
            "{key} missing: {:#}",
            run["history"]
        );
    }
    let tags = &run["tags"];
    assert_eq!(tags["compressd.job_id"], job_id.as_str());
    assert_eq!(tags["compressd.attempt"], "1");
    assert_eq!(tags["compressd.status"], "succeeded");
    assert_eq!(tags["compressd.final"], "1-quantize");
    assert_eq!(
        tags["compressd.acceptance_met"],
        job["result"]["acceptance_met"].to_string().as_str()
    );
    // The fine-tune is the reference the contract is measured against, so only the quantize has a verdict.
    assert!(
        tags["stage.1-quantize.acceptance_met"].is_string(),
        "{tags:#}"
    );

    // The spec, the report and the final model as artifacts; the model is the job's, byte for byte.
    let artifacts: Vec<&str> = run["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    for expected in [
        "spec.json",
        "report.json",
        "report.md",
        "model/model.safetensors",
        "model/config.json",
    ] {
        assert!(
            artifacts.contains(&expected),
            "{expected} not in {artifacts:?}"
        );
    }
    let listed = job["result"]["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "model/model.safetensors")
        .unwrap()
        .clone();
    let local = std::fs::read(run["model"].as_str().unwrap()).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&local)),
        listed["sha256"].as_str().unwrap()
    );

    // The contract held, so the final model is version 1 of the registered model, and MLflow's
    // client downloads it by `models:/tiny-classifier/1`, byte for byte the job's.
    assert_eq!(job["result"]["acceptance_met"], true, "{job:#}");
    let versions = run["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1, "{versions:#?}");
    assert_eq!(versions[0]["name"], "tiny-classifier");
    assert_eq!(versions[0]["version"], "1");
    assert_eq!(
        versions[0]["sha256"].as_str(),
        listed["sha256"].as_str(),
        "{versions:#?}"
    );
    assert!(
        versions[0]["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "config.json"),
        "{versions:#?}"
    );
    assert_eq!(
        tags["compressd.registered_model_version"],
        "tiny-classifier/1"
    );

    // A job whose attempts are retried stays one run: the second attempt continues the first's
    // run, tags its number, and ends it with the job (here: failed).
    let retried = uuid::Uuid::now_v7();
    let target = Target {
        uri: mlflow.uri.clone(),
        experiment: "compressd-test".into(),
        users: false,
    };
    for (attempt, status) in [(1, "queued"), (2, "failed")] {
        let tracker = RunTracker::start(
            target.clone(),
            &TrackingDefaults::default(),
            JobIdentity {
                id: retried,
                name: "retried".into(),
                attempt,
                spec: json!({"name": "retried", "seed": 7}),
            },
        );
        tracker.observe(&compressd::scheduler::protocol::ChildMessage::Metric {
            name: "train.loss".into(),
            value: f64::from(attempt),
            step: Some(u64::try_from(attempt).unwrap() * 10),
        });
        tracker
            .finish(Ending {
                job_status: status.into(),
                result: None,
                error: (status == "failed").then(|| "the data ran out".to_owned()),
                work_dir: PathBuf::new(),
            })
            .await;
    }
    let runs = read_back(
        &python,
        &mlflow.uri,
        "compressd-test",
        &retried.to_string(),
        downloads.path(),
    );
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:#?}");
    assert_eq!(runs[0]["status"], "FAILED");
    assert_eq!(runs[0]["tags"]["compressd.attempt"], "2");
    assert_eq!(runs[0]["tags"]["compressd.error"], "the data ran out");
    assert_eq!(runs[0]["params"]["seed"], "7");
    assert_eq!(
        runs[0]["history"]["train.loss"],
        json!([[10, 1.0], [20, 2.0]])
    );

    // A job whose worker died on its last attempt is failed by the reaper, which ends its run.
    let store = Arc::clone(&server.state.store);
    let seeded = tempfile::tempdir().unwrap();
    let inputs = seed_inputs(&*store, seeded.path()).await;
    let mut spec = dry_run_spec(&inputs, "orphaned");
    spec["mlflow"] = json!({"tracking_uri": mlflow.uri, "experiment": "compressd-test"});
    let orphaned = queue_job(&*store, &inputs, spec.clone(), 0, 1).await;
    let claimed = store
        .claim_next("a-worker-that-dies", Duration::ZERO)
        .await
        .unwrap()
        .expect("the job is claimed");
    assert_eq!(claimed.id, orphaned.id);
    // Its worker had started the run, then died: the run is left RUNNING.
    let tracker = RunTracker::start(
        target.clone(),
        &TrackingDefaults::default(),
        JobIdentity {
            id: orphaned.id,
            name: "orphaned".into(),
            attempt: 1,
            spec,
        },
    );
    tracker
        .finish(Ending {
            job_status: "running".into(),
            result: None,
            error: None,
            work_dir: PathBuf::new(),
        })
        .await;
    let runs = read_back(
        &python,
        &mlflow.uri,
        "compressd-test",
        &orphaned.id.to_string(),
        downloads.path(),
    );
    assert_eq!(runs[0]["status"], "RUNNING", "{runs:#}");
    let tracking = TrackingDefaults {
        policy: UrlPolicy::new(&["127.0.0.1".into()]),
        ..TrackingDefaults::default()
    };
    let ctx = compressd::scheduler::WorkerContext::new(
        Arc::clone(&store),
        server.state.artifacts.clone(),
        store.hub().clone(),
        worker_settings(&server, tracking),
        SchedulerMetrics::default(),
    );
    let reaped = compressd::scheduler::reaper::reap_once(&ctx).await;
    assert_eq!(
        reaped,
        [compressd::store::Reaped::Failed {
            job_id: orphaned.id,
            attempt: 1
        }]
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let run = loop {
        let runs = read_back(
            &python,
            &mlflow.uri,
            "compressd-test",
            &orphaned.id.to_string(),
            downloads.path(),
        );
        let run = runs[0].clone();
        if run["status"] != "RUNNING" {
            break run;
        }
        assert!(Instant::now() < deadline, "the run was not ended: {run:#}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(run["status"], "FAILED", "{run:#}");
    assert_eq!(run["tags"]["compressd.status"], "failed", "{run:#}");
    assert!(
        run["tags"]["compressd.error"].is_string(),
        "the reaper's reason: {run:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_mlflow_never_fails_or_holds_up_a_job() {
    let server = api_models_support::start(&[]).await;
    let store: &dyn compressd::store::Store = server.state.store.as_ref();
    let inputs = seed_inputs(store, server.dir.path()).await;
    let job = queue_job(store, &inputs, dry_run_spec(&inputs, "untracked"), 0, 3).await;
    // Nothing listens there: every MLflow call fails at once.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tracking = TrackingDefaults {
        tracking_uri: Some(format!("http://127.0.0.1:{closed_port}")),
        finish_timeout: Duration::from_secs(2),
        ..TrackingDefaults::default()
    };
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(compressd::scheduler::run(
        Arc::clone(&server.state.store),
        server.state.artifacts.clone(),
        worker_settings(&server, tracking),
        SchedulerMetrics::default(),
        shutdown.clone(),
    ));
    let finished = wait_until_finished(&server, &job.id.to_string(), Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "succeeded", "{finished:#}");
    assert_eq!(
        finished["attempt"], 1,
        "no retry because of MLflow: {finished:#}"
    );
    let stopping = Instant::now();
    shutdown.cancel();
    worker.await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(10),
        "the run's end is given up after the finish timeout: {:?}",
        stopping.elapsed()
    );
}

#[tokio::test]
async fn a_jobs_own_tracking_uri_must_pass_the_url_policy() {
    let server = api_models_support::start(&[]).await;
    let inputs = tempfile::tempdir().unwrap();
    let (model, dataset) = upload_tiny_inputs(&server, inputs.path()).await;
    let spec = |uri: &str| {
        json!({
            "name": "tracked",
            "model": model["id"], "task": {"type": "text_classification", "dataset": dataset["id"]},
            "pipeline": [{"type": "finetune", "epochs": 1}],
            "dry_run": true,
            "mlflow": {"tracking_uri": uri}
        })
    };
    for uri in [
        "http://127.0.0.1:5000",
        "http://169.254.169.254/",
        "ftp://mlflow.example/",
        "http://user:pw@8.8.8.8/",
    ] {
        let (status, problem) = server.post_json("/v1/jobs", &spec(uri)).await;
        assert_eq!(status, 422, "{uri}: {problem}");
        assert_eq!(problem["pointer"], "/mlflow/tracking_uri", "{problem}");
    }
    // Names MLflow would refuse are refused at submission, naming the field.
    for (mlflow, pointer) in [
        (json!({"experiment": ""}), "/mlflow/experiment"),
        (
            json!({"registered_model": "bad\u{0007}name"}),
            "/mlflow/registered_model",
        ),
    ] {
        let (status, problem) = server
            .post_json(
                "/v1/jobs",
                &json!({
                    "name": "tracked",
                    "model": model["id"], "task": {"type": "text_classification", "dataset": dataset["id"]},
                    "pipeline": [{"type": "finetune", "epochs": 1}],
                    "mlflow": mlflow
                }),
            )
            .await;
        assert_eq!(status, 422, "{problem}");
        assert_eq!(problem["pointer"], pointer, "{problem}");
    }
    // A public address passes (nothing is contacted at submission beyond resolving the name).
    let (status, job) = server
        .post_json("/v1/jobs", &spec("https://8.8.8.8/"))
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["spec"]["mlflow"]["tracking_uri"], "https://8.8.8.8/");
}
