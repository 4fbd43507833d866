//! BERT-style encoders (BERT, MiniLM, ...) and a sequence-classification head.
//!
//! Reference: Hugging Face `transformers/models/bert/modeling_bert.py` and candle-transformers'
//! `models/bert.rs`; parameter names equal the Hugging Face checkpoint names, with or without the
//! `bert.` prefix that `BertFor*` checkpoints carry.

mod config;

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

pub use config::BertConfig;

use super::common::{
    dropout, expect_in_features, expect_out_features, padding_bias, Activation, DropoutRng,
    Embedding, LayerNorm,
};
use super::{LayeredModel, Outputs};
use crate::data::Batch;
use crate::layers::{DenseParts, LinearFactory, LinearLayer};
use crate::ops;

/// The inputs of one forward pass.
#[derive(Clone, Copy, Debug)]
pub struct BertInput<'a> {
    /// Token ids `(batch, seq)`, u32 or i64.
    pub input_ids: &'a Tensor,
    /// Segment ids `(batch, seq)`; all zeros when absent.
    pub token_type_ids: Option<&'a Tensor>,
    /// 1 for real tokens, 0 for padding, `(batch, seq)`; all ones when absent.
    pub attention_mask: Option<&'a Tensor>,
}

/// Everything an encoder pass produces.
#[derive(Clone, Debug)]
pub struct BertOutput {
    /// The last layer's output `(batch, seq, hidden)`.
    pub last_hidden_state: Tensor,
    /// The embeddings' output followed by every layer's output (`num_hidden_layers + 1` tensors), as
    /// Hugging Face's `output_hidden_states`; used by distillation.
    pub hidden_states: Vec<Tensor>,
    /// Each layer's attention probabilities `(batch, heads, seq, seq)` when asked for
    /// ([`Outputs::attentions`]), else empty.
    pub attentions: Vec<Tensor>,
}

#[derive(Clone, Debug)]
struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, cfg: &BertConfig) -> Result<Self> {
        Ok(Self {
            word_embeddings: Embedding::load(
                vb.pp("word_embeddings"),
                cfg.vocab_size,
                cfg.hidden_size,
            )?,
            position_embeddings: Embedding::load(
                vb.pp("position_embeddings"),
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?,
            token_type_embeddings: Embedding::load(
                vb.pp("token_type_embeddings"),
                cfg.type_vocab_size,
                cfg.hidden_size,
            )?,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        rng: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let (_, seq_len) = input_ids.dims2()?;
        let max_positions = self.position_embeddings.weight().dim(0)?;
        if seq_len > max_positions {
            candle_core::bail!(
                "sequence of {seq_len} tokens exceeds max_position_embeddings {max_positions}"
            );
        }
        let words = self.word_embeddings.forward(input_ids)?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let positions = self.position_embeddings.forward(&positions)?;
        let types = match token_type_ids {
            Some(t) => self.token_type_embeddings.forward(t)?,
            None => self
                .token_type_embeddings
                .forward(&input_ids.zeros_like()?)?,
        };
        let sum = words.broadcast_add(&positions)?.add(&types)?;
        dropout(&self.layer_norm.forward(&sum)?, self.dropout, rng)
    }
}

/// The query, key and value projections of one call: one packed tensor from the stacked weights
/// ([`BertSelfAttention::stacked_projection`]) or three from the layers one by one.
enum Projections {
    Stacked(Tensor),
    Separate(Tensor, Tensor, Tensor),
}

#[derive(Clone, Debug)]
struct BertSelfAttention {
    query: Arc<dyn LinearLayer>,
    key: Arc<dyn LinearLayer>,
    value: Arc<dyn LinearLayer>,
    num_heads: usize,
    head_dim: usize,
    dropout: f64,
}

impl BertSelfAttention {
    /// Reads the projections; the head count comes from their stored width (a layer whose heads
    /// were pruned away has fewer), the head size from the config.
    fn load(vb: VarBuilder, cfg: &BertConfig, linears: &LinearFactory) -> Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = cfg.head_dim()?;
        let query = linears.build(vb.pp("query"), h, h, true)?;
        let width = query.out_features();
        if width == 0 || width % head_dim != 0 {
            candle_core::bail!(
                "{}.query.weight has {width} rows, not a whole number of {head_dim}-wide heads",
                vb.prefix()
            );
        }
        let key = linears.build(vb.pp("key"), h, width, true)?;
        let value = linears.build(vb.pp("value"), h, width, true)?;
        for (name, layer) in [("query", &query), ("key", &key), ("value", &value)] {
            expect_in_features(&**layer, &format!("{}.{name}", vb.prefix()), h)?;
        }
        for (name, layer) in [("key", &key), ("value", &value)] {
            if layer.out_features() != width {
                candle_core::bail!(
                    "{}.{name}.weight has {} rows but {}.query.weight has {width}",
                    vb.prefix(),
                    layer.out_features(),
                    vb.prefix()
                );
            }
        }
        Ok(Self {
            query,
            key,
            value,
            num_heads: width / head_dim,
            head_dim,
            dropout: cfg.attention_probs_dropout_prob,
        })
    }

    /// Width of the attention output (`heads × head size`).
    fn width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// `(batch, seq, hidden)` → `(batch, heads, seq, head_dim)`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `[q | k | v]` `(batch, seq, 3 · width)` from one product with the three weights stacked,
    /// when all three are dense layers being trained on the CPU; `None` otherwise. One GEMM
    /// instead of three packs `x` once, and its backward gives `x` one gradient instead of three
    /// that autograd would add up.
    fn stacked_projection(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let parts = [&self.query, &self.key, &self.value].map(|l| l.trained_dense_parts());
        let [Some(q), Some(k), Some(v)] = parts else {
            return Ok(None);
        };
        if q.products != k.products || q.products != v.products {
            return Ok(None);
        }
        let (wq, wk, wv) = (q.weight, k.weight, v.weight);
        let bias = match (q.bias, k.bias, v.bias) {
            (Some(bq), Some(bk), Some(bv)) => Some(Tensor::cat(&[bq, bk, bv], 0)?),
            (None, None, None) => None,
            _ => return Ok(None),
        };
        ops::linear(
            x,
            &Tensor::cat(&[wq, wk, wv], 0)?,
            bias.as_ref(),
            false,
            q.products,
        )
    }

    /// The attended values `(batch, seq, width)`, and the attention probabilities when `keep_probs`.
    fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rng: Option<&DropoutRng>,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, s, _) = x.dims3()?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let projections = match (!keep_probs).then(|| self.stacked_projection(x)) {
            Some(stacked) => stacked?,
            None => None,
        };
        let projections = match projections {
            Some(qkv) => Projections::Stacked(qkv),
            None => Projections::Separate(
                self.query.forward_t(x, rng)?,
                self.key.forward_t(x, rng)?,
                self.value.forward_t(x, rng)?,
            ),
        };
        // One seed per call for the probabilities' dropout mask, drawn after the projections (a
        // LoRA adapter's dropout draws first) on every path, so the generator's stream and the
        // dropped positions do not depend on which path runs (the fused kernel, or the composed
        // ops on CUDA and when the probabilities are kept).
        let drop = rng
            .filter(|_| self.dropout > 0.0)
            .map(|rng| (self.dropout, rng.next_seed()));
        if !keep_probs {
            let heads = self.num_heads;
            let fused = match &projections {
                Projections::Stacked(qkv) => {
                    ops::fused_self_attention(qkv, bias, heads, scale, drop)?
                }
                Projections::Separate(q, k, v) => {
                    ops::fused_attention(q, k, v, bias, heads, scale, drop)?
                }
            };
            if let Some(out) = fused {
                return Ok((out, None));
            }
        }
        let (q, k, v) = match projections {
            Projections::Stacked(qkv) => {
                let w = self.width();
                (
                    qkv.narrow(2, 0, w)?,
                    qkv.narrow(2, w, w)?,
                    qkv.narrow(2, 2 * w, w)?,
                )
            }
            Projections::Separate(q, k, v) => (q, k, v),
        };
        // Scaling q before the product touches seq·head_dim values instead of seq².
        let q = (self.split_heads(&q)? * scale)?;
        let k = self.split_heads(&k)?;
        let v = self.split_heads(&v)?;
        let scores = q.matmul(&k.t()?)?;
        let scores = match bias {
            Some(bias) => scores.broadcast_add(bias)?,
            None => scores,
        };
        let probs = ops::softmax_last_dim(&scores)?;
        let kept = keep_probs.then(|| probs.clone());
        let probs = match drop {
            Some((p, seed)) => ops::dropout(&probs, p, seed)?,
            None => probs,
        };
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, s, self.width()))?;
        Ok((out, kept))
    }
}

/// A projection followed by dropout, a residual add and a layer norm (`attention.output`, `output`).
#[derive(Clone, Debug)]
struct BertResidualOutput {
    dense: Arc<dyn LinearLayer>,
    layer_norm: LayerNorm,
    dropout: f64,
}

impl BertResidualOutput {
    fn load(
        vb: VarBuilder,
        cfg: &BertConfig,
        in_dim: usize,
        linears: &LinearFactory,
    ) -> Result<Self> {
        let dense = linears.build(vb.pp("dense"), in_dim, cfg.hidden_size, true)?;
        let path = format!("{}.dense", vb.prefix());
        expect_in_features(&*dense, &path, in_dim)?;
        expect_out_features(&*dense, &path, cfg.hidden_size)?;
        Ok(Self {
            dense,
            layer_norm: LayerNorm::load(vb.pp("LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            dropout: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, x: &Tensor, residual: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let projected = dropout(&self.dense.forward_t(x, rng)?, self.dropout, rng)?;
        self.layer_norm.forward(&(projected + residual)?)
    }
}

#[derive(Clone, Debug)]
struct BertLayer {
    attention: BertSelfAttention,
    attention_output: BertResidualOutput,
    intermediate: Arc<dyn LinearLayer>,
    activation: Activation,
    output: BertResidualOutput,
}

impl BertLayer {
    /// Reads one layer; attention and FFN widths come from the stored tensors (see
    /// [`LinearFactory::build`]), so layers shrunk by structured pruning load.
    fn load(vb: VarBuilder, cfg: &BertConfig, linears: &LinearFactory) -> Result<Self> {
        let attention = BertSelfAttention::load(vb.pp("attention.self"), cfg, linears)?;
        let attention_output =
            BertResidualOutput::load(vb.pp("attention.output"), cfg, attention.width(), linears)?;
        let intermediate = linears.build(
            vb.pp("intermediate.dense"),
            cfg.hidden_size,
            cfg.intermediate_size,
            true,
        )?;
        let intermediate_path = format!("{}.intermediate.dense", vb.prefix());
        expect_in_features(&*intermediate, &intermediate_path, cfg.hidden_size)?;
        let output =
            BertResidualOutput::load(vb.pp("output"), cfg, intermediate.out_features(), linears)?;
        Ok(Self {
            attention,
            attention_output,
            intermediate,
            activation: cfg.hidden_act,
            output,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rng: Option<&DropoutRng>,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (attended, probs) = self.attention.forward(x, bias, rng, keep_probs)?;
        let x = self.attention_output.forward(&attended, x, rng)?;
        let inner = match self.fused_intermediate(&x)? {
            Some(inner) => inner,
            None => self
                .activation
                .forward(&self.intermediate.forward_t(&x, rng)?)?,
        };
        Ok((self.output.forward(&inner, &x, rng)?, probs))
    }

    /// The FFN's first product and exact GELU as one node, when its dense layer is being trained
    /// on the CPU ([`ops::linear_gelu`]); `None` otherwise.
    fn fused_intermediate(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.activation != Activation::Gelu {
            return Ok(None);
        }
        match self.intermediate.trained_dense_parts() {
            Some(DenseParts {
                weight,
                bias: Some(bias),
                products,
            }) => ops::linear_gelu(x, weight, bias, products),
            _ => Ok(None),
        }
    }
}

/// The BERT encoder: embeddings and a stack of transformer layers (no pooler).
#[derive(Clone, Debug)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    config: BertConfig,
}

impl BertModel {
    /// Builds the encoder from `vb`, which points at the model root (the folder holding `embeddings`
    /// and `encoder`; see [`bert_root`] for checkpoints with a `bert.` prefix).
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape, or the config is inconsistent.
    pub fn load(vb: VarBuilder, cfg: &BertConfig, linears: &LinearFactory) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(format!("encoder.layer.{i}")), cfg, linears))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), cfg)?,
            layers,
            config: cfg.clone(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// The number of transformer layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Encodes a batch; dropout is active when `rng` is given.
    ///
    /// # Errors
    /// Fails on inconsistent shapes, out-of-range ids or sequences longer than the position table.
    pub fn forward(&self, input: BertInput, rng: Option<&DropoutRng>) -> Result<BertOutput> {
        self.forward_with(input, Outputs::default(), rng)
    }

    /// Encodes a batch, also returning the optional outputs `want` asks for.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward_with(
        &self,
        input: BertInput,
        want: Outputs,
        rng: Option<&DropoutRng>,
    ) -> Result<BertOutput> {
        let mut x = self
            .embeddings
            .forward(input.input_ids, input.token_type_ids, rng)?;
        let bias = input
            .attention_mask
            .map(|m| padding_bias(m, x.dtype()))
            .transpose()?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        let mut attentions = Vec::new();
        hidden_states.push(x.clone());
        for layer in &self.layers {
            let (next, probs) = layer.forward(&x, bias.as_ref(), rng, want.attentions)?;
            x = next;
            hidden_states.push(x.clone());
            attentions.extend(probs);
        }
        Ok(BertOutput {
            last_hidden_state: x,
            hidden_states,
            attentions,
        })
    }
}

/// The builder for the encoder's root: `vb.pp("bert")` when the checkpoint uses the `bert.` prefix of
/// Hugging Face's `BertFor*` classes, else `vb` itself (plain `BertModel` checkpoints such as MiniLM).
pub fn bert_root(vb: VarBuilder<'static>) -> VarBuilder<'static> {
    if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
        vb.pp("bert")
    } else {
        vb
    }
}

/// Mean of the token vectors of `(batch, seq, hidden)` over real tokens (mask 1), as
/// sentence-transformers pools.
///
/// # Errors
/// Fails when the mask is not `(batch, seq)`.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    let mask = attention_mask
        .to_dtype(hidden.dtype())?
        .unsqueeze(D::Minus1)?;
    let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
    // A row with no real token would divide by zero; clamping keeps it a zero vector.
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

/// The first (`[CLS]`) token's vector of `(batch, seq, hidden)`.
///
/// # Errors
/// Fails on an empty sequence.
pub fn cls_pool(hidden: &Tensor) -> Result<Tensor> {
    hidden.narrow(1, 0, 1)?.squeeze(1)
}

/// Hugging Face's `BertForSequenceClassification`: encoder, pooler (dense + tanh on `[CLS]`), dropout
/// and a linear `classifier` with `num_labels` outputs.
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    bert: BertModel,
    pooler: Arc<dyn LinearLayer>,
    classifier: Arc<dyn LinearLayer>,
    dropout: f64,
}

/// Logits and the encoder's hidden states.
#[derive(Clone, Debug)]
pub struct ClassifierOutput {
    /// `(batch, num_labels)`.
    pub logits: Tensor,
    /// See [`BertOutput::hidden_states`].
    pub hidden_states: Vec<Tensor>,
    /// See [`BertOutput::attentions`].
    pub attentions: Vec<Tensor>,
}

impl BertForSequenceClassification {
    /// Builds the classifier from `vb` at the checkpoint root; the encoder is found with or without
    /// the `bert.` prefix. The pooler and classifier are read under the encoder's root (`pooler`) and
    /// at the top (`classifier`); a fresh head needs a store with missing-parameter creation on
    /// (`ParamStore::set_init_missing`).
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape.
    pub fn load(
        vb: VarBuilder<'static>,
        cfg: &BertConfig,
        linears: &LinearFactory,
    ) -> Result<Self> {
        let root = bert_root(vb.clone());
        let h = cfg.hidden_size;
        let pooler = linears.build(root.pp("pooler.dense"), h, h, true)?;
        let pooler_path = format!("{}.pooler.dense", root.prefix());
        let pooler_path = pooler_path.trim_start_matches('.');
        expect_in_features(&*pooler, pooler_path, h)?;
        expect_out_features(&*pooler, pooler_path, h)?;
        let classifier = linears.build(vb.pp("classifier"), h, cfg.num_labels(), true)?;
        expect_in_features(&*classifier, "classifier", h)?;
        expect_out_features(&*classifier, "classifier", cfg.num_labels())?;
        Ok(Self {
            bert: BertModel::load(root.clone(), cfg, linears)?,
            pooler,
            classifier,
            dropout: cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob),
        })
    }

    /// The encoder.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// Classifies a batch; dropout is active when `rng` is given.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward(&self, input: BertInput, rng: Option<&DropoutRng>) -> Result<ClassifierOutput> {
        self.forward_with(input, Outputs::default(), rng)
    }

    /// Classifies a batch, also returning the optional outputs `want` asks for.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward_with(
        &self,
        input: BertInput,
        want: Outputs,
        rng: Option<&DropoutRng>,
    ) -> Result<ClassifierOutput> {
        let out = self.bert.forward_with(input, want, rng)?;
        Ok(ClassifierOutput {
            logits: self.classify(&out.last_hidden_state, rng)?,
            hidden_states: out.hidden_states,
            attentions: out.attentions,
        })
    }

    /// The head: pooler on `[CLS]`, dropout, classifier.
    fn classify(&self, last_hidden: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let pooled = self.pooler.forward(&cls_pool(last_hidden)?)?.tanh()?;
        self.classifier
            .forward(&dropout(&pooled, self.dropout, rng)?)
    }
}

impl LayeredModel for BertForSequenceClassification {
    fn num_blocks(&self) -> usize {
        self.bert.layers.len()
    }

    fn embed(&self, batch: &Batch, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.bert
            .embeddings
            .forward(&batch.input_ids, Some(&batch.token_type_ids), dropout)
    }

    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        padding_bias(&batch.attention_mask, dtype)
    }

    fn block(
        &self,
        index: usize,
        x: &Tensor,
        bias: &Tensor,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let Some(layer) = self.bert.layers.get(index) else {
            candle_core::bail!("no layer {index} in a {}-layer encoder", self.num_blocks());
        };
        Ok(layer.forward(x, Some(bias), dropout, false)?.0)
    }

    fn head(&self, last_hidden: &Tensor, dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.classify(last_hidden, dropout)?.to_dtype(DType::F32)
    }
}

/// Casts integer id tensors to u32, the index type candle's `index_select` is fastest with.
///
/// # Errors
/// Fails on a float tensor.
pub fn ids_to_u32(ids: &Tensor) -> Result<Tensor> {
    match ids.dtype() {
        DType::U32 => Ok(ids.clone()),
        DType::I64 | DType::U8 => ids.to_dtype(DType::U32),
        other => candle_core::bail!("token ids must be integers, got {other:?}"),
    }
}
