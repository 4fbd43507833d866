//! The worker side of the storage contract, on both backends: claim order, no double claims,
//! leases and fencing, retries and the attempt limit, the reaper, and notifications.

use crate::scheduler_support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use compressd::error::Error;
use compressd::events::Notice;
use compressd::store::{AttemptOutcome, JobError, JobProgress, JobStatus, Lease, Reaped};
use scheduler_support::{
    all_events, dry_run_spec, queue_job, seed_inputs, terminal_count, Inputs, SharedStore,
};
use serde_json::json;

const LONG: Duration = Duration::from_secs(60);

fn lease_of(job: &compressd::store::Job, owner: &str) -> Lease {
    Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: owner.into(),
    }
}

/// Whether a write was refused as coming from attempt 1's lost lease.
fn lost<T>(result: Result<T, Error>) -> bool {
    matches!(result, Err(Error::LeaseLost { attempt: 1, .. }))
}

fn crash() -> AttemptOutcome {
    AttemptOutcome::Retry {
        error: JobError {
            code: "child_killed".into(),
            message: "killed".into(),
        },
        backoff: Duration::ZERO,
    }
}

async fn claims_follow_priority_then_age(store: SharedStore, inputs: Inputs) {
    let low_old = queue_job(&*store, &inputs, dry_run_spec(&inputs, "low-old"), 0, 3).await;
    let high = queue_job(&*store, &inputs, dry_run_spec(&inputs, "high"), 5, 3).await;
    let low_new = queue_job(&*store, &inputs, dry_run_spec(&inputs, "low-new"), 0, 3).await;
    let order: Vec<_> = [
        store.claim_next("w", LONG).await.unwrap().unwrap(),
        store.claim_next("w", LONG).await.unwrap().unwrap(),
        store.claim_next("w", LONG).await.unwrap().unwrap(),
    ]
    .into_iter()
    .map(|j| j.id)
    .collect();
    assert_eq!(order, vec![high.id, low_old.id, low_new.id]);
    assert!(store.claim_next("w", LONG).await.unwrap().is_none());

    let job = store.get_job(high.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.attempt, job.lease_owner.as_deref()),
        (JobStatus::Running, 1, Some("w"))
    );
    assert!(job.lease_expires_at.is_some() && job.started_at.is_some());
    let events = all_events(&*store, high.id).await;
    let last = events.last().unwrap();
    assert_eq!((last.event_type.as_str(), last.attempt), ("status", 1));
    assert_eq!(last.payload["status"], "running");
}

async fn a_job_in_backoff_is_not_claimable(store: SharedStore, inputs: Inputs) {
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "backoff"), 0, 3).await;
    let claimed = store.claim_next("w", LONG).await.unwrap().unwrap();
    let outcome = AttemptOutcome::Retry {
        error: JobError {
            code: "child_killed".into(),
            message: "killed".into(),
        },
        backoff: Duration::from_secs(3600),
    };
    assert_eq!(
        store
            .finish_attempt(&lease_of(&claimed, "w"), outcome)
            .await
            .unwrap(),
        JobStatus::Queued
    );
    assert!(
        store.claim_next("w", LONG).await.unwrap().is_none(),
        "the job waits out its back-off"
    );
    let job = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!(
        (job.status, job.attempt, job.lease_owner),
        (JobStatus::Queued, 1, None)
    );
    assert_eq!(job.error.unwrap().code, "child_killed");
}

async fn concurrent_claims_never_take_the_same_job(store: SharedStore, inputs: Inputs) {
    let mut queued = HashSet::new();
    for i in 0..60 {
        queued.insert(
            queue_job(
                &*store,
                &inputs,
                dry_run_spec(&inputs, &format!("j{i}")),
                0,
                3,
            )
            .await
            .id,
        );
    }
    let mut claimers = Vec::new();
    for w in 0..8 {
        let store = Arc::clone(&store);
        claimers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(job) = store.claim_next(&format!("w{w}"), LONG).await.unwrap() {
                mine.push(job.id);
            }
            mine
        }));
    }
    let mut claimed = Vec::new();
    for claimer in claimers {
        claimed.extend(claimer.await.unwrap());
    }
    let unique: HashSet<_> = claimed.iter().copied().collect();
    assert_eq!(claimed.len(), unique.len(), "a job was claimed twice");
    assert_eq!(unique, queued);
}

async fn a_reclaimed_job_fences_its_old_worker(store: SharedStore, inputs: Inputs) {
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "fenced"), 0, 3).await;
    let first = store
        .claim_next("old", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let reaped = store.reap_expired(100, Duration::ZERO).await.unwrap();
    assert_eq!(
        reaped,
        vec![Reaped::Requeued {
            job_id: job.id,
            attempt: 1
        }]
    );
    let second = store.claim_next("new", LONG).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);

    let old = lease_of(&first, "old");
    assert_eq!(store.heartbeat(&old, LONG).await.unwrap(), None);
    assert!(lost(
        store
            .append_fenced_event(&old, "log", json!({"message": "zombie"}))
            .await
    ));
    assert!(lost(
        store.update_progress(&old, &JobProgress::default()).await
    ));
    assert!(lost(
        store
            .finish_attempt(
                &old,
                AttemptOutcome::Succeeded {
                    result: json!({"metrics": {}})
                }
            )
            .await
    ));
    // Same attempt number, other owner: still fenced.
    let impostor = Lease {
        owner: "old".into(),
        ..lease_of(&second, "new")
    };
    assert!(store.heartbeat(&impostor, LONG).await.unwrap().is_none());

    let new = lease_of(&second, "new");
    assert!(store.heartbeat(&new, LONG).await.unwrap().is_some());
    store
        .update_progress(
            &new,
            &JobProgress {
                fraction: 0.5,
                stages: 1,
                ..JobProgress::default()
            },
        )
        .await
        .unwrap();
    let status = store
        .finish_attempt(
            &new,
            AttemptOutcome::Succeeded {
                result: json!({"metrics": {}}),
            },
        )
        .await
        .unwrap();
    assert_eq!(status, JobStatus::Succeeded);
    assert!(lost(
        store.finish_attempt(&old, AttemptOutcome::Cancelled).await
    ));

    let events = all_events(&*store, job.id).await;
    assert_eq!(terminal_count(&events), 1);
    assert!(events
        .iter()
        .all(|e| e.payload.get("message") != Some(&json!("zombie"))));
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let job = store.get_job(job.id).await.unwrap().unwrap();
    assert_eq!((job.status, job.attempt), (JobStatus::Succeeded, 2));
    assert!(job.finished_at.is_some() && job.lease_owner.is_none());
}

async fn retries_stop_at_max_attempts(store: SharedStore, inputs: Inputs) {
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "retries"), 0, 2).await;
    let first = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(
        store
            .finish_attempt(&lease_of(&first, "w"), crash())
            .await
            .unwrap(),
        JobStatus::Queued
    );
    let second = store.claim_next("w", LONG).await.unwrap().unwrap();
    assert_eq!(second.attempt, 2);
    assert_eq!(
        store
            .finish_attempt(&lease_of(&second, "w"), crash())
            .await
            .unwrap(),
        JobStatus::Failed
    );
    let job = store.get_job(job.id).await.unwrap().unwrap();
    let error = job.error.unwrap();
    assert_eq!(error.code, "child_killed");
    assert!(
        error.message.starts_with("gave up after 2 attempts"),
        "{}",
        error.message
    );
    assert_eq!(terminal_count(&all_events(&*store, job.id).await), 1);
}

async fn bad_input_fails_without_retry(store: SharedStore, inputs: Inputs) {
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "bad"), 0, 3).await;
    let claimed = store.claim_next("w", LONG).await.unwrap().unwrap();
    let error = JobError {
        code: "invalid_input".into(),
        message: "no such file".into(),
    };
    let status = store
        .finish_attempt(&lease_of(&claimed, "w"), AttemptOutcome::Failed { error })
        .await
        .unwrap();
    assert_eq!(status, JobStatus::Failed);
    assert_eq!(store.get_job(job.id).await.unwrap().unwrap().attempt, 1);
}

async fn cancel_reaches_the_worker_and_the_reaper(store: SharedStore, inputs: Inputs) {
    // A running job: the heartbeat reports the request; the worker records the cancel.
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "cancel"), 0, 3).await;
    let claimed = store.claim_next("w", LONG).await.unwrap().unwrap();
    let lease = lease_of(&claimed, "w");
    assert!(
        !store
            .heartbeat(&lease, LONG)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
    store
        .request_cancel(job.id, chrono::Utc::now())
        .await
        .unwrap();
    assert!(
        store
            .heartbeat(&lease, LONG)
            .await
            .unwrap()
            .unwrap()
            .cancel_requested
    );
    assert_eq!(
        store
            .finish_attempt(&lease, AttemptOutcome::Cancelled)
            .await
            .unwrap(),
        JobStatus::Cancelled
    );
    assert!(matches!(
        store.request_cancel(job.id, chrono::Utc::now()).await,
        Err(Error::JobState { .. })
    ));

    // A job whose worker died after the cancel request: the reaper cancels it, not requeues it.
    let orphan = queue_job(&*store, &inputs, dry_run_spec(&inputs, "orphan"), 0, 3).await;
    store
        .claim_next("dead", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    store
        .request_cancel(orphan.id, chrono::Utc::now())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.reap_expired(100, Duration::ZERO).await.unwrap(),
        vec![Reaped::Cancelled { job_id: orphan.id }]
    );

    // A lost worker on the last attempt: failed for good.
    let last = queue_job(&*store, &inputs, dry_run_spec(&inputs, "last"), 0, 1).await;
    store
        .claim_next("dead", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.reap_expired(100, Duration::ZERO).await.unwrap(),
        vec![Reaped::Failed {
            job_id: last.id,
            attempt: 1
        }]
    );
    assert_eq!(
        store
            .get_job(last.id)
            .await
            .unwrap()
            .unwrap()
            .error
            .unwrap()
            .code,
        "lease_expired"
    );
    let counts = store.count_jobs_by_status().await.unwrap();
    assert!(
        counts.contains(&(JobStatus::Failed, 1)) && counts.contains(&(JobStatus::Cancelled, 2)),
        "{counts:?}"
    );
}

async fn commits_reach_the_hub(store: SharedStore, inputs: Inputs) {
    let mut notices = store.hub().subscribe();
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "hub"), 0, 3).await;
    let claimed = store.claim_next("w", LONG).await.unwrap().unwrap();
    let event = store
        .append_fenced_event(&lease_of(&claimed, "w"), "log", json!({"message": "hi"}))
        .await
        .unwrap();
    store
        .request_cancel(job.id, chrono::Utc::now())
        .await
        .unwrap();
    let (mut queued, mut heard_event, mut cancel) = (false, false, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(queued && heard_event && cancel) {
        let notice = tokio::time::timeout_at(deadline, notices.recv())
            .await
            .expect("notices arrive")
            .unwrap();
        match notice {
            Notice::Queued => queued = true,
            Notice::Event { job_id, seq } if job_id == job.id && seq == event.seq => {
                heard_event = true
            }
            Notice::CancelRequested { job_id } if job_id == job.id => cancel = true,
            _ => {}
        }
    }
}

/// Artifact commits are fenced; a later attempt replaces what an earlier one (that died while
/// publishing) left under the same name, and the same attempt cannot commit a name twice.
async fn artifact_commits_are_fenced_and_later_attempts_replace(
    store: SharedStore,
    inputs: Inputs,
) {
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "artifacts"), 0, 3).await;
    let first = store
        .claim_next("one", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let artifact = |lease: &Lease, sha: &str| compressd::store::Artifact {
        job_id: lease.job_id,
        attempt: lease.attempt,
        name: "model/model.safetensors".into(),
        kind: "model".into(),
        format: "safetensors".into(),
        bytes: 3,
        sha256: sha.repeat(64),
        uri: format!(
            "jobs/{}/attempt-{}/model/model.safetensors",
            lease.job_id, lease.attempt
        ),
        created_at: chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 6),
    };
    let one = lease_of(&first, "one");
    store
        .commit_artifact(&one, &artifact(&one, "a"))
        .await
        .unwrap();
    assert!(matches!(
        store.commit_artifact(&one, &artifact(&one, "a")).await,
        Err(Error::Conflict(_))
    ));
    tokio::time::sleep(Duration::from_millis(20)).await;
    store.reap_expired(100, Duration::ZERO).await.unwrap();
    let second = store.claim_next("two", LONG).await.unwrap().unwrap();
    assert!(lost(
        store.commit_artifact(&one, &artifact(&one, "c")).await
    ));
    let two = lease_of(&second, "two");
    store
        .commit_artifact(&two, &artifact(&two, "b"))
        .await
        .unwrap();
    let listed = store.list_artifacts(job.id).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].attempt, &listed[0].sha256), (2, &"b".repeat(64)));
}

/// Runs one contract check on a fresh SQLite file and, when Postgres is available, a fresh
/// Postgres database.
macro_rules! on_both_backends {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::backends::sqlite(dir.path()).await;
                    let inputs = super::seed_inputs(&*store, dir.path()).await;
                    super::$check(store, inputs).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $check() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::backends::postgres().await;
                    let inputs = super::seed_inputs(&*store, dir.path()).await;
                    super::$check(store, inputs).await;
                }
            )*
        }
    };
}

on_both_backends!(
    claims_follow_priority_then_age,
    a_job_in_backoff_is_not_claimable,
    concurrent_claims_never_take_the_same_job,
    a_reclaimed_job_fences_its_old_worker,
    retries_stop_at_max_attempts,
    bad_input_fails_without_retry,
    cancel_reaches_the_worker_and_the_reaper,
    commits_reach_the_hub,
    artifact_commits_are_fenced_and_later_attempts_replace,
);

mod backends {
    pub use crate::scheduler_support::backends::*;
}
