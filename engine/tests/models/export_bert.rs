//! A BERT classifier exported as a Hugging Face folder loads in candle-transformers' BertModel (same
//! encoder outputs) and back into ours (same logits, labels kept).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use compressd_engine::export::{export_transformers_folder, HfArchitecture};
use compressd_engine::layers::LinearFactory;
use compressd_engine::loading::read_hf_folder;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification, BertInput};
use compressd_engine::params::ParamStore;

fn tiny_config() -> BertConfig {
    let mut cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 32, "hidden_act": "gelu"
    }))
    .expect("valid config");
    cfg.set_labels(&["sport".into(), "tech".into(), "politics".into()]);
    cfg
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

#[test]
fn exported_bert_loads_in_candle_transformers_and_back() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_config();
    let store = ParamStore::new();
    store.set_init_missing(Some(5));
    let ours = BertForSequenceClassification::load(
        store.var_builder(DType::F32, &dev),
        &cfg,
        &LinearFactory::default(),
    )?;
    let dir = tempfile::tempdir()?;
    export_transformers_folder(
        dir.path(),
        HfArchitecture::BertForSequenceClassification,
        &serde_json::to_value(&cfg)?,
        store.tensors(),
        None,
    )?;

    let input_ids = Tensor::new(&[[2u32, 14, 7, 33, 9], [5, 1, 0, 0, 0]], &dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 0, 0, 0]], &dev)?;
    let type_ids = input_ids.zeros_like()?;
    let input = BertInput {
        input_ids: &input_ids,
        token_type_ids: None,
        attention_mask: Some(&mask),
    };
    let our_out = ours.forward(input, None)?;

    // candle-transformers reads the folder with its own config type and finds the `bert.` prefix
    // through `model_type`.
    let config_text = std::fs::read_to_string(dir.path().join("config.json"))?;
    let their_cfg: candle_transformers::models::bert::Config = serde_json::from_str(&config_text)?;
    // SAFETY: the file was just written by this test and is not modified while mapped.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &dev,
        )?
    };
    let theirs = candle_transformers::models::bert::BertModel::load(vb, &their_cfg)?;
    let their_hidden = theirs.forward(&input_ids, &type_ids, Some(&mask))?;
    let ours_hidden = ours.bert().forward(input, None)?.last_hidden_state;
    let diff = max_diff(&ours_hidden, &their_hidden)?;
    assert!(diff < 1e-4, "encoder outputs differ by {diff}");

    let checkpoint = read_hf_folder(dir.path(), DType::F32, &dev)?;
    let reread: BertConfig = checkpoint.parse_config()?;
    assert_eq!(reread.labels(), cfg.labels());
    assert_eq!(
        reread.extra.get("architectures"),
        Some(&serde_json::json!(["BertForSequenceClassification"]))
    );
    assert!(checkpoint
        .tensors
        .iter()
        .any(|(n, _)| n == "bert.pooler.dense.weight"));
    let store = checkpoint.into_store(|_| false)?;
    let reloaded = BertForSequenceClassification::load(
        store.var_builder(DType::F32, &dev),
        &reread,
        &LinearFactory::default(),
    )?;
    let diff = max_diff(&reloaded.forward(input, None)?.logits, &our_out.logits)?;
    assert!(diff < 1e-6, "logits after export/reload differ by {diff}");
    Ok(())
}
