//! Each custom op against its composed reference (forward and backward), against candle's fused
//! kernel (forward), and against central finite differences in f64.

use candle_core::{DType, Device, Result, Tensor, Var};

use super::*;

type OpFn = fn(&[Tensor]) -> Result<Tensor>;

/// One op under test: the dispatched version, the composed reference and its input shapes.
struct Case {
    name: &'static str,
    op: OpFn,
    reference: OpFn,
    shapes: &'static [&'static [usize]],
}

const EPS: f64 = 1e-5;

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "softmax",
            op: |t| softmax_last_dim(&t[0]),
            reference: |t| composed::softmax_last_dim(&t[0]),
            shapes: &[&[2, 3, 7]],
        },
        Case {
            name: "layer_norm",
            op: |t| layer_norm(&t[0], &t[1], &t[2], EPS),
            reference: |t| composed::layer_norm(&t[0], &t[1], &t[2], EPS),
            shapes: &[&[2, 3, 6], &[6], &[6]],
        },
        Case {
            name: "rms_norm",
            op: |t| rms_norm(&t[0], &t[1], EPS),
            reference: |t| composed::rms_norm(&t[0], &t[1], EPS),
            shapes: &[&[2, 3, 6], &[6]],
        },
        Case {
            name: "gelu",
            op: |t| gelu_erf(&t[0]),
            reference: |t| composed::gelu_erf(&t[0]),
            shapes: &[&[4, 9]],
        },
        Case {
            name: "rope",
            op: |t| rope(&t[0], &t[1], &t[2]),
            reference: |t| composed::rope(&t[0], &t[1], &t[2]),
            shapes: &[&[1, 2, 3, 4], &[3, 2], &[3, 2]],
        },
    ]
}

fn random_inputs(case: &Case, dtype: DType) -> Vec<Tensor> {
    case.shapes
        .iter()
        .map(|s| {
            Tensor::randn(0f64, 1.5, *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        })
        .collect()
}

/// `Σ f(inputs) ⊙ proj` with a fixed random projection, so no gradient is trivially zero (a plain
/// sum of a softmax is constant).
fn loss(f: OpFn, inputs: &[Tensor], proj: &Tensor) -> Tensor {
    (f(inputs).unwrap() * proj).unwrap().sum_all().unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
    d.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Output and input gradients of `f`, computed through autograd.
fn output_and_grads(f: OpFn, inputs: &[Tensor], proj: &Tensor) -> (Tensor, Vec<Tensor>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors).unwrap();
    let grads = (&out * proj)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let grads = vars
        .iter()
        .map(|v| grads.get(v).expect("every input gets a gradient").clone())
        .collect();
    (out, grads)
}

#[test]
fn custom_ops_match_composition_forward_and_backward_f32() {
    for case in cases() {
        let inputs = random_inputs(&case, DType::F32);
        let out_dims = (case.reference)(&inputs).unwrap().dims().to_vec();
        let proj = Tensor::randn(0f32, 1., out_dims, &Device::Cpu).unwrap();
        let (out, grads) = output_and_grads(case.op, &inputs, &proj);
        let (ref_out, ref_grads) = output_and_grads(case.reference, &inputs, &proj);
        assert!(max_abs_diff(&out, &ref_out) < 1e-5, "{} forward", case.name);
        for (i, (g, r)) in grads.iter().zip(&ref_grads).enumerate() {
            let diff = max_abs_diff(g, r);
            assert!(
                diff < 1e-4,
                "{} gradient of input {i} differs by {diff}",
                case.name
            );
        }
    }
}

#[test]
fn fused_inference_path_matches_differentiable_path() {
    for case in cases() {
        let inputs = random_inputs(&case, DType::F32);
        let fused = (case.op)(&inputs).unwrap(); // plain tensors: no gradient needed, fused kernel
        let proj = fused.ones_like().unwrap();
        let (differentiable, _) = output_and_grads(case.op, &inputs, &proj);
        assert!(
            max_abs_diff(&fused, &differentiable) < 1e-5,
            "{}",
            case.name
        );
    }
}

/// Central differences of the loss for every element of every input, in f64.
fn finite_difference_grads(f: OpFn, inputs: &[Tensor], proj: &Tensor) -> Vec<Vec<f64>> {
    let h = 1e-6;
    let mut grads = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let values = input.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let mut g = Vec::with_capacity(values.len());
        for j in 0..values.len() {
            let at = |delta: f64| {
                let mut v = values.clone();
                v[j] += delta;
                let mut shifted = inputs.to_vec();
                shifted[i] = Tensor::from_vec(v, input.shape(), &Device::Cpu).unwrap();
                loss(f, &shifted, proj).to_scalar::<f64>().unwrap()
            };
            g.push((at(h) - at(-h)) / (2.0 * h));
        }
        grads.push(g);
    }
    grads
}

#[test]
fn custom_op_gradients_match_finite_differences_f64() {
    for case in cases() {
        let inputs = random_inputs(&case, DType::F64);
        let out_dims = (case.reference)(&inputs).unwrap().dims().to_vec();
        let proj = Tensor::randn(0f64, 1., out_dims, &Device::Cpu).unwrap();
        let (_, grads) = output_and_grads(case.op, &inputs, &proj);
        let numeric = finite_difference_grads(case.op, &inputs, &proj);
        for (i, (g, n)) in grads.iter().zip(&numeric).enumerate() {
            let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for (a, b) in g.iter().zip(n) {
                assert!(
                    (a - b).abs() < 1e-6 * (1.0 + b.abs()),
                    "{} input {i}: {a} vs {b}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn bad_shapes_are_errors_not_panics() {
    let x = Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let w = Tensor::ones(3, DType::F32, &Device::Cpu).unwrap();
    assert!(layer_norm(&x, &w, &w, 1e-5).is_err());
    assert!(rms_norm(&x, &w, 1e-5).is_err());
}

/// Attention composed from basic ops on `(batch, seq, heads · head_dim)` projections, with the
/// dropout factors `(batch, heads, seq_q, seq_k)` applied to the probabilities when given.
fn composed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
    dropout: Option<&Tensor>,
) -> Result<Tensor> {
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, s, w) = t.dims3()?;
        t.reshape((b, s, heads, w / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (b, s, w) = q.dims3()?;
    let scores = ((split(q)? * scale)?.matmul(&split(k)?.t()?)?).broadcast_add(bias)?;
    let mut probs = composed::softmax_last_dim(&scores)?;
    if let Some(factors) = dropout {
        probs = (probs * factors)?;
    }
    probs
        .matmul(&split(v)?)?
        .transpose(1, 2)?
        .reshape((b, s, w))
}

#[test]
fn fused_attention_matches_the_composed_one_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    // Odd sizes everywhere: 3 heads of 5, 7 queries against 7 keys, a padded second sequence.
    let (b, s, heads, head_dim) = (2, 7, 3, 5);
    let w = heads * head_dim;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0]], &dev)?;
    let bias = crate::models::common::padding_bias(&mask, DType::F32)?;
    let scale = (head_dim as f64).powf(-0.5);
    let dropout = attention::AttentionDropout { p: 0.3, seed: 42 };
    let factors: Vec<f32> = (0..b * heads * s * s)
        .map(|i| dropout.factor(i as u64))
        .collect();
    assert!(factors.contains(&0.0) && factors.iter().any(|&f| f > 1.0));
    let factors = Tensor::from_vec(factors, (b, heads, s, s), &dev)?;

    for with_dropout in [false, true] {
        let vars: Vec<Var> = (0..3)
            .map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, w), &dev)?))
            .collect::<Result<_>>()?;
        let [q, k, v] = [0, 1, 2].map(|i| vars[i].as_tensor());
        // A loss that weighs every output element differently, so no gradient cancels.
        let weights = Tensor::randn(0f32, 1.0, (b, s, w), &dev)?;
        let fused = fused_attention(
            q,
            k,
            v,
            Some(&bias),
            heads,
            scale,
            with_dropout.then_some((0.3, 42)),
        )?
        .expect("fused path");
        let want = composed_attention(
            q,
            k,
            v,
            &bias,
            heads,
            scale,
            with_dropout.then_some(&factors),
        )?;
        let diff = max_abs_diff(&fused, &want);
        assert!(
            diff < 1e-5,
            "dropout {with_dropout}: forward differs by {diff}"
        );
        let fused_grads = (fused * &weights)?.sum_all()?.backward()?;
        let want_grads = (want * &weights)?.sum_all()?.backward()?;
        for (name, var) in ["q", "k", "v"].iter().zip(&vars) {
            let got = fused_grads.get(var).expect("gradient");
            let want = want_grads.get(var).expect("gradient");
            let diff = max_abs_diff(got, want);
            assert!(
                diff < 1e-5,
                "dropout {with_dropout}: d{name} differs by {diff}"
            );
            assert!(got.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
    }

    // Without a gradient the forward-only op runs; a bias of another shape falls back.
    let q = Tensor::randn(0f32, 1.0, (b, s, w), &dev)?;
    let out = fused_attention(&q, &q, &q, Some(&bias), heads, scale, None)?.expect("fused");
    let want = composed_attention(&q, &q, &q, &bias, heads, scale, None)?;
    assert!(max_abs_diff(&out, &want) < 1e-5);
    let squeezed = bias.squeeze(1)?;
    assert!(fused_attention(&q, &q, &q, Some(&squeezed), heads, scale, None)?.is_none());
    Ok(())
}

/// The packed `[q | k | v]` kernel computes what the separate one does on the same projections,
/// forward and backward (its gradient is the three side by side), with padding and dropout.
#[test]
fn packed_self_attention_matches_separate_projections() -> Result<()> {
    let dev = Device::Cpu;
    let (b, s, heads, head_dim) = (2, 6, 3, 4);
    let w = heads * head_dim;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], &dev)?;
    let bias = crate::models::common::padding_bias(&mask, DType::F32)?;
    let scale = (head_dim as f64).powf(-0.5);
    for dropout in [None, Some((0.25, 7))] {
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, 3 * w), &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (b, s, w), &dev)?;
        let packed = fused_self_attention(qkv.as_tensor(), Some(&bias), heads, scale, dropout)?
            .expect("packed path");
        let [q, k, v] = [0, 1, 2].map(|i| qkv.as_tensor().narrow(2, i * w, w).unwrap());
        let separate = fused_attention(&q, &k, &v, Some(&bias), heads, scale, dropout)?
            .expect("separate path");
        let diff = max_abs_diff(&packed, &separate);
        assert!(
            diff < 1e-6,
            "dropout {dropout:?}: forward differs by {diff}"
        );
        let got = (packed * &weights)?.sum_all()?.backward()?;
        let want = (separate * &weights)?.sum_all()?.backward()?;
        let (got, want) = (
            got.get(&qkv).expect("packed gradient"),
            want.get(&qkv).expect("gradient"),
        );
        let diff = max_abs_diff(got, want);
        assert!(
            diff < 1e-6,
            "dropout {dropout:?}: gradient differs by {diff}"
        );
        for i in 0..3 {
            let part = got
                .narrow(2, i * w, w)?
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?;
            assert!(part > 0.0, "no gradient for projection {i}");
        }
    }
    // Without a gradient the forward-only op runs; a width that is not 3 × whole heads fails.
    let frozen = Tensor::randn(0f32, 1.0, (b, s, 3 * w), &dev)?;
    assert!(fused_self_attention(&frozen, None, heads, scale, None)?.is_some());
    assert!(
        fused_self_attention(&frozen.narrow(2, 0, 3 * w - 3)?, None, heads, scale, None).is_err()
    );
    Ok(())
}

/// The linear layer with GELU inside gives what the linear layer then GELU give, forward and
/// backward, and refuses a frozen weight (which runs on its transposed copy instead).
#[test]
fn linear_gelu_matches_linear_then_gelu() -> Result<()> {
    let dev = Device::Cpu;
    let (inp, out) = (7, 9);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, inp), &dev)?)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (out, inp), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, out, &dev)?)?;
    let weights = Tensor::randn(0f32, 1.0, (2, 5, out), &dev)?;
    let fused = linear_gelu(x.as_tensor(), w.as_tensor(), b.as_tensor(), Products::F32)?
        .expect("fused path");
    let separate = gelu_erf(
        &linear(
            x.as_tensor(),
            w.as_tensor(),
            Some(b.as_tensor()),
            false,
            Products::F32,
        )?
        .expect("linear"),
    )?;
    assert!(max_abs_diff(&fused, &separate) < 1e-6);
    let got = (fused * &weights)?.sum_all()?.backward()?;
    let want = (separate * &weights)?.sum_all()?.backward()?;
    for (name, var) in [("x", &x), ("w", &w), ("b", &b)] {
        let diff = max_abs_diff(
            got.get(var).expect("gradient"),
            want.get(var).expect("gradient"),
        );
        assert!(diff < 1e-5, "d{name} differs by {diff}");
    }
    let frozen = w.as_tensor().detach();
    assert!(linear_gelu(x.as_tensor(), &frozen, b.as_tensor(), Products::F32)?.is_none());
    Ok(())
}

/// Dropout masks from a seed: only `0` and `1 / (1 − p)`, about `p` of them dropped, the same
/// mask for the same seed (across the parallel chunks and in another dtype) and another for
/// another seed.
#[test]
fn dropout_masks_are_drawn_from_their_seed() -> Result<()> {
    let dev = Device::Cpu;
    let dims = [3, 50_000];
    let p = 0.1;
    let mask = dropout_factors(7, p, &dims, DType::F32, &dev)?;
    let values = mask.flatten_all()?.to_vec1::<f32>()?;
    let kept = 1.0 / (1.0 - p as f32);
    assert!(values.iter().all(|&v| v == 0.0 || v == kept));
    let dropped = values.iter().filter(|&&v| v == 0.0).count() as f64 / values.len() as f64;
    assert!((dropped - p).abs() < 0.005, "dropped share {dropped}");
    for (i, &v) in values.iter().enumerate().step_by(997) {
        assert_eq!(v, dropout_factor(7, p as f32, i as u64), "element {i}");
    }
    let again = dropout_factors(7, p, &dims, DType::F64, &dev)?.to_dtype(DType::F32)?;
    assert_eq!(max_abs_diff(&mask, &again), 0.0);
    let other = dropout_factors(8, p, &dims, DType::F32, &dev)?;
    assert!(max_abs_diff(&mask, &other) > 0.0);
    assert!(dropout_factors(7, 1.0, &dims, DType::F32, &dev).is_err());
    Ok(())
}

/// The dropout node multiplies by the seed's mask, forward and backward, and gives the same
/// values as the product with the mask (the path of other devices and dtypes).
#[test]
fn dropout_multiplies_by_its_mask_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    let dims = [4, 9000];
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, &dims[..], &dev)?)?;
    let mask = dropout_factors(3, 0.3, &dims, DType::F32, &dev)?;
    let y = dropout(x.as_tensor(), 0.3, 3)?;
    assert_eq!(max_abs_diff(&y, &(x.as_tensor() * &mask)?), 0.0);
    let weights = Tensor::randn(0f32, 1.0, &dims[..], &dev)?;
    let grads = (y * &weights)?.sum_all()?.backward()?;
    let dx = grads.get(&x).expect("gradient");
    assert_eq!(max_abs_diff(dx, &(weights * &mask)?), 0.0);
    let in_f64 = dropout(&x.as_tensor().to_dtype(DType::F64)?, 0.3, 3)?;
    assert!(max_abs_diff(&in_f64, &(x.as_tensor() * &mask)?) < 1e-6);
    assert!(dropout(x.as_tensor(), 1.0, 3).is_err());
    Ok(())
}

#[test]
fn fused_linear_matches_the_composed_one_forward_and_backward() -> Result<()> {
    let dev = Device::Cpu;
    let (rows, inp, out) = ((2, 5), 7, 9);
    for (with_bias, frozen_weight) in [(true, false), (false, false), (true, true)] {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows.0, rows.1, inp), &dev)?)?;
        let w_init = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
        let w = Var::from_tensor(&w_init)?;
        let w_used = if frozen_weight {
            w_init.clone()
        } else {
            w.as_tensor().clone()
        };
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, out, &dev)?)?;
        let bias = with_bias.then(|| b.as_tensor());
        let got = linear(x.as_tensor(), &w_used, bias, false, Products::F32)?.expect("fused path");
        if frozen_weight {
            // A frozen layer's transposed copy gives the same output and the same dx.
            let w_t = w_used.t()?.contiguous()?;
            let via_t =
                linear(x.as_tensor(), &w_t, bias, true, Products::F32)?.expect("fused path");
            assert!(max_abs_diff(&via_t, &got) < 1e-5);
            let weights = Tensor::randn(0f32, 1.0, got.shape(), &dev)?;
            let dx_t = (via_t * &weights)?.sum_all()?.backward()?;
            let dx = (got.clone() * &weights)?.sum_all()?.backward()?;
            let diff = max_abs_diff(dx_t.get(&x).expect("dx"), dx.get(&x).expect("dx"));
            assert!(
                diff < 1e-4,
                "dx through the transposed weight differs by {diff}"
            );
        }
        let mut want = x.as_tensor().broadcast_matmul(&w_used.t()?)?;
        if let Some(bias) = bias {
            want = want.broadcast_add(bias)?;
        }
        assert_eq!(got.dims(), [rows.0, rows.1, out]);
        assert!(max_abs_diff(&got, &want) < 1e-5);
        let weights = Tensor::randn(0f32, 1.0, got.shape(), &dev)?;
        let got_grads = (got * &weights)?.sum_all()?.backward()?;
        let want_grads = (want * &weights)?.sum_all()?.backward()?;
        let mut checked = vec![&x];
        if !frozen_weight {
            checked.push(&w);
        } else {
            assert!(
                got_grads.get(&w).is_none(),
                "a frozen weight gets no gradient"
            );
        }
        if with_bias {
            checked.push(&b);
        }
        for var in checked {
            let diff = max_abs_diff(
                got_grads.get(var).expect("gradient"),
                want_grads.get(var).expect("gradient"),
            );
            assert!(
                diff < 1e-4,
                "bias {with_bias}, frozen {frozen_weight}: gradient differs by {diff}"
            );
        }
    }
    // A trained weight held transposed gets its gradient in its own orientation.
    let x = Tensor::randn(0f32, 1.0, (6, inp), &dev)?;
    let w_t = Var::from_tensor(&Tensor::randn(0f32, 1.0, (inp, out), &dev)?)?;
    let got = linear(&x, w_t.as_tensor(), None, true, Products::F32)?.expect("fused path");
    let want = x.matmul(w_t.as_tensor())?;
    assert!(max_abs_diff(&got, &want) < 1e-5);
    let weights = Tensor::randn(0f32, 1.0, got.shape(), &dev)?;
    let got = (got * &weights)?.sum_all()?.backward()?;
    let want = (want * &weights)?.sum_all()?.backward()?;
    let diff = max_abs_diff(got.get(&w_t).expect("dWᵀ"), want.get(&w_t).expect("dWᵀ"));
    assert!(diff < 1e-4, "dWᵀ differs by {diff}");

    // Shapes that do not fit are errors, not panics.
    let x = Tensor::zeros((3, 4), DType::F32, &dev)?;
    assert!(linear(
        &x,
        &Tensor::zeros((2, 5), DType::F32, &dev)?,
        None,
        false,
        Products::F32
    )
    .is_err());
    assert!(linear(
        &x,
        &Tensor::zeros((5, 2), DType::F32, &dev)?,
        None,
        true,
        Products::F32
    )
    .is_err());
    Ok(())
}

/// Values bfloat16 holds exactly (multiples of 1/8 up to ±2): their bf16 products are the f32 ones.
fn bf16_exact(shape: &[usize], seed: usize, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + seed * 13) % 33) as f32 / 8.0 - 2.0)
        .collect();
    Tensor::from_vec(v, shape, dev)
}

/// CPU mixed precision: with bf16 products the linear op (and linear + GELU) computes what the
/// f32 one does when the operands are bf16 values, forward and every gradient, trained or frozen
/// weight; on other values the difference is bf16's rounding, not more.
#[test]
fn bf16_products_match_f32_on_bf16_values_forward_and_backward() -> Result<()> {
    if !bf16_gemm::available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return Ok(());
    }
    let dev = Device::Cpu;
    // More rows, inputs and outputs than one register tile or packed block holds.
    let (rows, inp, out) = (37, 300, 45);
    for frozen in [false, true] {
        let x = Var::from_tensor(&bf16_exact(&[rows, inp], 1, &dev)?)?;
        let w = Var::from_tensor(&bf16_exact(&[out, inp], 2, &dev)?)?;
        let b = Var::from_tensor(&bf16_exact(&[out], 3, &dev)?)?;
        let weights = bf16_exact(&[rows, out], 4, &dev)?;
        let (w_arg, transposed) = if frozen {
            (w.as_tensor().t()?.contiguous()?.detach(), true)
        } else {
            (w.as_tensor().clone(), false)
        };
        let mut results = Vec::new();
        for products in [Products::F32, Products::Bf16] {
            let y = linear(
                x.as_tensor(),
                &w_arg,
                Some(b.as_tensor()),
                transposed,
                products,
            )?
            .expect("fused path");
            let grads = (&y * &weights)?.sum_all()?.backward()?;
            let dw = grads.get(&w).cloned();
            results.push((
                y,
                grads.get(&x).expect("dx").clone(),
                dw,
                grads.get(&b).cloned(),
            ));
        }
        let (f, h) = (&results[0], &results[1]);
        assert!(max_abs_diff(&f.0, &h.0) < 1e-3, "frozen {frozen}: y");
        assert!(max_abs_diff(&f.1, &h.1) < 1e-3, "frozen {frozen}: dx");
        assert_eq!(f.2.is_some(), !frozen);
        if let (Some(a), Some(c)) = (&f.2, &h.2) {
            // dW sums over the rows; dy·x is exact in bf16 here as well.
            assert!(max_abs_diff(a, c) < 1e-3, "dW");
        }
        assert!(max_abs_diff(f.3.as_ref().expect("db"), h.3.as_ref().expect("db")) < 1e-4);
    }
    // Linear + GELU: the pre-activation agrees, so the output and the gradients do.
    let x = Var::from_tensor(&bf16_exact(&[rows, inp], 5, &dev)?)?;
    let w = Var::from_tensor(&(bf16_exact(&[out, inp], 6, &dev)? / 64.0)?)?;
    let b = Var::from_tensor(&bf16_exact(&[out], 7, &dev)?)?;
    let run = |products| -> Result<(Tensor, Tensor)> {
        let y = linear_gelu(x.as_tensor(), w.as_tensor(), b.as_tensor(), products)?
            .expect("fused path");
        let grads = y.sum_all()?.backward()?;
        Ok((y, grads.get(&w).expect("dW").clone()))
    };
    let (y32, dw32) = run(Products::F32)?;
    let (y16, dw16) = run(Products::Bf16)?;
    assert!(max_abs_diff(&y32, &y16) < 1e-4);
    // Here the GELU derivative times x is not a bf16 value: dW differs by bf16's rounding of it.
    let scale = dw32.abs()?.max_all()?.to_scalar::<f32>()?;
    assert!(max_abs_diff(&dw32, &dw16) < 1e-2 * f64::from(scale.max(1.0)));
    // Random values: within bf16's relative precision (8 bits) of the f32 product.
    let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (out, inp), &dev)?;
    let y32 = linear(&x, &w, None, false, Products::F32)?.expect("fused path");
    let y16 = linear(&x, &w, None, false, Products::Bf16)?.expect("fused path");
    let diff = max_abs_diff(&y32, &y16);
    assert!(diff > 0.0 && diff < 0.05 * (inp as f64).sqrt(), "{diff}");
    Ok(())
}

/// Partials summed by [`kernel::sum_in_order`] give the left-to-right sum exactly, whatever rayon's
/// split: values chosen so that any other order rounds differently.
#[test]
fn partials_are_added_in_chunk_order() {
    use rayon::prelude::*;
    let values: Vec<f32> = (0..4096)
        .map(|i| match i % 4 {
            0 => 1e8,
            1 => 3.0,
            2 => -1e8,
            _ => 0.7,
        })
        .collect();
    let sequential = values
        .chunks(7)
        .map(|c| c.iter().sum::<f32>())
        .fold(None, |acc: Option<f32>, p| Some(acc.map_or(p, |a| a + p)));
    for _ in 0..20 {
        let parallel = kernel::sum_in_order(
            values.par_chunks(7).map(|c| c.iter().sum::<f32>()),
            |a, b| a + b,
        );
        assert_eq!(parallel.map(f32::to_bits), sequential.map(f32::to_bits));
    }
}

/// The bias gradient of a dense layer and the weight and bias gradients of a layer norm, over
/// inputs of many parallel chunks, are the same bits on every run (they were not: rayon's
/// reduction tree changed with thread timing).
#[test]
fn parameter_gradients_repeat_exactly_over_many_chunks() -> Result<()> {
    let dev = Device::Cpu;
    let (rows, inp, out) = (64 * 40 + 5, 16, 24);
    let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, inp), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, out, &dev)?)?;
    let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.1, out, &dev)?)?;
    let beta = Var::from_tensor(&Tensor::randn(0f32, 0.1, out, &dev)?)?;
    let weights = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
    let grads = || -> Result<Vec<Vec<u32>>> {
        let y = linear(&x, w.as_tensor(), Some(b.as_tensor()), false, Products::F32)?
            .expect("fused path");
        let y = layer_norm(&y, gamma.as_tensor(), beta.as_tensor(), 1e-5)?;
        let store = (y * &weights)?.sum_all()?.backward()?;
        [&b, &gamma, &beta]
            .iter()
            .map(|v| {
                let g = store.get(v.as_tensor()).expect("gradient");
                Ok(g.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
            })
            .collect()
    };
    let first = grads()?;
    for _ in 0..10 {
        assert_eq!(grads()?, first);
    }
    Ok(())
}

/// An empty batch (no rows): an empty output, and zero gradients, not whatever memory the
/// unfilled buffers held. (A layer without input features is refused at its shape.)
#[test]
fn fused_linear_handles_empty_products() -> Result<()> {
    let dev = Device::Cpu;
    let b = Var::from_tensor(&Tensor::new(&[1f32, -2.0, 3.0], &dev)?)?;
    // No rows: an empty output, and zero gradients for the weight and the bias.
    let x = Var::from_tensor(&Tensor::zeros((0, 2), DType::F32, &dev)?)?;
    let w = Var::from_tensor(&Tensor::ones((3, 2), DType::F32, &dev)?)?;
    let y = linear(
        x.as_tensor(),
        w.as_tensor(),
        Some(b.as_tensor()),
        false,
        Products::F32,
    )?
    .expect("fused path");
    assert_eq!(y.dims(), [0, 3]);
    let grads = y.sum_all()?.backward()?;
    if let Some(dw) = grads.get(&w) {
        assert_eq!(dw.to_vec2::<f32>()?, vec![vec![0.0; 2]; 3]);
    }
    if let Some(db) = grads.get(&b) {
        assert_eq!(db.to_vec1::<f32>()?, vec![0.0; 3]);
    }
    Ok(())
}
