//! Objectives on tiny random classifiers: sums, frozen models and objective-owned parameters.

use std::sync::atomic::AtomicBool;

use candle_core::{DType, Device, Tensor, Var};
use serde_json::json;

use super::*;
use crate::data::Example;
use crate::family::family_of;
use crate::layers::LinearFactory;
use crate::models::TaskOutput;
use crate::params::ParamStore;
use crate::spec::TaskType;
use crate::train::trainer::{TrainConfig, Trainer};
use crate::train::{AdamW, AdamWConfig, NoHooks};

fn classifier(seed: u64, trainable: bool) -> (ParamStore, Box<dyn TaskModel>) {
    classifier_of_width(seed, trainable, 16)
}

fn classifier_of_width(
    seed: u64,
    trainable: bool,
    hidden: usize,
) -> (ParamStore, Box<dyn TaskModel>) {
    let config = json!({
        "model_type": "bert", "vocab_size": 20, "hidden_size": hidden, "num_hidden_layers": 1,
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
    // Nested sums flatten into their terms, weights multiplied.
    let nested = WeightedSum::new(vec![(2.0, Box::new(sum)), (1.0, Box::new(TaskLoss))]);
    let terms = nested.terms(&input).unwrap();
    let weights: Vec<f64> = terms.iter().map(|t| t.weight).collect();
    assert_eq!(weights, [0.5, 1.0, 1.0]);
    assert!(terms.iter().all(|t| t.name == "task"));
    assert!((scalar(&nested.loss(&input).unwrap()) - 2.5 * task).abs() < 1e-5);
}

/// Every knowledge term of a student identical to its teacher is zero (InfoNCE excepted: it is a
/// cross-entropy over the batch).
#[test]
fn knowledge_terms_vanish_for_a_student_equal_to_its_teacher() {
    let (_, model) = classifier(6, false);
    let rows = rows();
    let batch = batch(&rows[..6]);
    let all = Outputs {
        hidden_states: true,
        attentions: true,
    };
    let output = model.forward(&batch, all, None).unwrap();
    let frozen = [output.clone()];
    let input = ObjectiveInput {
        batch: &batch,
        model: &*model,
        output: &output,
        frozen: &frozen,
    };
    let pairs = vec![(0, 0)];
    let cpu = &Device::Cpu;
    let mut objectives: Vec<Box<dyn Objective>> = vec![Box::new(AttentionKd {
        pairs: pairs.clone(),
    })];
    for loss in [FeatureLoss::Mse, FeatureLoss::Cosine] {
        for tokens in [Tokens::All, Tokens::Cls, Tokens::Mean] {
            let kd = FeatureKd::new(pairs.clone(), loss, tokens, (16, 16), true, cpu).unwrap();
            assert!(kd.trainable().is_empty(), "no projection for equal widths");
            objectives.push(Box::new(kd));
        }
    }
    for loss in [RelationLoss::Mse, RelationLoss::Kl] {
        for pooling in [Pooling::Mean, Pooling::Cls] {
            objectives.push(Box::new(
                RelationKd::new(loss, pooling, 0.5, (16, 16), true, cpu).unwrap(),
            ));
        }
    }
    for objective in &objectives {
        let value = scalar(&objective.loss(&input).unwrap());
        assert!(value.abs() < 1e-5, "{}: {value}", objective.name());
    }
    // A different student is not at zero, and a layer the outputs lack is an error.
    let (_, other) = classifier(7, false);
    let other_output = other.forward(&batch, all, None).unwrap();
    let apart = ObjectiveInput {
        output: &other_output,
        ..input
    };
    for objective in &objectives {
        // Random tiny models attend almost uniformly: their attention maps differ only a little.
        let value = scalar(&objective.loss(&apart).unwrap());
        assert!(value > 0.0, "{}: {value}", objective.name());
    }
    let beyond = FeatureKd::new(
        vec![(0, 3)],
        FeatureLoss::Mse,
        Tokens::All,
        (16, 16),
        true,
        cpu,
    )
    .unwrap();
    let err = beyond.loss(&input).unwrap_err().to_string();
    assert!(err.contains("teacher layer 3"), "{err}");
    let infonce = RelationKd::new(
        RelationLoss::Infonce,
        Pooling::Mean,
        0.1,
        (16, 16),
        true,
        cpu,
    )
    .unwrap();
    assert!(scalar(&infonce.loss(&input).unwrap()).is_finite());
    assert!(RelationKd::new(RelationLoss::Kl, Pooling::Mean, 0.0, (16, 16), true, cpu).is_err());
}

/// Hand-computed values: MSE per element and 1 − cos per token on a one-token batch.
#[test]
fn feature_losses_match_hand_computation() {
    let rows = [Example {
        input_ids: vec![1],
        label: Some(0),
    }];
    let refs: Vec<&Example> = rows.iter().collect();
    let batch = Batch::collate(&refs, 0, &Device::Cpu).unwrap();
    let (_, model) = classifier(1, false);
    let out = |h: [f32; 2]| TaskOutput {
        logits: Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap(),
        hidden_states: vec![
            Tensor::zeros((1, 1, 2), DType::F32, &Device::Cpu).unwrap(),
            Tensor::new(&[[h]], &Device::Cpu).unwrap(),
        ],
        attentions: Vec::new(),
    };
    let (student, teacher) = (out([1.0, 0.0]), [out([1.0, 1.0])]);
    let input = ObjectiveInput {
        batch: &batch,
        model: &*model,
        output: &student,
        frozen: &teacher,
    };
    let kd = |loss| FeatureKd::new(vec![(0, 0)], loss, Tokens::All, (2, 2), true, &Device::Cpu);
    let mse = scalar(&kd(FeatureLoss::Mse).unwrap().loss(&input).unwrap());
    assert!((mse - 0.5).abs() < 1e-6, "{mse}");
    let cosine = scalar(&kd(FeatureLoss::Cosine).unwrap().loss(&input).unwrap());
    assert!((cosine - (1.0 - 0.5f32.sqrt())).abs() < 1e-6, "{cosine}");
}

/// A narrower student is matched through a learned projection, which gets gradients with the
/// student's layers; without one the pair is refused.
#[test]
fn a_projection_bridges_different_widths_and_trains() {
    let (_, teacher) = classifier_of_width(8, false, 24);
    let (student_store, student) = classifier(9, true);
    let cpu = &Device::Cpu;
    let refused = FeatureKd::new(
        vec![(0, 0)],
        FeatureLoss::Mse,
        Tokens::All,
        (16, 24),
        false,
        cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("16 wide") && refused.contains("projection"),
        "{refused}"
    );
    assert!(RelationKd::new(
        RelationLoss::Infonce,
        Pooling::Mean,
        0.1,
        (16, 24),
        false,
        cpu
    )
    .is_err());
    // MSE and cosine relations compare each model with itself: no projection needed.
    assert!(RelationKd::new(RelationLoss::Mse, Pooling::Mean, 0.1, (16, 24), false, cpu).is_ok());

    let feature = FeatureKd::new(
        vec![(0, 0)],
        FeatureLoss::Mse,
        Tokens::All,
        (16, 24),
        true,
        cpu,
    )
    .unwrap();
    let relation = RelationKd::new(
        RelationLoss::Infonce,
        Pooling::Mean,
        0.1,
        (16, 24),
        true,
        cpu,
    )
    .unwrap();
    let projections: Vec<Var> = feature
        .trainable()
        .into_iter()
        .chain(relation.trainable())
        .map(|(_, v)| v)
        .collect();
    assert_eq!(projections.len(), 2);
    assert_eq!(projections[0].as_tensor().dims(), [24, 16]);
    let objective = WeightedSum::new(vec![(1.0, Box::new(feature)), (1.0, Box::new(relation))]);
    let rows = rows();
    let task = ObjectiveTask::new(&*student, vec![&*teacher], &objective);
    let grads = task
        .loss(&batch(&rows[..6]), None)
        .unwrap()
        .backward()
        .unwrap();
    for projection in &projections {
        let grad = grads.get(projection.as_tensor()).expect("a gradient");
        assert!(scalar(&grad.abs().unwrap().sum_all().unwrap()) > 0.0);
    }
    let layer_vars: Vec<_> = student_store
        .trainable_vars()
        .into_iter()
        .filter(|(n, _)| n.contains("encoder.layer.0."))
        .collect();
    assert!(!layer_vars.is_empty());
    for (name, var) in layer_vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}"));
        assert!(
            scalar(&grad.abs().unwrap().sum_all().unwrap()) > 0.0,
            "{name}"
        );
    }
    // The terms were kept for the trainer, one mean each, and are taken once.
    let terms = task.take_loss_terms();
    let names: Vec<&str> = terms.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["feature", "relation"]);
    assert!(task.take_loss_terms().is_empty());
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
        let task = ObjectiveTask::new(&*student, vec![&*teacher], &objective);
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
    let task = ObjectiveTask::new(&*student, vec![&*teacher], &objective);
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
    let task = ObjectiveTask::new(&*student, vec![&*teacher], &objective);
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

/// `cache_teacher`: a batch whose examples were all seen is assembled from the cache (the teacher
/// does not run) and gives the loss the teacher's own outputs give, whatever the batch's order and
/// padding; logits, hidden states and attention maps all go through it. A budget too small for
/// one example caches nothing and says so.
#[test]
fn the_teacher_cache_serves_seen_examples_with_the_same_loss() {
    let (_, teacher) = classifier(3, false);
    let (_, student) = classifier(4, true);
    let objective = WeightedSum::new(vec![
        (
            1.0,
            Box::new(ResponseKd {
                temperature: 2.0,
                top_k: None,
            }),
        ),
        (
            1.0,
            Box::new(
                FeatureKd::new(
                    vec![(0, 0)],
                    FeatureLoss::Mse,
                    Tokens::All,
                    (16, 16),
                    true,
                    &Device::Cpu,
                )
                .unwrap(),
            ),
        ),
        (
            1.0,
            Box::new(AttentionKd {
                pairs: vec![(0, 0)],
            }),
        ),
    ]);
    // Rows of 2 to 5 tokens, so batches pad them differently.
    let rows: Vec<Example> = (0..8u32)
        .map(|i| Example {
            input_ids: (0..2 + i % 4).map(|j| 1 + (i * 3 + j * 5) % 18).collect(),
            label: Some(i % 3),
        })
        .collect();
    let cached =
        ObjectiveTask::new(&*student, vec![&*teacher], &objective).with_teacher_cache(1 << 20);
    let plain = ObjectiveTask::new(&*student, vec![&*teacher], &objective);
    let first = batch(&rows[..4]);
    let second = batch(&rows[4..]);
    for b in [&first, &second] {
        let (a, p) = (cached.loss(b, None).unwrap(), plain.loss(b, None).unwrap());
        assert_eq!(scalar(&a), scalar(&p));
    }
    let report = cached.teacher_cache_report().unwrap();
    assert_eq!((report.batches_computed, report.batches_from_cache), (2, 0));
    assert_eq!(report.cached_examples, 8);
    assert!(report.cached_bytes > 0 && report.cached_bytes <= 1 << 20);
    // The next epoch: the same examples, reordered into other batches (other padding).
    let order = [7usize, 0, 5, 2, 6, 1, 3, 4];
    let shuffled: Vec<Example> = order.iter().map(|&i| rows[i].clone()).collect();
    for chunk in shuffled.chunks(4) {
        let b = batch(chunk);
        let (a, p) = (
            cached.loss(&b, None).unwrap(),
            plain.loss(&b, None).unwrap(),
        );
        assert!(
            (scalar(&a) - scalar(&p)).abs() <= 1e-5 * scalar(&p).abs().max(1.0),
            "cached {} vs computed {}",
            scalar(&a),
            scalar(&p)
        );
    }
    let report = cached.teacher_cache_report().unwrap();
    assert_eq!((report.batches_computed, report.batches_from_cache), (2, 2));

    // A budget for about half the examples: batches mixing held and new rows run the teacher on
    // the new rows only and still give the teacher's loss.
    let half = ObjectiveTask::new(&*student, vec![&*teacher], &objective)
        .with_teacher_cache(report.cached_bytes / 2);
    for b in [&first, &second] {
        half.loss(b, None).unwrap();
    }
    let held = half.teacher_cache_report().unwrap();
    assert!(
        held.cached_examples > 0 && held.examples_over_budget > 0,
        "{held:?}"
    );
    for chunk in shuffled.chunks(4) {
        let b = batch(chunk);
        let (a, p) = (half.loss(&b, None).unwrap(), plain.loss(&b, None).unwrap());
        assert!(
            (scalar(&a) - scalar(&p)).abs() <= 1e-5 * scalar(&p).abs().max(1.0),
            "partly cached {} vs computed {}",
            scalar(&a),
            scalar(&p)
        );
    }
    let after = half.teacher_cache_report().unwrap();
    assert_eq!(after.cached_examples, held.cached_examples);
    assert!(after.cached_bytes <= after.budget_bytes);

    let tiny = ObjectiveTask::new(&*student, vec![&*teacher], &objective).with_teacher_cache(1);
    tiny.loss(&first, None).unwrap();
    tiny.loss(&first, None).unwrap();
    let report = tiny.teacher_cache_report().unwrap();
    assert_eq!(report.cached_examples, 0);
    assert_eq!(report.examples_over_budget, 4);
    assert_eq!(report.batches_computed, 2);
}
