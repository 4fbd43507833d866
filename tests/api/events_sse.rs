//! `GET /v1/jobs/{id}/events` over a real socket: replay, live follow, reconnect with
//! `Last-Event-ID`, the end after the terminal event, keep-alives, JSON pages, slow clients and
//! bad input. On Postgres the API has its own store (its own connections and `LISTEN`), as if it
//! were another process than the one writing the events.

use crate::scheduler_support;

use std::sync::Arc;
use std::time::Duration;

use compressd::api::metrics::Metrics;
use compressd::api::{ApiConfig, AppState};
use compressd::artifacts::ArtifactStore;
use compressd::clock::SystemClock;
use compressd::settings::Settings;
use compressd::store::{AttemptOutcome, Lease};
use figment::providers::Serialized;
use scheduler_support::sse::SseReader;
use scheduler_support::{all_events, dry_run_spec, queue_job, seed_inputs, SharedStore};
use serde_json::json;
use tokio::sync::oneshot;

/// An API server on a free port.
struct Api {
    base: String,
    state: AppState,
    _stop: oneshot::Sender<()>,
}

async fn start_api(
    store: SharedStore,
    dir: &std::path::Path,
    tweak: impl FnOnce(&mut ApiConfig),
) -> Api {
    let figment = Settings::figment(None)
        .unwrap()
        .merge(Serialized::default("data_dir", dir));
    let settings = Settings::from_figment(figment).unwrap();
    let mut config = ApiConfig::from_settings(&settings);
    tweak(&mut config);
    let state = AppState {
        store,
        artifacts: ArtifactStore::from_settings(&settings).unwrap(),
        clock: Arc::new(SystemClock),
        metrics: Arc::new(Metrics::new()),
        config,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    tokio::spawn(compressd::server::serve(
        listener,
        state.clone(),
        shutdown,
        Duration::from_secs(1),
    ));
    Api {
        base,
        state,
        _stop: stop,
    }
}

async fn open_stream(api: &Api, job: uuid::Uuid, last_event_id: Option<i64>) -> reqwest::Response {
    let mut request = reqwest::Client::new()
        .get(format!("{}/v1/jobs/{job}/events", api.base))
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id.to_string());
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    response
}

async fn log(writer: &SharedStore, lease: &Lease, n: usize) {
    writer
        .append_fenced_event(
            lease,
            "log",
            json!({"level": "info", "message": format!("line {n}")}),
        )
        .await
        .unwrap();
}

/// `writer` records the job's events; `reader` serves the API (on Postgres, another store).
async fn reconnect_sees_every_event_once_in_order(
    writer: SharedStore,
    reader: SharedStore,
    dir: &std::path::Path,
) {
    let inputs = seed_inputs(&*writer, dir).await;
    let job = queue_job(&*writer, &inputs, dry_run_spec(&inputs, "sse"), 0, 3).await;
    let claimed = writer
        .claim_next("w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let lease = Lease {
        job_id: job.id,
        attempt: claimed.attempt,
        owner: "w".into(),
    };
    for n in 1..=3 {
        log(&writer, &lease, n).await;
    }
    let api = start_api(reader, dir, |_| {}).await;

    // First connection: the replay (queued, status, 3 logs), then one live event.
    let mut first = SseReader::new(open_stream(&api, job.id, None).await);
    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(first.next().await.unwrap());
    }
    log(&writer, &lease, 4).await;
    seen.push(
        tokio::time::timeout(Duration::from_secs(10), first.next())
            .await
            .expect("live event")
            .unwrap(),
    );
    drop(first);

    // Events written while the client is away, then a reconnect from the last id it saw.
    for n in 5..=8 {
        log(&writer, &lease, n).await;
    }
    let last_id = seen.last().unwrap().id.unwrap();
    let second = SseReader::new(open_stream(&api, job.id, Some(last_id)).await);
    log(&writer, &lease, 9).await;
    writer
        .finish_attempt(
            &lease,
            AttemptOutcome::Succeeded {
                result: json!({"metrics": {}}),
            },
        )
        .await
        .unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(10), second.rest())
        .await
        .expect("the stream ends after the terminal event");
    seen.extend(rest);

    let stored = all_events(&*writer, job.id).await;
    let seen_ids: Vec<i64> = seen.iter().map(|f| f.id.unwrap()).collect();
    let stored_ids: Vec<i64> = stored.iter().map(|e| e.seq).collect();
    assert_eq!(seen_ids, stored_ids, "every event exactly once, in order");
    let kinds: Vec<_> = seen.iter().map(|f| f.event.clone().unwrap()).collect();
    assert_eq!(kinds.first().map(String::as_str), Some("queued"));
    assert_eq!(kinds.last().map(String::as_str), Some("succeeded"));
    assert_eq!(seen[2].data["payload"]["message"], "line 1");
    assert_eq!(seen[2].data["seq"], seen_ids[2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reconnect_sees_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    reconnect_sees_every_event_once_in_order(Arc::clone(&store), store, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_reconnect_through_another_api_process_sees_every_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let url = scheduler_support::backends::postgres_url().await;
    let writer = scheduler_support::backends::postgres_at(&url).await;
    let reader = scheduler_support::backends::postgres_at(&url).await;
    reconnect_sees_every_event_once_in_order(writer, reader, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_jobs_are_404_and_bad_resume_points_400() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "bad"), 0, 3).await;
    let api = start_api(store, dir.path(), |_| {}).await;
    let client = reqwest::Client::new();
    let get = |path: String, header: Option<(&'static str, &'static str)>| {
        let mut request = client
            .get(format!("{}{path}", api.base))
            .header("accept", "text/event-stream");
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        request.send()
    };
    let unknown = get(format!("/v1/jobs/{}/events", uuid::Uuid::now_v7()), None)
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert_eq!(
        unknown.json::<serde_json::Value>().await.unwrap()["type"],
        "urn:compressd:problem:job-not-found"
    );
    for (path, header) in [
        (
            format!("/v1/jobs/{}/events", job.id),
            Some(("last-event-id", "abc")),
        ),
        (
            format!("/v1/jobs/{}/events", job.id),
            Some(("last-event-id", "-4")),
        ),
        (format!("/v1/jobs/{}/events?after=x", job.id), None),
        // Found by schemathesis: a valid resume header must not hide an out-of-range `after`.
        (
            format!("/v1/jobs/{}/events?after=15619647304331446272", job.id),
            Some(("last-event-id", "320")),
        ),
        (format!("/v1/jobs/{}/events?bogus=1", job.id), None),
        ("/v1/jobs/not-a-uuid/events".to_owned(), None),
    ] {
        let response = get(path.clone(), header).await.unwrap();
        assert_eq!(response.status(), 400, "{path} {header:?}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_pages_and_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "pages"), 0, 3).await;
    let claimed = store
        .claim_next("w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let lease = Lease {
        job_id: job.id,
        attempt: claimed.attempt,
        owner: "w".into(),
    };
    log(&store, &lease, 1).await;
    let api = start_api(Arc::clone(&store), dir.path(), |c| {
        c.events.keepalive = Duration::from_millis(100)
    })
    .await;

    let url = format!("{}/v1/jobs/{}/events", api.base, job.id);
    let page: serde_json::Value = reqwest::get(format!("{url}?limit=2"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(
        (events[0]["type"].as_str(), events[1]["type"].as_str()),
        (Some("queued"), Some("status"))
    );
    let next = page["next"].as_i64().expect("a full page has a cursor");
    let page: serde_json::Value = reqwest::get(format!("{url}?after={next}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], serde_json::Value::Null);

    // An idle stream carries keep-alive comments.
    let mut body = open_stream(&api, job.id, Some(i64::MAX / 2)).await;
    let mut text = String::new();
    while !text.lines().any(|l| l.starts_with(':')) {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.chunk())
            .await
            .expect("a keep-alive")
            .unwrap()
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_is_dropped_and_can_resume() {
    let dir = tempfile::tempdir().unwrap();
    let store = scheduler_support::backends::sqlite(dir.path()).await;
    let inputs = seed_inputs(&*store, dir.path()).await;
    let job = queue_job(&*store, &inputs, dry_run_spec(&inputs, "slow"), 0, 3).await;
    let claimed = store
        .claim_next("w", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let lease = Lease {
        job_id: job.id,
        attempt: claimed.attempt,
        owner: "w".into(),
    };
    let api = start_api(Arc::clone(&store), dir.path(), |c| {
        c.events.limits.buffer = 4;
        c.events.limits.slow_client_timeout = Duration::from_millis(300);
    })
    .await;
    let metrics = api.state.metrics.scheduler.clone();

    let stuck = open_stream(&api, job.id, None).await; // never read
                                                       // Enough data to fill the socket buffers on both ends and then the stream's own buffer.
    let filler = "x".repeat(4096);
    for n in 0..3000 {
        store
            .append_fenced_event(
                &lease,
                "log",
                json!({"level": "info", "message": filler, "n": n}),
            )
            .await
            .unwrap();
        if metrics.dropped_streams() > 0 {
            break;
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while metrics.dropped_streams() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck stream was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(stuck);

    // The client comes back and gets everything, from the start.
    store
        .finish_attempt(
            &lease,
            AttemptOutcome::Succeeded {
                result: json!({"metrics": {}}),
            },
        )
        .await
        .unwrap();
    let frames = SseReader::new(open_stream(&api, job.id, Some(0)).await)
        .rest()
        .await;
    let stored: Vec<i64> = all_events(&*store, job.id)
        .await
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(
        frames.iter().map(|f| f.id.unwrap()).collect::<Vec<_>>(),
        stored
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metrics.active_streams() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams still counted as open: {}",
            metrics.active_streams()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
