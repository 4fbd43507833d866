//! f16 mixed precision with dynamic loss scaling, on the CPU (the engine refuses it there for
//! speed, not correctness; the arithmetic is the one a GPU runs): training matches f32, and steps
//! whose gradients overflow are skipped without touching the weights while the scale comes down.

use crate::train_support;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::{DType, Device};
use compressd_engine::layers::LinearFactory;
use compressd_engine::task::SequenceClassificationTask;
use compressd_engine::train::{
    AdamW, AdamWConfig, LossScaling, NoHooks, TrainConfig, TrainHooks, Trainer,
};
use train_support::{snapshot, synthetic_rows, tiny_classifier_with, CancelAfter};

fn config(steps: u64, loss_scaling: Option<LossScaling>) -> TrainConfig {
    TrainConfig {
        epochs: 0,
        max_steps: Some(steps),
        batch_size: 16,
        optimizer: AdamWConfig {
            lr: 3e-3,
            weight_decay: 0.0,
            ..Default::default()
        },
        seed: 4,
        loss_scaling,
        ..Default::default()
    }
}

/// The largest element-wise difference between two snapshots.
fn max_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn f16_with_loss_scaling_trains_as_f32_does() -> Result<()> {
    let train = synthetic_rows(64, 1);
    let never = AtomicBool::new(false);
    let mut losses = Vec::new();
    for (linears, scaling) in [
        (LinearFactory::default(), None),
        (
            LinearFactory::default().with_compute_dtype(DType::F16),
            Some(LossScaling::default()),
        ),
    ] {
        let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
        let task = SequenceClassificationTask { model: &model };
        let cfg = config(60, scaling);
        let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
        let report = Trainer::new(cfg, Device::Cpu, 0, &never)?.run(
            &task,
            &mut opt,
            &train,
            &mut NoHooks,
        )?;
        assert_eq!(report.steps, 60);
        if scaling.is_some() {
            let scale = report.loss_scale.expect("loss scaling reported");
            // Every skipped step halves the scale from 65536.
            assert_eq!(
                scale.final_scale,
                65_536.0 / 2f64.powi(scale.skipped_steps as i32)
            );
            assert!(scale.skipped_steps < 5, "{scale:?}");
        } else {
            assert!(report.loss_scale.is_none());
        }
        losses.push(report.final_loss.expect("a loss"));
    }
    let (f32_loss, f16_loss) = (losses[0], losses[1]);
    assert!(f32_loss < 0.2, "f32 learned: {f32_loss}");
    assert!(
        (f16_loss - f32_loss).abs() < 0.05,
        "f16 {f16_loss} against f32 {f32_loss}"
    );
    Ok(())
}

/// Keeps the weights after each step.
struct Snapshots {
    store: compressd_engine::params::ParamStore,
    after_step: Vec<Vec<(String, Vec<f32>)>>,
}

impl TrainHooks for Snapshots {
    fn after_optimizer_step(&mut self, _step: u64) -> compressd_engine::Result<()> {
        self.after_step
            .push(snapshot(&self.store).map_err(|e| candle_core::Error::Msg(e.to_string()))?);
        Ok(())
    }
}

#[test]
fn overflowed_steps_leave_the_weights_alone_until_the_scale_fits() -> Result<()> {
    let train = synthetic_rows(64, 1);
    let never = AtomicBool::new(false);
    let linears = LinearFactory::default().with_compute_dtype(DType::F16);
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    // 2^60 times any gradient is past f16's 65504: the first steps must overflow, each dividing
    // the scale by 2^10, until it fits.
    let scaling = LossScaling {
        init_scale: 2f64.powi(60),
        backoff_factor: 2f64.powi(-10),
        ..LossScaling::default()
    };
    let before = snapshot(&store)?;
    let cfg = config(8, Some(scaling));
    let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
    let mut hooks = Snapshots {
        store: store.clone(),
        after_step: Vec::new(),
    };
    let report =
        Trainer::new(cfg, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut hooks)?;
    let scale = report.loss_scale.expect("loss scaling reported");
    assert_eq!(report.steps, 8);
    assert!(
        (2..8).contains(&scale.skipped_steps),
        "some steps overflow, then training goes on: {scale:?}"
    );
    assert_eq!(
        scale.final_scale,
        2f64.powi(60 - 10 * scale.skipped_steps as i32)
    );
    // Only the steps that updated call the post-step hook; the skipped ones left no trace in the
    // weights or in AdamW's step count.
    assert_eq!(hooks.after_step.len() as u64, 8 - scale.skipped_steps);
    assert_eq!(opt.steps(), 8 - scale.skipped_steps);
    assert!(max_diff(&before, &hooks.after_step[0]) > 0.0);
    let last = snapshot(&store)?;
    assert!(last.iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    Ok(())
}

#[test]
fn a_skipped_step_changes_nothing() -> Result<()> {
    let train = synthetic_rows(32, 1);
    let never = AtomicBool::new(false);
    let linears = LinearFactory::default().with_compute_dtype(DType::F16);
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let before = snapshot(&store)?;
    let cfg = config(
        1,
        Some(LossScaling {
            init_scale: 2f64.powi(60),
            ..LossScaling::default()
        }),
    );
    let mut opt = AdamW::new(store.trainable_vars(), cfg.optimizer.clone())?;
    let report =
        Trainer::new(cfg, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut NoHooks)?;
    let scale = report.loss_scale.expect("loss scaling reported");
    assert_eq!((report.steps, scale.skipped_steps), (1, 1));
    assert_eq!(scale.final_scale, 2f64.powi(59));
    assert_eq!(max_diff(&before, &snapshot(&store)?), 0.0);
    assert_eq!(opt.steps(), 0);
    assert!(report.final_loss.is_some_and(f64::is_finite));
    Ok(())
}

#[test]
fn a_resumed_run_goes_on_with_the_scale_it_had_reached() -> Result<()> {
    let train = synthetic_rows(64, 1);
    let linears = LinearFactory::default().with_compute_dtype(DType::F16);
    let scaling = LossScaling {
        init_scale: 2f64.powi(60),
        backoff_factor: 2f64.powi(-10),
        growth_interval: 2,
        ..LossScaling::default()
    };
    let run_config = |dir: Option<std::path::PathBuf>| TrainConfig {
        grad_accum_steps: 2,
        batch_size: 8,
        checkpoint_dir: dir,
        ..config(8, Some(scaling))
    };
    let never = AtomicBool::new(false);
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let mut opt = AdamW::new(store.trainable_vars(), run_config(None).optimizer)?;
    let whole = Trainer::new(run_config(None), Device::Cpu, 0, &never)?.run(
        &task,
        &mut opt,
        &train,
        &mut NoHooks,
    )?;
    let whole_weights = snapshot(&store)?;

    let dir = tempfile::tempdir()?;
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let cancel = AtomicBool::new(false);
    let mut opt = AdamW::new(store.trainable_vars(), run_config(None).optimizer)?;
    let first = Trainer::new(run_config(Some(dir.path().into())), Device::Cpu, 0, &cancel)?.run(
        &task,
        &mut opt,
        &train,
        &mut CancelAfter {
            step: 3,
            flag: &cancel,
        },
    )?;
    assert_eq!(first.steps, 3);
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let mut opt = AdamW::new(store.trainable_vars(), run_config(None).optimizer)?;
    let resumed = Trainer::new(run_config(Some(dir.path().into())), Device::Cpu, 0, &never)?.run(
        &task,
        &mut opt,
        &train,
        &mut NoHooks,
    )?;
    assert!(resumed.resumed);
    assert_eq!(resumed.loss_scale, whole.loss_scale);
    let skipped = whole
        .loss_scale
        .expect("loss scaling reported")
        .skipped_steps;
    assert!(skipped >= 2, "{:?}", whole.loss_scale);
    assert_eq!(max_diff(&whole_weights, &snapshot(&store)?), 0.0);
    Ok(())
}

#[test]
fn a_checkpoint_resumed_without_loss_scaling_trains_unscaled() -> Result<()> {
    let train = synthetic_rows(32, 1);
    let dir = tempfile::tempdir()?;
    let linears = LinearFactory::default().with_compute_dtype(DType::F16);
    let cancel = AtomicBool::new(false);
    let (store, model) = tiny_classifier_with(3, 0.0, &linears)?;
    let task = SequenceClassificationTask { model: &model };
    let scaled = TrainConfig {
        checkpoint_dir: Some(dir.path().into()),
        ..config(4, Some(LossScaling::default()))
    };
    let mut opt = AdamW::new(store.trainable_vars(), scaled.optimizer.clone())?;
    let first = Trainer::new(scaled, Device::Cpu, 0, &cancel)?.run(
        &task,
        &mut opt,
        &train,
        &mut CancelAfter {
            step: 1,
            flag: &cancel,
        },
    )?;
    assert!(first.loss_scale.is_some());
    // The same job retried with mixed precision turned off: no scale is carried over.
    let (store, model) = tiny_classifier_with(3, 0.0, &LinearFactory::default())?;
    let task = SequenceClassificationTask { model: &model };
    let plain = TrainConfig {
        checkpoint_dir: Some(dir.path().into()),
        ..config(4, None)
    };
    let never = AtomicBool::new(false);
    let mut opt = AdamW::new(store.trainable_vars(), plain.optimizer.clone())?;
    let resumed =
        Trainer::new(plain, Device::Cpu, 0, &never)?.run(&task, &mut opt, &train, &mut NoHooks)?;
    assert!(resumed.resumed);
    assert_eq!(resumed.steps, 4);
    assert!(resumed.loss_scale.is_none());
    assert_eq!(opt.steps(), 4);
    Ok(())
}
