//! Objectives on tiny random classifiers: sums, frozen models and objective-owned parameters.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;

use super::*;
use crate::data::Example;
use crate::family::family_of;
use crate::layers::LinearFactory;
use crate::params::ParamStore;
use crate::spec::TaskType;
use crate::train::trainer::{TrainConfig, Trainer};
use crate::train::{AdamW, AdamWConfig, NoHooks};

fn classifier(seed: u64, trainable: bool) -> (ParamStore, Box<dyn TaskModel>) {
    let config = json!({
        "model_type": "bert", "vocab_size": 20, "hidden_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "id2label": {"0": "a", "1": "b", "2": "c"}
    });
    let store = ParamStore::new();
    store.set_init_missing(Some(seed));
    let family = family_of(&config).unwrap();
    let linears = LinearFactory::default();
    let task = TaskType::TextClassification;
    family
        .build(&store, &config, task, &linears, &Device::Cpu)
        .unwrap();
    let store = if trainable {
        store
    } else {
        ParamStore::from_tensors(
            store.tensors().into_iter().map(|(n, t)| (n, t.detach())),
            |_| false,
        )
        .unwrap()
    };
    let model = family
        .build(&store, &config, task, &linears, &Device::Cpu)
        .unwrap();
    (store, model)
}

fn rows() -> Vec<Example> {
    (0..24u32)
        .map(|i| Example {
            input_ids: vec![1, 2 + i % 17, 3 + (i * 7) % 16, 2 + (i * 5) % 17],
            label: Some(i % 3),
        })
        .collect()
}

fn batch(rows: &[Example]) -> Batch {
    let refs: Vec<&Example> = rows.iter().collect();
    Batch::collate(&refs, 0, &Device::Cpu).unwrap()
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

/// Mean squared distance from the trained model's logits, scaled by a learned factor, to the
/// first frozen model's logits: a stand-in for a distillation loss with its own parameter.
struct MatchFrozen {
    scale: Var,
}

impl Objective for MatchFrozen {
    fn name(&self) -> String {
        "match".into()
    }
    fn frozen_models(&self) -> usize {
        1
    }
    fn loss(&self, input: &ObjectiveInput<'_>) -> Result<Tensor> {
        let scaled = input.output.logits.broadcast_mul(self.scale.as_tensor())?;
        (scaled - &input.frozen[0].logits)?.sqr()?.mean_all()
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        vec![("match.scale".into(), self.scale.clone())]
    }
}

#[test]
fn a_weighted_sum_adds_its_terms() {
    let (_, model) = classifier(1, false);
    let rows = rows();
    let batch = batch(&rows[..4]);
    let output = model.forward(&batch, Outputs::LOGITS, None).unwrap();
    let input = ObjectiveInput {
        batch: &batch,
        model: &*model,
        output: &output,
        frozen: &[],
    };
    let task = scalar(&TaskLoss.loss(&input).unwrap());
    let sum = WeightedSum::new(vec![(0.25, Box::new(TaskLoss)), (0.5, Box::new(TaskLoss))]);
    assert!((scalar(&sum.loss(&input).unwrap()) - 0.75 * task).abs() < 1e-6);
    assert_eq!(sum.name(), "0.25·task + 0.5·task");
    assert!(WeightedSum::new(Vec::new()).loss(&input).is_err());
}

#[test]
fn training_against_a_frozen_model_moves_the_student_and_its_objective_not_the_teacher() {
    let (teacher_store, teacher) = classifier(2, false);
    let (student_store, student) = classifier(3, true);
    let objective = MatchFrozen {
        scale: Var::new(&[1f32], &Device::Cpu).unwrap(),
    };
    let rows = rows();
    let all = batch(&rows);
    let distance = || {
        let task = ObjectiveTask {
            model: &*student,
            frozen: vec![&*teacher],
            objective: &objective,
        };
        scalar(&task.loss(&all, None).unwrap())
    };
    let teacher_before: Vec<Tensor> = teacher_store
        .tensors()
        .into_iter()
        .map(|(_, t)| t.copy().unwrap())
        .collect();
    let before = distance();

    let mut vars = student_store.trainable_vars();
    vars.extend(objective.trainable());
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: 0.0,
        ..AdamWConfig::default()
    };
    let mut optimizer = AdamW::new(vars, cfg).unwrap();
    let config = TrainConfig {
        epochs: 10,
        batch_size: 8,
        eval_each_epoch: false,
        ..TrainConfig::default()
    };
    let cancel = AtomicBool::new(false);
    let trainer = Trainer::new(config, Device::Cpu, 0, &cancel).unwrap();
    let task = ObjectiveTask {
        model: &*student,
        frozen: vec![&*teacher],
        objective: &objective,
    };
    let report = trainer
        .run(&task, &mut optimizer, &rows, &mut NoHooks)
        .unwrap();
    assert_eq!(report.steps, 30);

    let after = distance();
    assert!(after < before * 0.5, "distance {before} → {after}");
    assert_ne!(
        scalar(&objective.scale.as_tensor().squeeze(0).unwrap()),
        1.0,
        "the objective's own parameter trains"
    );
    for ((_, now), then) in teacher_store.tensors().iter().zip(&teacher_before) {
        assert_eq!(
            scalar(&(now - then).unwrap().abs().unwrap().sum_all().unwrap()),
            0.0
        );
    }
}

#[test]
fn frozen_outputs_are_cut_from_the_graph() {
    // The teacher's store is trainable here, yet none of its variables may get a gradient.
    let (teacher_store, teacher) = classifier(4, true);
    let (student_store, student) = classifier(5, true);
    let objective = MatchFrozen {
        scale: Var::new(&[1f32], &Device::Cpu).unwrap(),
    };
    let rows = rows();
    let task = ObjectiveTask {
        model: &*student,
        frozen: vec![&*teacher],
        objective: &objective,
    };
    let grads = task
        .loss(&batch(&rows[..6]), None)
        .unwrap()
        .backward()
        .unwrap();
    assert!(grads.get(objective.scale.as_tensor()).is_some());
    assert!(student_store
        .trainable_vars()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_some()));
    assert!(teacher_store
        .trainable_vars()
        .iter()
        .all(|(_, v)| grads.get(v.as_tensor()).is_none()));
}
