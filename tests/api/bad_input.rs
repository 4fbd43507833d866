//! Every bad input of issue 2, with the status AND the problem body (slug, pointer) checked.

use crate::common;

use axum::body::Body;
use axum::http::{Method, StatusCode};
use common::api::{Reply, TestApi};
use compressd_engine::spec::MAX_STAGES;
use serde_json::{json, Value};

fn assert_problem(reply: &Reply, status: StatusCode, slug: &str) {
    assert_eq!(reply.status, status, "{:?}", reply.body);
    assert_eq!(reply.content_type(), "application/problem+json");
    assert_eq!(reply.slug(), slug, "{:?}", reply.body);
    assert_eq!(reply.body["status"], status.as_u16());
    assert!(reply.body["detail"].as_str().is_some_and(|d| !d.is_empty()));
}

async fn rejected_spec(api: &TestApi, edit: impl FnOnce(&mut Value)) -> Reply {
    let mut spec = api.spec();
    edit(&mut spec);
    api.post_json("/v1/jobs", &spec, &[]).await
}

async fn assert_invalid_at(api: &TestApi, pointer: &str, edit: impl FnOnce(&mut Value)) {
    let reply = rejected_spec(api, edit).await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), pointer, "{:?}", reply.body);
    assert_eq!(reply.body["errors"][0]["pointer"], pointer);
}

#[tokio::test]
async fn malformed_json_is_400() {
    let (api, _dir) = TestApi::sqlite().await;
    let reply = api
        .send(
            Method::POST,
            "/v1/jobs",
            &[("content-type", "application/json")],
            "{\"name\": ",
        )
        .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "malformed-json");
    let nested = "[".repeat(10_000);
    let reply = api
        .send(
            Method::POST,
            "/v1/jobs",
            &[("content-type", "application/json")],
            nested,
        )
        .await;
    assert_problem(&reply, StatusCode::BAD_REQUEST, "malformed-json");
}

#[tokio::test]
async fn wrong_or_missing_content_type_is_415() {
    let (api, _dir) = TestApi::sqlite().await;
    let body = api.spec().to_string();
    let reply = api
        .send(
            Method::POST,
            "/v1/jobs",
            &[("content-type", "text/plain")],
            body.clone(),
        )
        .await;
    assert_problem(
        &reply,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
    let reply = api.send(Method::POST, "/v1/jobs", &[], body).await;
    assert_problem(
        &reply,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
    );
}

#[tokio::test]
async fn unknown_fields_are_422_with_their_pointer() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_invalid_at(&api, "/colour", |s| s["colour"] = json!("red")).await;
    assert_invalid_at(&api, "/task/colour", |s| s["task"]["colour"] = json!(1)).await;
    assert_invalid_at(&api, "/pipeline/0/colour", |s| {
        s["pipeline"][0]["colour"] = json!(1)
    })
    .await;
}

#[tokio::test]
async fn wrong_types_are_422_with_their_pointer() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_invalid_at(&api, "/pipeline/0/epochs", |s| {
        s["pipeline"][0]["epochs"] = json!("two")
    })
    .await;
    assert_invalid_at(&api, "/name", |s| s["name"] = json!(5)).await;
    assert_invalid_at(&api, "/pipeline", |s| {
        s["pipeline"] = json!({"type": "finetune"})
    })
    .await;
    assert_invalid_at(&api, "/task/type", |s| {
        s["task"]["type"] = json!("translation")
    })
    .await;
    assert_invalid_at(&api, "/pipeline/0/type", |s| {
        s["pipeline"][0]["type"] = json!("shrink")
    })
    .await;
    assert_invalid_at(&api, "/model", |s| {
        s.as_object_mut().unwrap().remove("model");
    })
    .await;
}

#[tokio::test]
async fn out_of_range_values_are_422_with_their_pointer() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_invalid_at(&api, "/pipeline/0/epochs", |s| {
        s["pipeline"][0]["epochs"] = json!(0)
    })
    .await;
    assert_invalid_at(&api, "/pipeline/0/learning_rate", |s| {
        s["pipeline"][0]["learning_rate"] = json!(3.0)
    })
    .await;
    assert_invalid_at(&api, "/task/max_length", |s| {
        s["task"]["max_length"] = json!(0)
    })
    .await;
    assert_invalid_at(&api, "/priority", |s| s["priority"] = json!(101)).await;
    // A stage's range failure points inside it, also for stages the engine has yet to implement.
    let reply = rejected_spec(&api, |s| {
        s["pipeline"] = json!([{"type": "finetune"}, {"type": "prune", "sparsity": 1.5}]);
    })
    .await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    let pointers: Vec<&str> = reply.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/pipeline/1/sparsity"), "{pointers:?}");
}

#[tokio::test]
async fn pipeline_length_is_bounded() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_invalid_at(&api, "/pipeline", |s| s["pipeline"] = json!([])).await;
    let stages = vec![json!({"type": "finetune"}); MAX_STAGES + 1];
    let reply = rejected_spec(&api, |s| s["pipeline"] = Value::Array(stages)).await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/pipeline");
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains("at most 16"),
        "{:?}",
        reply.body
    );
}

#[tokio::test]
async fn preconditions_on_the_registered_model_and_the_order_are_422_at_submission() {
    let (api, _dir) = TestApi::sqlite().await;
    // The registered model is a BERT encoder: it cannot be a language model.
    let reply = rejected_spec(&api, |s| {
        s["task"]["type"] = json!("language_modeling");
        s["task"].as_object_mut().unwrap().remove("label_field");
    })
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/task/type", "{:?}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(
        detail.contains("bert") && detail.contains("language_modeling"),
        "{detail}"
    );
    // A stage that needs full-precision weights after a post-training quantize.
    let reply = rejected_spec(&api, |s| {
        s["pipeline"] = json!([{"type": "quantize", "scheme": "int8"}, {"type": "finetune"}])
    })
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/pipeline/1/type", "{:?}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("/pipeline/0"), "{detail}");
}

/// `method: "dynamic"` quantizes to int8 only and takes no QAT: 422 at the field.
#[tokio::test]
async fn dynamic_quantization_with_another_scheme_or_qat_is_422() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_invalid_at(&api, "/pipeline/0/scheme", |s| {
        s["pipeline"] = json!([{"type": "quantize", "method": "dynamic", "scheme": "q4_k"}])
    })
    .await;
    assert_invalid_at(&api, "/pipeline/0/qat", |s| {
        s["pipeline"] = json!([
            {"type": "quantize", "method": "dynamic", "scheme": "int8", "qat": {"epochs": 1}}
        ])
    })
    .await;
    assert_invalid_at(&api, "/pipeline/0/qat", |s| {
        s["pipeline"] = json!([{"type": "quantize", "scheme": "int4", "qat": {"epochs": 1}}])
    })
    .await;
    assert_invalid_at(&api, "/pipeline/0/method", |s| {
        s["pipeline"] = json!([{"type": "quantize", "method": "fastest", "scheme": "int8"}])
    })
    .await;
}

#[tokio::test]
async fn structured_prune_after_quantization_and_structured_only_options_are_422() {
    let (api, _dir) = TestApi::sqlite().await;
    let reply = rejected_spec(&api, |s| {
        s["pipeline"] = json!([
            {"type": "quantize", "scheme": "int8"},
            {"type": "prune", "pattern": "structured", "importance": "taylor", "sparsity": 0.4}
        ])
    })
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/pipeline/1/type", "{:?}", reply.body);
    assert_invalid_at(&api, "/pipeline/0/importance", |s| {
        s["pipeline"] = json!([{"type": "prune", "sparsity": 0.4, "importance": "taylor"}])
    })
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/min_keep",
        |s| {
            s["pipeline"] =
                json!([{"type": "prune", "pattern": "heads", "sparsity": 0.4, "min_keep": 0}])
        },
    )
    .await;
}

#[tokio::test]
async fn bad_distillation_specs_are_422_at_the_field() {
    let (api, _dir) = TestApi::sqlite().await;
    let distill = |stage: Value| move |s: &mut Value| s["pipeline"] = json!([stage]);
    // The registered model has 2 layers: a 2-layer student is not smaller.
    let reply = rejected_spec(
        &api,
        distill(json!({"type": "distill", "student_layers": 2})),
    )
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(
        reply.pointer(),
        "/pipeline/0/student_layers",
        "{:?}",
        reply.body
    );
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains("2-layer teacher"),
        "{:?}",
        reply.body
    );
    // A layer_map naming teacher layer 5 of 2.
    let reply = rejected_spec(
        &api,
        distill(
            json!({"type": "distill", "student_layers": 1, "layer_map": [5],
                       "weights": {"feature": 1.0}}),
        ),
    )
    .await;
    assert_eq!(reply.pointer(), "/pipeline/0/layer_map", "{:?}", reply.body);
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains("teacher layer 5"),
        "{:?}",
        reply.body
    );
    // A layer_map with an entry per student layer, and a layer_init list the teacher lacks.
    assert_invalid_at(
        &api,
        "/pipeline/0/layer_map",
        distill(json!({"type": "distill", "student_layers": 1, "layer_map": [0, 1]})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/layer_init",
        distill(json!({"type": "distill", "layer_init": [3]})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/temperature",
        distill(json!({"type": "distill", "temperature": 0.0})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/relation/temperature",
        distill(json!({"type": "distill", "relation": {"temperature": -1.0}})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/weights",
        distill(json!({"type": "distill", "weights": {"task": 0.0, "response": 0.0}})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/weights/feature",
        distill(json!({"type": "distill", "weights": {"task": 1.0, "feature": -0.5}})),
    )
    .await;
    // Recomputation keeps no attention maps, which attention matching reads.
    let reply = rejected_spec(
        &api,
        distill(
            json!({"type": "distill", "student_layers": 1, "gradient_checkpointing": true,
                       "weights": {"feature": 1.0}, "feature": {"attention": true}}),
        ),
    )
    .await;
    assert_eq!(
        reply.pointer(),
        "/pipeline/0/gradient_checkpointing",
        "{:?}",
        reply.body
    );
    assert!(
        reply.body["detail"]
            .as_str()
            .unwrap()
            .contains("attention probabilities"),
        "{:?}",
        reply.body
    );
    // `alpha` gave way to `weights`.
    assert_invalid_at(
        &api,
        "/pipeline/0/alpha",
        distill(json!({"type": "distill", "alpha": 0.5})),
    )
    .await;
    // A second distillation is checked against the first one's student (1 layer).
    let reply = rejected_spec(&api, |s| {
        s["pipeline"] = json!([
            {"type": "distill", "student_layers": 1},
            {"type": "distill", "student_layers": 1}
        ])
    })
    .await;
    assert_eq!(
        reply.pointer(),
        "/pipeline/1/student_layers",
        "{:?}",
        reply.body
    );
    // A good one is queued.
    let mut spec = api.spec();
    spec["pipeline"] = json!([{"type": "distill", "student_layers": 1,
        "gradient_checkpointing": true,
        "weights": {"task": 0.5, "response": 0.5, "feature": 0.1, "relation": 0.1}}]);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
}

#[tokio::test]
async fn unknown_or_malformed_input_ids_are_422() {
    let (api, _dir) = TestApi::sqlite().await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_invalid_at(&api, "/model", |s| s["model"] = json!(unknown)).await;
    assert_invalid_at(&api, "/task/dataset", |s| {
        s["task"]["dataset"] = json!(unknown)
    })
    .await;
    assert_invalid_at(&api, "/model", |s| s["model"] = json!("not-a-uuid")).await;
}

#[tokio::test]
async fn bodies_over_the_limit_are_413() {
    let (api, _dir) = TestApi::sqlite().await;
    let limit = api.state.config.json_body_limit_bytes;
    let mut spec = api.spec();
    spec["name"] = json!("x".repeat(limit + 1));
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_problem(&reply, StatusCode::PAYLOAD_TOO_LARGE, "body-too-large");
}

#[tokio::test]
async fn unknown_and_malformed_job_ids() {
    let (api, _dir) = TestApi::sqlite().await;
    let unknown = uuid::Uuid::now_v7();
    assert_problem(
        &api.get(&format!("/v1/jobs/{unknown}")).await,
        StatusCode::NOT_FOUND,
        "job-not-found",
    );
    assert_problem(
        &api.post_empty(&format!("/v1/jobs/{unknown}/cancel")).await,
        StatusCode::NOT_FOUND,
        "job-not-found",
    );
    assert_problem(
        &api.delete(&format!("/v1/jobs/{unknown}")).await,
        StatusCode::NOT_FOUND,
        "job-not-found",
    );
    for bad in ["nope", "123", "%00", "00000000-0000-0000-0000-00000000000g"] {
        let reply = api.get(&format!("/v1/jobs/{bad}")).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-job-id");
    }
}

#[tokio::test]
async fn cancelling_a_finished_job_is_409() {
    let (api, _dir) = TestApi::sqlite().await;
    let id = api.create_job().await;
    assert_eq!(
        api.post_empty(&format!("/v1/jobs/{id}/cancel"))
            .await
            .status,
        StatusCode::OK
    );
    let again = api.post_empty(&format!("/v1/jobs/{id}/cancel")).await;
    assert_problem(&again, StatusCode::CONFLICT, "job-state-conflict");
}

#[tokio::test]
async fn bad_list_queries_are_400() {
    let (api, _dir) = TestApi::sqlite().await;
    for query in [
        "limit=0",
        "limit=101",
        "limit=x",
        "status=paused",
        "after=nope",
        "colour=red",
        "limit=1&limit=2",
    ] {
        let reply = api.get(&format!("/v1/jobs?{query}")).await;
        assert_problem(&reply, StatusCode::BAD_REQUEST, "invalid-query");
    }
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let (api, _dir) = TestApi::sqlite().await;
    assert_problem(
        &api.get("/v2/nothing").await,
        StatusCode::NOT_FOUND,
        "not-found",
    );
    let reply = api.send(Method::PUT, "/v1/jobs", &[], Body::empty()).await;
    assert_problem(&reply, StatusCode::METHOD_NOT_ALLOWED, "method-not-allowed");
}

#[tokio::test]
async fn odd_json_documents_never_cause_a_5xx() {
    let (api, _dir) = TestApi::sqlite().await;
    let spec = api.spec();
    let documents = [
        json!(null),
        json!([]),
        json!("spec"),
        json!(1e308),
        json!({}),
        json!({"pipeline": null}),
        json!({"name": "n", "model": spec["model"], "task": null, "pipeline": []}),
        json!({"name": "n", "model": spec["model"], "task": spec["task"], "pipeline": [null, 1, "x", {"type": 5}]}),
        json!({"name": "", "model": "", "task": {"type": "language_modeling", "dataset": "", "label_field": ""}, "pipeline": [{"type": "finetune", "epochs": u64::MAX}]}),
        json!({"name": "\u{0000}", "model": spec["model"], "task": spec["task"], "pipeline": [{"type": "finetune", "learning_rate": -0.0}]}),
    ];
    for document in documents {
        let reply = api.post_json("/v1/jobs", &document, &[]).await;
        assert!(
            reply.status.is_client_error(),
            "{document} → {} {:?}",
            reply.status,
            reply.body
        );
        assert_eq!(reply.content_type(), "application/problem+json");
    }
}

/// A model registered with its linear modules (as an upload records them) is checked against LoRA
/// settings at submission: a rank wider than a target matrix, targets that match nothing, and
/// QLoRA on a model an earlier stage quantized are 422s at the field.
#[tokio::test]
async fn lora_settings_that_cannot_fit_the_model_are_422_at_the_field() {
    let (api, _dir) = TestApi::sqlite().await;
    let mut model = common::model(&*api.state.clock);
    model.name = "tiny-bert-with-shapes".into();
    model.metadata = json!({"layers": 1, "linear_modules": [
        {"path": "encoder.layer.0.attention.self.query", "out_features": 4, "in_features": 4,
         "default_lora_target": true},
        {"path": "encoder.layer.0.intermediate.dense", "out_features": 8, "in_features": 4,
         "default_lora_target": true}
    ]});
    api.state.store.insert_model(&model).await.unwrap();
    let lora = |stage: Value| {
        let model = model.id.to_string();
        move |s: &mut Value| {
            s["model"] = json!(model);
            s["pipeline"] = stage;
        }
    };
    let reply = rejected_spec(
        &api,
        lora(json!([{"type": "finetune", "method": "lora", "rank": 8}])),
    )
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/pipeline/0/rank", "{:?}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("smaller side"), "{detail}");
    assert_invalid_at(
        &api,
        "/pipeline/0/target_modules",
        lora(json!([{"type": "finetune", "method": "lora", "rank": 4,
                     "target_modules": ["model.layers.*.q_proj"]}])),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/1/base_quantization",
        lora(json!([{"type": "quantize", "scheme": "int8"},
                     {"type": "finetune", "method": "lora", "rank": 4, "base_quantization": "int4"}])),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/dropout",
        lora(json!([{"type": "finetune", "method": "lora", "rank": 4, "dropout": -0.1}])),
    )
    .await;
    // Fitting settings are accepted.
    let mut spec = api.spec();
    lora(json!([{"type": "finetune", "method": "lora", "rank": 4, "dropout": 0.1}]))(&mut spec);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
}

#[tokio::test]
async fn loraprune_settings_and_a_dataset_without_training_rows_are_422_at_the_field() {
    let (api, _dir) = TestApi::sqlite().await;
    let prune = |extra: Value| {
        move |s: &mut Value| {
            let mut stage = json!({"type": "prune", "pattern": "structured", "sparsity": 0.3});
            stage
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            s["pipeline"] = json!([stage]);
        }
    };
    // `lora` settings belong to `importance: "lora"`.
    assert_invalid_at(
        &api,
        "/pipeline/0/lora",
        prune(json!({"importance": "taylor", "lora": {"rank": 8}})),
    )
    .await;
    assert_invalid_at(&api, "/pipeline/0/lora", prune(json!({"lora": {}}))).await;
    // Rank at least 1; a negative one does not parse, and says where.
    assert_invalid_at(
        &api,
        "/pipeline/0/lora/rank",
        prune(json!({"importance": "lora", "lora": {"rank": 0}})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/lora/rank",
        prune(json!({"importance": "lora", "lora": {"rank": -2}})),
    )
    .await;
    // The registered dataset counted its splits: no training rows, nothing to score LoRAPrune on.
    let mut test_only = common::dataset(&*api.state.clock);
    test_only.metadata = json!({"splits": {"test": 10}, "labels": ["a", "b"]});
    api.state.store.insert_dataset(&test_only).await.unwrap();
    let on_test_only = |extra: Value| {
        let dataset = test_only.id.to_string();
        let edit = prune(extra);
        move |s: &mut Value| {
            edit(s);
            s["task"]["dataset"] = json!(dataset);
        }
    };
    for importance in ["lora", "taylor"] {
        let reply = rejected_spec(&api, on_test_only(json!({"importance": importance}))).await;
        assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
        assert_eq!(
            reply.pointer(),
            "/pipeline/0/importance",
            "{:?}",
            reply.body
        );
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(detail.contains("no training rows"), "{detail}");
    }
    // Magnitude scores need no training data: the same dataset is accepted with l1.
    let reply = api
        .post_json(
            "/v1/jobs",
            &{
                let mut s = api.spec();
                on_test_only(json!({"importance": "l1"}))(&mut s);
                s
            },
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
}

/// Quantization-aware training: activations rounded per token only on the int8 kernel's scheme,
/// settings in range, and a dataset with training rows.
#[tokio::test]
async fn qat_bad_settings_and_no_training_rows_are_422() {
    let (api, _dir) = TestApi::sqlite().await;
    let qat = |settings: Value| {
        move |s: &mut Value| {
            s["pipeline"] = json!([
                {"type": "quantize", "method": "qat", "scheme": "int4", "group_size": 32,
                 "qat": settings}
            ])
        }
    };
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/activations",
        qat(json!({"activations": "int8_per_token"})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/activations",
        qat(json!({"activations": "int8_per_tensor"})),
    )
    .await;
    // Observers exist for per-tensor inputs only, and freeze after at least one batch.
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/freeze_observers_after",
        qat(json!({"freeze_observers_after": 10})),
    )
    .await;
    let int8_qat = |settings: Value| {
        move |s: &mut Value| {
            s["pipeline"] = json!([
                {"type": "quantize", "method": "qat", "scheme": "int8", "qat": settings}
            ])
        }
    };
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/freeze_observers_after",
        int8_qat(json!({"activations": "int8_per_token", "freeze_observers_after": 10})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/freeze_observers_after",
        int8_qat(json!({"activations": "int8_per_tensor", "freeze_observers_after": 0})),
    )
    .await;
    assert_invalid_at(&api, "/pipeline/0/qat/epochs", qat(json!({"epochs": 0}))).await;
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/learning_rate",
        qat(json!({"learning_rate": 2.0})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/temperature",
        qat(json!({"distill_from_float": true, "temperature": 0})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/qat/grad_clip/max_norm",
        qat(json!({"grad_clip": {"max_norm": -1}})),
    )
    .await;
    assert_invalid_at(&api, "/pipeline/0/qat/bogus", qat(json!({"bogus": 1}))).await;

    let mut test_only = common::dataset(&*api.state.clock);
    test_only.metadata = json!({"splits": {"test": 10}, "labels": ["a", "b"]});
    api.state.store.insert_dataset(&test_only).await.unwrap();
    let dataset = test_only.id.to_string();
    let reply = rejected_spec(&api, |s| {
        qat(json!({}))(s);
        s["task"]["dataset"] = json!(dataset);
    })
    .await;
    assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
    assert_eq!(reply.pointer(), "/pipeline/0/method", "{:?}", reply.body);
    let detail = reply.body["detail"].as_str().unwrap();
    assert!(detail.contains("no training rows"), "{detail}");
    // The same job with defaults on a dataset that has them is accepted.
    let reply = api
        .post_json(
            "/v1/jobs",
            &{
                let mut s = api.spec();
                qat(json!({"distill_from_float": true}))(&mut s);
                s
            },
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
}

/// The compressed-tensors layout stores int8 and int4: a pipeline that does not end with such a
/// quantized model is refused at the output.
#[tokio::test]
async fn compressed_tensors_output_without_an_int8_or_int4_model_is_422() {
    let (api, _dir) = TestApi::sqlite().await;
    let with = |pipeline: Value| {
        move |s: &mut Value| {
            s["pipeline"] = pipeline;
            s["outputs"] = json!(["safetensors", "compressed_tensors"]);
        }
    };
    for pipeline in [
        json!([{"type": "finetune", "epochs": 1}]),
        json!([{"type": "quantize", "scheme": "nf4"}]),
        json!([{"type": "quantize", "scheme": "q4_k"}]),
        json!([{"type": "quantize", "scheme": "int8"}, {"type": "distill", "student_layers": 1}]),
    ] {
        let reply = rejected_spec(&api, with(pipeline.clone())).await;
        assert_problem(&reply, StatusCode::UNPROCESSABLE_ENTITY, "invalid-spec");
        assert_eq!(
            reply.pointer(),
            "/outputs/1",
            "{pipeline}: {:?}",
            reply.body
        );
        let detail = reply.body["detail"].as_str().unwrap();
        assert!(detail.contains("compressed-tensors"), "{detail}");
    }
    for pipeline in [
        json!([{"type": "quantize", "scheme": "int4", "group_size": 32}]),
        json!([{"type": "quantize", "method": "dynamic", "scheme": "int8"}]),
    ] {
        let reply = api
            .post_json(
                "/v1/jobs",
                &{
                    let mut s = api.spec();
                    with(pipeline.clone())(&mut s);
                    s
                },
                &[],
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::CREATED,
            "{pipeline}: {:?}",
            reply.body
        );
    }
}

/// Static int8: its fields only with `method: "static"`, int8 only, in range, one fallback rule.
#[tokio::test]
async fn static_quantization_bad_settings_are_422() {
    let (api, _dir) = TestApi::sqlite().await;
    let quantize = |stage: Value| move |s: &mut Value| s["pipeline"] = json!([stage]);
    let cases = [
        (
            json!({"type": "quantize", "method": "static", "scheme": "int4"}),
            "/pipeline/0/scheme",
        ),
        (
            json!({"type": "quantize", "method": "dynamic", "scheme": "int8", "calibration_batches": 4}),
            "/pipeline/0/calibration_batches",
        ),
        (
            json!({"type": "quantize", "scheme": "int8", "fallback": {"share": 0.1}}),
            "/pipeline/0/fallback",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8", "calibration_batches": 0}),
            "/pipeline/0/calibration_batches",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8", "percentile": 99.0}),
            "/pipeline/0/percentile",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8",
                   "calibration": "percentile", "percentile": 50}),
            "/pipeline/0/percentile",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8",
                   "fallback": {"share": 0.1, "max_output_error": 0.2}}),
            "/pipeline/0/fallback",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8",
                   "fallback": {"share": 1.5}}),
            "/pipeline/0/fallback/share",
        ),
        (
            json!({"type": "quantize", "method": "static", "scheme": "int8", "calibration": "best"}),
            "/pipeline/0/calibration",
        ),
    ];
    for (stage, pointer) in cases {
        assert_invalid_at(&api, pointer, quantize(stage)).await;
    }
    let reply = api
        .post_json(
            "/v1/jobs",
            &{
                let mut s = api.spec();
                quantize(
                    json!({"type": "quantize", "method": "static", "scheme": "int8",
                    "calibration": "percentile", "percentile": 99.9,
                    "fallback": {"max_output_error": 0.05}}),
                )(&mut s);
                s
            },
            &[],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
}

/// The training-memory and precision options: accepted with their values, and a mode the engine
/// does not know or a wrong type is a 422 at the field. (Whether the worker's device offers bf16
/// or f16
/// is known only where the job runs: a CPU worker fails the job at its start, tested in the
/// engine's pipeline tests.)
#[tokio::test]
async fn training_precision_and_recomputation_options_are_checked_at_the_field() {
    let (api, _dir) = TestApi::sqlite().await;
    let finetune = |extra: Value| {
        move |s: &mut Value| {
            let mut stage = json!({"type": "finetune", "epochs": 1});
            for (k, v) in extra.as_object().unwrap() {
                stage[k] = v.clone();
            }
            s["pipeline"] = json!([stage]);
        }
    };
    assert_invalid_at(
        &api,
        "/pipeline/0/mixed_precision",
        finetune(json!({"mixed_precision": "fp8"})),
    )
    .await;
    assert_invalid_at(
        &api,
        "/pipeline/0/gradient_checkpointing",
        finetune(json!({"gradient_checkpointing": "yes"})),
    )
    .await;
    let mut spec = api.spec();
    finetune(json!({"mixed_precision": "bf16", "gradient_checkpointing": true}))(&mut spec);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    let stage = &reply.body["spec"]["pipeline"][0];
    assert_eq!(stage["mixed_precision"], "bf16", "{:?}", reply.body);
    assert_eq!(stage["gradient_checkpointing"], true);
    let mut spec = api.spec();
    finetune(json!({"mixed_precision": "f16"}))(&mut spec);
    let reply = api.post_json("/v1/jobs", &spec, &[]).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{:?}", reply.body);
    assert_eq!(reply.body["spec"]["pipeline"][0]["mixed_precision"], "f16");
}
