//! The server on a real socket: port 0, real HTTP, graceful shutdown.

use crate::common;

use std::time::Duration;

use common::api::TestApi;

#[tokio::test]
async fn serves_on_port_zero_and_shuts_down_gracefully() {
    let (api, _dir) = TestApi::sqlite().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(compressd::server::serve(
        listener,
        api.state.clone(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(5),
    ));
    let client = reqwest::Client::new();
    let health = client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    let mut spec = api.spec();
    spec["pipeline"][0]["epochs"] = serde_json::json!(-1);
    let rejected = client
        .post(format!("http://{address}/v1/jobs"))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(rejected.status(), 422);
    let problem: serde_json::Value = rejected.json().await.unwrap();
    assert_eq!(problem["pointer"], "/pipeline/0/epochs");
    stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .expect("no panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(
        client
            .get(format!("http://{address}/healthz"))
            .send()
            .await
            .is_err(),
        "the socket is closed"
    );
}

/// Starts `compressd serve` on `listen` with `auth` and JSON logs and returns its log lines up to
/// the `listening` line, then stops it.
fn start_up_log(listen: &str, auth: &str) -> Vec<serde_json::Value> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_compressd"))
        .args(["serve", "--no-worker"])
        .env("COMPRESSD_DATA_DIR", dir.path())
        .env("COMPRESSD_LISTEN", listen)
        .env("COMPRESSD_AUTH", auth)
        .env("COMPRESSD_LOG", "info")
        .env("COMPRESSD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the compressd binary starts");
    let stderr = BufReader::new(server.stderr.take().unwrap());
    let mut lines = Vec::new();
    for line in stderr.lines() {
        let line: serde_json::Value = serde_json::from_str(&line.unwrap()).expect("JSON log lines");
        let listening = line["fields"]["message"] == "listening";
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    lines
}

fn warnings(lines: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    lines.iter().filter(|l| l["level"] == "WARN").collect()
}

#[test]
fn without_keys_the_server_says_it_listens_on_loopback_only() {
    let lines = start_up_log("0.0.0.0:0", "auto");
    let listening = lines.last().expect("log lines");
    assert_eq!(listening["fields"]["message"], "listening", "{lines:#?}");
    assert!(
        listening["fields"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{listening}"
    );
    let warned = warnings(&lines);
    assert!(
        warned.iter().any(|w| w["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("listens on loopback only"))
            && w["fields"]["configured"] == "0.0.0.0:0"),
        "{lines:#?}"
    );
}

#[test]
fn auth_none_off_loopback_listens_there_and_logs_a_warning() {
    let lines = start_up_log("0.0.0.0:0", "none");
    let listening = lines.last().expect("log lines");
    assert!(
        listening["fields"]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("0.0.0.0:")),
        "{listening}"
    );
    let warned = warnings(&lines);
    assert!(
        warned.iter().any(|w| w["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("auth = \"none\"") && m.contains("every tenant")))
            && warned.iter().all(|w| !w["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .contains("loopback only")),
        "{lines:#?}"
    );
    // On loopback, `auth = "none"` needs no warning.
    let quiet = start_up_log("127.0.0.1:0", "none");
    assert!(
        warnings(&quiet).iter().all(|w| !w["fields"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("auth = \"none\"")),
        "{quiet:#?}"
    );
}
