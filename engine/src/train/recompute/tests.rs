//! Recomputation gives the loss and gradients of a plain step, on tiny random models.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};

use super::RecomputingForward;
use crate::data::{Batch, Example};
use crate::family::family_of;
use crate::layers::{ActivationObservers, FakeQuantInputs, LinearFactory, LinearKind, LinearPlan};
use crate::models::common::DropoutRng;
use crate::models::{Outputs, TaskModel};
use crate::params::ParamStore;
use crate::quant::QuantScheme;
use crate::spec::TaskType;

fn bert_config() -> Value {
    json!({
        "model_type": "bert", "vocab_size": 24, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2,
        "id2label": {"0": "a", "1": "b", "2": "c"}
    })
}

fn llama_config() -> Value {
    json!({
        "model_type": "llama", "vocab_size": 24, "hidden_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
        "max_position_embeddings": 32, "tie_word_embeddings": true
    })
}

fn model(
    config: &Value,
    task: TaskType,
    linears: &LinearFactory,
) -> (ParamStore, Box<dyn TaskModel>) {
    let store = ParamStore::new();
    store.set_init_missing(Some(7));
    let model = family_of(config)
        .unwrap()
        .build(&store, config, task, linears, &Device::Cpu)
        .unwrap();
    (store, model)
}

/// Rows of different lengths, so padding is masked; labelled for classification, or the rows'
/// own next tokens for language modelling.
fn batch_of(labelled: bool) -> Batch {
    let rows: Vec<Example> = (0..5u32)
        .map(|i| Example {
            input_ids: (0..(4 + i as usize * 2))
                .map(|t| 1 + (i * 7 + t as u32 * 5) % 23)
                .collect(),
            label: labelled.then_some(i % 3),
        })
        .collect();
    let refs: Vec<&Example> = rows.iter().collect();
    Batch::collate(&refs, 0, &Device::Cpu).unwrap()
}

fn batch() -> Batch {
    batch_of(true)
}

/// The task loss plus a term on an inner hidden state, so a block's input gets a gradient both
/// from the block after it and from the loss directly.
fn loss(model: &dyn TaskModel, out: &crate::models::TaskOutput, batch: &Batch) -> Tensor {
    let task = model.task_loss(out, batch).unwrap();
    let inner = out.hidden_states[1].sqr().unwrap().mean_all().unwrap();
    (task + (inner * 0.1).unwrap()).unwrap()
}

fn plain(model: &dyn TaskModel, batch: &Batch, seed: u64) -> (f32, GradStore) {
    let rng = DropoutRng::new(seed);
    let want = Outputs {
        hidden_states: true,
        attentions: false,
    };
    let out = model.forward(batch, want, Some(&rng)).unwrap();
    let loss = loss(model, &out, batch);
    (loss.to_scalar().unwrap(), loss.backward().unwrap())
}

fn recomputed(
    model: &dyn TaskModel,
    batch: &Batch,
    seed: u64,
    vars: &[(String, Var)],
) -> (f32, GradStore) {
    let rng = DropoutRng::new(seed);
    let want = Outputs {
        hidden_states: true,
        attentions: false,
    };
    let layered = model.layered().unwrap();
    let forward = RecomputingForward::run(layered, batch, want, Some(&rng)).unwrap();
    let loss = loss(model, forward.output(), batch);
    let value = loss.to_scalar().unwrap();
    (value, forward.backward(batch, loss, vars).unwrap())
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Every variable's gradient agrees to float rounding, and none is missing or all zero.
fn assert_same_gradients(vars: &[(String, Var)], a: &GradStore, b: &GradStore) {
    for (name, var) in vars {
        let ga = a
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no plain gradient"));
        let gb = b
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no recomputed gradient"));
        let scale = max_abs(ga);
        assert!(scale > 0.0, "{name}: zero gradient");
        let diff = max_abs(&(ga - gb).unwrap());
        // Measured: at most 6e-7 of the scale (summing order). The floor is for gradients that
        // are zero in exact arithmetic (a key bias shifts every score of a row alike) and hold
        // only rounding noise.
        assert!(
            diff <= 1e-5 * scale + 1e-7,
            "{name}: differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn an_encoder_with_dropout_gets_the_plain_loss_and_gradients() {
    let (store, model) = model(
        &bert_config(),
        TaskType::TextClassification,
        &LinearFactory::default(),
    );
    let vars = store.trainable_vars();
    let batch = batch();
    let (loss_a, grads_a) = plain(&*model, &batch, 11);
    let (loss_b, grads_b) = recomputed(&*model, &batch, 11, &vars);
    // Same masks, same ops in the same order: the loss is the same to the bit.
    assert_eq!(loss_a.to_bits(), loss_b.to_bits());
    assert_same_gradients(&vars, &grads_a, &grads_b);
    // Another seed draws other masks: the comparison above is not vacuous.
    let (loss_c, _) = plain(&*model, &batch, 12);
    assert_ne!(loss_a, loss_c);
}

#[test]
fn a_decoder_with_tied_embeddings_gets_the_plain_loss_and_gradients() {
    let (store, model) = model(
        &llama_config(),
        TaskType::LanguageModeling,
        &LinearFactory::default(),
    );
    let vars = store.trainable_vars();
    let batch = batch_of(false);
    let (loss_a, grads_a) = plain(&*model, &batch, 3);
    let (loss_b, grads_b) = recomputed(&*model, &batch, 3, &vars);
    assert_eq!(loss_a.to_bits(), loss_b.to_bits());
    // The tied embedding's gradient is the sum of its use as a table and as the output layer.
    assert_same_gradients(&vars, &grads_a, &grads_b);
}

#[test]
fn frozen_lower_layers_or_a_frozen_body_give_the_plain_gradients() {
    type Frozen = fn(&str) -> bool;
    let frozen: [(&str, Frozen); 2] = [
        ("embeddings and layer 0", |n: &str| {
            n.starts_with("embeddings.") || n.contains(".layer.0.")
        }),
        ("the whole body", |n: &str| {
            !(n.starts_with("classifier") || n.starts_with("pooler"))
        }),
    ];
    for (what, is_frozen) in frozen {
        let (store, _) = model(
            &bert_config(),
            TaskType::TextClassification,
            &LinearFactory::default(),
        );
        store.set_trainable(is_frozen, false).unwrap();
        // Rebuilt, the model holds the frozen weights as constants, as a training stage does.
        let model = family_of(&bert_config())
            .unwrap()
            .build(
                &store,
                &bert_config(),
                TaskType::TextClassification,
                &LinearFactory::default(),
                &Device::Cpu,
            )
            .unwrap();
        let vars = store.trainable_vars();
        assert!(
            !vars.is_empty() && vars.iter().all(|(n, _)| !is_frozen(n)),
            "{what}"
        );
        let batch = batch();
        let (loss_a, grads_a) = plain(&*model, &batch, 4);
        let (loss_b, grads_b) = recomputed(&*model, &batch, 4, &vars);
        assert_eq!(loss_a.to_bits(), loss_b.to_bits(), "{what}");
        assert_same_gradients(&vars, &grads_a, &grads_b);
        assert_eq!(grads_b.get_ids().count(), vars.len(), "{what}");
    }
}

#[test]
fn only_the_variables_asked_for_are_kept() {
    let (store, model) = model(
        &bert_config(),
        TaskType::TextClassification,
        &LinearFactory::default(),
    );
    let vars = store.trainable_vars();
    let (_, grads) = recomputed(&*model, &batch(), 1, &vars);
    assert_eq!(grads.get_ids().count(), vars.len());
}

#[test]
fn observers_update_once_per_batch_and_the_replay_uses_the_same_scale() {
    let linears = |observers: &Arc<ActivationObservers>| {
        LinearFactory::new(LinearPlan::uniform(LinearKind::FakeQuant {
            scheme: QuantScheme::Int8,
            inputs: FakeQuantInputs::Int8PerTensor,
        }))
        .with_activation_observers(observers.clone())
    };
    let plain_observers = Arc::new(ActivationObservers::new(None));
    let replay_observers = Arc::new(ActivationObservers::new(None));
    let (store_a, model_a) = model(
        &bert_config(),
        TaskType::TextClassification,
        &linears(&plain_observers),
    );
    let (store_b, model_b) = model(
        &bert_config(),
        TaskType::TextClassification,
        &linears(&replay_observers),
    );
    let batch = batch();
    for step in 0..3 {
        let (loss_a, grads_a) = plain(&*model_a, &batch, step);
        let vars_b = store_b.trainable_vars();
        let (loss_b, grads_b) = recomputed(&*model_b, &batch, step, &vars_b);
        assert_eq!(loss_a.to_bits(), loss_b.to_bits(), "step {step}");
        // Same seed, same weights: the two models' variables pair up by name.
        let vars_a = store_a.trainable_vars();
        let mut paired = GradStore::default();
        for ((name_a, var_a), (name_b, var_b)) in vars_a.iter().zip(&vars_b) {
            assert_eq!(name_a, name_b);
            paired.insert(
                var_a.as_tensor(),
                grads_b.get(var_b.as_tensor()).unwrap().clone(),
            );
        }
        assert_same_gradients(&vars_a, &grads_a, &paired);
    }
    let (a, b) = (plain_observers.ranges(), replay_observers.ranges());
    assert!(!a.is_empty());
    assert_eq!(a, b, "the replay must not update the ranges again");
    assert!(a.values().all(|r| r.batches == 3), "{a:?}");
}

#[test]
fn attention_maps_are_refused() {
    let (_, model) = model(
        &bert_config(),
        TaskType::TextClassification,
        &LinearFactory::default(),
    );
    let want = Outputs {
        hidden_states: false,
        attentions: true,
    };
    let Err(err) = RecomputingForward::run(model.layered().unwrap(), &batch(), want, None) else {
        panic!("attention maps need the activations");
    };
    assert!(err.to_string().contains("attention maps"), "{err}");
}
