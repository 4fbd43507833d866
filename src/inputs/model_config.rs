//! Does a model's configuration name an architecture the engine can run, and do its
//! hyper-parameters agree with the tensors actually in the files?
//!
//! Checked shapes follow the Hugging Face reference implementations: BERT
//! (`transformers/models/bert/modeling_bert.py`) and Llama (`models/llama/modeling_llama.py`),
//! and llama.cpp's tensor names for GGUF. Only the tensors whose shapes the config determines are
//! checked; norms and biases follow from them.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::Value;

use super::gguf::GgufSummary;
use super::{Checked, Rejection};

/// The architectures the engine can load, with a word on each for error messages.
pub const SUPPORTED_ARCHITECTURES: &[(&str, &str)] = &[
    ("bert", "BERT-style encoders"),
    ("llama", "Llama-style decoders"),
];

const MISMATCH: &str = "config-mismatch";

/// A supported architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    Bert,
    Llama,
}

impl Architecture {
    /// Name as in `config.json`'s `model_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bert => "bert",
            Self::Llama => "llama",
        }
    }

    /// Maps a `model_type` (or a class name in `architectures`) to a supported architecture.
    ///
    /// # Errors
    /// An `unsupported-architecture` [`Rejection`] naming it and the supported ones.
    pub fn parse(name: &str) -> Checked<Self> {
        let lower = name.to_ascii_lowercase();
        if lower == "bert" || lower.starts_with("bertfor") || lower == "bertmodel" {
            Ok(Self::Bert)
        } else if lower == "llama" || lower.starts_with("llamafor") || lower == "llamamodel" {
            Ok(Self::Llama)
        } else {
            let supported: Vec<String> = SUPPORTED_ARCHITECTURES
                .iter()
                .map(|(n, what)| format!("{n} ({what})"))
                .collect();
            Err(Rejection::new(
                "unsupported-architecture",
                format!(
                    "architecture '{name}' is not supported; supported: {}",
                    supported.join(", ")
                ),
            ))
        }
    }
}

/// Reads the architecture from `config.json` (`model_type`, else the first `architectures` entry).
///
/// # Errors
/// A [`Rejection`] when neither names a supported architecture.
pub fn architecture_of(config: &Value) -> Checked<Architecture> {
    let named = config
        .get("model_type")
        .and_then(Value::as_str)
        .or_else(|| {
            config
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(Value::as_str)
        });
    match named {
        Some(name) => Architecture::parse(name),
        None => Err(Rejection::in_file(
            "invalid-config",
            "config.json",
            "names no architecture: it has neither `model_type` nor `architectures`",
        )),
    }
}

/// Checks a Hugging Face folder's `config.json` against its tensors (name → shape).
///
/// # Errors
/// A [`Rejection`] naming the first tensor or field that disagrees.
pub fn check_hf(config: &Value, tensors: &BTreeMap<String, Vec<usize>>) -> Checked<Architecture> {
    let arch = architecture_of(config)?;
    let cfg = Fields {
        source: "config.json",
        get: &|k| config.get(k).and_then(Value::as_u64),
    };
    match arch {
        Architecture::Bert => check_bert(&cfg, tensors)?,
        Architecture::Llama => check_llama(&cfg, tensors)?,
    }
    Ok(arch)
}

/// Checks a GGUF file's metadata against its tensor table.
///
/// # Errors
/// A [`Rejection`] for an unsupported architecture or disagreeing shapes.
pub fn check_gguf(summary: &GgufSummary) -> Checked<Architecture> {
    let arch = Architecture::parse(&summary.architecture)?;
    if arch != Architecture::Llama {
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

/// Integer hyper-parameters by name, from `config.json` or GGUF metadata.
struct Fields<'a> {
    source: &'a str,
    get: &'a dyn Fn(&str) -> Option<u64>,
}

impl Fields<'_> {
    fn required(&self, key: &str) -> Checked<u64> {
        require((self.get)(key), key, self.source)
    }
}

fn require(value: Option<u64>, key: &str, source: &str) -> Checked<u64> {
    value.ok_or_else(|| {
        Rejection::new(
            "invalid-config",
            format!("{source} lacks the integer field `{key}`"),
        )
    })
}

fn check_bert(cfg: &Fields<'_>, tensors: &BTreeMap<String, Vec<usize>>) -> Checked<()> {
    let vocab = cfg.required("vocab_size")?;
    let hidden = cfg.required("hidden_size")?;
    let layers = cfg.required("num_hidden_layers")?;
    let heads = cfg.required("num_attention_heads")?;
    let inter = cfg.required("intermediate_size")?;
    let positions = cfg.required("max_position_embeddings")?;
    if heads == 0 || hidden % heads != 0 {
        return Err(Rejection::in_file(
            MISMATCH,
            "config.json",
            format!("hidden_size {hidden} is not divisible by num_attention_heads {heads}"),
        ));
    }
    // Checkpoints saved from `BertFor…` heads prefix the encoder with `bert.`.
    let p = if tensors.contains_key("bert.embeddings.word_embeddings.weight") {
        "bert."
    } else {
        ""
    };
    let check = Shapes {
        tensors,
        file: "config.json",
    };
    check.expect(
        &format!("{p}embeddings.word_embeddings.weight"),
        &[vocab, hidden],
        true,
    )?;
    check.expect(
        &format!("{p}embeddings.position_embeddings.weight"),
        &[positions, hidden],
        true,
    )?;
    check.layers(&format!("{p}encoder.layer."), layers)?;
    for i in 0..layers {
        let l = format!("{p}encoder.layer.{i}");
        for part in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
        ] {
            check.expect(&format!("{l}.{part}.weight"), &[hidden, hidden], true)?;
        }
        check.expect(
            &format!("{l}.intermediate.dense.weight"),
            &[inter, hidden],
            true,
        )?;
        check.expect(&format!("{l}.output.dense.weight"), &[hidden, inter], true)?;
    }
    Ok(())
}

fn check_llama(cfg: &Fields<'_>, tensors: &BTreeMap<String, Vec<usize>>) -> Checked<()> {
    let vocab = cfg.required("vocab_size")?;
    let hidden = cfg.required("hidden_size")?;
    let layers = cfg.required("num_hidden_layers")?;
    let heads = cfg.required("num_attention_heads")?;
    let inter = cfg.required("intermediate_size")?;
    let kv_heads = (cfg.get)("num_key_value_heads").unwrap_or(heads);
    if heads == 0 {
        return Err(Rejection::in_file(
            MISMATCH,
            "config.json",
            "num_attention_heads is 0",
        ));
    }
    let head_dim = (cfg.get)("head_dim").unwrap_or(hidden / heads);
    let check = Shapes {
        tensors,
        file: "config.json",
    };
    check.expect("model.embed_tokens.weight", &[vocab, hidden], true)?;
    check.expect("lm_head.weight", &[vocab, hidden], false)?;
    check.layers("model.layers.", layers)?;
    for i in 0..layers {
        let l = format!("model.layers.{i}");
        check.expect(
            &format!("{l}.self_attn.q_proj.weight"),
            &[heads * head_dim, hidden],
            true,
        )?;
        check.expect(
            &format!("{l}.self_attn.k_proj.weight"),
            &[kv_heads * head_dim, hidden],
            true,
        )?;
        check.expect(
            &format!("{l}.self_attn.v_proj.weight"),
            &[kv_heads * head_dim, hidden],
            true,
        )?;
        check.expect(
            &format!("{l}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            true,
        )?;
        check.expect(&format!("{l}.mlp.gate_proj.weight"), &[inter, hidden], true)?;
        check.expect(&format!("{l}.mlp.up_proj.weight"), &[inter, hidden], true)?;
        check.expect(&format!("{l}.mlp.down_proj.weight"), &[hidden, inter], true)?;
    }
    Ok(())
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
        assert_eq!(check_hf(&cfg, &tensors).unwrap(), Architecture::Bert);
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
    }
}
