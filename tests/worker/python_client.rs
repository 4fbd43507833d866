//! The Python client generated from `openapi.yaml` by `openapi-python-client`, used as a platform
//! team would: against a real `compressd serve` with API keys, it creates a job, follows it to
//! its end and downloads its model, whose sha256 must be the listed one. A document the generator
//! cannot turn into a working client fails here.
//!
//! Needs Python with `openapi-python-client` (`COMPRESSD_INTEROP_PYTHON`; its `bin/` holds the
//! generator); `.ci/run` installs it and runs this test:
//! `COMPRESSD_INTEROP_PYTHON=$HOME/.cache/compressd-pyenv/bin/python cargo test --test worker -- --ignored python_client::`

use crate::served::{create_key, serve};
use crate::tiny_task;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

const SCRIPT: &str = r#"
import hashlib, json, sys, time
import httpx

config = json.load(open(sys.argv[1]))
sys.path.insert(0, config["client_parent"])
from compressd_client import AuthenticatedClient
from compressd_client.api.jobs import create_job, get_job
from compressd_client.api.artifacts import list_artifacts, download_artifact
from compressd_client.models.job_spec import JobSpec

# Registration uploads are multipart; the generated client is for the JSON API, so plain httpx.
auth = {"Authorization": f"Bearer {config['key']}"}
files = [("file", (name, open(path, "rb").read())) for name, path in config["model_files"]]
model = httpx.post(config["url"] + "/v1/models", data={"name": "tiny"}, files=files, headers=auth).json()
data = [("file", ("data.jsonl", open(config["dataset_file"], "rb").read()))]
dataset = httpx.post(config["url"] + "/v1/datasets", files=data, headers=auth).json()

client = AuthenticatedClient(base_url=config["url"], token=config["key"], timeout=httpx.Timeout(60.0))
spec = dict(config["spec"], model=model["id"])
spec["task"] = dict(spec["task"], dataset=dataset["id"])
job = create_job.sync(client=client, body=JobSpec.from_dict(spec))
assert job is not None and hasattr(job, "id"), f"create_job answered {job!r}"
seen = []
deadline = time.time() + 300
while True:
    view = get_job.sync(id=job.id, client=client).to_dict()
    if not seen or seen[-1] != view["status"]:
        seen.append(view["status"])
    if view["status"] in ("succeeded", "failed", "cancelled"):
        break
    if time.time() > deadline:
        sys.exit(f"the job is still {view['status']}")
    time.sleep(0.25)

listing = list_artifacts.sync(id=job.id, client=client)
model_file = next(a for a in listing.artifacts if a.name == "model/model.safetensors")
download = download_artifact.sync_detailed(id=job.id, name=model_file.name, client=client)
print(json.dumps({
    "job": str(job.id),
    "statuses": seen,
    "artifacts": [a.name for a in listing.artifacts],
    "download_status": int(download.status_code),
    "downloaded_sha256": hashlib.sha256(download.content).hexdigest(),
    "listed_sha256": model_file.sha256,
}))
"#;

fn interop_python() -> Option<PathBuf> {
    std::env::var_os("COMPRESSD_INTEROP_PYTHON").map(PathBuf::from)
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("a UTF-8 path").to_owned()
}

#[test]
#[ignore = "needs openapi-python-client: COMPRESSD_INTEROP_PYTHON=$HOME/.cache/compressd-pyenv/bin/python cargo test --test worker -- --ignored python_client::"]
fn the_generated_python_client_creates_follows_and_downloads_a_job() {
    let python = interop_python().expect("set COMPRESSD_INTEROP_PYTHON");
    let bin = python
        .parent()
        .expect("the venv's bin folder")
        .to_path_buf();
    let work = tempfile::tempdir().unwrap();

    // Generate the client from the document in the repository, as a user would.
    let document = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.yaml");
    let client_dir = work.path().join("compressd_client");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let generated = Command::new(bin.join("openapi-python-client"))
        .args(["generate", "--meta", "none", "--path"])
        .arg(&document)
        .arg("--output-path")
        .arg(&client_dir)
        .env("PATH", &path)
        .output()
        .expect("run openapi-python-client");
    let log = String::from_utf8_lossy(&generated.stdout).into_owned()
        + &String::from_utf8_lossy(&generated.stderr);
    assert!(generated.status.success(), "generation failed:\n{log}");
    assert!(client_dir.join("api/jobs/create_job.py").is_file(), "{log}");

    let data_dir = work.path().join("data");
    let key = create_key(&data_dir);
    let server = serve(&data_dir);
    let inputs = work.path().join("inputs");
    let model_dir = inputs.join("model");
    tiny_task::write_model(&model_dir).unwrap();
    let data = inputs.join("data.jsonl");
    tiny_task::write_data(&data).unwrap();
    let model_files: Vec<(String, String)> = ["config.json", "model.safetensors", "tokenizer.json"]
        .iter()
        .map(|f| (f.to_string(), path_text(&model_dir.join(f))))
        .collect();
    let spec = json!({
        "name": "python-client",
        "model": "", "task": {"type": "text_classification", "dataset": ""},
        "pipeline": [
            {"type": "finetune", "epochs": 1, "learning_rate": 0.003, "batch_size": 16},
            {"type": "quantize", "scheme": "int8"}
        ]
    });
    let config = json!({
        "url": server.url, "key": key, "client_parent": path_text(work.path()),
        "model_files": model_files, "dataset_file": path_text(&data), "spec": spec,
    });
    let config_path = work.path().join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = Command::new(&python)
        .args(["-c", SCRIPT])
        .arg(&config_path)
        .output()
        .expect("run the client script");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the client script failed:\n{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON from the script ({e}):\n{stdout}\n{stderr}"));
    eprintln!("the Python client saw: {seen:#}");

    assert_eq!(
        seen["statuses"].as_array().unwrap().last().unwrap(),
        "succeeded",
        "{seen:#}"
    );
    assert_eq!(seen["download_status"], 200, "{seen:#}");
    assert_eq!(seen["downloaded_sha256"], seen["listed_sha256"], "{seen:#}");
    let artifacts: Vec<&str> = seen["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(artifacts.contains(&"report.json"), "{artifacts:?}");
}
