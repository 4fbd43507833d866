//! Llama-style decoders (Llama, SmolLM, Qwen2-like): RMS norm, rotary embeddings, grouped-query
//! attention, SwiGLU MLP and optionally tied input/output embeddings.
//!
//! Reference: Hugging Face `transformers/models/llama/modeling_llama.py` and candle-transformers'
//! `models/llama.rs`; parameter names equal the Hugging Face checkpoint names (`model.layers.N...`,
//! `lm_head`). Rotary embeddings use the "rotate half" convention of Hugging Face checkpoints; GGUF
//! files are converted to it when loaded (see `loading::gguf`).

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::common::{
    dropout, expect_in_features, expect_out_features, mask_value, padding_bias, Activation,
    DropoutRng, Embedding, RmsNorm,
};
use super::{LayeredModel, Outputs};
use crate::data::Batch;
use crate::layers::{LinearFactory, LinearLayer};
use crate::ops;

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_activation() -> Activation {
    Activation::Silu
}

/// A Llama configuration, with Hugging Face `config.json` field names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Key/value heads for grouped-query attention; `num_attention_heads` when absent.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// The size of one attention head when it is not `hidden_size / num_attention_heads` (a model
    /// whose heads were pruned away keeps its head size).
    #[serde(default, rename = "head_dim", skip_serializing_if = "Option::is_none")]
    pub explicit_head_dim: Option<usize>,
    #[serde(default = "default_activation")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Whether `lm_head` reuses `model.embed_tokens.weight`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the q/k/v/o projections have biases (Qwen2-style checkpoints).
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub attention_dropout: f64,
    /// Every other field of `config.json`, kept so an export writes it back unchanged.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl LlamaConfig {
    /// The number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The size of one attention head.
    ///
    /// # Errors
    /// Fails when the head counts do not divide the hidden size evenly or the head size is odd.
    pub fn head_dim(&self) -> Result<usize> {
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        let uneven =
            self.explicit_head_dim.is_none() && !self.hidden_size.is_multiple_of(heads.max(1));
        if heads == 0 || kv == 0 || uneven || !heads.is_multiple_of(kv) {
            candle_core::bail!(
                "inconsistent heads: hidden {} heads {heads} kv heads {kv}",
                self.hidden_size
            );
        }
        let head_dim = self.explicit_head_dim.unwrap_or(self.hidden_size / heads);
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head size, got {head_dim}");
        }
        Ok(head_dim)
    }
}

/// Precomputed rotary tables `(max_positions, head_dim / 2)`.
#[derive(Clone, Debug)]
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim()? / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / (2 * half) as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let angles = positions.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(2)?;
        ops::rope(
            x,
            &self.cos.narrow(0, 0, seq)?,
            &self.sin.narrow(0, 0, seq)?,
        )
    }
}

#[derive(Clone, Debug)]
struct LlamaAttention {
    q_proj: Arc<dyn LinearLayer>,
    k_proj: Arc<dyn LinearLayer>,
    v_proj: Arc<dyn LinearLayer>,
    o_proj: Arc<dyn LinearLayer>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    dropout: f64,
}

impl LlamaAttention {
    /// Reads the projections; query and key/value head counts come from their stored widths (a
    /// layer whose heads were pruned away has fewer), the head size from the config.
    fn load(vb: VarBuilder, cfg: &LlamaConfig, linears: &LinearFactory) -> Result<Self> {
        let (h, hd, kv) = (cfg.hidden_size, cfg.head_dim()?, cfg.kv_heads());
        let bias = cfg.attention_bias;
        let prefix = vb.prefix();
        let q_proj = linears.build(vb.pp("q_proj"), h, cfg.num_attention_heads * hd, bias)?;
        let k_proj = linears.build(vb.pp("k_proj"), h, kv * hd, bias)?;
        let v_proj = linears.build(vb.pp("v_proj"), h, k_proj.out_features(), bias)?;
        let (q_width, kv_width) = (q_proj.out_features(), k_proj.out_features());
        for (name, width) in [("q_proj", q_width), ("k_proj", kv_width)] {
            if width == 0 || width % hd != 0 {
                candle_core::bail!(
                    "{prefix}.{name}.weight has {width} rows, not a whole number of {hd}-wide heads"
                );
            }
        }
        if v_proj.out_features() != kv_width {
            candle_core::bail!(
                "{prefix}.v_proj.weight has {} rows but {prefix}.k_proj.weight has {kv_width}",
                v_proj.out_features()
            );
        }
        let (num_heads, num_kv_heads) = (q_width / hd, kv_width / hd);
        if num_heads % num_kv_heads != 0 {
            candle_core::bail!(
                "{prefix}: {num_heads} query heads cannot share {num_kv_heads} key/value heads"
            );
        }
        let o_proj = linears.build(vb.pp("o_proj"), q_width, h, bias)?;
        for (name, layer) in [
            ("q_proj", &q_proj),
            ("k_proj", &k_proj),
            ("v_proj", &v_proj),
        ] {
            expect_in_features(&**layer, &format!("{prefix}.{name}"), h)?;
        }
        expect_in_features(&*o_proj, &format!("{prefix}.o_proj"), q_width)?;
        expect_out_features(&*o_proj, &format!("{prefix}.o_proj"), h)?;
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            num_heads,
            num_kv_heads,
            head_dim: hd,
            dropout: cfg.attention_dropout,
        })
    }

    /// `(batch, seq, heads·head_dim)` → `(batch, heads, seq, head_dim)`.
    fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Repeats each key/value head for the query heads that share it.
    fn repeat_kv(&self, x: Tensor) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return Ok(x);
        }
        let (b, kv, s, d) = x.dims4()?;
        x.unsqueeze(2)?
            .broadcast_as((b, kv, groups, s, d))?
            .reshape((b, kv * groups, s, d))
    }

    /// The attention output, and the attention probabilities when `keep_probs`.
    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        bias: &Tensor,
        rng: Option<&DropoutRng>,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, s, _) = x.dims3()?;
        let q =
            rotary.apply(&self.split_heads(&self.q_proj.forward_t(x, rng)?, self.num_heads)?)?;
        let k =
            rotary.apply(&self.split_heads(&self.k_proj.forward_t(x, rng)?, self.num_kv_heads)?)?;
        let v = self.split_heads(&self.v_proj.forward_t(x, rng)?, self.num_kv_heads)?;
        let (k, v) = (self.repeat_kv(k)?, self.repeat_kv(v)?);
        let q = (q * (self.head_dim as f64).powf(-0.5))?;
        let scores = q.contiguous()?.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = ops::softmax_last_dim(&scores)?;
        let kept = keep_probs.then(|| probs.clone());
        let probs = dropout(&probs, self.dropout, rng)?;
        let out = probs.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((
            b,
            s,
            self.num_heads * self.head_dim,
        ))?;
        Ok((self.o_proj.forward_t(&out, rng)?, kept))
    }
}

#[derive(Clone, Debug)]
struct LlamaMlp {
    gate_proj: Arc<dyn LinearLayer>,
    up_proj: Arc<dyn LinearLayer>,
    down_proj: Arc<dyn LinearLayer>,
    activation: Activation,
}

impl LlamaMlp {
    /// Reads the projections; the FFN width comes from the stored `gate_proj` (pruned neurons).
    fn load(vb: VarBuilder, cfg: &LlamaConfig, linears: &LinearFactory) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let prefix = vb.prefix();
        let gate_proj = linears.build(vb.pp("gate_proj"), h, i, false)?;
        let width = gate_proj.out_features();
        let up_proj = linears.build(vb.pp("up_proj"), h, width, false)?;
        if up_proj.out_features() != width {
            candle_core::bail!(
                "{prefix}.up_proj.weight has {} rows but {prefix}.gate_proj.weight has {width}",
                up_proj.out_features()
            );
        }
        let down_proj = linears.build(vb.pp("down_proj"), width, h, false)?;
        expect_in_features(&*gate_proj, &format!("{prefix}.gate_proj"), h)?;
        expect_in_features(&*up_proj, &format!("{prefix}.up_proj"), h)?;
        expect_in_features(&*down_proj, &format!("{prefix}.down_proj"), width)?;
        expect_out_features(&*down_proj, &format!("{prefix}.down_proj"), h)?;
        Ok(Self {
            gate_proj,
            up_proj,
            down_proj,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let gate = self
            .activation
            .forward(&self.gate_proj.forward_t(x, rng)?)?;
        self.down_proj
            .forward_t(&(gate * self.up_proj.forward_t(x, rng)?)?, rng)
    }
}

#[derive(Clone, Debug)]
struct LlamaBlock {
    input_layernorm: RmsNorm,
    self_attn: LlamaAttention,
    post_attention_layernorm: RmsNorm,
    mlp: LlamaMlp,
}

impl LlamaBlock {
    fn load(vb: VarBuilder, cfg: &LlamaConfig, linears: &LinearFactory) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: LlamaAttention::load(vb.pp("self_attn"), cfg, linears)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: LlamaMlp::load(vb.pp("mlp"), cfg, linears)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        bias: &Tensor,
        rng: Option<&DropoutRng>,
        keep_probs: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let normed = self.input_layernorm.forward(x)?;
        let (attended, probs) = self
            .self_attn
            .forward(&normed, rotary, bias, rng, keep_probs)?;
        let x = (x + attended)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&x)?, rng)?;
        Ok(((x + mlp)?, probs))
    }
}

/// Everything a decoder pass produces.
#[derive(Clone, Debug)]
pub struct CausalLmOutput {
    /// Next-token logits for every position, `(batch, seq, vocab)`.
    pub logits: Tensor,
    /// The embeddings followed by every block's output (`num_hidden_layers + 1` tensors, before the
    /// final norm).
    pub hidden_states: Vec<Tensor>,
    /// Each block's attention probabilities `(batch, heads, seq, seq)` when asked for
    /// ([`Outputs::attentions`]), else empty.
    pub attentions: Vec<Tensor>,
}

/// A Llama-style causal language model.
#[derive(Clone, Debug)]
pub struct LlamaForCausalLm {
    embed_tokens: Embedding,
    blocks: Vec<LlamaBlock>,
    norm: RmsNorm,
    lm_head: Arc<dyn LinearLayer>,
    rotary: Rotary,
    config: LlamaConfig,
}

impl LlamaForCausalLm {
    /// Builds the model from `vb` at the checkpoint root (holding `model.` and `lm_head`). With tied
    /// embeddings the output layer is built on `model.embed_tokens`, so both uses share one
    /// parameter (and its gradient).
    ///
    /// # Errors
    /// Fails when a tensor is missing or has the wrong shape, or the config is inconsistent.
    pub fn load(vb: VarBuilder, cfg: &LlamaConfig, linears: &LinearFactory) -> Result<Self> {
        let model = vb.pp("model");
        let blocks = (0..cfg.num_hidden_layers)
            .map(|i| LlamaBlock::load(model.pp(format!("layers.{i}")), cfg, linears))
            .collect::<Result<Vec<_>>>()?;
        let head_vb = if cfg.tie_word_embeddings {
            model.pp("embed_tokens")
        } else {
            vb.pp("lm_head")
        };
        let head_path = head_vb.prefix();
        let lm_head = linears.build(head_vb, cfg.hidden_size, cfg.vocab_size, false)?;
        expect_in_features(&*lm_head, &head_path, cfg.hidden_size)?;
        expect_out_features(&*lm_head, &head_path, cfg.vocab_size)?;
        Ok(Self {
            embed_tokens: Embedding::load(
                model.pp("embed_tokens"),
                cfg.vocab_size,
                cfg.hidden_size,
            )?,
            blocks,
            norm: RmsNorm::load(model.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            lm_head,
            rotary: Rotary::new(cfg, vb.dtype(), vb.device())?,
            config: cfg.clone(),
        })
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Runs the decoder over `input_ids` `(batch, seq)` with a causal mask, plus a `(batch, seq)`
    /// 0/1 padding mask when given; dropout is active when `rng` is given.
    ///
    /// # Errors
    /// Fails on inconsistent shapes, out-of-range ids or sequences longer than the position table.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        rng: Option<&DropoutRng>,
    ) -> Result<CausalLmOutput> {
        self.forward_with(input_ids, attention_mask, Outputs::default(), rng)
    }

    /// The number of decoder blocks.
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Runs the decoder, also returning the optional outputs `want` asks for.
    ///
    /// # Errors
    /// As [`LlamaForCausalLm::forward`].
    pub fn forward_with(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        want: Outputs,
        rng: Option<&DropoutRng>,
    ) -> Result<CausalLmOutput> {
        let (_, seq) = input_ids.dims2()?;
        let mut x = self.embed_ids(input_ids)?;
        let bias = attention_bias(seq, attention_mask, x.dtype(), x.device())?;
        let mut hidden_states = Vec::with_capacity(self.blocks.len() + 1);
        let mut attentions = Vec::new();
        hidden_states.push(x.clone());
        for block in &self.blocks {
            let (next, probs) = block.forward(&x, &self.rotary, &bias, rng, want.attentions)?;
            x = next;
            hidden_states.push(x.clone());
            attentions.extend(probs);
        }
        let logits = self.lm_head.forward(&self.norm.forward(&x)?)?;
        Ok(CausalLmOutput {
            logits,
            hidden_states,
            attentions,
        })
    }
}

impl LlamaForCausalLm {
    /// The token embeddings of `input_ids` `(batch, seq)`.
    fn embed_ids(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = input_ids.dims2()?;
        if seq > self.config.max_position_embeddings {
            candle_core::bail!(
                "sequence of {seq} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        self.embed_tokens.forward(input_ids)
    }
}

impl LayeredModel for LlamaForCausalLm {
    fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    fn embed(&self, batch: &Batch, _dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.embed_ids(&batch.input_ids)
    }

    fn attention_bias(&self, batch: &Batch, dtype: DType) -> Result<Tensor> {
        let (_, seq) = batch.input_ids.dims2()?;
        attention_bias(
            seq,
            Some(&batch.attention_mask),
            dtype,
            batch.input_ids.device(),
        )
    }

    fn block(
        &self,
        index: usize,
        x: &Tensor,
        bias: &Tensor,
        dropout: Option<&DropoutRng>,
    ) -> Result<Tensor> {
        let Some(block) = self.blocks.get(index) else {
            candle_core::bail!("no block {index} in a {}-block decoder", self.blocks.len());
        };
        Ok(block.forward(x, &self.rotary, bias, dropout, false)?.0)
    }

    fn head(&self, last_hidden: &Tensor, _dropout: Option<&DropoutRng>) -> Result<Tensor> {
        self.lm_head
            .forward(&self.norm.forward(last_hidden)?)?
            .to_dtype(DType::F32)
    }
}

/// The additive attention bias: causal `(1, 1, seq, seq)`, plus padding `(batch, 1, 1, seq)` if given.
fn attention_bias(
    seq: usize,
    padding: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let masked = mask_value(dtype) as f32;
    let causal: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { masked } else { 0.0 }))
        .collect();
    let causal = Tensor::from_vec(causal, (1, 1, seq, seq), device)?.to_dtype(dtype)?;
    match padding {
        Some(mask) => causal.broadcast_add(&padding_bias(mask, dtype)?),
        None => Ok(causal),
    }
}
