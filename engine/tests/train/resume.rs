//! A run interrupted (by the cancellation flag) and resumed from its checkpoint ends with weights
//! bit-identical to an uninterrupted run: weights, AdamW moments, step, data order and dropout RNG
//! all round-trip.

use crate::train_support;

use std::sync::atomic::AtomicBool;

use anyhow::Result;
use candle_core::Device;
use compressd_engine::task::SequenceClassificationTask;
use compressd_engine::train::{
    AdamW, AdamWConfig, ClipConfig, Decay, NoHooks, ScheduleConfig, StopReason, TrainConfig,
    Trainer,
};
use train_support::{snapshot, synthetic_rows, tiny_classifier, CancelAfter};

fn config(checkpoint_dir: Option<std::path::PathBuf>) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        batch_size: 4,
        grad_accum_steps: 2,
        optimizer: AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        schedule: ScheduleConfig {
            decay: Decay::Cosine,
            warmup_steps: Some(2),
            warmup_ratio: None,
        },
        clip: ClipConfig {
            max_norm: Some(0.5),
            max_value: Some(0.05),
        },
        seed: 11,
        checkpoint_dir,
        ..Default::default()
    }
}

#[test]
fn interrupted_and_resumed_run_matches_uninterrupted_run() -> Result<()> {
    let rows = synthetic_rows(26, 3);
    let dev = Device::Cpu;

    let (store, model) = tiny_classifier(5, 0.1)?;
    let mut opt = AdamW::new(store.trainable_vars(), config(None).optimizer)?;
    let never = AtomicBool::new(false);
    let task = SequenceClassificationTask { model: &model };
    let full = Trainer::new(config(None), dev.clone(), 0, &never)?.run(
        &task,
        &mut opt,
        &rows,
        &mut NoHooks,
    )?;
    assert_eq!(full.stop_reason, StopReason::Completed);
    // 26 rows / 4 = 7 micro-batches per epoch → 4 steps per epoch (the last has one micro-batch).
    assert_eq!(full.steps, 12);
    let expected = snapshot(&store)?;

    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("ckpt");
    let (store, model) = tiny_classifier(5, 0.1)?;
    let task = SequenceClassificationTask { model: &model };
    let mut opt = AdamW::new(store.trainable_vars(), config(None).optimizer)?;
    let flag = AtomicBool::new(false);
    let first = Trainer::new(config(Some(ckpt.clone())), dev.clone(), 0, &flag)?.run(
        &task,
        &mut opt,
        &rows,
        &mut CancelAfter {
            step: 5,
            flag: &flag,
        },
    )?;
    assert_eq!(first.stop_reason, StopReason::Cancelled);
    assert_eq!(first.steps, 5);
    assert_ne!(snapshot(&store)?, expected, "a partial run must differ");

    // A fresh process: new model (same init), new optimizer, state only from the checkpoint.
    let (store, model) = tiny_classifier(5, 0.1)?;
    let task = SequenceClassificationTask { model: &model };
    let mut opt = AdamW::new(store.trainable_vars(), config(None).optimizer)?;
    let fresh = AtomicBool::new(false);
    let second = Trainer::new(config(Some(ckpt)), dev, 0, &fresh)?.run(
        &task,
        &mut opt,
        &rows,
        &mut NoHooks,
    )?;
    assert!(second.resumed);
    assert_eq!(second.stop_reason, StopReason::Completed);
    assert_eq!(second.steps, 12);
    assert_eq!(opt.steps(), 12);

    let resumed = snapshot(&store)?;
    assert_eq!(resumed.len(), expected.len());
    for ((name, a), (_, b)) in resumed.iter().zip(&expected) {
        let same_bits = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same_bits, "{name} differs after resume");
    }
    Ok(())
}
