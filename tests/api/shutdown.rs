//! SIGTERM to a real `compressd serve` process while an upload is streaming in and an event
//! stream is open: the server stops taking connections at once, lets the upload finish (stored
//! whole), ends the event stream, and exits cleanly within `shutdown_grace_secs`.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use compressd::clock::SystemClock;
use compressd::store::{SqliteStore, Store};
use futures::StreamExt;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The grace period the server is started with.
const GRACE: Duration = Duration::from_secs(4);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn start_server(data_dir: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_compressd"))
        .args(["serve", "--no-worker"])
        .env("COMPRESSD_DATA_DIR", data_dir)
        .env("COMPRESSD_LISTEN", format!("127.0.0.1:{port}"))
        .env("COMPRESSD_SHUTDOWN_GRACE_SECS", GRACE.as_secs().to_string())
        .env("COMPRESSD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the compressd binary starts")
}

/// A JSONL dataset sent as `chunks` pieces, one every `every`.
fn slow_jsonl(chunks: usize, every: Duration) -> reqwest::Body {
    let stream = futures::stream::iter(0..chunks).then(move |i| async move {
        tokio::time::sleep(every).await;
        let mut rows = String::new();
        for j in 0..10 {
            let label = if (i + j) % 2 == 0 { "a" } else { "b" };
            rows.push_str(&format!(
                "{{\"text\": \"row {i} {j}\", \"label\": \"{label}\"}}\n"
            ));
        }
        Ok::<_, std::io::Error>(rows.into_bytes())
    });
    reqwest::Body::wrap_stream(stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_an_upload_and_an_event_stream_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = start_server(dir.path(), port);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(Instant::now() < deadline, "the server did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A job to follow, on inputs registered straight in the server's database.
    let store = SqliteStore::open_file(&dir.path().join("compressd.db"), 2)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let (model, dataset) = common::register_inputs(&*store, &SystemClock).await;
    let created = client
        .post(format!("{base}/v1/jobs"))
        .json(&common::spec_json(model, dataset))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let job: serde_json::Value = created.json().await.unwrap();
    let events = client
        .get(format!(
            "{base}/v1/jobs/{}/events",
            job["id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let follower = tokio::spawn(async move {
        let mut body = events.bytes_stream();
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
        Instant::now()
    });

    // 20 chunks of 10 rows, 100 ms apart: the upload is still streaming when SIGTERM arrives.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::stream(slow_jsonl(20, Duration::from_millis(100)))
            .file_name("slow.jsonl"),
    );
    let upload = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/v1/datasets");
        async move { client.post(url).multipart(form).send().await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    kill(Pid::from_raw(server.id() as i32), Signal::SIGTERM).unwrap();

    // No new connections once shutdown started.
    let mut refused = false;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let fresh = reqwest::Client::new();
        if fresh.get(format!("{base}/healthz")).send().await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "new connections are refused during the drain");

    // The upload in flight finishes and is stored whole.
    let reply = upload.await.unwrap().expect("the upload gets its answer");
    assert_eq!(reply.status(), 201);
    let stored: serde_json::Value = reply.json().await.unwrap();
    assert_eq!(stored["rows"], 200, "{stored}");

    // The event stream is ended, and the process exits cleanly, within the grace period.
    let stream_ended = tokio::time::timeout(GRACE + Duration::from_secs(2), follower)
        .await
        .expect("the event stream ends")
        .unwrap();
    assert!(stream_ended.duration_since(signalled) <= GRACE + Duration::from_secs(1));
    let exit = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        loop {
            if let Some(status) = server.try_wait().unwrap() {
                return Some(status);
            }
            if started.elapsed() > GRACE + Duration::from_secs(3) {
                let _ = server.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    let exit = exit.expect("the server exits within the grace period");
    assert!(exit.success(), "{exit:?}");
    eprintln!(
        "drained and exited {:.2} s after SIGTERM (grace {} s)",
        signalled.elapsed().as_secs_f64(),
        GRACE.as_secs()
    );
    let id: uuid::Uuid = stored["id"].as_str().unwrap().parse().unwrap();
    let row = store
        .get_dataset(id)
        .await
        .unwrap()
        .expect("the dataset row");
    assert_eq!(row.id, id);
}
