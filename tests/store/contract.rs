//! The storage contract: every test runs against SQLite and PostgreSQL (see `contract!` at the end).

use crate::common;

use std::sync::Arc;

use compressd::clock::Clock;
use compressd::error::Error;
use compressd::store::{
    Artifact, Created, Idempotency, JobFilter, JobStatus, NewEvent, Page, Store, EVENT_QUEUED,
};
use serde_json::json;
use uuid::Uuid;

use common::{clock, new_job, register_inputs};

async fn create_job_round_trips(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let new = new_job(&*clock, model, dataset);
    let Created::New(job) = store.create_job(new.clone()).await.unwrap() else {
        panic!("a new job")
    };
    assert_eq!(job.id, new.id);
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.spec, new.spec);
    assert_eq!((job.model_id, job.dataset_id), (Some(model), Some(dataset)));
    assert_eq!(
        (job.attempt, job.max_attempts, job.priority),
        (0, new.max_attempts, 0)
    );
    assert_eq!(job.created_at, new.created_at);
    assert_eq!(job.run_after, new.created_at);
    assert!(job.lease_owner.is_none() && job.progress.is_none() && job.finished_at.is_none());
    assert_eq!(store.get_job(job.id).await.unwrap(), Some(job.clone()));
    let events = store.list_events(job.id, 0, 10).await.unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event_type, EVENT_QUEUED);
    assert!(events[0].seq > 0);
}

async fn unknown_jobs_are_none(store: Arc<dyn Store>) {
    assert_eq!(store.get_job(Uuid::now_v7()).await.unwrap(), None);
}

async fn a_job_needs_registered_inputs(store: Arc<dyn Store>) {
    let clock = clock();
    let err = store
        .create_job(new_job(&*clock, Uuid::now_v7(), Uuid::now_v7()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err:?}");
}

async fn idempotency_keys_dedupe_and_detect_reuse(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let keyed = |hash: &str| {
        let mut job = new_job(&*clock, model, dataset);
        job.idempotency = Some(Idempotency {
            key: "key-1".into(),
            request_hash: hash.into(),
        });
        job
    };
    let first = store.create_job(keyed("h1")).await.unwrap();
    let Created::New(first) = first else {
        panic!("first use creates")
    };
    let Created::Existing(again) = store.create_job(keyed("h1")).await.unwrap() else {
        panic!("replay returns the job")
    };
    assert_eq!(again.id, first.id);
    assert_eq!(again.idempotency_key.as_deref(), Some("key-1"));
    let err = store.create_job(keyed("h2")).await.unwrap_err();
    assert!(
        matches!(err, Error::IdempotencyConflict { ref key } if key == "key-1"),
        "{err:?}"
    );
    let all = store
        .list_jobs(&JobFilter {
            tenant: None,
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
}

async fn jobs_list_newest_first_with_a_cursor(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            store
                .create_job(new_job(&*clock, model, dataset))
                .await
                .unwrap()
                .job()
                .id,
        );
    }
    ids.reverse();
    let page = |after, limit| JobFilter {
        tenant: None,
        status: None,
        after,
        limit,
    };
    let first: Vec<Uuid> = store
        .list_jobs(&page(None, 2))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(first, ids[..2]);
    let second: Vec<Uuid> = store
        .list_jobs(&page(Some(ids[1]), 2))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(second, ids[2..4]);
    let last: Vec<Uuid> = store
        .list_jobs(&page(Some(ids[3]), 2))
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(last, ids[4..]);
    store.request_cancel(ids[2], clock.now()).await.unwrap();
    let cancelled = store
        .list_jobs(&JobFilter {
            tenant: None,
            status: Some(JobStatus::Cancelled),
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(
        cancelled.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![ids[2]]
    );
    let queued = store
        .list_jobs(&JobFilter {
            tenant: None,
            status: Some(JobStatus::Queued),
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(queued.len(), 4);
}

async fn list_limits_are_clamped(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap();
    let none_asked = store
        .list_jobs(&JobFilter {
            tenant: None,
            limit: 0,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        none_asked.len(),
        1,
        "a zero limit still returns a page of at least one"
    );
}

async fn cancelling_a_queued_job_finishes_it(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let id = store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap()
        .job()
        .id;
    let now = clock.now();
    let job = store.request_cancel(id, now).await.unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert_eq!(job.finished_at, Some(now));
    assert!(job.cancel_requested);
    let types: Vec<String> = store
        .list_events(id, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(types, vec!["queued", "cancelled"]);
    let err = store.request_cancel(id, clock.now()).await.unwrap_err();
    assert!(
        matches!(err, Error::JobState { ref status, .. } if status == "cancelled"),
        "{err:?}"
    );
    let err = store
        .request_cancel(Uuid::now_v7(), clock.now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFound { kind: "job", .. }),
        "{err:?}"
    );
}

async fn only_finished_jobs_are_deleted_with_their_rows(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let id = store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap()
        .job()
        .id;
    let err = store.delete_job(id).await.unwrap_err();
    assert!(
        matches!(err, Error::JobState { ref status, .. } if status == "queued"),
        "{err:?}"
    );
    store
        .insert_artifact(&artifact(&*clock, id, "report.json"))
        .await
        .unwrap();
    store.request_cancel(id, clock.now()).await.unwrap();
    let removed = store.delete_job(id).await.unwrap();
    assert_eq!(
        removed.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        vec!["report.json"]
    );
    assert_eq!(store.get_job(id).await.unwrap(), None);
    assert!(store.list_events(id, 0, 10).await.unwrap().is_empty());
    assert!(store.list_artifacts(id).await.unwrap().is_empty());
    assert!(matches!(
        store.delete_job(id).await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

async fn events_append_in_order_and_page(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let id = store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap()
        .job()
        .id;
    let mut seqs = Vec::new();
    for step in 0..3 {
        let event = NewEvent {
            job_id: id,
            attempt: 1,
            event_type: "progress".into(),
            payload: json!({"step": step}),
            created_at: clock.now(),
        };
        let stored = store.append_event(event.clone()).await.unwrap();
        assert_eq!(
            (
                stored.job_id,
                stored.attempt,
                &stored.payload,
                stored.created_at
            ),
            (id, 1, &event.payload, event.created_at)
        );
        seqs.push(stored.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let after_first = store.list_events(id, seqs[0], 10).await.unwrap();
    assert_eq!(
        after_first.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[1..]
    );
    assert_eq!(store.list_events(id, 0, 2).await.unwrap().len(), 2);
    let orphan = NewEvent {
        job_id: Uuid::now_v7(),
        attempt: 0,
        event_type: "x".into(),
        payload: json!({}),
        created_at: clock.now(),
    };
    assert!(matches!(
        store.append_event(orphan).await.unwrap_err(),
        Error::NotFound { kind: "job", .. }
    ));
}

async fn models_register_list_and_delete(store: Arc<dyn Store>) {
    let clock = clock();
    let first = common::model(&*clock);
    let second = common::model(&*clock);
    store.insert_model(&first).await.unwrap();
    store.insert_model(&second).await.unwrap();
    assert_eq!(
        store.get_model(first.id).await.unwrap(),
        Some(first.clone())
    );
    assert!(matches!(
        store.insert_model(&first).await.unwrap_err(),
        Error::Conflict(_)
    ));
    let listed = store
        .list_models(Page {
            tenant: None,
            after: None,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(listed, vec![second.clone(), first.clone()]);
    let after = store
        .list_models(Page {
            tenant: None,
            after: Some(second.id),
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(after, vec![first.clone()]);

    let dataset = common::dataset(&*clock);
    store.insert_dataset(&dataset).await.unwrap();
    let job = store
        .create_job(new_job(&*clock, first.id, dataset.id))
        .await
        .unwrap()
        .job()
        .id;
    assert!(
        matches!(
            store.delete_model(first.id).await.unwrap_err(),
            Error::Conflict(_)
        ),
        "a queued job uses it"
    );
    store.request_cancel(job, clock.now()).await.unwrap();
    store.delete_model(first.id).await.unwrap();
    assert_eq!(store.get_model(first.id).await.unwrap(), None);
    assert_eq!(
        store.get_job(job).await.unwrap().unwrap().model_id,
        None,
        "finished jobs keep their history"
    );
    assert!(matches!(
        store.delete_model(first.id).await.unwrap_err(),
        Error::NotFound { kind: "model", .. }
    ));
}

async fn datasets_register_list_and_delete(store: Arc<dyn Store>) {
    let clock = clock();
    let model = common::model(&*clock);
    let dataset = common::dataset(&*clock);
    store.insert_model(&model).await.unwrap();
    store.insert_dataset(&dataset).await.unwrap();
    assert_eq!(
        store.get_dataset(dataset.id).await.unwrap(),
        Some(dataset.clone())
    );
    assert!(matches!(
        store.insert_dataset(&dataset).await.unwrap_err(),
        Error::Conflict(_)
    ));
    assert_eq!(
        store
            .list_datasets(Page {
                tenant: None,
                after: None,
                limit: 10
            })
            .await
            .unwrap(),
        vec![dataset.clone()]
    );
    let job = store
        .create_job(new_job(&*clock, model.id, dataset.id))
        .await
        .unwrap()
        .job()
        .id;
    assert!(matches!(
        store.delete_dataset(dataset.id).await.unwrap_err(),
        Error::Conflict(_)
    ));
    store.request_cancel(job, clock.now()).await.unwrap();
    store.delete_dataset(dataset.id).await.unwrap();
    assert_eq!(store.get_dataset(dataset.id).await.unwrap(), None);
    assert!(matches!(
        store.delete_dataset(dataset.id).await.unwrap_err(),
        Error::NotFound {
            kind: "dataset",
            ..
        }
    ));
}

fn artifact(clock: &dyn Clock, job_id: Uuid, name: &str) -> Artifact {
    Artifact {
        job_id,
        attempt: 1,
        name: name.into(),
        kind: "report".into(),
        format: "json".into(),
        bytes: 10,
        sha256: "ef".repeat(32),
        uri: format!("jobs/{job_id}/{name}"),
        created_at: clock.now(),
    }
}

async fn artifacts_are_unique_per_job(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let id = store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap()
        .job()
        .id;
    let report = artifact(&*clock, id, "report.json");
    let weights = artifact(&*clock, id, "model.safetensors");
    store.insert_artifact(&report).await.unwrap();
    store.insert_artifact(&weights).await.unwrap();
    assert_eq!(
        store.list_artifacts(id).await.unwrap(),
        vec![weights, report.clone()]
    );
    assert!(matches!(
        store.insert_artifact(&report).await.unwrap_err(),
        Error::Conflict(_)
    ));
    let orphan = artifact(&*clock, Uuid::now_v7(), "x");
    assert!(matches!(
        store.insert_artifact(&orphan).await.unwrap_err(),
        Error::NotFound { kind: "job", .. }
    ));
}

async fn migrating_twice_is_harmless(store: Arc<dyn Store>) {
    store.migrate().await.unwrap();
    store.ping().await.unwrap();
}

/// Instantiates every contract test once per backend.
macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let (store, _dir) = crate::common::sqlite_store().await;
                    super::$test(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test(crate::common::pg_store().await).await;
                }
            )*
        }
    };
}

contract!(
    create_job_round_trips,
    unknown_jobs_are_none,
    a_job_needs_registered_inputs,
    idempotency_keys_dedupe_and_detect_reuse,
    jobs_list_newest_first_with_a_cursor,
    list_limits_are_clamped,
    cancelling_a_queued_job_finishes_it,
    only_finished_jobs_are_deleted_with_their_rows,
    events_append_in_order_and_page,
    models_register_list_and_delete,
    datasets_register_list_and_delete,
    artifacts_are_unique_per_job,
    migrating_twice_is_harmless,
);
