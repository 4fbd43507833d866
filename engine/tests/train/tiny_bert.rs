//! A tiny random BERT classifier driven by the trainer learns a synthetic task to near-zero loss;
//! progress reports, validation hooks, parameter groups and early stopping behave.

use crate::train_support;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use compressd_engine::task::{evaluate_classifier, SequenceClassificationTask};
use compressd_engine::train::{
    AdamW, AdamWConfig, EarlyStopping, ParamGroupConfig, Progress, StopReason, TrainConfig,
    TrainHooks, Trainer,
};
use train_support::{synthetic_rows, tiny_classifier};

/// Records progress and validates on held-out rows.
struct Recorder<'a> {
    task: SequenceClassificationTask<'a>,
    validation: &'a [compressd_engine::data::Example],
    progress: Vec<Progress>,
    validations: Vec<f64>,
    /// When set, validation returns this constant (to force early stopping).
    fixed_metric: Option<f64>,
}

impl TrainHooks for Recorder<'_> {
    fn on_progress(&mut self, progress: &Progress) {
        self.progress.push(progress.clone());
    }

    fn validate(&mut self, _step: u64) -> compressd_engine::Result<Option<f64>> {
        let metric = match self.fixed_metric {
            Some(m) => m,
            None => {
                evaluate_classifier(&self.task, self.validation, 16, 0, &Device::Cpu, 2)?.accuracy
            }
        };
        self.validations.push(metric);
        Ok(Some(metric))
    }
}

#[test]
fn tiny_bert_learns_the_synthetic_task() -> Result<()> {
    let train = synthetic_rows(64, 1);
    let validation = synthetic_rows(32, 2);
    let (store, model) = tiny_classifier(3, 0.0)?;
    let task = SequenceClassificationTask { model: &model };
    let cfg = TrainConfig {
        epochs: 25,
        batch_size: 16,
        optimizer: AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            groups: vec![ParamGroupConfig {
                pattern: "classifier.*".into(),
                lr: 1e-2,
                weight_decay: None,
            }],
            ..Default::default()
        },
        seed: 4,
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
    let never = AtomicBool::new(false);
    let mut hooks = Recorder {
        task,
        validation: &validation,
        progress: vec![],
        validations: vec![],
        fixed_metric: None,
    };
    let report =
        Trainer::new(cfg, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut hooks)?;

    assert_eq!(report.stop_reason, StopReason::Completed);
    assert_eq!(report.steps, 100);
    let first = &hooks.progress[0];
    let last = hooks.progress.last().expect("progress was reported");
    assert_eq!((first.step, first.total_steps, last.step), (1, 100, 100));
    assert!(first.grad_norm > 0.0 && first.samples_per_sec > 0.0 && first.eta_seconds >= 0.0);
    assert!(
        (first.learning_rate - 3e-3).abs() < 1e-12,
        "constant schedule reports the body lr"
    );
    assert!(first.loss > 0.5, "starts near ln 2: {}", first.loss);
    let final_loss = report.final_loss.expect("a loss");
    assert!(final_loss < 0.05, "final training loss {final_loss}");
    assert_eq!(hooks.validations.len(), 25, "validated once per epoch");
    assert!(
        report.best_metric.unwrap_or(0.0) >= 0.95,
        "validation accuracy {:?}",
        report.best_metric
    );
    Ok(())
}

#[test]
fn early_stopping_stops_after_patience_validations_without_improvement() -> Result<()> {
    let train = synthetic_rows(32, 1);
    let (store, model) = tiny_classifier(3, 0.0)?;
    let task = SequenceClassificationTask { model: &model };
    let cfg = TrainConfig {
        epochs: 50,
        batch_size: 16,
        eval_every_steps: Some(1),
        eval_each_epoch: false,
        early_stopping: Some(EarlyStopping {
            patience: 3,
            min_delta: 0.0,
            higher_is_better: true,
        }),
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
    let never = AtomicBool::new(false);
    let mut hooks = Recorder {
        task,
        validation: &[],
        progress: vec![],
        validations: vec![],
        fixed_metric: Some(0.5),
    };
    let report =
        Trainer::new(cfg, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut hooks)?;
    // Step 1 sets the best; steps 2, 3, 4 do not improve → stop after step 4.
    assert_eq!(report.stop_reason, StopReason::EarlyStopped);
    assert_eq!(report.steps, 4);
    assert_eq!(report.best_step, Some(1));
    assert_eq!(report.restored_best_step, Some(1));
    Ok(())
}

/// Copies the weights after every step; validation returns a constant.
struct SnapshotEachStep {
    vars: Vec<(String, Var)>,
    saved: Vec<Vec<Tensor>>,
}

impl TrainHooks for SnapshotEachStep {
    fn after_optimizer_step(&mut self, _step: u64) -> compressd_engine::Result<()> {
        let copy = self
            .vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        self.saved.push(copy);
        Ok(())
    }

    fn validate(&mut self, _step: u64) -> compressd_engine::Result<Option<f64>> {
        Ok(Some(0.5))
    }
}

#[test]
fn early_stopping_ends_with_the_best_steps_weights() -> Result<()> {
    let train = synthetic_rows(32, 1);
    let (store, model) = tiny_classifier(3, 0.0)?;
    let task = SequenceClassificationTask { model: &model };
    let cfg = TrainConfig {
        epochs: 50,
        batch_size: 16,
        eval_every_steps: Some(1),
        eval_each_epoch: false,
        early_stopping: Some(EarlyStopping {
            patience: 2,
            min_delta: 0.0,
            higher_is_better: true,
        }),
        ..Default::default()
    };
    let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
    let mut hooks = SnapshotEachStep {
        vars: opt.vars(),
        saved: vec![],
    };
    let never = AtomicBool::new(false);
    let report =
        Trainer::new(cfg, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut hooks)?;
    // Step 1 is the best (later constant metrics never improve); patience 2 stops after step 3.
    assert_eq!((report.steps, report.restored_best_step), (3, Some(1)));
    assert_eq!(hooks.saved.len(), 3);
    let max_diff = |saved: &[Tensor]| -> Result<f32> {
        let mut worst = 0f32;
        for ((_, var), t) in hooks.vars.iter().zip(saved) {
            let d = (var.as_tensor() - t)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            worst = worst.max(d);
        }
        Ok(worst)
    };
    assert_eq!(
        max_diff(&hooks.saved[0])?,
        0.0,
        "final weights are not step 1's"
    );
    assert!(
        max_diff(&hooks.saved[2])? > 0.0,
        "steps 2-3 did not move the weights"
    );
    Ok(())
}
