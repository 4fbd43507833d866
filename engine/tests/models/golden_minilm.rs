//! all-MiniLM-L6-v2 through our BertModel against PyTorch reference embeddings.
//!
//! `../shared/golden/golden.json` holds, for three sentences, the token ids and the mean-pooled,
//! L2-normalised embeddings computed with PyTorch + transformers (f32, CPU); see shared/README.md.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use compressd_engine::layers::LinearFactory;
use compressd_engine::loading::{load_tokenizer, read_hf_folder};
use compressd_engine::models::bert::{mean_pool, BertConfig, BertInput, BertModel};

fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPRESSD_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    dir.join("golden/golden.json").is_file().then_some(dir)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Embeds one sentence: encoder, mean pooling over its tokens, L2 normalisation.
fn embed(model: &BertModel, ids: &[u32]) -> Result<Vec<f32>> {
    let input_ids = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let mask = input_ids.ones_like()?;
    let input = BertInput {
        input_ids: &input_ids,
        token_type_ids: None,
        attention_mask: Some(&mask),
    };
    let hidden = model.forward(input, None)?.last_hidden_state;
    let pooled = mean_pool(&hidden, &mask)?.squeeze(0)?;
    let norm = pooled.sqr()?.sum_all()?.sqrt()?;
    Ok(pooled.broadcast_div(&norm)?.to_vec1()?)
}

#[test]
#[ignore = "needs ../shared: cargo test -p compressd-engine --test models golden_minilm:: -- --ignored"]
fn minilm_embeddings_match_pytorch() -> Result<()> {
    let shared = shared_dir()
        .ok_or_else(|| anyhow::anyhow!("../shared not found (set COMPRESSD_SHARED)"))?;
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared.join("golden/golden.json"))?)?;
    let golden = &golden["minilm"];
    let dir = shared.join("models/all-MiniLM-L6-v2");
    let checkpoint = read_hf_folder(&dir, DType::F32, &Device::Cpu)?;
    let config: BertConfig = checkpoint.parse_config()?;
    let tokenizer = load_tokenizer(checkpoint.tokenizer.as_deref().context("tokenizer.json")?)?;
    let store = checkpoint.into_store(|_| false)?;
    let model = BertModel::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &config,
        &LinearFactory::default(),
    )?;

    let sentences = golden["sentences"].as_array().context("sentences")?;
    let mut embeddings = Vec::new();
    for (i, sentence) in sentences.iter().enumerate() {
        let encoding = tokenizer
            .encode(sentence.as_str().context("sentence")?, true)
            .map_err(anyhow::Error::msg)?;
        let want_ids: Vec<u32> = serde_json::from_value(golden["input_ids"][i].clone())?;
        assert_eq!(
            encoding.get_ids(),
            want_ids.as_slice(),
            "token ids of sentence {i}"
        );
        let embedding = embed(&model, encoding.get_ids())?;
        let want: Vec<f32> =
            serde_json::from_value(golden["mean_pooled_l2_normalized"][i].clone())?;
        let cos = cosine(&embedding, &want);
        eprintln!("sentence {i}: cosine to PyTorch {cos:.7}");
        assert!(cos >= 0.9999, "sentence {i}: cosine to golden {cos}");
        embeddings.push(embedding);
    }
    let cos01 = cosine(&embeddings[0], &embeddings[1]);
    assert!((cos01 - 0.7553).abs() <= 0.001, "cos(0,1) = {cos01}");
    let cos02 = cosine(&embeddings[0], &embeddings[2]);
    eprintln!("cos(0,1) = {cos01:.5}, cos(0,2) = {cos02:.5}");
    assert!((cos02 - 0.0037).abs() <= 0.001, "cos(0,2) = {cos02}");
    Ok(())
}
