//! The fenced artifact commit: only the attempt that holds the job's lease can record an
//! artifact, so a reclaimed or cancelled attempt never leaves a visible half-artifact.

use crate::api_models_support as support;

use std::time::Duration;

use chrono::Utc;
use compressd::error::Error;
use compressd::store::{Artifact, Dataset, Lease, Model};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn only_the_lease_holder_commits_artifacts() {
    let server = support::start(&[]).await;
    let store = &server.state.store;
    let now = Utc::now();
    let model = Model {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "m".into(),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri: "models/x/".into(),
        bytes: 1,
        sha256: "0".into(),
        metadata: json!({}),
        created_at: now,
    };
    let dataset = Dataset {
        tenant: "default".into(),
        id: Uuid::now_v7(),
        name: "d".into(),
        format: "jsonl".into(),
        uri: "datasets/x".into(),
        bytes: 1,
        sha256: "0".into(),
        rows: 2,
        metadata: json!({}),
        created_at: now,
    };
    store.insert_model(&model).await.unwrap();
    store.insert_dataset(&dataset).await.unwrap();
    let spec = json!({"name": "j", "model": model.id, "pipeline": [{"type": "finetune"}],
        "task": {"type": "text_classification", "dataset": dataset.id}});
    let (status, job) = server.post_json("/v1/jobs", &spec).await;
    assert_eq!(status, 201, "{job}");
    let job = store
        .claim_next("worker-a", Duration::from_secs(60))
        .await
        .unwrap()
        .expect("claimed");
    let artifact = |name: &str| Artifact {
        job_id: job.id,
        attempt: job.attempt,
        name: name.into(),
        kind: "report".into(),
        format: "json".into(),
        bytes: 2,
        sha256: "ab".into(),
        uri: format!("jobs/{}/attempt-1/{name}", job.id),
        created_at: now,
    };
    let holder = Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: "worker-a".into(),
    };
    store
        .commit_artifact(&holder, &artifact("report.json"))
        .await
        .unwrap();
    assert!(matches!(
        store
            .commit_artifact(&holder, &artifact("report.json"))
            .await,
        Err(Error::Conflict(_))
    ));

    let stranger = Lease {
        owner: "worker-b".into(),
        ..holder.clone()
    };
    assert!(matches!(
        store.commit_artifact(&stranger, &artifact("x.json")).await,
        Err(Error::LeaseLost { .. })
    ));
    let old_attempt = Lease {
        attempt: job.attempt + 1,
        ..holder.clone()
    };
    assert!(matches!(
        store
            .commit_artifact(&old_attempt, &artifact("y.json"))
            .await,
        Err(Error::LeaseLost { .. })
    ));
    let names: Vec<String> = store
        .list_artifacts(job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["report.json".to_owned()]);
}
