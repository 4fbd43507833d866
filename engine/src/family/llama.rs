//! Llama-style decoders (Llama, SmolLM): causal language modelling.

use candle_core::{DType, Device};
use serde_json::Value;

use super::modules::{classify, ModuleMap, ModuleRole};
use super::{parse_config, require_positive, ModelFamily};
use crate::error::{EngineError, Result};
use crate::layers::LinearFactory;
use crate::models::llama::{LlamaConfig, LlamaForCausalLm};
use crate::models::TaskModel;
use crate::params::ParamStore;
use crate::spec::TaskType;

/// The Llama family.
#[derive(Clone, Copy, Debug, Default)]
pub struct LlamaFamily;

const LAYER_PREFIXES: &[&str] = &["model.layers."];

/// The token embedding, which a tied model also uses as its output matrix.
const EMBEDDING: &str = "model.embed_tokens.weight";

const TOP: &[(&str, ModuleRole)] = &[
    ("model.embed_tokens", ModuleRole::Embedding),
    ("model.norm", ModuleRole::Norm),
    ("lm_head", ModuleRole::TaskHead),
];

const IN_LAYER: &[(&str, ModuleRole)] = &[
    ("self_attn.q_proj", ModuleRole::Query),
    ("self_attn.k_proj", ModuleRole::Key),
    ("self_attn.v_proj", ModuleRole::Value),
    ("self_attn.o_proj", ModuleRole::AttentionOutput),
    ("mlp.gate_proj", ModuleRole::FfnGate),
    ("mlp.up_proj", ModuleRole::FfnUp),
    ("mlp.down_proj", ModuleRole::FfnDown),
    ("input_layernorm", ModuleRole::Norm),
    ("post_attention_layernorm", ModuleRole::Norm),
];

fn config(value: &Value) -> Result<LlamaConfig> {
    let cfg: LlamaConfig = parse_config(value)?;
    require_positive(&[
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("num_hidden_layers", cfg.num_hidden_layers),
        ("intermediate_size", cfg.intermediate_size),
        ("max_position_embeddings", cfg.max_position_embeddings),
    ])?;
    cfg.head_dim()
        .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))?;
    Ok(cfg)
}

impl ModelFamily for LlamaFamily {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn description(&self) -> &'static str {
        "Llama-style decoders"
    }

    fn model_types(&self) -> &'static [&'static str] {
        // Mistral is Llama's architecture with a sliding attention window that only matters
        // past its length (4,096 tokens and more), longer than the sequences jobs train on.
        &["llama", "mistral"]
    }

    fn tasks(&self) -> &'static [TaskType] {
        &[TaskType::LanguageModeling]
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
        let hd = cfg
            .head_dim()
            .map_err(|e| EngineError::InvalidModel(e.to_string()))?;
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let mut shapes = vec![(EMBEDDING.to_owned(), vec![cfg.vocab_size, h])];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        if names.iter().any(|n| n == "lm_head.weight") {
            shapes.push(("lm_head.weight".to_owned(), vec![cfg.vocab_size, h]));
        }
        Ok(shapes)
    }

    fn config_for_task(&self, value: &Value, _task: TaskType, _labels: &[String]) -> Result<Value> {
        config(value)?;
        Ok(value.clone())
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
            TaskType::LanguageModeling => {
                let vb = store.var_builder(DType::F32, device);
                Ok(Box::new(LlamaForCausalLm::load(vb, &cfg, linears)?))
            }
            TaskType::TextClassification => Err(EngineError::Unsupported(
                "Llama-style decoders are built for language_modeling only".into(),
            )),
        }
    }

    fn modules(&self, value: &Value, names: &[String]) -> Result<ModuleMap> {
        let cfg = config(value)?;
        let modules = classify(names, LAYER_PREFIXES, TOP, IN_LAYER);
        let head_dim = cfg
            .head_dim()
            .map_err(|e| EngineError::InvalidModel(e.to_string()))?;
        let kv_groups = cfg.num_attention_heads / cfg.kv_heads();
        let output = if names.iter().any(|n| n == "lm_head.weight") {
            "lm_head.weight"
        } else {
            EMBEDDING
        };
        Ok(ModuleMap::new(
            modules,
            head_dim,
            kv_groups,
            Some(output.to_owned()),
        ))
    }

    fn layer_prefixes(&self) -> &'static [&'static str] {
        LAYER_PREFIXES
    }

    fn hf_architecture(&self, _task: TaskType) -> &'static str {
        "LlamaForCausalLM"
    }

    fn needs_uniform_layers(&self) -> bool {
        true
    }

    fn config_for_widths(
        &self,
        config: &Value,
        widths: &super::LayerWidths,
        map: &ModuleMap,
    ) -> Result<Value> {
        super::uneven::uniform_config(config, widths, map.head_dim)
    }
}
