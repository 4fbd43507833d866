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
