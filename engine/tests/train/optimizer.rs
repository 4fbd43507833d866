//! The fused AdamW against candle's reference AdamW, plus groups, decay exclusions, master weights,
//! accumulation and clipping as seen through the optimizer.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use compressd_engine::train::{
    clip, AdamW, AdamWConfig, ClipConfig, GradAccumulator, GradTransform, Gradients,
    ParamGroupConfig,
};

const NO_CLIP: GradTransform = GradTransform {
    average: 1.0,
    clamp: None,
    norm_scale: 1.0,
};

/// A small quadratic-ish loss with a non-trivial gradient for every element.
fn loss_of(w: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    w.broadcast_mul(x)?.tanh()?.sqr()?.sum_all()
}

fn data(dev: &Device) -> Result<(Tensor, Tensor)> {
    let w0 = Tensor::arange(0f32, 48., dev)?
        .reshape((6, 8))?
        .affine(0.05, -1.0)?
        .sin()?;
    let x = Tensor::arange(0f32, 48., dev)?
        .reshape((6, 8))?
        .affine(0.13, 0.3)?
        .cos()?;
    Ok((w0, x))
}

#[test]
fn matches_candle_adamw_over_several_steps() -> Result<()> {
    let dev = Device::Cpu;
    let (w0, x) = data(&dev)?;
    let ours = Var::from_tensor(&w0.copy()?)?;
    let reference = Var::from_tensor(&w0.copy()?)?;
    let cfg = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("dense.weight".into(), ours.clone())], cfg.clone())?;
    let params = candle_nn::ParamsAdamW {
        lr: cfg.lr,
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let mut candle_opt = candle_nn::AdamW::new(vec![reference.clone()], params)?;
    for _ in 0..5 {
        let grads = loss_of(ours.as_tensor(), &x)?.backward()?;
        opt.step(Gradients::Store(&grads), 1.0, NO_CLIP)?;
        candle_opt.backward_step(&loss_of(reference.as_tensor(), &x)?)?;
    }
    let diff = (ours.as_tensor() - reference.as_tensor())?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    // f32 rounding differs (candle folds the scalars in f64); steps are ~0.05 each.
    assert!(diff < 1e-5, "max difference {diff}");
    let moved = (ours.as_tensor() - &w0)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(moved > 0.1, "weights barely moved: {moved}");
    assert_eq!(opt.steps(), 5);
    Ok(())
}

#[test]
fn biases_and_norms_get_no_weight_decay() -> Result<()> {
    let dev = Device::Cpu;
    // Zero gradient: the only change can come from weight decay.
    let make = || Var::ones(4, DType::F32, &dev);
    let (weight, bias, norm) = (make()?, make()?, make()?);
    let vars = vec![
        ("layer.weight".to_string(), weight.clone()),
        ("layer.bias".to_string(), bias.clone()),
        ("embeddings.LayerNorm.weight".to_string(), norm.clone()),
    ];
    let cfg = AdamWConfig {
        lr: 0.1,
        weight_decay: 0.5,
        ..Default::default()
    };
    let mut opt = AdamW::new(vars, cfg)?;
    // Multiplying by a zeros tensor (not by the scalar 0, which candle prunes from the graph).
    let zeros = Tensor::zeros(4, DType::F32, &dev)?;
    let loss =
        ((weight.as_tensor() + bias.as_tensor())?.add(norm.as_tensor())? * &zeros)?.sum_all()?;
    opt.step(Gradients::Store(&loss.backward()?), 1.0, NO_CLIP)?;
    assert_eq!(weight.as_tensor().to_vec1::<f32>()?, vec![0.95; 4]);
    assert_eq!(bias.as_tensor().to_vec1::<f32>()?, vec![1.0; 4]);
    assert_eq!(norm.as_tensor().to_vec1::<f32>()?, vec![1.0; 4]);
    Ok(())
}

#[test]
fn groups_have_their_own_learning_rate() -> Result<()> {
    let dev = Device::Cpu;
    let body = Var::zeros(3, DType::F32, &dev)?;
    let head = Var::zeros(3, DType::F32, &dev)?;
    let cfg = AdamWConfig {
        lr: 2e-5,
        weight_decay: 0.0,
        groups: vec![ParamGroupConfig {
            pattern: "classifier.*".into(),
            lr: 1e-3,
            weight_decay: None,
        }],
        ..Default::default()
    };
    let vars = vec![
        ("encoder.w".to_string(), body.clone()),
        ("classifier.weight".to_string(), head.clone()),
    ];
    let mut opt = AdamW::new(vars, cfg)?;
    assert_eq!(opt.group_of("classifier.weight"), Some("classifier.*"));
    assert_eq!(opt.group_of("encoder.w"), None);
    let loss = (body.as_tensor().sum_all()? + head.as_tensor().sum_all()?)?;
    // Half the schedule factor: Adam's first step moves every weight by exactly -lr (sign of grad).
    opt.step(Gradients::Store(&loss.backward()?), 0.5, NO_CLIP)?;
    for v in body.as_tensor().to_vec1::<f32>()? {
        assert!((v + 1e-5).abs() < 1e-9, "{v}");
    }
    for v in head.as_tensor().to_vec1::<f32>()? {
        assert!((v + 5e-4).abs() < 1e-7, "{v}");
    }
    Ok(())
}

#[test]
fn bf16_parameters_keep_f32_master_weights() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::ones(4, DType::BF16, &dev)?)?;
    let cfg = AdamWConfig {
        lr: 1e-4,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg)?;
    // Each step moves by 1e-4, far below bf16's resolution at 1.0 (2^-7): without a master copy the
    // weight would never change. After 100 steps the master is at 0.99 and the bf16 value follows.
    for _ in 0..100 {
        let loss = w.as_tensor().to_dtype(DType::F32)?.sum_all()?;
        opt.step(Gradients::Store(&loss.backward()?), 1.0, NO_CLIP)?;
    }
    let master = opt
        .state_tensors()?
        .into_iter()
        .find(|(n, _)| n == "master.w")
        .map(|(_, t)| t);
    let master = master
        .expect("master weights are checkpointed")
        .to_vec1::<f32>()?;
    assert!((master[0] - 0.99).abs() < 1e-5, "{master:?}");
    let value = w.as_tensor().to_dtype(DType::F32)?.to_vec1::<f32>()?;
    assert!((value[0] - 0.99).abs() < 4e-3, "{value:?}");
    Ok(())
}

#[test]
fn accumulated_gradients_equal_one_big_batch() -> Result<()> {
    let dev = Device::Cpu;
    let (w0, x) = data(&dev)?;
    let cfg = AdamWConfig {
        lr: 0.01,
        ..Default::default()
    };

    let whole = Var::from_tensor(&w0.copy()?)?;
    let mut opt_whole = AdamW::new(vec![("w".into(), whole.clone())], cfg.clone())?;
    // Mean over two halves == (loss_a + loss_b) / 2 on the whole batch.
    let loss = (loss_of(whole.as_tensor(), &x)? * 0.5)?;
    opt_whole.step(Gradients::Store(&loss.backward()?), 1.0, NO_CLIP)?;

    let accum = Var::from_tensor(&w0.copy()?)?;
    let mut opt_accum = AdamW::new(vec![("w".into(), accum.clone())], cfg)?;
    let mut acc = GradAccumulator::new();
    let vars = opt_accum.vars();
    for start in [0, 3] {
        let loss = loss_of(
            &accum.as_tensor().narrow(0, start, 3)?,
            &x.narrow(0, start, 3)?,
        )?;
        acc.add(&vars, &loss.backward()?)?;
    }
    let grads = Gradients::Accumulated(&acc);
    let outcome = clip::measure(&vars, grads, &ClipConfig::default())?;
    opt_accum.step(grads, 1.0, outcome.transform)?;
    let diff = (whole.as_tensor() - accum.as_tensor())?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-7, "max difference {diff}");
    Ok(())
}

#[test]
fn transposed_gradients_of_linear_weights_are_handled_in_place() -> Result<()> {
    let dev = Device::Cpu;
    let (w0, x) = data(&dev)?;
    let linear_loss =
        |w: &Tensor| -> candle_core::Result<Tensor> { x.matmul(&w.t()?)?.tanh()?.sqr()?.sum_all() };
    // candle's backward currently hands out contiguous gradients (it sums into zero-filled buffers);
    // a backward without that copy yields the transposed view of `w.t()`'s gradient. Simulate it.
    let transposed_grads = |w: &Var| -> Result<candle_core::backprop::GradStore> {
        let mut grads = linear_loss(w.as_tensor())?.backward()?;
        let g = grads.remove(w.as_tensor()).expect("a gradient");
        let view = g.t()?.contiguous()?.t()?;
        assert!(!view.is_contiguous(), "test premise: a column-major view");
        grads.insert(w.as_tensor(), view);
        Ok(grads)
    };

    let ours = Var::from_tensor(&w0.copy()?)?;
    let reference = Var::from_tensor(&w0.copy()?)?;
    let cfg = AdamWConfig {
        lr: 0.05,
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt = AdamW::new(vec![("dense.weight".into(), ours.clone())], cfg.clone())?;
    let params = candle_nn::ParamsAdamW {
        lr: cfg.lr,
        weight_decay: cfg.weight_decay,
        ..Default::default()
    };
    let mut candle_opt = candle_nn::AdamW::new(vec![reference.clone()], params)?;
    let mut acc = GradAccumulator::new();
    for _ in 0..3 {
        let grads = transposed_grads(&ours)?;
        let vars = opt.vars();
        let norm = clip::measure(&vars, Gradients::Store(&grads), &ClipConfig::default())?;
        let expected_norm = grads
            .get(ours.as_tensor())
            .unwrap()
            .sqr()?
            .sum_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        assert!((norm.pre_clip_norm as f32 - expected_norm).abs() < 1e-4 * expected_norm.max(1.0));
        // Also through the accumulator (transposed add into a row-major buffer).
        acc.clear();
        acc.add(&vars, &grads)?;
        opt.step(Gradients::Accumulated(&acc), 1.0, NO_CLIP)?;
        candle_opt.backward_step(&linear_loss(reference.as_tensor())?)?;
    }
    let diff = (ours.as_tensor() - reference.as_tensor())?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "max difference {diff}");

    let direct = Var::from_tensor(&w0.copy()?)?;
    let mut opt = AdamW::new(vec![("dense.weight".into(), direct.clone())], cfg)?;
    for _ in 0..3 {
        let grads = transposed_grads(&direct)?;
        opt.step(Gradients::Store(&grads), 1.0, NO_CLIP)?;
    }
    let diff = (direct.as_tensor() - reference.as_tensor())?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(diff < 1e-5, "max difference {diff}");
    Ok(())
}
