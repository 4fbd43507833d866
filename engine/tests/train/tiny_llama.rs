//! A tiny random Llama driven by the trainer through the causal-LM adapter learns a deterministic
//! token sequence: next-token loss falls far below chance and perplexity follows.

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{DType, Device};
use compressd_engine::data::Example;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};
use compressd_engine::params::ParamStore;
use compressd_engine::task::{evaluate_lm, CausalLmTask};
use compressd_engine::train::{AdamW, AdamWConfig, NoHooks, StopReason, TrainConfig, Trainer};

#[test]
fn tiny_llama_learns_a_cyclic_sequence() -> Result<()> {
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    }))?;
    let store = ParamStore::new();
    store.set_init_missing(Some(9));
    let model = LlamaForCausalLm::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &cfg,
        &LinearFactory::default(),
    )?;
    // Rows are windows of the cycle 1, 2, ..., 12, 1, 2, ...: every next token is determined.
    let rows: Vec<Example> = (0..24u32)
        .map(|start| Example {
            input_ids: (0..12).map(|i| 1 + (start + i) % 12).collect(),
            label: None,
        })
        .collect();
    let task = CausalLmTask { model: &model };
    let (chance_nll, _) = evaluate_lm(&task, &rows, 8, 0, &Device::Cpu)?;
    let train_cfg = TrainConfig {
        epochs: 30,
        batch_size: 8,
        optimizer: AdamWConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable_vars(), train_cfg.optimizer.clone())?;
    let never = AtomicBool::new(false);
    let report = Trainer::new(train_cfg, Device::Cpu, 0, &never)?.run(
        &task,
        &mut opt,
        &rows,
        &mut NoHooks,
    )?;
    assert_eq!(report.stop_reason, StopReason::Completed);
    let (nll, ppl) = evaluate_lm(&task, &rows, 8, 0, &Device::Cpu)?;
    assert!(
        chance_nll > 2.0,
        "an untrained model is near ln 16 = 2.77: {chance_nll}"
    );
    assert!(nll < 0.1, "trained next-token NLL {nll}");
    assert!((ppl - nll.exp()).abs() < 1e-9 && ppl < 1.2);
    Ok(())
}
