//! The generated job spec schema: what it holds, that the README's lists agree with it, and that a
//! stage added through one file and one registry line shows up everywhere.

use compressd_engine::spec::{JobSpec, Registry, StageDescriptor, IMPLEMENTED_STAGES, STAGE_TYPES};
use serde_json::{json, Value};

use super::noop_stage::NoopSpec;
use super::{document, document_for};
use crate::scheduler::plan::plan;

/// The `const` of every alternative of a `oneOf` schema (stage tags or enum values).
fn consts(schema: &Value, of: impl Fn(&Value) -> &Value) -> Vec<String> {
    schema["oneOf"]
        .as_array()
        .map(|kinds| {
            kinds
                .iter()
                .filter_map(|k| of(k).as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn stage_types(document: &Value) -> Vec<String> {
    let stages = &document["components"]["schemas"]["StageSpec"];
    consts(stages, |k| &k["properties"]["type"]["const"])
}

/// The backquoted words of the README line starting with `prefix`, split at `;`.
fn readme_list(prefix: &str) -> Vec<Vec<String>> {
    let readme = include_str!("../../../README.md");
    let line = readme
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("README has no line starting with {prefix:?}"));
    line.split(';')
        .map(|part| {
            part.split('`')
                .skip(1)
                .step_by(2)
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

#[test]
fn the_schema_has_every_stage_field_with_defaults_ranges_and_enums() {
    let document = document();
    assert_eq!(stage_types(&document), STAGE_TYPES);
    let schemas = &document["components"]["schemas"];
    let prune = &schemas["StageSpec"]["oneOf"][1];
    assert_eq!(prune["properties"]["sparsity"]["maximum"], json!(0.95));
    assert_eq!(prune["properties"]["steps"]["default"], json!(1));
    assert_eq!(prune["required"], json!(["type", "sparsity"]));
    let finetune = &schemas["StageSpec"]["oneOf"][0]["properties"];
    assert_eq!(finetune["learning_rate"]["default"], json!(5e-5));
    assert_eq!(finetune["epochs"]["maximum"], json!(1000));
    let body = &document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"];
    assert_eq!(body["schema"]["$ref"], "#/components/schemas/JobSpec");
    assert_eq!(
        schemas["JobSpec"]["properties"]["pipeline"]["items"]["$ref"],
        "#/components/schemas/StageSpec"
    );
}

#[test]
fn the_readme_lists_the_registered_stages_and_schemes() {
    let lists = readme_list("Stage types (`type`): ");
    let [run, not_run] = lists.as_slice() else {
        panic!("README stage types: the implemented ones, `;`, the others: {lists:?}")
    };
    assert_eq!(run, IMPLEMENTED_STAGES, "README: implemented stage types");
    let all: Vec<&String> = run.iter().chain(not_run).collect();
    assert_eq!(
        all, STAGE_TYPES,
        "README: all stage types, in registry order"
    );
    let schemes = readme_list("Quantization schemes (`scheme`): ").concat();
    let schema = &document()["components"]["schemas"]["QuantScheme"];
    assert_eq!(
        schemes,
        consts(schema, |k| &k["const"]),
        "README: quantization schemes"
    );
}

#[test]
fn a_stage_added_by_one_registry_line_is_in_the_schema_the_estimate_and_the_checks() {
    let registry = Registry::standard()
        .clone()
        .with(StageDescriptor::of::<NoopSpec>());

    // The served document's schema.
    let document = document_for(&registry);
    assert_eq!(
        stage_types(&document).last().map(String::as_str),
        Some("noop")
    );
    let noop = &document["components"]["schemas"]["StageSpec"]["oneOf"][STAGE_TYPES.len()];
    assert_eq!(noop["properties"]["passes"]["maximum"], json!(10));
    assert!(stage_types(&super::document()).iter().all(|t| t != "noop"));

    // Parsed by its registry line; checked and estimated with the rest of the pipeline.
    let mut spec: JobSpec = serde_json::from_value(json!({
        "name": "n", "model": "m", "task": {"type": "text_classification", "dataset": "d"},
        "pipeline": [{"type": "finetune", "epochs": 1}, {"type": "quantize", "scheme": "int8"}]
    }))
    .unwrap();
    spec.fill_defaults();
    let stage = |body: Value| registry.parse_stage(&body).expect("noop parses");
    spec.pipeline
        .insert(1, stage(json!({"type": "noop", "passes": 3})));
    assert!(spec.validate().is_empty(), "{:?}", spec.validate());
    assert_eq!(
        serde_json::to_value(&spec.pipeline[1]).unwrap(),
        json!({"type": "noop", "passes": 3})
    );

    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    std::fs::write(&model, vec![0u8; 4000]).unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::write(&data, "{\"text\":\"x\"}\n".repeat(50)).unwrap();
    let planned = plan(&spec, Some(&model), Some(&data)).unwrap();
    let names: Vec<&str> = planned.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(names, ["finetune", "noop", "quantize"]);
    let (noop, quantize) = (&planned.stages[1], &planned.stages[2]);
    assert!((noop.estimated_seconds - 3.0 * quantize.estimated_seconds).abs() < 1e-12);

    // Its own field checks and its precondition (nothing after a post-training quantize).
    spec.pipeline[1] = stage(json!({"type": "noop", "passes": 0}));
    spec.pipeline.push(stage(json!({"type": "noop"})));
    let violations = spec.validate();
    let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
    assert_eq!(pointers, ["/pipeline/1/passes", "/pipeline/3/type"]);
    assert!(violations[1]
        .message
        .contains("`noop` cannot follow /pipeline/2, which leaves the weights quantized"));
    let err = registry
        .parse_stage(&json!({"type": "noop", "colour": 1}))
        .unwrap_err();
    assert!(err.to_string().contains("unknown field `colour`"), "{err}");
}

#[test]
fn the_yaml_reads_back_as_the_served_document() {
    let yaml = super::yaml();
    assert!(
        yaml.contains("const: '2:4'"),
        "2:4 is quoted for YAML 1.1 readers"
    );
    let read: Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(read, document());
}

#[test]
fn a_created_job_model_or_dataset_links_to_the_operations_on_it() {
    let document = document();
    let operations: Vec<String> = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|path| path.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str().map(str::to_owned))
        .collect();
    let created = [
        (
            "/v1/jobs",
            &["GetJob", "CancelJob", "DeleteJob", "JobEvents"][..],
        ),
        ("/v1/models", &["GetModel", "DeleteModel"][..]),
        ("/v1/datasets", &["GetDataset", "DeleteDataset"][..]),
    ];
    for (route, names) in created {
        let responses = &document["paths"][route]["post"]["responses"];
        let mut linked = 0;
        for status in ["201", "200"] {
            let links = &responses[status]["links"];
            if responses[status].is_null() {
                continue;
            }
            linked += 1;
            for name in names {
                let link = &links[name];
                let target = link["operationId"].as_str().unwrap_or_default();
                assert!(
                    operations.iter().any(|op| op == target),
                    "{route} {status} {name}: {link}"
                );
                assert_eq!(link["parameters"]["id"], "$response.body#/id");
            }
        }
        assert!(linked > 0, "{route}: no created response");
    }
}
