//! Unit tests of [`ModelInspector`] on tiny models built in the test.

use super::*;
use serde_json::json;

/// A word-level tokenizer with `n` tokens, enough for `Tokenizer::from_bytes`.
fn tokenizer(n: usize) -> Vec<u8> {
    let vocab: serde_json::Map<String, Value> =
        (0..n).map(|i| (format!("t{i}"), json!(i))).collect();
    serde_json::to_vec(&json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    }))
    .unwrap()
}

/// A safetensors file of f32 zeros with the given (name, shape) tensors laid out back to back.
fn safetensors(tensors: &[(&str, Vec<u64>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape) in tensors {
        let bytes = 4 * shape.iter().product::<u64>();
        header.insert(
            name.to_string(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.resize(out.len() + offset as usize, 0);
    out
}

/// The files of a one-layer BERT with hidden size 4 and a 10-token vocabulary.
fn tiny_bert_files() -> Vec<(&'static str, Vec<u8>)> {
    let config = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6});
    let mut tensors = vec![
        ("embeddings.word_embeddings.weight", vec![10, 4]),
        ("embeddings.position_embeddings.weight", vec![6, 4]),
        ("encoder.layer.0.attention.self.query.weight", vec![4, 4]),
        ("encoder.layer.0.attention.self.key.weight", vec![4, 4]),
        ("encoder.layer.0.attention.self.value.weight", vec![4, 4]),
        ("encoder.layer.0.attention.output.dense.weight", vec![4, 4]),
        ("encoder.layer.0.intermediate.dense.weight", vec![8, 4]),
        ("encoder.layer.0.output.dense.weight", vec![4, 8]),
    ];
    tensors.sort();
    vec![
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("model.safetensors", safetensors(&tensors)),
        ("tokenizer.json", tokenizer(10)),
        ("vocab.txt", b"t0\nt1\n".to_vec()),
    ]
}

fn inspect(files: &[(&str, Vec<u8>)]) -> Checked<ModelSummary> {
    let mut inspector = ModelInspector::new();
    for (name, bytes) in files {
        inspector.start_file(name)?;
        for chunk in bytes.chunks(5) {
            inspector.feed(chunk)?;
        }
        inspector.end_file()?;
    }
    inspector.finish()
}

#[test]
fn summarises_a_valid_folder() {
    let files = tiny_bert_files();
    let summary = inspect(&files).unwrap();
    assert_eq!(summary.format, ModelFormat::Safetensors);
    assert_eq!(summary.architecture.as_str(), "bert");
    assert_eq!(summary.parameters, 40 + 24 + 4 * 16 + 32 + 32);
    assert_eq!(
        summary.bytes,
        files.iter().map(|(_, b)| b.len() as u64).sum::<u64>()
    );
    let config = &summary.files[0];
    assert_eq!(config.sha256, hex::encode(Sha256::digest(&files[0].1)));
}

#[test]
fn rejects_missing_parts() {
    let files = tiny_bert_files();
    let without = |name: &str| -> Vec<(&str, Vec<u8>)> {
        files.iter().filter(|(n, _)| *n != name).cloned().collect()
    };
    assert!(inspect(&without("config.json"))
        .unwrap_err()
        .message
        .contains("config.json"));
    assert!(inspect(&without("tokenizer.json"))
        .unwrap_err()
        .message
        .contains("tokenizer.json"));
    assert!(inspect(&without("model.safetensors"))
        .unwrap_err()
        .message
        .contains("weights"));
    assert!(inspect(&[]).unwrap_err().message.contains("no files"));
}

#[test]
fn rejects_bad_files_and_names() {
    let mut files = tiny_bert_files();
    files[2].1 = b"{\"not\": \"a tokenizer\"}".to_vec();
    assert_eq!(inspect(&files).unwrap_err().slug, "invalid-tokenizer");
    let mut files = tiny_bert_files();
    files[0].1 = b"{oops".to_vec();
    assert_eq!(inspect(&files).unwrap_err().slug, "invalid-config");
    let mut files = tiny_bert_files();
    files[3].1 = Vec::new();
    assert!(inspect(&files).unwrap_err().message.contains("empty"));
    for name in [
        "../x",
        "/etc/passwd",
        "a//b",
        "a\\b",
        "",
        "A:",
        "AA:",
        "sub/c:",
        "a:b",
    ] {
        assert_eq!(
            ModelInspector::new().start_file(name).unwrap_err().slug,
            "invalid-file-name"
        );
    }
}

#[test]
fn rejects_a_tokenizer_larger_than_the_embedding() {
    let mut files = tiny_bert_files();
    files[2].1 = tokenizer(11);
    assert!(inspect(&files).unwrap_err().message.contains("11 tokens"));
}

#[test]
fn checks_the_index_against_the_shards() {
    let mut files = tiny_bert_files();
    let index = json!({"weight_map": {"embeddings.word_embeddings.weight": "other.safetensors"}});
    files.push((
        "model.safetensors.index.json",
        serde_json::to_vec(&index).unwrap(),
    ));
    assert!(inspect(&files)
        .unwrap_err()
        .message
        .contains("but it is in model.safetensors"));
}
