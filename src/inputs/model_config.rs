//! Does a model's configuration name a family the engine can run, and do its hyper-parameters
//! agree with the tensors actually in the files?
//!
//! Hugging Face folders are checked by the engine's own family code
//! (`compressd_engine::family::check_checkpoint`), so the service and the engine share one list of
//! families and one notion of a consistent checkpoint. GGUF files are checked here against
//! llama.cpp's tensor names, which only the GGUF reader knows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use compressd_engine::family::{
    check_checkpoint, family_from_config, CheckpointProblem, ModelFamily,
};
use serde::Serialize;
use serde_json::Value;

use super::gguf::GgufSummary;
use super::{Checked, Rejection};

const MISMATCH: &str = "config-mismatch";

/// A model family the engine can run (see `compressd_engine::family`, which owns the list).
#[derive(Clone, Copy)]
pub struct Architecture(&'static dyn ModelFamily);

impl Architecture {
    /// Name as in `config.json`'s `model_type`.
    pub fn as_str(self) -> &'static str {
        self.0.name()
    }

    /// The transformer layer count a config states, under the family's field name.
    pub fn layers_in(self, config: &Value) -> Option<u64> {
        config
            .get(self.0.layer_count_field())
            .and_then(Value::as_u64)
    }

    /// Maps a `model_type` (or a class name in `architectures`) to a supported family.
    ///
    /// # Errors
    /// An `unsupported-architecture` [`Rejection`] naming it and the supported ones.
    pub fn parse(name: &str) -> Checked<Self> {
        family_from_config(&serde_json::json!({ "model_type": name.to_ascii_lowercase() }))
            .or_else(|_| family_from_config(&serde_json::json!({ "architectures": [name] })))
            .map(Self)
            .map_err(rejection)
    }
}

impl PartialEq for Architecture {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Architecture {}

impl fmt::Debug for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Architecture {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// The service's problem for an engine check's finding.
fn rejection(problem: CheckpointProblem) -> Rejection {
    match problem {
        CheckpointProblem::Unsupported(m) => Rejection::new("unsupported-architecture", m),
        CheckpointProblem::InvalidConfig(m) => {
            Rejection::in_file("invalid-config", "config.json", m)
        }
        CheckpointProblem::Mismatch(m) => Rejection::new(MISMATCH, m),
    }
}

/// Checks a Hugging Face folder's `config.json` against its tensors (name → shape) with the
/// engine's family checks, so the service and the engine agree on what loads.
///
/// # Errors
/// A [`Rejection`] naming the first tensor or field that disagrees.
pub fn check_hf(config: &Value, tensors: &BTreeMap<String, Vec<usize>>) -> Checked<Architecture> {
    check_checkpoint(config, tensors)
        .map(Architecture)
        .map_err(rejection)
}

/// Checks a GGUF file's metadata against its tensor table.
///
/// # Errors
/// A [`Rejection`] for an unsupported architecture or disagreeing shapes.
pub fn check_gguf(summary: &GgufSummary) -> Checked<Architecture> {
    let arch = Architecture::parse(&summary.architecture)?;
    // GGUF names follow llama.cpp's Llama layout; the engine reads no other family from GGUF.
    if arch.as_str() != "llama" {
        return Err(Rejection::new(
            "unsupported-architecture",
            format!(
                "architecture '{}' is supported from safetensors only, not from GGUF",
                arch.as_str()
            ),
        ));
    }
    let tensors: BTreeMap<String, Vec<usize>> = summary
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.shape.clone()))
        .collect();
    let key = |k: &str| summary.integers.get(&format!("llama.{k}")).copied();
    let hidden = require(
        key("embedding_length"),
        "llama.embedding_length",
        "GGUF metadata",
    )?;
    let heads = require(
        key("attention.head_count"),
        "llama.attention.head_count",
        "GGUF metadata",
    )?;
    let kv_heads = key("attention.head_count_kv").unwrap_or(heads);
    let ff = require(
        key("feed_forward_length"),
        "llama.feed_forward_length",
        "GGUF metadata",
    )?;
    let layers = require(key("block_count"), "llama.block_count", "GGUF metadata")?;
    let head_dim = key("attention.key_length").unwrap_or(hidden / heads.max(1));
    let vocab = key("vocab_size").or(summary.vocab_tokens.map(|n| n as u64));
    let check = Shapes {
        tensors: &tensors,
        file: "GGUF",
    };
    if let Some(vocab) = vocab {
        check.expect("token_embd.weight", &[vocab, hidden], true)?;
    }
    check.layers("blk.", layers)?;
    for i in 0..layers {
        check.expect(
            &format!("blk.{i}.attn_q.weight"),
            &[heads * head_dim, hidden],
            true,
        )?;
        check.expect(
            &format!("blk.{i}.attn_k.weight"),
            &[kv_heads * head_dim, hidden],
            true,
        )?;
        check.expect(&format!("blk.{i}.ffn_gate.weight"), &[ff, hidden], true)?;
        check.expect(&format!("blk.{i}.ffn_down.weight"), &[hidden, ff], true)?;
    }
    Ok(arch)
}

fn require(value: Option<u64>, key: &str, source: &str) -> Checked<u64> {
    value.ok_or_else(|| {
        Rejection::new(
            "invalid-config",
            format!("{source} lacks the integer field `{key}`"),
        )
    })
}

/// Compares tensors against the shapes the configuration implies.
struct Shapes<'a> {
    tensors: &'a BTreeMap<String, Vec<usize>>,
    /// Where the expectation comes from, for messages.
    file: &'a str,
}

impl Shapes<'_> {
    fn expect(&self, name: &str, shape: &[u64], required: bool) -> Checked<()> {
        let expected: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        match self.tensors.get(name) {
            Some(actual) if *actual == expected => Ok(()),
            Some(actual) => Err(Rejection::new(
                MISMATCH,
                format!(
                    "tensor '{name}' has shape {actual:?} but {} implies {expected:?}",
                    self.file
                ),
            )),
            None if required => Err(Rejection::new(
                MISMATCH,
                format!("tensor '{name}' that {} implies is missing", self.file),
            )),
            None => Ok(()),
        }
    }

    /// Checks that the layers numbered under `prefix` are exactly `0..count`.
    fn layers(&self, prefix: &str, count: u64) -> Checked<()> {
        let found: BTreeSet<u64> = self
            .tensors
            .keys()
            .filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse().ok())
            .collect();
        match found.iter().next_back() {
            Some(&last) if last + 1 > count => Err(Rejection::new(
                MISMATCH,
                format!(
                    "the tensors have {} layers but {} says {count}",
                    last + 1,
                    self.file
                ),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tiny_bert() -> (Value, BTreeMap<String, Vec<usize>>) {
        let cfg = json!({"model_type": "bert", "vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 6});
        let mut t = BTreeMap::new();
        t.insert("embeddings.word_embeddings.weight".to_string(), vec![10, 4]);
        t.insert(
            "embeddings.position_embeddings.weight".to_string(),
            vec![6, 4],
        );
        for part in ["query", "key", "value"] {
            t.insert(
                format!("encoder.layer.0.attention.self.{part}.weight"),
                vec![4, 4],
            );
        }
        t.insert(
            "encoder.layer.0.attention.output.dense.weight".to_string(),
            vec![4, 4],
        );
        t.insert(
            "encoder.layer.0.intermediate.dense.weight".to_string(),
            vec![8, 4],
        );
        t.insert(
            "encoder.layer.0.output.dense.weight".to_string(),
            vec![4, 8],
        );
        (cfg, t)
    }

    #[test]
    fn accepts_agreeing_bert() {
        let (cfg, tensors) = tiny_bert();
        assert_eq!(check_hf(&cfg, &tensors).unwrap().as_str(), "bert");
        let by_class = json!({"architectures": ["BertForSequenceClassification"]});
        assert_eq!(
            Architecture::parse("BertForSequenceClassification").unwrap(),
            check_hf(&cfg, &tensors).unwrap()
        );
        assert!(check_hf(&by_class, &tensors).is_err(), "fields missing");
    }

    #[test]
    fn rejects_disagreeing_shapes_and_layer_counts() {
        let (mut cfg, tensors) = tiny_bert();
        cfg["intermediate_size"] = json!(16);
        let err = check_hf(&cfg, &tensors).unwrap_err();
        assert_eq!(err.slug, MISMATCH);
        assert!(err.message.contains("intermediate.dense.weight"), "{err}");
        let (mut cfg, tensors) = tiny_bert();
        cfg["num_hidden_layers"] = json!(2);
        assert!(check_hf(&cfg, &tensors)
            .unwrap_err()
            .message
            .contains("missing"));
        let (cfg, mut tensors) = tiny_bert();
        tensors.insert("encoder.layer.3.output.dense.weight".into(), vec![4, 8]);
        assert!(check_hf(&cfg, &tensors)
            .unwrap_err()
            .message
            .contains("4 layers"));
    }

    #[test]
    fn unsupported_architecture_names_it_and_the_supported_ones() {
        let err = check_hf(&json!({"model_type": "gpt2"}), &BTreeMap::new()).unwrap_err();
        assert_eq!(err.slug, "unsupported-architecture");
        assert!(
            err.message.contains("'gpt2'")
                && err.message.contains("bert")
                && err.message.contains("llama")
        );
        let err = check_hf(&json!({"hidden_size": 4}), &BTreeMap::new()).unwrap_err();
        assert!(err.message.contains("model_type"));
        let (mut cfg, tensors) = tiny_bert();
        cfg["num_attention_heads"] = json!(3);
        let err = check_hf(&cfg, &tensors).unwrap_err();
        assert_eq!(err.slug, "invalid-config");
        assert!(err.message.contains("num_attention_heads"), "{err}");
    }
}
