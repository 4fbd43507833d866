//! The access part of the storage contract (API keys, audit log, tenant usage and tenant
//! filters), on SQLite and PostgreSQL.

use std::sync::Arc;

use compressd::clock::Clock;
use compressd::error::Error;
use compressd::store::{
    ApiKey, Artifact, AuditEntry, AuditFilter, Created, Idempotency, JobFilter, Page, Scope, Store,
    TenantUsage,
};

use crate::common::{self, clock, new_job, register_inputs};

fn api_key(clock: &dyn Clock, id: &str, tenant: &str) -> ApiKey {
    ApiKey {
        id: id.into(),
        tenant: tenant.into(),
        scopes: vec![Scope::Read, Scope::Write],
        secret_hash: "ab".repeat(32),
        created_at: clock.now(),
        revoked_at: None,
    }
}

async fn api_keys_round_trip_and_revoke(store: Arc<dyn Store>) {
    let clock = clock();
    let key = api_key(&*clock, "0123456789ab", "team-a");
    store.insert_api_key(&key).await.unwrap();
    assert!(matches!(
        store.insert_api_key(&key).await.unwrap_err(),
        Error::Conflict(_)
    ));
    assert_eq!(store.get_api_key(&key.id).await.unwrap(), Some(key.clone()));
    assert_eq!(store.get_api_key("ffffffffffff").await.unwrap(), None);
    let second = api_key(&*clock, "ba9876543210", "team-b");
    store.insert_api_key(&second).await.unwrap();
    let listed = store.list_api_keys().await.unwrap();
    assert_eq!(listed.len(), 2);
    let now = clock.now();
    let revoked = store.revoke_api_key(&key.id, now).await.unwrap();
    assert_eq!(revoked.revoked_at, Some(now));
    clock.advance(chrono::Duration::seconds(5));
    // Revoking again keeps the first time.
    let again = store.revoke_api_key(&key.id, clock.now()).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
    assert_eq!(
        store
            .get_api_key(&key.id)
            .await
            .unwrap()
            .unwrap()
            .revoked_at,
        revoked.revoked_at
    );
    assert!(matches!(
        store.revoke_api_key("nope", clock.now()).await.unwrap_err(),
        Error::NotFound { .. }
    ));
}

async fn audit_entries_page_per_tenant(store: Arc<dyn Store>) {
    let at = clock().now();
    for (i, tenant) in ["a", "b", "a", "a"].into_iter().enumerate() {
        let entry = AuditEntry {
            seq: 0,
            at,
            tenant: tenant.into(),
            key_id: Some(format!("key{i}")),
            method: "POST".into(),
            path: format!("/v1/jobs/{i}"),
            status: 201,
            request_id: None,
        };
        store.insert_audit(&entry).await.unwrap();
    }
    let page = |after, limit| AuditFilter {
        tenant: Some("a".into()),
        after,
        limit,
    };
    let first = store.list_audit(&page(None, 2)).await.unwrap();
    assert_eq!(
        first.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        ["/v1/jobs/0", "/v1/jobs/2"]
    );
    assert!(first[0].seq < first[1].seq);
    assert_eq!(first[0].at, at);
    let rest = store
        .list_audit(&page(Some(first[1].seq), 2))
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].key_id.as_deref(), Some("key3"));
    let all = store
        .list_audit(&AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 4);
}

async fn tenant_usage_counts_active_jobs_and_stored_bytes(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let inputs = store.get_model(model).await.unwrap().unwrap().bytes
        + store.get_dataset(dataset).await.unwrap().unwrap().bytes;
    let Created::New(job) = store
        .create_job(new_job(&*clock, model, dataset))
        .await
        .unwrap()
    else {
        panic!("new job")
    };
    store
        .insert_artifact(&Artifact {
            job_id: job.id,
            attempt: 0,
            name: "report.json".into(),
            kind: "report".into(),
            format: "json".into(),
            bytes: 10,
            sha256: "0".repeat(64),
            uri: "jobs/x/report.json".into(),
            created_at: clock.now(),
        })
        .await
        .unwrap();
    assert_eq!(
        store.tenant_usage("default").await.unwrap(),
        TenantUsage {
            active_jobs: 1,
            stored_bytes: inputs + 10
        }
    );
    assert_eq!(
        store.tenant_usage("nobody").await.unwrap(),
        TenantUsage::default()
    );
    store.request_cancel(job.id, clock.now()).await.unwrap();
    assert_eq!(store.tenant_usage("default").await.unwrap().active_jobs, 0);
}

/// Twelve creations at once against a quota of three active jobs: exactly three pass, the rest
/// are refused naming the quota; a replay of a stored idempotency key is still answered.
async fn the_active_job_quota_holds_under_concurrent_creation(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let mut creations = Vec::new();
    for n in 0..12 {
        let store = Arc::clone(&store);
        let mut job = new_job(&*clock, model, dataset);
        job.max_active_jobs = Some(3);
        job.idempotency = Some(Idempotency {
            key: format!("key-{n}"),
            request_hash: "h".into(),
        });
        creations.push(tokio::spawn(
            async move { (n, store.create_job(job).await) },
        ));
    }
    let mut created = Vec::new();
    for creation in creations {
        match creation.await.unwrap() {
            (n, Ok(Created::New(job))) => created.push((n, job)),
            (_, Err(Error::Quota { quota, limit, used })) => {
                assert_eq!((quota, limit, used), ("tenant_max_active_jobs", 3, 4));
            }
            (_, other) => panic!("{other:?}"),
        }
    }
    assert_eq!(created.len(), 3, "{created:?}");
    assert_eq!(store.tenant_usage("default").await.unwrap().active_jobs, 3);
    // At the quota, the same request again gets its job back rather than a refusal.
    let (n, first) = &created[0];
    let mut again = new_job(&*clock, model, dataset);
    again.max_active_jobs = Some(3);
    again.idempotency = Some(Idempotency {
        key: format!("key-{n}"),
        request_hash: "h".into(),
    });
    match store.create_job(again).await.unwrap() {
        Created::Existing(job) => assert_eq!(job.id, first.id),
        other => panic!("{other:?}"),
    }
    // Another tenant's quota is its own.
    let mut elsewhere = new_job(&*clock, model, dataset);
    elsewhere.max_active_jobs = Some(3);
    elsewhere.tenant = "other".into();
    let other = store.create_job(elsewhere).await;
    // The inputs are the default tenant's: refused for that, not for the quota.
    assert!(!matches!(other, Err(Error::Quota { .. })), "{other:?}");
    // A finished job frees its place.
    store.request_cancel(first.id, clock.now()).await.unwrap();
    let mut next = new_job(&*clock, model, dataset);
    next.max_active_jobs = Some(3);
    assert!(matches!(store.create_job(next).await, Ok(Created::New(_))));
}

async fn lists_and_idempotency_keys_are_per_tenant(store: Arc<dyn Store>) {
    let clock = clock();
    let (model, dataset) = register_inputs(&*store, &*clock).await;
    let (mut other_model, mut other_dataset) = (common::model(&*clock), common::dataset(&*clock));
    other_model.tenant = "other".into();
    other_dataset.tenant = "other".into();
    store.insert_model(&other_model).await.unwrap();
    store.insert_dataset(&other_dataset).await.unwrap();
    let keyed = |tenant: &str, model, dataset| {
        let mut job = new_job(&*clock, model, dataset);
        job.tenant = tenant.into();
        job.idempotency = Some(Idempotency {
            key: "same".into(),
            request_hash: "h".into(),
        });
        job
    };
    let Created::New(ours) = store
        .create_job(keyed("default", model, dataset))
        .await
        .unwrap()
    else {
        panic!("new job")
    };
    let Created::New(theirs) = store
        .create_job(keyed("other", other_model.id, other_dataset.id))
        .await
        .unwrap()
    else {
        panic!("the same key in another tenant is a new job")
    };
    assert_eq!(ours.idempotency_key.as_deref(), Some("same"));
    assert_eq!(theirs.tenant, "other");
    let Created::Existing(replayed) = store
        .create_job(keyed("other", other_model.id, other_dataset.id))
        .await
        .unwrap()
    else {
        panic!("a replay")
    };
    assert_eq!(replayed.id, theirs.id);

    let jobs = |tenant: Option<&str>| JobFilter {
        tenant: tenant.map(str::to_owned),
        limit: 10,
        ..JobFilter::default()
    };
    let listed = store.list_jobs(&jobs(Some("other"))).await.unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), [theirs.id]);
    assert_eq!(store.list_jobs(&jobs(None)).await.unwrap().len(), 2);
    let page = |tenant: &str| Page {
        tenant: Some(tenant.into()),
        after: None,
        limit: 10,
    };
    let models = store.list_models(page("default")).await.unwrap();
    assert_eq!(models.iter().map(|m| m.id).collect::<Vec<_>>(), [model]);
    assert_eq!(models[0].tenant, "default");
    let datasets = store.list_datasets(page("other")).await.unwrap();
    assert_eq!(
        datasets.iter().map(|d| d.id).collect::<Vec<_>>(),
        [other_dataset.id]
    );
}

/// Instantiates every test once per backend.
macro_rules! access_contract {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    let (store, _dir) = crate::common::sqlite_store().await;
                    super::$test(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $test() {
                    super::$test(crate::common::pg_store().await).await;
                }
            )*
        }
    };
}

access_contract!(
    api_keys_round_trip_and_revoke,
    audit_entries_page_per_tenant,
    tenant_usage_counts_active_jobs_and_stored_bytes,
    the_active_job_quota_holds_under_concurrent_creation,
    lists_and_idempotency_keys_are_per_tenant,
);
