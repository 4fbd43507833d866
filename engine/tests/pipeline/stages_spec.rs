//! Submission-time checks of the compression stages (the service answers 422 with these pointers).

use compressd_engine::spec::JobSpec;

fn violations(pipeline: serde_json::Value) -> Vec<(String, String)> {
    let spec: JobSpec = serde_json::from_value(serde_json::json!({
        "name": "t", "model": "m", "task": {"type": "text_classification", "dataset": "d"}, "pipeline": pipeline
    }))
    .expect("parses");
    spec.validate()
        .into_iter()
        .map(|v| (v.pointer, v.message))
        .collect()
}

#[test]
fn sparsity_above_095_is_refused_with_its_pointer() {
    let v = violations(serde_json::json!([{"type": "prune", "sparsity": 0.96}]));
    assert_eq!(v.len(), 1, "{v:?}");
    assert_eq!(v[0].0, "/pipeline/0/sparsity");
    assert!(violations(serde_json::json!([{"type": "prune", "sparsity": 0.95}])).is_empty());
    assert!(!violations(serde_json::json!([{"type": "prune", "sparsity": -0.1}])).is_empty());
}

#[test]
fn nothing_may_follow_post_training_quantization() {
    let v = violations(serde_json::json!([
        {"type": "quantize", "scheme": "int8"}, {"type": "finetune"}, {"type": "prune", "sparsity": 0.5}
    ]));
    let pointers: Vec<&str> = v.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        pointers,
        vec!["/pipeline/1/type", "/pipeline/2/type"],
        "{v:?}"
    );
    assert!(v[0].1.contains("cannot follow"), "{v:?}");
    let ok = violations(serde_json::json!([
        {"type": "finetune"}, {"type": "prune", "sparsity": 0.5, "pattern": "2:4"}, {"type": "quantize", "scheme": "q5_k"}
    ]));
    assert!(ok.is_empty(), "{ok:?}");
}
