//! LoRAPrune's adapter plumbing on a tiny BERT: the adapters it attaches train alone, and folding
//! them in keeps the model's outputs.

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::data::{Batch, Example};
use crate::family::family_of;
use crate::layers::LinearFactory;
use crate::models::Outputs;
use crate::params::ParamStore;
use crate::spec::TaskType;
use crate::stages::lora::{attach_adapters, merge_attached, LoraSettings};
use crate::stages::WorkingModel;

fn tiny_bert() -> WorkingModel {
    let config = json!({"model_type": "bert", "vocab_size": 12, "hidden_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
        "max_position_embeddings": 8, "id2label": {"0": "a", "1": "b"}});
    let store = ParamStore::new();
    store.set_init_missing(Some(5));
    let family = family_of(&config).unwrap();
    family
        .build(
            &store,
            &config,
            TaskType::TextClassification,
            &LinearFactory::default(),
            &Device::Cpu,
        )
        .unwrap();
    // Linear weights are created as zeros: give them values so the outputs mean something.
    let tensors = store.tensors().into_iter().map(|(n, t)| {
        let t = if t.rank() == 2 {
            Tensor::randn(0f32, 0.3, t.dims(), &Device::Cpu).unwrap()
        } else {
            t
        };
        (n, t)
    });
    WorkingModel::new(ParamStore::from_tensors(tensors, |_| true).unwrap(), config)
}

fn logits(model: &WorkingModel) -> Tensor {
    let built = model
        .family()
        .unwrap()
        .build(
            &model.store,
            &model.config,
            TaskType::TextClassification,
            &model.linear_factory(),
            &Device::Cpu,
        )
        .unwrap();
    let rows = [
        Example {
            input_ids: vec![1, 4, 7, 2],
            label: Some(1),
        },
        Example {
            input_ids: vec![3, 9, 5],
            label: Some(0),
        },
    ];
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = Batch::collate(&refs, 0, &Device::Cpu).unwrap();
    built.forward(&batch, Outputs::LOGITS, None).unwrap().logits
}

#[test]
fn attached_adapters_train_alone_and_merging_them_keeps_the_outputs() {
    let mut model = tiny_bert();
    let lora = LoraSettings {
        rank: 2,
        alpha: 4,
        target_modules: None,
        modules_to_save: None,
        base_quantization: None,
        requantize_merged: false,
        dropout: 0.0,
    };
    let dense = logits(&model);
    let targets = attach_adapters(&mut model, &lora, 3).unwrap();
    // 2 layers × (query, key, value, attention output, FFN up, FFN down).
    assert_eq!(targets.adapted.len(), 12);
    let trainable: Vec<String> = model
        .store
        .trainable_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(
        trainable
            .iter()
            .all(|n| n.contains(".lora_") || n.starts_with("classifier.")),
        "{trainable:?}"
    );
    // A fresh adapter (B = 0) changes nothing; a trained one does.
    let diff = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert!(diff(&logits(&model), &dense) < 1e-6);
    for (name, var) in model.store.trainable_vars() {
        if name.ends_with("lora_B.weight") {
            var.set(&Tensor::randn(0f32, 0.5, var.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    let adapted = logits(&model);
    assert!(
        diff(&adapted, &dense) > 1e-3,
        "the adapters change the outputs"
    );

    merge_attached(&mut model, &lora, &targets).unwrap();
    assert!(model.store.names().iter().all(|n| !n.contains(".lora_")));
    assert_eq!(
        model.store.trainable_vars().len(),
        model.store.names().len(),
        "every weight is trainable again"
    );
    let merged = logits(&model);
    assert!(
        diff(&merged, &adapted) < 1e-5,
        "merged W + BA gives the adapted outputs: {}",
        diff(&merged, &adapted)
    );
}
