//! BERT-style encoders (BERT, MiniLM): classification with a pooler and a linear head.

use candle_core::{DType, Device};
use serde_json::Value;

use super::modules::{classify, ModuleMap, ModuleRole};
use super::{parse_config, require_positive, ModelFamily};
use crate::error::{EngineError, Result};
use crate::layers::LinearFactory;
use crate::models::bert::{BertConfig, BertForSequenceClassification};
use crate::models::TaskModel;
use crate::params::ParamStore;
use crate::spec::TaskType;

/// The BERT family.
#[derive(Clone, Copy, Debug, Default)]
pub struct BertFamily;

const LAYER_PREFIXES: &[&str] = &["bert.encoder.layer.", "encoder.layer."];

const TOP: &[(&str, ModuleRole)] = &[
    ("embeddings.word_embeddings", ModuleRole::Embedding),
    ("embeddings.position_embeddings", ModuleRole::Embedding),
    ("embeddings.token_type_embeddings", ModuleRole::Embedding),
    ("embeddings.LayerNorm", ModuleRole::Norm),
    ("pooler.dense", ModuleRole::Pooler),
    ("bert.embeddings.word_embeddings", ModuleRole::Embedding),
    ("bert.embeddings.position_embeddings", ModuleRole::Embedding),
    (
        "bert.embeddings.token_type_embeddings",
        ModuleRole::Embedding,
    ),
    ("bert.embeddings.LayerNorm", ModuleRole::Norm),
    ("bert.pooler.dense", ModuleRole::Pooler),
    ("classifier", ModuleRole::TaskHead),
];

const IN_LAYER: &[(&str, ModuleRole)] = &[
    ("attention.self.query", ModuleRole::Query),
    ("attention.self.key", ModuleRole::Key),
    ("attention.self.value", ModuleRole::Value),
    ("attention.output.dense", ModuleRole::AttentionOutput),
    ("attention.output.LayerNorm", ModuleRole::Norm),
    ("intermediate.dense", ModuleRole::FfnUp),
    ("output.dense", ModuleRole::FfnDown),
    ("output.LayerNorm", ModuleRole::Norm),
];

fn config(value: &Value) -> Result<BertConfig> {
    let cfg: BertConfig = parse_config(value)?;
    require_positive(&[
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("num_attention_heads", cfg.num_attention_heads),
        ("intermediate_size", cfg.intermediate_size),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ])?;
    if !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        return Err(EngineError::InvalidModel(format!(
            "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
            cfg.hidden_size, cfg.num_attention_heads
        )));
    }
    Ok(cfg)
}

impl ModelFamily for BertFamily {
    fn name(&self) -> &'static str {
        "bert"
    }

    fn description(&self) -> &'static str {
        "BERT-style encoders"
    }

    fn model_types(&self) -> &'static [&'static str] {
        &["bert"]
    }

    fn tasks(&self) -> &'static [TaskType] {
        &[TaskType::TextClassification]
    }

    fn check_config(&self, value: &Value) -> Result<()> {
        config(value).map(|_| ())
    }

    fn expected_shapes(
        &self,
        value: &Value,
        names: &[String],
    ) -> Result<Vec<(String, Vec<usize>)>> {
        let cfg = config(value)?;
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        // Checkpoints saved from `BertFor…` classes prefix the encoder with `bert.`.
        let root = if names.iter().any(|n| n.starts_with("bert.embeddings.")) {
            "bert."
        } else {
            ""
        };
        let mut shapes = vec![
            (
                format!("{root}embeddings.word_embeddings.weight"),
                vec![cfg.vocab_size, h],
            ),
            (
                format!("{root}embeddings.position_embeddings.weight"),
                vec![cfg.max_position_embeddings, h],
            ),
        ];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("{root}encoder.layer.{l}");
            for name in ["query", "key", "value"] {
                shapes.push((format!("{p}.attention.self.{name}.weight"), vec![h, h]));
            }
            shapes.push((format!("{p}.attention.output.dense.weight"), vec![h, h]));
            shapes.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
            shapes.push((format!("{p}.output.dense.weight"), vec![h, i]));
        }
        Ok(shapes)
    }

    fn config_for_task(&self, value: &Value, task: TaskType, labels: &[String]) -> Result<Value> {
        let mut cfg = config(value)?;
        if task == TaskType::TextClassification {
            cfg.set_labels(labels);
        }
        serde_json::to_value(&cfg).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }

    fn build(
        &self,
        store: &ParamStore,
        value: &Value,
        task: TaskType,
        linears: &LinearFactory,
        device: &Device,
    ) -> Result<Box<dyn TaskModel>> {
        let cfg = config(value)?;
        match task {
            TaskType::TextClassification => {
                let vb = store.var_builder(DType::F32, device);
                Ok(Box::new(BertForSequenceClassification::load(
                    vb, &cfg, linears,
                )?))
            }
            TaskType::LanguageModeling => Err(EngineError::Unsupported(
                "BERT-style encoders are built for text_classification only".into(),
            )),
        }
    }

    fn modules(&self, value: &Value, names: &[String]) -> Result<ModuleMap> {
        let cfg = config(value)?;
        let modules = classify(names, LAYER_PREFIXES, TOP, IN_LAYER);
        let head_dim = cfg.hidden_size / cfg.num_attention_heads;
        Ok(ModuleMap::new(modules, head_dim, 1, None))
    }

    fn layer_prefixes(&self) -> &'static [&'static str] {
        LAYER_PREFIXES
    }

    fn hf_architecture(&self, _task: TaskType) -> &'static str {
        "BertForSequenceClassification"
    }

    fn needs_uniform_layers(&self) -> bool {
        false
    }

    fn config_for_widths(
        &self,
        config: &Value,
        widths: &super::LayerWidths,
        _map: &ModuleMap,
    ) -> Result<Value> {
        super::uneven::padded_config(config, widths)
    }
}
