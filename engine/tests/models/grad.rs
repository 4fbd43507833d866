//! Gradient tests for tiny random BERT and Llama models: every trainable tensor gets a gradient,
//! autograd agrees with finite differences (f64), masks and causality behave, and the fused inference
//! path agrees with the differentiable one.

use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, IndexOp, Tensor};
use compressd_engine::layers::{
    ActivationObservers, FakeQuantInputs, LinearFactory, LinearKind, LinearPlan,
};
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification, BertInput};
use compressd_engine::models::common::DropoutRng;
use compressd_engine::models::llama::{LlamaConfig, LlamaForCausalLm};
use compressd_engine::models::Outputs;
use compressd_engine::params::{Param, ParamStore};
use compressd_engine::quant::QuantScheme;

fn tiny_bert_config() -> BertConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 16, "type_vocab_size": 2,
        "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "id2label": {"0": "a", "1": "b", "2": "c"}
    }))
    .expect("valid config")
}

fn tiny_llama_config() -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true
    }))
    .expect("valid config")
}

/// A store whose parameters are all created, trainable, by the model that loads from it.
fn random_store(seed: u64) -> ParamStore {
    let store = ParamStore::new();
    store.set_init_missing(Some(seed));
    store
}

/// Makes every parameter non-trivial: fresh biases are zero and norms are one, which would hide
/// bugs in their gradients.
fn perturb(store: &ParamStore) -> Result<()> {
    for (_, var) in store.trainable_vars() {
        let noise = (var.randn_like(0.0, 0.1)?.to_dtype(var.dtype()))?;
        var.set(&(var.as_tensor() + noise)?)?;
    }
    Ok(())
}

fn ids(rows: &[&[u32]]) -> Result<Tensor> {
    Ok(Tensor::new(
        rows.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
        &Device::Cpu,
    )?)
}

struct BertCase {
    store: ParamStore,
    model: BertForSequenceClassification,
    input_ids: Tensor,
    mask: Tensor,
    labels: Tensor,
}

fn bert_case(dtype: DType) -> Result<BertCase> {
    bert_case_with(dtype, &LinearFactory::default())
}

fn bert_case_with(dtype: DType, factory: &LinearFactory) -> Result<BertCase> {
    let store = random_store(1);
    let cfg = tiny_bert_config();
    let model =
        BertForSequenceClassification::load(store.var_builder(dtype, &Device::Cpu), &cfg, factory)?;
    perturb(&store)?;
    let input_ids = ids(&[&[1, 5, 9, 3, 2, 0], &[1, 7, 2, 0, 0, 0]])?;
    let mask = ids(&[&[1, 1, 1, 1, 1, 0], &[1, 1, 1, 0, 0, 0]])?;
    Ok(BertCase {
        store,
        model,
        input_ids,
        mask,
        labels: Tensor::new(&[2u32, 0], &Device::Cpu)?,
    })
}

fn bert_loss(case: &BertCase, rng: Option<&DropoutRng>) -> Result<Tensor> {
    let input = BertInput {
        input_ids: &case.input_ids,
        token_type_ids: None,
        attention_mask: Some(&case.mask),
    };
    let logits = case.model.forward(input, rng)?.logits;
    Ok(candle_nn::loss::cross_entropy(&logits, &case.labels)?)
}

struct LlamaCase {
    store: ParamStore,
    model: LlamaForCausalLm,
    input_ids: Tensor,
}

fn llama_case(dtype: DType) -> Result<LlamaCase> {
    let store = random_store(2);
    let model = LlamaForCausalLm::load(
        store.var_builder(dtype, &Device::Cpu),
        &tiny_llama_config(),
        &LinearFactory::default(),
    )?;
    perturb(&store)?;
    Ok(LlamaCase {
        store,
        model,
        input_ids: ids(&[&[3, 17, 4, 29, 8, 11, 5], &[6, 1, 38, 2, 9, 9, 30]])?,
    })
}

fn llama_loss(case: &LlamaCase) -> Result<Tensor> {
    let (b, s) = case.input_ids.dims2()?;
    let logits = case.model.forward(&case.input_ids, None, None)?.logits;
    let inputs = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), ()))?;
    let targets = case.input_ids.narrow(1, 1, s - 1)?.flatten_all()?;
    Ok(candle_nn::loss::cross_entropy(&inputs, &targets)?)
}

/// Asserts every trainable tensor except attention key biases has a non-zero gradient.
fn assert_all_gradients_nonzero(store: &ParamStore, loss: &Tensor) -> Result<()> {
    let grads = loss.backward()?;
    let vars = store.trainable_vars();
    assert!(vars.len() > 10, "only {} trainable tensors", vars.len());
    for (name, var) in vars {
        let grad = grads
            .get(&var)
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let norm = grad
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        if name.ends_with("key.bias") || name.ends_with("k_proj.bias") {
            // Softmax is shift-invariant per query, and a key bias shifts every score of a query by
            // the same amount: its true gradient is zero.
            assert!(
                norm < 1e-10,
                "{name}: key bias gradient {norm} should vanish"
            );
        } else {
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }
    Ok(())
}

#[test]
fn every_bert_parameter_gets_a_gradient_with_dropout_on() -> Result<()> {
    let case = bert_case(DType::F32)?;
    let rng = DropoutRng::new(3);
    assert_all_gradients_nonzero(&case.store, &bert_loss(&case, Some(&rng))?)
}

/// Quantization-aware training: weights and inputs rounded to int8 in the forward pass must not
/// cut any gradient (the straight-through estimator passes them on).
#[test]
fn every_bert_parameter_gets_a_gradient_through_fake_quantized_layers() -> Result<()> {
    for inputs in [
        FakeQuantInputs::Int8PerToken,
        FakeQuantInputs::Int8PerTensor,
    ] {
        let kind = LinearKind::FakeQuant {
            scheme: QuantScheme::Int8,
            inputs,
        };
        // Per-tensor ranges start at the first training batch's largest |x|: nothing saturates.
        let observers = Arc::new(ActivationObservers::new(None));
        let factory = LinearFactory::new(LinearPlan::uniform(kind))
            .with_activation_observers(observers.clone());
        let case = bert_case_with(DType::F32, &factory)?;
        let rng = DropoutRng::new(3);
        assert_all_gradients_nonzero(&case.store, &bert_loss(&case, Some(&rng))?)?;
        let observed = observers.ranges().len();
        match inputs {
            FakeQuantInputs::Int8PerTensor => assert!(observed > 0, "ranges observed"),
            _ => assert_eq!(observed, 0, "per-token layers keep no range"),
        }
    }
    Ok(())
}

#[test]
fn every_llama_parameter_gets_a_gradient() -> Result<()> {
    let case = llama_case(DType::F32)?;
    assert!(
        case.store.contains("model.embed_tokens.weight") && !case.store.contains("lm_head.weight"),
        "tied head"
    );
    assert_all_gradients_nonzero(&case.store, &llama_loss(&case)?)
}

/// Compares autograd with central differences on a spread of elements of every tensor (f64).
fn check_finite_differences(store: &ParamStore, loss: impl Fn() -> Result<Tensor>) -> Result<()> {
    let grads = loss()?.backward()?;
    let h = 1e-5;
    for (name, var) in store.trainable_vars() {
        let grad = grads
            .get(&var)
            .map(|g| g.flatten_all()?.to_vec1::<f64>())
            .transpose()?
            .unwrap_or_default();
        let values = var.flatten_all()?.to_vec1::<f64>()?;
        for j in (0..values.len()).step_by(values.len().div_ceil(3).max(1)) {
            let at = |delta: f64| -> Result<f64> {
                let mut v = values.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu)?)?;
                Ok(loss()?.to_scalar::<f64>()?)
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            at(0.0)?;
            let analytic = grad.get(j).copied().unwrap_or(0.0);
            assert!(
                (numeric - analytic).abs() < 1e-6 + 1e-4 * numeric.abs(),
                "{name}[{j}]: autograd {analytic} vs numeric {numeric}"
            );
        }
    }
    Ok(())
}

#[test]
fn bert_gradients_match_finite_differences_f64() -> Result<()> {
    let case = bert_case(DType::F64)?;
    check_finite_differences(&case.store, || bert_loss(&case, None))
}

#[test]
fn llama_gradients_match_finite_differences_f64() -> Result<()> {
    let case = llama_case(DType::F64)?;
    check_finite_differences(&case.store, || llama_loss(&case))
}

/// A copy of `store` whose parameters are frozen tensors, so forward passes take the fused path.
fn frozen_copy(store: &ParamStore) -> Result<ParamStore> {
    let frozen = ParamStore::new();
    for (name, tensor) in store.tensors() {
        frozen.insert(name, Param::Frozen(tensor.copy()?));
    }
    Ok(frozen)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn fused_inference_path_agrees_with_differentiable_path() -> Result<()> {
    let case = bert_case(DType::F32)?;
    let frozen = frozen_copy(&case.store)?;
    let fast = BertForSequenceClassification::load(
        frozen.var_builder(DType::F32, &Device::Cpu),
        &tiny_bert_config(),
        &LinearFactory::default(),
    )?;
    let input = BertInput {
        input_ids: &case.input_ids,
        token_type_ids: None,
        attention_mask: Some(&case.mask),
    };
    let diff = max_diff(
        &fast.forward(input, None)?.logits,
        &case.model.forward(input, None)?.logits,
    )?;
    assert!(diff < 1e-5, "BERT logits differ by {diff}");

    let case = llama_case(DType::F32)?;
    let frozen = frozen_copy(&case.store)?;
    let fast = LlamaForCausalLm::load(
        frozen.var_builder(DType::F32, &Device::Cpu),
        &tiny_llama_config(),
        &LinearFactory::default(),
    )?;
    let diff = max_diff(
        &fast.forward(&case.input_ids, None, None)?.logits,
        &case.model.forward(&case.input_ids, None, None)?.logits,
    )?;
    assert!(diff < 1e-5, "Llama logits differ by {diff}");
    Ok(())
}

#[test]
fn bert_padding_does_not_change_real_tokens() -> Result<()> {
    let case = bert_case(DType::F32)?;
    let bert = case.model.bert();
    let short = ids(&[&[1, 7, 2]])?;
    let padded = ids(&[&[1, 7, 2, 0, 0]])?;
    let plain = bert.forward(
        BertInput {
            input_ids: &short,
            token_type_ids: None,
            attention_mask: None,
        },
        None,
    )?;
    let mask = ids(&[&[1, 1, 1, 0, 0]])?;
    let masked = bert.forward(
        BertInput {
            input_ids: &padded,
            token_type_ids: None,
            attention_mask: Some(&mask),
        },
        None,
    )?;
    assert_eq!(masked.hidden_states.len(), 3, "embeddings + 2 layers");
    let diff = max_diff(
        &plain.last_hidden_state,
        &masked.last_hidden_state.narrow(1, 0, 3)?,
    )?;
    assert!(diff < 1e-5, "padding leaked into real tokens: {diff}");
    Ok(())
}

#[test]
fn llama_is_causal_and_reports_every_layer() -> Result<()> {
    let case = llama_case(DType::F32)?;
    let a = case.model.forward(&ids(&[&[3, 17, 4, 29]])?, None, None)?;
    let b = case.model.forward(&ids(&[&[3, 17, 4, 1]])?, None, None)?;
    assert_eq!(a.hidden_states.len(), 3);
    assert_eq!(a.logits.dims(), &[1, 4, 40]);
    let diff = max_diff(&a.logits.i((.., ..3))?, &b.logits.i((.., ..3))?)?;
    assert!(
        diff < 1e-6,
        "a later token changed earlier logits by {diff}"
    );
    assert!(max_diff(&a.logits.i((.., 3))?, &b.logits.i((.., 3))?)? > 1e-4);
    Ok(())
}

#[test]
fn dropout_is_seeded_and_only_active_in_training() -> Result<()> {
    let case = bert_case(DType::F32)?;
    let eval_a = bert_loss(&case, None)?.to_scalar::<f32>()?;
    let eval_b = bert_loss(&case, None)?.to_scalar::<f32>()?;
    assert_eq!(eval_a, eval_b);
    let train_a = bert_loss(&case, Some(&DropoutRng::new(9)))?.to_scalar::<f32>()?;
    let train_b = bert_loss(&case, Some(&DropoutRng::new(9)))?.to_scalar::<f32>()?;
    assert_eq!(train_a, train_b, "same seed, same masks");
    assert_ne!(train_a, eval_a);
    Ok(())
}

#[test]
fn half_precision_with_padding_stays_finite() -> Result<()> {
    for dtype in [DType::F16, DType::BF16] {
        let case = bert_case(dtype)?;
        // Trainable store: the composed differentiable path; frozen copy: candle's fused kernels.
        let frozen = frozen_copy(&case.store)?;
        let fast = BertForSequenceClassification::load(
            frozen.var_builder(dtype, &Device::Cpu),
            &tiny_bert_config(),
            &LinearFactory::default(),
        )?;
        let input = BertInput {
            input_ids: &case.input_ids,
            token_type_ids: None,
            attention_mask: Some(&case.mask),
        };
        for logits in [
            case.model.forward(input, None)?.logits,
            fast.forward(input, None)?.logits,
        ] {
            let values = logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert!(
                values.iter().all(|v| v.is_finite()),
                "{dtype:?}: {values:?}"
            );
        }
        let loss = bert_loss(&case, None)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        assert!(loss.is_finite(), "{dtype:?} loss {loss}");
    }
    Ok(())
}

/// With dropout on, the fused attention (stacked projections) and the composed one (taken when
/// the attention maps are kept, and on CUDA) draw one seed per call and the same mask from it, so
/// they give the same logits and leave the generator in the same state.
#[test]
fn fused_and_composed_attention_drop_the_same_probabilities() -> Result<()> {
    let case = bert_case(DType::F32)?;
    let input = BertInput {
        input_ids: &case.input_ids,
        token_type_ids: None,
        attention_mask: Some(&case.mask),
    };
    let run = |seed: u64, attentions: bool| -> Result<(Tensor, u64)> {
        let rng = DropoutRng::new(seed);
        let outputs = Outputs {
            hidden_states: false,
            attentions,
        };
        let logits = case.model.forward_with(input, outputs, Some(&rng))?.logits;
        Ok((logits, rng.next_seed()))
    };
    let (fused, fused_next) = run(5, false)?;
    let (composed, composed_next) = run(5, true)?;
    let diff = max_diff(&fused, &composed)?;
    assert!(diff < 1e-5, "logits differ by {diff}");
    assert_eq!(fused_next, composed_next, "the generators drew differently");
    // Dropout is on: another seed, or none, moves the logits.
    let (other, _) = run(6, false)?;
    let plain = case.model.forward(input, None)?.logits;
    assert!(max_diff(&fused, &other)? > 1e-4 && max_diff(&fused, &plain)? > 1e-4);
    Ok(())
}
