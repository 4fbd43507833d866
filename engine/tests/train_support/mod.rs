//! Shared helpers of the training tests: a tiny random BERT classifier and a synthetic dataset it
//! can learn (label = whether token 7 occurs in the row).

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use anyhow::Result;
use candle_core::{DType, Device};
use compressd_engine::data::Example;
use compressd_engine::layers::LinearFactory;
use compressd_engine::models::bert::{BertConfig, BertForSequenceClassification};
use compressd_engine::params::ParamStore;
use rand::{Rng, SeedableRng};

/// A 2-layer, hidden-16 BERT with two classes, its parameters drawn from `seed` (the store creates
/// the missing weights with Hugging Face's N(0, 0.02²) init).
pub fn tiny_classifier(
    seed: u64,
    dropout: f64,
) -> Result<(ParamStore, BertForSequenceClassification)> {
    tiny_classifier_with(seed, dropout, &LinearFactory::default())
}

/// [`tiny_classifier`] with its linear layers made by `linears` (mixed precision, say).
pub fn tiny_classifier_with(
    seed: u64,
    dropout: f64,
    linears: &LinearFactory,
) -> Result<(ParamStore, BertForSequenceClassification)> {
    let cfg: BertConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 20, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 32, "max_position_embeddings": 16, "type_vocab_size": 2,
        "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
        "id2label": {"0": "absent", "1": "present"}
    }))?;
    let store = ParamStore::new();
    store.set_init_missing(Some(seed));
    let model = BertForSequenceClassification::load(
        store.var_builder(DType::F32, &Device::Cpu),
        &cfg,
        linears,
    )?;
    Ok((store, model))
}

/// `n` rows of 3..=8 tokens from 2..20 (0 is padding, 1 is `[CLS]` at the start); label 1 when the
/// row contains token 7.
pub fn synthetic_rows(n: usize, seed: u64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.gen_range(3..=8);
            let mut ids: Vec<u32> = std::iter::once(1)
                .chain((1..len).map(|_| rng.gen_range(2..20)))
                .collect();
            ids.retain(|&t| t != 7);
            if i % 2 == 0 {
                let at = rng.gen_range(1..=ids.len());
                ids.insert(at, 7);
            }
            Example {
                label: Some(ids.contains(&7) as u32),
                input_ids: ids,
            }
        })
        .collect()
}

/// Every trainable tensor of a store, by name.
pub fn snapshot(store: &ParamStore) -> Result<Vec<(String, Vec<f32>)>> {
    store
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| Ok((n, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// Sets the cancellation flag after a given step, as a client cancelling the job would.
pub struct CancelAfter<'a> {
    pub step: u64,
    pub flag: &'a std::sync::atomic::AtomicBool,
}

impl compressd_engine::train::TrainHooks for CancelAfter<'_> {
    fn on_progress(&mut self, progress: &compressd_engine::train::Progress) {
        if progress.step == self.step {
            self.flag.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
