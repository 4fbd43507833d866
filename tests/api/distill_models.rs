//! A `distill` stage's `teacher` and `student` are registered model ids, checked at submission
//! like the job's `model`: registered to the caller's tenant, the job model's tokenizer, for a
//! teacher the dataset's labels, a student smaller than its teacher, layers that exist. Each
//! refusal is a 422 naming the stage's field.

use crate::common;

use axum::http::StatusCode;
use bytes::Bytes;
use common::api::{Reply, TestApi};
use compressd::store::{Dataset, Model};
use serde_json::{json, Value};
use uuid::Uuid;

/// A WordLevel tokenizer over `words` (ids in order after the four special tokens).
fn tokenizer(words: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    for (id, token) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .iter()
        .chain(words)
        .enumerate()
    {
        vocab.insert((*token).to_owned(), json!(id));
    }
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "[UNK]", "vocab": vocab}
    })
    .to_string()
}

/// Registers a model row of `tenant` whose files (`name`, content) are in the artifact store.
async fn register(
    api: &TestApi,
    tenant: &str,
    parameters: u64,
    layers: u64,
    files: &[(&str, String)],
) -> Uuid {
    let id = Uuid::now_v7();
    let uri = format!("models/{id}/");
    for (name, content) in files {
        api.state
            .artifacts
            .put_small(&format!("{uri}{name}"), Bytes::from(content.clone()))
            .await
            .unwrap();
    }
    let model = Model {
        id,
        tenant: tenant.into(),
        name: format!("model-{parameters}"),
        architecture: "bert".into(),
        format: "safetensors".into(),
        uri,
        bytes: 1000,
        sha256: "ab".repeat(32),
        metadata: json!({"parameters": parameters, "layers": layers}),
        created_at: api.state.clock.now(),
    };
    api.state.store.insert_model(&model).await.unwrap();
    id
}

fn config(labels: &[&str]) -> String {
    let id2label: serde_json::Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), json!(l)))
        .collect();
    json!({"model_type": "bert", "num_hidden_layers": 2, "id2label": id2label}).to_string()
}

async fn submit(api: &TestApi, spec: &Value) -> Reply {
    api.post_json("/v1/jobs", spec, &[]).await
}

fn assert_refused_at(reply: &Reply, pointer: &str, says: &str) {
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{:?}",
        reply.body
    );
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.pointer(), pointer, "{:?}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(says), "{detail:?} should say {says:?}");
}

#[tokio::test]
async fn named_teachers_and_students_are_checked_at_submission() {
    let (api, _dir) = TestApi::sqlite().await;
    let words = ["good", "bad", "movie"];
    // The job's model (2 layers, no parameter count recorded) and its tokenizer.
    let input: Model = api.state.store.get_model(api.model).await.unwrap().unwrap();
    api.state
        .artifacts
        .put_small(
            &format!("{}/tokenizer.json", input.uri.trim_end_matches('/')),
            Bytes::from(tokenizer(&words)),
        )
        .await
        .unwrap();
    // A dataset whose labels are `neg` and `pos`.
    let dataset = Dataset {
        id: Uuid::now_v7(),
        tenant: "default".into(),
        name: "reviews".into(),
        format: "jsonl".into(),
        uri: "datasets/reviews.jsonl".into(),
        bytes: 10,
        sha256: "cd".repeat(32),
        rows: 10,
        metadata: json!({"label_counts": {"neg": 5, "pos": 5}, "label_field": "label"}),
        created_at: api.state.clock.now(),
    };
    api.state.store.insert_dataset(&dataset).await.unwrap();
    let same = |labels: &[&str]| {
        vec![
            ("tokenizer.json", tokenizer(&words)),
            ("config.json", config(labels)),
        ]
    };
    let teacher = register(&api, "default", 1000, 2, &same(&["neg", "pos"])).await;
    let small = register(&api, "default", 400, 1, &same(&[])).await;
    let large = register(&api, "default", 2000, 1, &same(&[])).await;
    let other_labels = register(&api, "default", 1000, 2, &same(&["x", "y"])).await;
    let other_tokenizer = register(
        &api,
        "default",
        1000,
        2,
        &[
            ("tokenizer.json", tokenizer(&["movie", "bad", "good"])),
            ("config.json", config(&["neg", "pos"])),
        ],
    )
    .await;
    let foreign = register(&api, "another-tenant", 1000, 2, &same(&["neg", "pos"])).await;
    let spec = |stage: Value| {
        let mut spec = api.spec();
        spec["task"]["dataset"] = json!(dataset.id.to_string());
        spec["pipeline"] = json!([{"type": "finetune", "epochs": 1}, stage]);
        spec
    };

    let unknown = Uuid::now_v7();
    for (id, says) in [
        (unknown.to_string(), "is not registered"),
        (foreign.to_string(), "is not registered"),
        ("not-a-uuid".to_owned(), "is not a model id"),
    ] {
        let reply = submit(&api, &spec(json!({"type": "distill", "teacher": id}))).await;
        assert_refused_at(&reply, "/pipeline/1/teacher", says);
        let reply = submit(&api, &spec(json!({"type": "distill", "student": id}))).await;
        assert_refused_at(&reply, "/pipeline/1/student", says);
    }
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "teacher": other_tokenizer.to_string()})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/teacher", "another tokenizer");
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "teacher": other_labels.to_string()})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/teacher", "not the dataset's");
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "teacher": teacher.to_string(),
                     "student": large.to_string()})),
    )
    .await;
    assert_refused_at(
        &reply,
        "/pipeline/1/student",
        "not fewer than the teacher's 1000",
    );
    // The student's layers are the registered teacher's to give: 2 of 2 is not smaller.
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "teacher": teacher.to_string(), "student_layers": 2})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/student_layers", "2-layer teacher");
    // A named student brings its own layers: a layer map of its length, naming teacher layers.
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "teacher": teacher.to_string(),
                     "student": small.to_string(), "layer_map": [4],
                     "weights": {"task": 1.0, "feature": 1.0}})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/layer_map", "teacher layer 4");
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "student": small.to_string(), "student_layers": 1})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/student_layers", "leave it out");

    // Narrowing is for a student built from the teacher, and head by head attention matching
    // needs the teacher's heads.
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "student": small.to_string(), "intermediate_size": 8})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/intermediate_size", "leave it out");
    let reply = submit(
        &api,
        &spec(
            json!({"type": "distill", "attention_heads": 2, "weights": {"feature": 1.0},
                     "feature": {"attention": true}}),
        ),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/attention_heads", "attention matching");
    let reply = submit(
        &api,
        &spec(json!({"type": "distill", "attention_heads": 0})),
    )
    .await;
    assert_refused_at(&reply, "/pipeline/1/attention_heads", "");

    // Good ones are queued, the ids kept in the stored spec.
    for stage in [
        json!({"type": "distill", "teacher": teacher.to_string(), "student_layers": 1}),
        json!({"type": "distill", "teacher": teacher.to_string(), "student": small.to_string()}),
        json!({"type": "distill", "student": small.to_string()}),
        json!({"type": "distill", "attention_heads": 2, "intermediate_size": 16}),
    ] {
        let reply = submit(&api, &spec(stage.clone())).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
        assert_eq!(
            reply.body["spec"]["pipeline"][1]["teacher"],
            stage["teacher"]
        );
        assert_eq!(
            reply.body["spec"]["pipeline"][1]["student"],
            stage["student"]
        );
    }
}
