//! Parsing and validation of the job spec.

use super::*;
use serde_json::json;

fn example() -> serde_json::Value {
    json!({
        "name": "minilm-bbc",
        "model": "m1",
        "task": {"type": "text_classification", "dataset": "d1", "text_field": "text", "label_field": "label"},
        "pipeline": [
            {"type": "finetune", "epochs": 2, "learning_rate": 5e-5, "head_learning_rate": 1e-3,
             "freeze": ["embeddings.*"], "grad_clip": {"max_norm": 1.0}, "early_stopping": {"patience": 1}},
            {"type": "prune", "method": "magnitude", "sparsity": 0.5, "pattern": "unstructured", "scope": "global",
             "steps": 5, "recover": {"epochs": 1}},
            {"type": "quantize", "scheme": "int8"}
        ],
        "acceptance": {"metric": "accuracy", "max_drop": 0.01},
        "outputs": ["safetensors"],
        "dry_run": false
    })
}

fn parse(value: serde_json::Value) -> JobSpec {
    let mut spec: JobSpec = serde_json::from_value(value).expect("spec parses");
    spec.fill_defaults();
    spec
}

fn pointers(spec: &JobSpec) -> Vec<String> {
    spec.validate().into_iter().map(|v| v.pointer).collect()
}

#[test]
fn the_issue_example_parses_with_defaults_filled() {
    let spec = parse(example());
    assert_eq!(spec.seed, 42);
    assert_eq!(spec.priority, 0);
    let ft = spec.pipeline[0]
        .get::<FinetuneSpec>()
        .expect("first stage is finetune");
    assert_eq!(ft.epochs, 2);
    assert_eq!(ft.batch_size, 16);
    assert_eq!(ft.head_learning_rate, Some(1e-3));
    let prune = spec.pipeline[1]
        .get::<PruneSpec>()
        .expect("second stage is prune");
    assert_eq!(prune.recover.as_ref().map(|r| r.learning_rate), Some(5e-5));
    let stored = serde_json::to_value(&spec).unwrap();
    assert_eq!(stored["pipeline"][0]["weight_decay"], json!(0.01));
    assert_eq!(stored["pipeline"][2]["type"], json!("quantize"));
    // The stored form parses back to the same spec.
    assert_eq!(parse(stored), spec);
}

#[test]
fn classification_gets_a_default_label_field_and_language_modeling_none() {
    let mut value = example();
    value["task"] = json!({"type": "text_classification", "dataset": "d"});
    assert_eq!(
        parse(value.clone()).task.label_field.as_deref(),
        Some("label")
    );
    value["task"] = json!({"type": "language_modeling", "dataset": "d"});
    value["acceptance"] = json!({"metric": "perplexity", "max_relative_drop": 0.05});
    value["pipeline"] = json!([{"type": "finetune"}]);
    let spec = parse(value);
    assert_eq!(spec.task.label_field, None);
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
}

#[test]
fn unknown_fields_are_rejected_at_every_level() {
    for (pointer, field) in [
        ("", "colour"),
        ("/task", "colour"),
        ("/pipeline/0", "colour"),
        ("/acceptance", "colour"),
    ] {
        let mut value = example();
        value
            .pointer_mut(if pointer.is_empty() { "" } else { pointer })
            .unwrap()[field] = json!(1);
        let err = serde_json::from_value::<JobSpec>(value).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `colour`"),
            "{pointer}: {err}"
        );
    }
}

#[test]
fn unimplemented_stages_are_named() {
    let violations = parse(example()).validate();
    let implemented_all = STAGE_TYPES.iter().all(|s| IMPLEMENTED_STAGES.contains(s));
    if !implemented_all {
        let prune = violations.iter().find(|v| v.pointer == "/pipeline/1/type");
        assert_eq!(IMPLEMENTED_STAGES.contains(&"prune"), prune.is_none());
        if let Some(v) = prune {
            assert!(
                v.message.contains("stage `prune` is not implemented yet"),
                "{}",
                v.message
            );
        }
    }
}

#[test]
fn ranges_are_checked_with_pointers() {
    let mut value = example();
    value["pipeline"][0]["epochs"] = json!(0);
    value["pipeline"][0]["learning_rate"] = json!(2.0);
    value["pipeline"][1]["sparsity"] = json!(1.5);
    value["pipeline"][2]["group_size"] = json!(32);
    value["task"]["max_length"] = json!(0);
    value["priority"] = json!(1000);
    let found = pointers(&parse(value));
    for expected in [
        "/task/max_length",
        "/pipeline/0/epochs",
        "/pipeline/0/learning_rate",
        "/pipeline/1/sparsity",
        "/pipeline/2/group_size",
        "/priority",
    ] {
        assert!(
            found.iter().any(|p| p == expected),
            "missing {expected} in {found:?}"
        );
    }
}

#[test]
fn pipeline_length_is_bounded() {
    let mut value = example();
    value["pipeline"] = json!([]);
    assert_eq!(pointers(&parse(value.clone())), vec!["/pipeline"]);
    value["pipeline"] = serde_json::Value::Array(vec![json!({"type": "finetune"}); MAX_STAGES + 1]);
    assert_eq!(pointers(&parse(value)), vec!["/pipeline"]);
}

#[test]
fn acceptance_metric_must_fit_the_task_and_one_bound_is_required() {
    let mut value = example();
    value["pipeline"] = json!([{"type": "finetune"}]);
    value["acceptance"] = json!({"metric": "perplexity"});
    let found = pointers(&parse(value));
    assert_eq!(found, vec!["/acceptance/metric", "/acceptance"]);
}

#[test]
fn two_four_pruning_requires_half_sparsity() {
    let mut value = example();
    value["pipeline"][1]["pattern"] = json!("2:4");
    value["pipeline"][1]["sparsity"] = json!(0.6);
    assert!(pointers(&parse(value)).contains(&"/pipeline/1/sparsity".to_owned()));
}

#[test]
fn a_stage_body_deserializes_by_type() {
    let body = json!({"sparsity": 0.3});
    let stage = StageSpec::deserialize_typed("prune", &body).unwrap();
    assert_eq!(stage.type_name(), "prune");
    let err = StageSpec::deserialize_typed("shrink", &body).unwrap_err();
    assert!(
        err.to_string().contains("unknown variant `shrink`"),
        "{err}"
    );
}

#[test]
fn the_stage_lists_derive_from_the_registry() {
    let registry = Registry::standard();
    let types: Vec<&str> = registry.stages().iter().map(|s| s.type_name).collect();
    assert_eq!(types, STAGE_TYPES);
    let implemented: Vec<&str> = registry
        .stages()
        .iter()
        .filter(|s| s.implemented)
        .map(|s| s.type_name)
        .collect();
    assert_eq!(implemented, IMPLEMENTED_STAGES);
    assert_eq!(
        IMPLEMENTED_STAGES,
        ["finetune", "prune", "quantize", "distill"]
    );
}

#[test]
fn preconditions_walk_the_pipeline_from_the_input_model() {
    let spec = parse(example());
    let mut model = ModelState::input(TaskType::TextClassification);
    for (i, stage) in spec.pipeline.iter().enumerate() {
        assert_eq!(stage.preconditions(&model), Ok(()));
        stage.transform(&mut model, i);
    }
    assert!(model.pruned);
    assert_eq!(model.quantized_at, Some(2));
    let failed = spec.pipeline[0].preconditions(&model).unwrap_err();
    assert_eq!(failed.name, "full-precision weights");
    assert_eq!(
        failed.message,
        "`finetune` cannot follow /pipeline/2, which leaves the weights quantized (a `quantize`, \
         or a QLoRA `finetune` merged into its quantized base): quantized weights cannot be \
         trained, pruned or re-quantized; move it before"
    );
}

#[test]
fn a_stage_serializes_with_its_type_first_and_compares_by_value() {
    let spec = parse(example());
    let text = serde_json::to_string(&spec.pipeline[2]).unwrap();
    assert!(text.starts_with(r#"{"type":"quantize","#), "{text}");
    assert_eq!(spec.pipeline[2].clone(), spec.pipeline[2]);
    assert_ne!(spec.pipeline[0], spec.pipeline[1]);
    assert!(spec.pipeline[2].get::<FinetuneSpec>().is_none());
    assert_eq!(
        spec.pipeline[2]
            .get::<QuantizeSpec>()
            .map(|q| q.scheme.name()),
        Some("int8".to_owned())
    );
}

#[test]
fn the_json_schema_lists_every_stage_with_its_tag() {
    let schema = Registry::standard().job_spec_schema("/$defs");
    assert_eq!(schema["title"], json!("JobSpec"));
    let kinds = schema["$defs"]["StageSpec"]["oneOf"].as_array().unwrap();
    let tags: Vec<&str> = kinds
        .iter()
        .map(|k| k["properties"]["type"]["const"].as_str().unwrap())
        .collect();
    assert_eq!(tags, STAGE_TYPES);
    for kind in kinds {
        assert_eq!(kind["required"][0], json!("type"));
        assert_eq!(kind["additionalProperties"], json!(false));
    }
    let schemes = schema["$defs"]["QuantScheme"]["oneOf"].as_array().unwrap();
    assert!(schemes.iter().any(|s| s["const"] == json!("q4_k")));
}

#[test]
fn distill_parses_with_defaults_and_builds() {
    let stage = StageSpec::deserialize_typed("distill", &json!({})).unwrap();
    assert!(stage.implemented());
    assert!(stage.build().is_ok());
    let spec: crate::stages::distill::DistillSpec = serde_json::from_value(json!({})).unwrap();
    assert_eq!(
        spec.student_layer_indices(6).unwrap(),
        [1, 3, 5],
        "half, every other layer"
    );
    assert_eq!(
        spec.student_layer_indices(5).unwrap(),
        [0, 2, 4],
        "half rounded up"
    );
    let three: crate::stages::distill::DistillSpec =
        serde_json::from_value(json!({"student_layers": 3})).unwrap();
    assert_eq!(three.student_layer_indices(6).unwrap(), [1, 3, 5]);
    let first: crate::stages::distill::DistillSpec =
        serde_json::from_value(json!({"student_layers": 2, "layer_init": "first"})).unwrap();
    assert_eq!(first.student_layer_indices(6).unwrap(), [0, 1]);
    let last: crate::stages::distill::DistillSpec =
        serde_json::from_value(json!({"student_layers": 2, "layer_init": "last"})).unwrap();
    assert_eq!(last.student_layer_indices(6).unwrap(), [4, 5]);
    let list: crate::stages::distill::DistillSpec =
        serde_json::from_value(json!({"layer_init": [0, 3, 5]})).unwrap();
    assert_eq!(list.student_layer_indices(6).unwrap(), [0, 3, 5]);
    // Bad students: as large as the teacher, a layer it lacks, a list of the wrong length.
    assert!(three.student_layer_indices(3).is_err());
    assert!(list.student_layer_indices(4).is_err());
    let mismatch: crate::stages::distill::DistillSpec =
        serde_json::from_value(json!({"student_layers": 2, "layer_init": [0, 3, 5]})).unwrap();
    assert!(mismatch.student_layer_indices(6).is_err());
}

#[test]
fn webhooks_default_to_the_terminal_events_and_are_bounded() {
    let plain = parse(example());
    assert!(plain.webhooks.is_empty());
    // A spec without webhooks serializes as before (idempotency hashes of old specs hold).
    assert!(serde_json::to_value(&plain)
        .unwrap()
        .get("webhooks")
        .is_none());
    let mut value = example();
    value["webhooks"] = json!([
        {"url": "https://ci.example/hook"},
        {"url": "https://ops.example/hook", "events": ["job.started", "stage.completed"]}
    ]);
    let spec = parse(value.clone());
    assert_eq!(spec.webhooks[0].events, WebhookEvent::terminal());
    assert_eq!(
        spec.webhooks[1].events,
        [WebhookEvent::JobStarted, WebhookEvent::StageCompleted]
    );
    assert!(pointers(&spec).is_empty(), "{:?}", spec.validate());
    value["webhooks"][1]["events"] = json!([]);
    assert_eq!(pointers(&parse(value.clone())), ["/webhooks/1/events"]);
    value["webhooks"] = json!(vec![
        json!({"url": "https://ci.example/hook"});
        MAX_WEBHOOKS + 1
    ]);
    assert_eq!(pointers(&parse(value.clone())), ["/webhooks"]);
    value["webhooks"] = json!([{"url": "https://ci.example/hook", "events": ["job.exploded"]}]);
    assert!(serde_json::from_value::<JobSpec>(value).is_err());
}
