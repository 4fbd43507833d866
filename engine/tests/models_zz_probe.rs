//! Temporary timing probe (deleted before hand-off).
use std::time::Instant;
use candle_core::{DType, Device, Tensor, Var};
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification, BertInput};
use compressd_engine::params::ParamStore;
use compressd_engine::ops;

fn time<F: FnMut()>(name: &str, n: usize, mut f: F) {
    f();
    let t = Instant::now();
    for _ in 0..n { f(); }
    eprintln!("{name}: {:.2} ms", t.elapsed().as_secs_f64() * 1000.0 / n as f64);
}

#[test]
fn probe() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (1024, 256), &dev).unwrap();
    let w = Var::from_tensor(&Tensor::randn(0f32, 1., (1024, 256), &dev).unwrap()).unwrap();
    time("matmul 1024x256 @ (1024x256)^T", 10, || { x.matmul(&w.t().unwrap()).unwrap(); });
    let wt = w.t().unwrap().contiguous().unwrap();
    time("matmul contiguous wT", 10, || { x.matmul(&wt).unwrap(); });
    let big = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 4, 128, 128), &dev).unwrap()).unwrap();
    time("softmax kernel 8x4x128x128", 10, || { ops::softmax_last_dim(&big).unwrap(); });
    time("softmax fused", 10, || { candle_nn::ops::softmax_last_dim(big.as_tensor()).unwrap(); });
    let h = Var::from_tensor(&Tensor::randn(0f32, 1., (8, 128, 1024), &dev).unwrap()).unwrap();
    time("gelu kernel 8x128x1024", 10, || { ops::gelu_erf(&h).unwrap(); });
    time("gelu candle", 10, || { h.as_tensor().gelu_erf().unwrap(); });
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 30522, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "max_position_embeddings": 512, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})).unwrap();
    let store = ParamStore::new();
    store.set_init_missing(Some(1));
    let model = BertForSequenceClassification::load(store.var_builder(DType::F32, &dev), &cfg, &LinearFactory::default()).unwrap();
    let ids = Tensor::ones((8, 128), DType::U32, &dev).unwrap();
    let input = BertInput { input_ids: &ids, token_type_ids: None, attention_mask: None };
    time("bert forward (grad path)", 3, || { model.forward(input, None).unwrap(); });
    let out = model.forward(input, None).unwrap().logits;
    time("bert backward", 3, || { out.sum_all().unwrap().backward().unwrap(); });
}
