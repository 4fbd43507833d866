//! The webhook part of the storage contract, on SQLite and PostgreSQL: subscriptions, the outbox
//! rows a job event writes (in its transaction), leased claims, fenced attempts and the log.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use compressd::clock::Clock;
use compressd::error::Error;
use compressd::store::{
    AttemptOutcome, Created, DeliveryAttempt, DeliveryFilter, DeliveryNext, DeliveryStatus, Job,
    Lease, Store, Webhook, WebhookDelivery,
};
use compressd_engine::spec::WebhookEvent;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::common::{clock, new_job, register_inputs};

const LONG_LEASE: Duration = Duration::from_secs(3600);

fn webhook(
    clock: &dyn Clock,
    tenant: &str,
    job_id: Option<Uuid>,
    events: &[WebhookEvent],
) -> Webhook {
    Webhook {
        id: clock.new_id(),
        tenant: tenant.into(),
        job_id,
        url: format!("https://hooks.example/{tenant}"),
        events: events.to_vec(),
        secret: compressd::webhooks::signing::new_secret(),
        created_at: clock.now(),
    }
}

/// A queued job of the default tenant with `own` webhooks (their job id filled in).
async fn job_with_webhooks(store: &dyn Store, own: Vec<Webhook>) -> Job {
    let clock = clock();
    let (model, dataset) = register_inputs(store, &*clock).await;
    let mut new = new_job(&*clock, model, dataset);
    new.webhooks = own
        .into_iter()
        .map(|w| Webhook {
            job_id: Some(new.id),
            ..w
        })
        .collect();
    let Created::New(job) = store.create_job(new).await.unwrap() else {
        panic!("a new job")
    };
    job
}

/// Claims the job and ends its attempt with `outcome`.
async fn run_job(store: &dyn Store, outcome: AttemptOutcome) -> Job {
    let job = store
        .claim_next("worker", LONG_LEASE)
        .await
        .unwrap()
        .unwrap();
    let lease = Lease {
        job_id: job.id,
        attempt: job.attempt,
        owner: "worker".into(),
    };
    store.finish_attempt(&lease, outcome).await.unwrap();
    job
}

fn succeeded() -> AttemptOutcome {
    AttemptOutcome::Succeeded {
        result: json!({"metrics": {}}),
    }
}

async fn all_deliveries(store: &dyn Store, tenant: &str) -> Vec<compressd::store::DeliveryLog> {
    store
        .list_webhook_deliveries(&DeliveryFilter {
            tenant: tenant.into(),
            limit: 100,
            ..DeliveryFilter::default()
        })
        .await
        .unwrap()
}

fn attempt_of(claimed: &WebhookDelivery, status_code: Option<i32>) -> DeliveryAttempt {
    DeliveryAttempt {
        delivery_id: claimed.id,
        attempt: claimed.attempts,
        started_at: Utc::now(),
        finished_at: Utc::now(),
        status_code,
        error: (status_code != Some(200)).then(|| "the target answered HTTP 500".into()),
    }
}

async fn webhooks_round_trip_and_delete(store: Arc<dyn Store>) {
    let clock = clock();
    let tenant_hook = webhook(&*clock, "team-a", None, &WebhookEvent::terminal());
    store.insert_webhook(&tenant_hook).await.unwrap();
    assert!(matches!(
        store.insert_webhook(&tenant_hook).await.unwrap_err(),
        Error::Conflict(_)
    ));
    assert_eq!(
        store.get_webhook(tenant_hook.id).await.unwrap(),
        Some(tenant_hook.clone())
    );
    assert_eq!(
        store.list_webhooks("team-a", None).await.unwrap(),
        std::slice::from_ref(&tenant_hook)
    );
    assert!(store
        .list_webhooks("team-b", None)
        .await
        .unwrap()
        .is_empty());
    // A job's own webhooks are stored with the job and listed by it, not with the tenant's.
    let own = webhook(&*clock, "default", None, &[WebhookEvent::JobStarted]);
    let job = job_with_webhooks(&*store, vec![own.clone()]).await;
    let listed = store.list_webhooks("default", Some(job.id)).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].job_id, &listed[0].events, &listed[0].secret),
        (Some(job.id), &own.events, &own.secret)
    );
    assert!(store
        .list_webhooks("default", None)
        .await
        .unwrap()
        .is_empty());

    store.delete_webhook(tenant_hook.id).await.unwrap();
    assert_eq!(store.get_webhook(tenant_hook.id).await.unwrap(), None);
    assert!(matches!(
        store.delete_webhook(tenant_hook.id).await.unwrap_err(),
        Error::NotFound {
            kind: "webhook",
            ..
        }
    ));
}

async fn job_events_write_deliveries_for_matching_webhooks(store: Arc<dyn Store>) {
    let clock = clock();
    // The tenant's webhook (terminal events), another tenant's, and the job's own two.
    let tenant_hook = webhook(&*clock, "default", None, &WebhookEvent::terminal());
    let foreign_hook = webhook(&*clock, "other", None, &WebhookEvent::ALL);
    store.insert_webhook(&tenant_hook).await.unwrap();
    store.insert_webhook(&foreign_hook).await.unwrap();
    let started_hook = webhook(&*clock, "default", None, &[WebhookEvent::JobStarted]);
    let failed_hook = webhook(&*clock, "default", None, &[WebhookEvent::JobFailed]);
    let job = job_with_webhooks(&*store, vec![started_hook.clone(), failed_hook]).await;
    // Queued: no subscribed event yet.
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 0);

    run_job(&*store, succeeded()).await;
    let logs = all_deliveries(&*store, "default").await;
    let sent: Vec<(&str, Uuid)> = logs
        .iter()
        .map(|l| (l.delivery.event_type.as_str(), l.delivery.webhook_id))
        .collect();
    let job_hooks = store.list_webhooks("default", Some(job.id)).await.unwrap();
    let started_id = job_hooks
        .iter()
        .find(|w| w.events == [WebhookEvent::JobStarted])
        .unwrap()
        .id;
    // job.started to the job's started hook; job.succeeded to the tenant's; nothing to the
    // failed-only hook or the other tenant's.
    assert_eq!(
        sent,
        [
            ("job.started", started_id),
            ("job.succeeded", tenant_hook.id)
        ]
    );
    assert!(all_deliveries(&*store, "other").await.is_empty());
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 2);

    // The job as the event left it, even when one statement claims and records (Postgres).
    let started: Value = serde_json::from_str(&logs[0].delivery.body).unwrap();
    assert_eq!(started["type"], "job.started");
    assert_eq!(started["data"]["status"], "running", "{started}");
    assert_eq!(started["data"]["event"]["worker"], "worker");
    let succeeded = &logs[1].delivery;
    assert_eq!(
        (succeeded.job_id, succeeded.status, succeeded.attempts),
        (job.id, DeliveryStatus::Pending, 0)
    );
    assert_eq!(
        (&succeeded.url, &succeeded.secret),
        (&tenant_hook.url, &tenant_hook.secret)
    );
    assert!(logs[0].attempts.is_empty() && logs[1].attempts.is_empty());
    let body: Value = serde_json::from_str(&succeeded.body).unwrap();
    assert_eq!(body["type"], "job.succeeded");
    assert_eq!(body["data"]["job_id"], job.id.to_string());
    assert_eq!(body["data"]["status"], "succeeded");
    assert_eq!(body["data"]["attempt"], 1);
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'), "{body}");
    let events = store.list_events(job.id, 0, 100).await.unwrap();
    let terminal = events.iter().find(|e| e.event_type == "succeeded").unwrap();
    assert_eq!(succeeded.event_seq, terminal.seq);
    assert_eq!(body["data"]["event_seq"], terminal.seq);

    // Deleting the job keeps its deliveries: they carry what they need.
    store.delete_job(job.id).await.unwrap();
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 2);
}

async fn claims_are_leased_and_attempts_fenced(store: Arc<dyn Store>) {
    let clock = clock();
    store
        .insert_webhook(&webhook(
            &*clock,
            "default",
            None,
            &WebhookEvent::terminal(),
        ))
        .await
        .unwrap();
    job_with_webhooks(&*store, Vec::new()).await;
    run_job(
        &*store,
        AttemptOutcome::Failed {
            error: compressd::store::JobError {
                code: "bad".into(),
                message: "no".into(),
            },
        },
    )
    .await;

    let first = store
        .claim_webhook_deliveries("loop-a", LONG_LEASE, 10)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].event_type, "job.failed");
    assert_eq!(
        (first[0].attempts, first[0].lease_owner.as_deref()),
        (1, Some("loop-a"))
    );
    // Claimed: no one else gets it while the lease holds.
    assert!(store
        .claim_webhook_deliveries("loop-b", LONG_LEASE, 10)
        .await
        .unwrap()
        .is_empty());
    // A failed attempt, retried at once.
    let retry = DeliveryNext::RetryAt(Utc::now() - chrono::Duration::seconds(1));
    assert!(store
        .record_webhook_attempt(&first[0], &attempt_of(&first[0], Some(500)), retry)
        .await
        .unwrap());
    // Loop B claims it with a lease that has passed at once: as if B died mid-attempt.
    let second = store
        .claim_webhook_deliveries("loop-b", Duration::ZERO, 10)
        .await
        .unwrap();
    assert_eq!((second[0].id, second[0].attempts), (first[0].id, 2));
    // Loop C reclaims it; B's late answer is refused and records nothing.
    let third = store
        .claim_webhook_deliveries("loop-c", LONG_LEASE, 10)
        .await
        .unwrap();
    assert_eq!(third[0].attempts, 3);
    assert!(!store
        .record_webhook_attempt(
            &second[0],
            &attempt_of(&second[0], Some(200)),
            DeliveryNext::Delivered
        )
        .await
        .unwrap());
    assert!(store
        .record_webhook_attempt(
            &third[0],
            &attempt_of(&third[0], Some(200)),
            DeliveryNext::Delivered
        )
        .await
        .unwrap());
    // Recorded twice is refused too (the claim ended).
    assert!(!store
        .record_webhook_attempt(
            &third[0],
            &attempt_of(&third[0], Some(200)),
            DeliveryNext::Delivered
        )
        .await
        .unwrap());

    let logs = all_deliveries(&*store, "default").await;
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].delivery.status, DeliveryStatus::Delivered);
    assert_eq!(logs[0].delivery.lease_owner, None);
    let attempts: Vec<(i32, Option<i32>)> = logs[0]
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status_code))
        .collect();
    assert_eq!(attempts, [(1, Some(500)), (3, Some(200))]);
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 0);
    assert!(store
        .claim_webhook_deliveries("loop-d", LONG_LEASE, 10)
        .await
        .unwrap()
        .is_empty());
}

async fn given_up_and_deleted_webhooks_leave_the_outbox(store: Arc<dyn Store>) {
    let clock = clock();
    let kept = webhook(&*clock, "default", None, &WebhookEvent::terminal());
    let deleted = webhook(&*clock, "default", None, &WebhookEvent::terminal());
    store.insert_webhook(&kept).await.unwrap();
    store.insert_webhook(&deleted).await.unwrap();
    let job = job_with_webhooks(&*store, Vec::new()).await;
    store.request_cancel(job.id, clock.now()).await.unwrap();
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 2);
    // Deleting a webhook drops its delivery not yet made.
    store.delete_webhook(deleted.id).await.unwrap();
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 1);
    let mut claimed = store
        .claim_webhook_deliveries("loop", LONG_LEASE, 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let kept_delivery = claimed.remove(0);
    assert_eq!(kept_delivery.webhook_id, kept.id);
    assert_eq!(kept_delivery.event_type, "job.cancelled");
    assert!(store
        .record_webhook_attempt(
            &kept_delivery,
            &attempt_of(&kept_delivery, None),
            DeliveryNext::GiveUp
        )
        .await
        .unwrap());
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 0);
    let logs = store
        .list_webhook_deliveries(&DeliveryFilter {
            tenant: "default".into(),
            webhook_id: Some(kept.id),
            limit: 10,
            ..DeliveryFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(logs.len(), 1);
    assert_eq!(logs[0].delivery.status, DeliveryStatus::Failed);
    assert_eq!(logs[0].attempts[0].status_code, None);
}

async fn concurrent_loops_never_claim_the_same_delivery(store: Arc<dyn Store>) {
    let clock = clock();
    for _ in 0..20 {
        store
            .insert_webhook(&webhook(
                &*clock,
                "default",
                None,
                &WebhookEvent::terminal(),
            ))
            .await
            .unwrap();
    }
    job_with_webhooks(&*store, Vec::new()).await;
    run_job(&*store, succeeded()).await;
    assert_eq!(store.count_pending_webhook_deliveries().await.unwrap(), 20);
    // Four loops (replicas) claim small batches at once until nothing is left.
    let loops = (0..4).map(|i| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let claimed = store
                    .claim_webhook_deliveries(&format!("loop-{i}"), LONG_LEASE, 3)
                    .await
                    .unwrap();
                if claimed.is_empty() {
                    return mine;
                }
                mine.extend(claimed.into_iter().map(|d| d.id));
            }
        })
    });
    let mut all: Vec<i64> = Vec::new();
    for claimed in futures::future::join_all(loops).await {
        all.extend(claimed.unwrap());
    }
    let claims = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        (claims, all.len()),
        (20, 20),
        "a delivery was claimed twice"
    );
}

/// Instantiates every test once per backend.
macro_rules! webhooks_contract {
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

webhooks_contract!(
    webhooks_round_trip_and_delete,
    job_events_write_deliveries_for_matching_webhooks,
    claims_are_leased_and_attempts_fenced,
    given_up_and_deleted_webhooks_leave_the_outbox,
    concurrent_loops_never_claim_the_same_delivery,
);
