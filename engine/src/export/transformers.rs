//! The one place that knows how each model family is written for Hugging Face transformers: the
//! class a saved folder declares (`architectures`, `model_type`), the config fields transformers
//! needs to rebuild the model the engine ran, and the tensor names.
//!
//! Inside the engine a BERT encoder's tensors have no `bert.` prefix (as in a plain `BertModel`
//! checkpoint such as MiniLM) and the task head sits at `classifier.*`; Llama tensors already carry
//! transformers' names (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`; GGUF files are
//! mapped to them when read, see [`crate::loading::gguf`]). [`HfArchitecture::export_name`] and
//! [`HfArchitecture::import_name`] convert between the two, so a folder written by the engine loads
//! both in transformers and back in the engine under the same internal names.
//!
//! References: transformers' `BertForSequenceClassification` (`modeling_bert.py`: encoder and pooler
//! under `bert.`, `classifier` at the top) and `LlamaForCausalLM` (`modeling_llama.py`,
//! `configuration_llama.py`).

use serde_json::{json, Map, Value};

use crate::error::{EngineError, Result};
use crate::models::bert::BertConfig;
use crate::models::llama::LlamaConfig;

/// The transformers class a saved model is written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HfArchitecture {
    /// A BERT encoder with pooler and classification head: `BertForSequenceClassification`.
    BertForSequenceClassification,
    /// A Llama decoder with its output matrix (or tied embeddings): `LlamaForCausalLM`.
    LlamaForCausalLm,
}

/// The prefix transformers' `BertFor*` classes put before the encoder's and pooler's tensors.
const BERT_PREFIX: &str = "bert.";
/// The classification head's module, which `BertForSequenceClassification` keeps at the top.
const BERT_HEAD: &str = "classifier.";

impl HfArchitecture {
    /// The architecture whose class name is `class` (a family's
    /// [`crate::family::ModelFamily::hf_architecture`]), if the engine can export it.
    pub fn from_class_name(class: &str) -> Option<Self> {
        [Self::BertForSequenceClassification, Self::LlamaForCausalLm]
            .into_iter()
            .find(|a| a.class_name() == class)
    }

    /// The class name written to `architectures`.
    pub fn class_name(self) -> &'static str {
        match self {
            Self::BertForSequenceClassification => "BertForSequenceClassification",
            Self::LlamaForCausalLm => "LlamaForCausalLM",
        }
    }

    /// PEFT's `task_type` for an adapter of this class.
    pub fn peft_task_type(self) -> &'static str {
        match self {
            Self::BertForSequenceClassification => "SEQ_CLS",
            Self::LlamaForCausalLm => "CAUSAL_LM",
        }
    }

    /// The `config.json` to write for a model with the engine's `config`: the family's config is
    /// parsed (so a saved config is one the engine can read back), fields transformers would
    /// otherwise default differently are filled in from what the engine ran, and `architectures`,
    /// `model_type` and `torch_dtype` (the engine saves float32) are set. Other fields are kept.
    ///
    /// # Errors
    /// Fails when `config` is not a valid config of the family (a missing field, inconsistent
    /// heads).
    pub fn export_config(self, config: &Value) -> Result<Value> {
        match self {
            Self::BertForSequenceClassification => bert_classifier_config(config),
            Self::LlamaForCausalLm => llama_causal_lm_config(config),
        }
    }

    /// The name a tensor with the engine's `name` gets in a saved folder.
    pub fn export_name(self, name: &str) -> String {
        match self {
            Self::BertForSequenceClassification
                if !name.starts_with(BERT_PREFIX) && !name.starts_with(BERT_HEAD) =>
            {
                format!("{BERT_PREFIX}{name}")
            }
            _ => name.to_string(),
        }
    }

    /// The engine's name for a tensor read as `name` from a checkpoint (one the engine saved, or an
    /// input model that uses transformers' names): the inverse of [`Self::export_name`].
    pub fn import_name(self, name: &str) -> String {
        match self {
            Self::BertForSequenceClassification => {
                name.strip_prefix(BERT_PREFIX).unwrap_or(name).to_string()
            }
            Self::LlamaForCausalLm => name.to_string(),
        }
    }

    /// Renames `(name, value)` pairs with [`Self::export_name`].
    pub fn export_names<T>(self, tensors: Vec<(String, T)>) -> Vec<(String, T)> {
        tensors
            .into_iter()
            .map(|(n, t)| (self.export_name(&n), t))
            .collect()
    }

    /// Renames `(name, value)` pairs with [`Self::import_name`].
    pub fn import_names<T>(self, tensors: Vec<(String, T)>) -> Vec<(String, T)> {
        tensors
            .into_iter()
            .map(|(n, t)| (self.import_name(&n), t))
            .collect()
    }
}

/// A BERT classifier's config: `BertForSequenceClassification`, `model_type: bert` (the engine runs
/// the BERT architecture whatever the input's type was), labels as the engine holds them, and the
/// fields transformers' `BertConfig` needs that older checkpoints may lack.
fn bert_classifier_config(config: &Value) -> Result<Value> {
    let parsed: BertConfig = parse(config, "BERT")?;
    let mut out = to_object(&parsed)?;
    for (key, value) in [
        ("initializer_range", json!(0.02)),
        ("pad_token_id", json!(0)),
    ] {
        out.entry(key).or_insert(value);
    }
    // The engine adds absolute position embeddings only; a relative type would change the model.
    out.insert("position_embedding_type".into(), json!("absolute"));
    finish(out, "bert", HfArchitecture::BertForSequenceClassification)
}

/// A Llama decoder's config: `LlamaForCausalLM`, `model_type: llama`, and every shape field written
/// out explicitly (key/value heads, head size, tied embeddings, biases, norm epsilon, rope base) so
/// transformers' defaults, which differ from the engine's in places (`tie_word_embeddings`), never
/// apply.
fn llama_causal_lm_config(config: &Value) -> Result<Value> {
    let parsed: LlamaConfig = parse(config, "Llama")?;
    let head_dim = parsed
        .head_dim()
        .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))?;
    let mut out = to_object(&parsed)?;
    out.insert("num_key_value_heads".into(), json!(parsed.kv_heads()));
    out.insert("head_dim".into(), json!(head_dim));
    out.insert("mlp_bias".into(), json!(false));
    finish(out, "llama", HfArchitecture::LlamaForCausalLm)
}

fn parse<C: serde::de::DeserializeOwned>(config: &Value, family: &str) -> Result<C> {
    serde_json::from_value(config.clone()).map_err(|e| {
        EngineError::InvalidModel(format!("config.json is not a {family} config: {e}"))
    })
}

fn to_object(config: &impl serde::Serialize) -> Result<Map<String, Value>> {
    match serde_json::to_value(config) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(EngineError::InvalidModel(format!(
            "config serialized as {other}, not an object"
        ))),
        Err(e) => Err(EngineError::InvalidModel(format!(
            "config cannot be serialized: {e}"
        ))),
    }
}

fn finish(mut out: Map<String, Value>, model_type: &str, arch: HfArchitecture) -> Result<Value> {
    out.insert("model_type".into(), json!(model_type));
    out.insert("architectures".into(), json!([arch.class_name()]));
    out.insert("torch_dtype".into(), json!("float32"));
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bert_names_gain_the_prefix_except_the_head_and_come_back() {
        let arch = HfArchitecture::BertForSequenceClassification;
        for (engine, saved) in [
            (
                "encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
            ),
            ("pooler.dense.bias", "bert.pooler.dense.bias"),
            (
                "embeddings.word_embeddings.weight",
                "bert.embeddings.word_embeddings.weight",
            ),
            ("classifier.weight", "classifier.weight"),
        ] {
            assert_eq!(arch.export_name(engine), saved);
            assert_eq!(arch.import_name(saved), engine);
        }
        // An input that already used transformers' names imports to the same engine names.
        assert_eq!(
            arch.export_name("bert.pooler.dense.weight"),
            "bert.pooler.dense.weight"
        );
        assert_eq!(
            arch.import_name("bert.pooler.dense.weight"),
            "pooler.dense.weight"
        );
    }

    #[test]
    fn llama_names_are_transformers_names_already() {
        let arch = HfArchitecture::LlamaForCausalLm;
        for name in ["model.layers.3.self_attn.q_proj.weight", "lm_head.weight"] {
            assert_eq!(arch.export_name(name), name);
            assert_eq!(arch.import_name(name), name);
        }
    }

    #[test]
    fn bert_config_declares_the_classifier_and_keeps_labels() {
        let config = json!({
            "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30,
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "max_position_embeddings": 16,
            "id2label": {"0": "neg", "1": "pos"}, "label2id": {"neg": 0, "pos": 1},
            "pad_token_id": 3, "_name_or_path": "x"
        });
        let out = HfArchitecture::BertForSequenceClassification
            .export_config(&config)
            .unwrap();
        assert_eq!(
            out["architectures"],
            json!(["BertForSequenceClassification"])
        );
        assert_eq!(out["model_type"], "bert");
        assert_eq!(out["id2label"], config["id2label"]);
        assert_eq!(out["label2id"], config["label2id"]);
        assert_eq!(out["pad_token_id"], 3, "kept, not defaulted");
        assert_eq!(out["_name_or_path"], "x");
        assert_eq!(out["hidden_act"], "gelu");
        assert_eq!(out["layer_norm_eps"], 1e-12);
        assert_eq!(out["torch_dtype"], "float32");
        let missing = json!({"model_type": "bert", "hidden_size": 8});
        assert!(matches!(
            HfArchitecture::BertForSequenceClassification.export_config(&missing),
            Err(EngineError::InvalidModel(m)) if m.contains("BERT")
        ));
    }

    #[test]
    fn llama_config_spells_out_what_transformers_would_default() {
        // A config as GGUF loading builds it for a "smollm"-typed file, minimal fields only.
        let config = json!({
            "model_type": "smollm", "vocab_size": 16, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 32, "tie_word_embeddings": true
        });
        let out = HfArchitecture::LlamaForCausalLm
            .export_config(&config)
            .unwrap();
        assert_eq!(out["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(out["model_type"], "llama");
        assert_eq!(out["num_key_value_heads"], 4);
        assert_eq!(out["head_dim"], 8);
        assert_eq!(out["tie_word_embeddings"], true);
        assert_eq!(out["attention_bias"], false);
        assert_eq!(out["mlp_bias"], false);
        assert_eq!(out["hidden_act"], "silu");
        assert_eq!(out["rms_norm_eps"], 1e-6);
        assert_eq!(out["rope_theta"], 10_000.0);
        let uneven = json!({
            "vocab_size": 16, "hidden_size": 30, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32
        });
        assert!(HfArchitecture::LlamaForCausalLm
            .export_config(&uneven)
            .is_err());
    }
}
