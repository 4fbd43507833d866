//! JSON logs: every line a worker writes while it runs a job carries the job's id (in the
//! `job.attempt` span's fields), so `jq 'select(.span.job_id == "…" or any(.spans[]?; .job_id == "…"))'`
//! finds a job's whole story in a worker's log.

use crate::scheduler_support;
use crate::tiny_jobs::{real_spec, seed_tiny_inputs};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use scheduler_support::queue_job;
use serde_json::Value;

/// The job id a JSON log line carries, from its event fields or any span it is in.
fn job_id_of(line: &Value) -> Option<&str> {
    line["fields"]["job_id"]
        .as_str()
        .or_else(|| line["span"]["job_id"].as_str())
        .or_else(|| {
            line["spans"]
                .as_array()?
                .iter()
                .find_map(|span| span["job_id"].as_str())
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_log_line_of_a_job_carries_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_tiny_inputs(&*store, dir.path()).await;
    let mut jobs = Vec::new();
    for name in ["first", "second"] {
        jobs.push(
            queue_job(&*store, &inputs, real_spec(&inputs, name, 2), 0, 1)
                .await
                .id,
        );
    }
    let log = dir.path().join("worker.log");
    let mut worker = Command::new(env!("CARGO_BIN_EXE_compressd"))
        .arg("worker")
        .env("COMPRESSD_DATA_DIR", dir.path())
        .env("COMPRESSD_WORKER_CONCURRENCY", "1")
        .env("COMPRESSD_WORKER_POLL_INTERVAL_SECS", "0.2")
        .env(
            "COMPRESSD_LOG",
            "compressd=debug,job=debug,engine=debug,info",
        )
        .env("COMPRESSD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("the compressd binary starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &jobs {
        loop {
            let job = store.get_job(*id).await.unwrap().unwrap();
            if job.status.is_finished() {
                assert_eq!(job.status.as_str(), "succeeded", "{:?}", job.error);
                break;
            }
            assert!(Instant::now() < deadline, "job {id} still {:?}", job.status);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    worker.kill().unwrap();
    worker.wait().unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let mut child_lines = 0;
    for id in &jobs {
        let id = id.to_string();
        let of_attempt = |line: &Value, message: &str| {
            line["fields"]["message"] == message && job_id_of(line) == Some(id.as_str())
        };
        let start = lines
            .iter()
            .position(|l| of_attempt(l, "attempt started"))
            .unwrap_or_else(|| panic!("no start of {id}:\n{text}"));
        let end = lines
            .iter()
            .position(|l| of_attempt(l, "attempt finished"))
            .unwrap_or_else(|| panic!("no end of {id}:\n{text}"));
        // One job at a time: everything the worker wrote meanwhile was about this job.
        for line in &lines[start..=end] {
            assert_eq!(job_id_of(line), Some(id.as_str()), "{line}");
            if line["target"] == "job.child" {
                child_lines += 1;
                // The child's record is forwarded flat, not as a JSON string inside a message.
                assert!(
                    !line["fields"]["message"].as_str().unwrap().starts_with('{'),
                    "{line}"
                );
            }
        }
    }
    assert!(
        child_lines >= 2,
        "the job processes' own lines are in the worker's log:\n{text}"
    );
}
