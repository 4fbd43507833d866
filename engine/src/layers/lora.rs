//! The low-rank adapter kind (LoRA, Hu et al. 2021): a base linear layer plus a trainable update
//! `(alpha / rank) · B·A`, with `A` `(rank, in)` and `B` `(out, rank)` read under the module as
//! `lora_A.weight` and `lora_B.weight` (PEFT's names). `B` starts at zero, so a fresh adapter
//! leaves the base's outputs unchanged; freezing the base is the training stage's choice. In
//! training ([`LinearLayer::forward_t`] with a dropout source) the adapter's input is dropped with
//! the layer's `dropout` probability, as PEFT's `lora_dropout` does; the base sees the whole input.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::{DenseLinear, LinearKind, LinearLayer, QuantizedLinear};
use crate::models::common::{dropout, DropoutRng};
use crate::quant::{QuantScheme, QuantizedWeight};

/// `y = base(x) + (alpha / rank) · x Aᵀ Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    base: Arc<dyn LinearLayer>,
    a: Tensor,
    b: Tensor,
    rank: u32,
    alpha: u32,
    /// The scheme of a quantized base (QLoRA), `None` for a dense one.
    base_scheme: Option<QuantScheme>,
    /// The probability of dropping an element of the adapter's input in training.
    dropout: f64,
}

impl LoraLinear {
    /// Reads the dense base (`weight`, `bias`) and the adapter (`lora_A.weight`, `lora_B.weight`)
    /// under `vb`. A store that creates missing parameters draws `A` from N(0, 1/in) and sets `B`
    /// to zero.
    ///
    /// # Errors
    /// A missing tensor, a rank of zero, or shapes that do not fit the base.
    pub fn load(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        rank: u32,
        alpha: u32,
    ) -> Result<Self> {
        let base = DenseLinear::load(vb.clone(), in_features, out_features, bias)?;
        Self::on_base(vb, Arc::new(base), rank, alpha, None)
    }

    /// As [`LoraLinear::load`], with the base weight quantized with `scheme` and run on the
    /// quantized kernels (QLoRA): the input gradient passes through the quantized layer, the base
    /// gets none.
    ///
    /// # Errors
    /// As [`LoraLinear::load`], or a weight the scheme cannot take.
    pub fn load_quantized(
        vb: VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        rank: u32,
        alpha: u32,
        scheme: QuantScheme,
    ) -> Result<Self> {
        let base = QuantizedLinear::load(vb.clone(), in_features, out_features, bias, scheme)?;
        Self::on_base(vb, Arc::new(base), rank, alpha, Some(scheme))
    }

    /// As [`LoraLinear::load_quantized`] on a base already quantized (`weight`, as QLoRA packs it
    /// once for the whole stage): no dense weight is read.
    ///
    /// # Errors
    /// As [`LoraLinear::load`], or a bias that does not fit the weight.
    pub fn on_packed(
        vb: VarBuilder,
        weight: QuantizedWeight,
        bias: bool,
        rank: u32,
        alpha: u32,
        scheme: QuantScheme,
    ) -> Result<Self> {
        let out_features = weight.dims().first().copied().unwrap_or(0);
        let bias = if bias {
            Some(vb.get(out_features, "bias")?.detach())
        } else {
            None
        };
        let base = QuantizedLinear::new(weight, bias, vb.device())?;
        Self::on_base(vb, Arc::new(base), rank, alpha, Some(scheme))
    }

    /// The adapter read (or created) under `vb` around `base`.
    fn on_base(
        vb: VarBuilder,
        base: Arc<dyn LinearLayer>,
        rank: u32,
        alpha: u32,
        base_scheme: Option<QuantScheme>,
    ) -> Result<Self> {
        if rank == 0 {
            candle_core::bail!("{}: a LoRA rank must be at least 1", vb.prefix());
        }
        let (out_features, in_features) = (base.out_features(), base.in_features());
        let r = rank as usize;
        let a_init = Init::Randn {
            mean: 0.0,
            stdev: (in_features as f64).sqrt().recip(),
        };
        let a = vb.get_with_hints((r, in_features), "lora_A.weight", a_init)?;
        let b = vb.get_with_hints((out_features, r), "lora_B.weight", Init::Const(0.0))?;
        Ok(Self {
            base,
            a,
            b,
            rank,
            alpha,
            base_scheme,
            dropout: 0.0,
        })
    }

    /// The same layer, dropping each element of the adapter's input with probability `p` in
    /// training (PEFT's `lora_dropout`); evaluation and the base are unaffected.
    ///
    /// # Errors
    /// `p` outside `[0, 1)`.
    pub fn with_dropout(mut self, p: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("a LoRA dropout of {p} is not in [0, 1)");
        }
        self.dropout = p;
        Ok(self)
    }

    /// The same layer with a dense base computing its product in `dtype` (mixed precision: the
    /// frozen base is the layer's large GEMM; the rank-`r` adapter stays f32). A quantized base
    /// (QLoRA) runs on its kernels as before.
    ///
    /// # Errors
    /// A dense base without a weight (never made by this module).
    pub fn with_base_compute_dtype(mut self, dtype: candle_core::DType) -> Result<Self> {
        if self.base_scheme.is_some() {
            return Ok(self);
        }
        let Some(weight) = self.base.weight() else {
            candle_core::bail!("a dense LoRA base without a weight");
        };
        let base = DenseLinear::new(weight.clone(), self.base.bias().cloned())?;
        self.base = Arc::new(base.with_compute_dtype(dtype));
        Ok(self)
    }

    /// The adapter input's dropout probability in training.
    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// `alpha / rank`, the update's scale.
    pub fn scale(&self) -> f64 {
        f64::from(self.alpha) / f64::from(self.rank)
    }
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    fn forward_t(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        let base = self.base.forward(x)?;
        let dims = x.dims();
        let Some((&in_features, leading)) = dims.split_last() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let rows: usize = leading.iter().product();
        let low = dropout(x, self.dropout, rng)?
            .reshape((rows, in_features))?
            .matmul(&self.a.t()?)?
            .matmul(&self.b.t()?)?;
        let mut out_dims = leading.to_vec();
        out_dims.push(self.out_features());
        base + (low * self.scale())?.reshape(out_dims)?
    }

    fn weight(&self) -> Option<&Tensor> {
        self.base.weight()
    }

    fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }

    fn in_features(&self) -> usize {
        self.base.in_features()
    }

    fn out_features(&self) -> usize {
        self.base.out_features()
    }

    fn kind(&self) -> LinearKind {
        match self.base_scheme {
            None => LinearKind::Lora {
                rank: self.rank,
                alpha: self.alpha,
            },
            Some(base) => LinearKind::QLora {
                rank: self.rank,
                alpha: self.alpha,
                base,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::params::ParamStore;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn mixed_precision_runs_the_dense_base_in_bf16_and_the_adapter_in_f32() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (6, 16), &dev).unwrap();
        let store = ParamStore::from_tensors([("l.weight".to_string(), weight.clone())], |_| false)
            .unwrap();
        store.set_init_missing(Some(1));
        let vb = store.var_builder(DType::F32, &dev);
        let full = LoraLinear::load(vb.pp("l"), 16, 6, false, 2, 8).unwrap();
        let mixed = LoraLinear::load(vb.pp("l"), 16, 6, false, 2, 8)
            .unwrap()
            .with_base_compute_dtype(DType::BF16)
            .unwrap();
        let vars = store.trainable_vars();
        vars[1]
            .1
            .set(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap())
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 16), &dev).unwrap();
        let (y_full, y_mixed) = (full.forward(&x).unwrap(), mixed.forward(&x).unwrap());
        assert_eq!(y_mixed.dtype(), DType::F32);
        let scale = y_full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let err = max_diff(&y_full, &y_mixed) / scale;
        // The base's bf16 rounding shows; nothing else differs.
        assert!(err > 0.0 && err < 2e-2, "{err}");
        // The adapter alone (base output subtracted) is the f32 one exactly.
        let base_mixed = DenseLinear::new(weight.clone(), None)
            .unwrap()
            .with_compute_dtype(DType::BF16)
            .forward(&x)
            .unwrap();
        let base_full = DenseLinear::new(weight, None).unwrap().forward(&x).unwrap();
        let adapter_full = (&y_full - &base_full).unwrap();
        let adapter_mixed = (&y_mixed - &base_mixed).unwrap();
        assert!(max_diff(&adapter_full, &adapter_mixed) < 1e-5);
        let grads = y_mixed.sum_all().unwrap().backward().unwrap();
        for (name, var) in &vars {
            let g = grads.get(var.as_tensor()).unwrap();
            assert_eq!(g.dtype(), DType::F32, "{name}");
        }
    }

    #[test]
    fn a_fresh_adapter_keeps_the_base_and_trains_only_a_and_b() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let store = ParamStore::from_tensors([("l.weight".to_string(), weight.clone())], |_| false)
            .unwrap();
        store.set_init_missing(Some(1));
        let vb = store.var_builder(DType::F32, &dev);
        let layer = LoraLinear::load(vb.pp("l"), 4, 6, false, 2, 8).unwrap();
        assert_eq!(layer.kind(), LinearKind::Lora { rank: 2, alpha: 8 });
        assert_eq!(layer.scale(), 4.0);
        let x = Tensor::randn(0f32, 1.0, (3, 5, 4), &dev).unwrap();
        let base = DenseLinear::new(weight, None).unwrap().forward(&x).unwrap();
        assert_eq!(
            max_diff(&layer.forward(&x).unwrap(), &base),
            0.0,
            "B starts at zero"
        );

        // With B set, the update is scale · x Aᵀ Bᵀ; gradients reach A and B only.
        let vars = store.trainable_vars();
        let names: Vec<&str> = vars.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["l.lora_A.weight", "l.lora_B.weight"]);
        let b = &vars[1].1;
        b.set(&Tensor::ones((6, 2), DType::F32, &dev).unwrap())
            .unwrap();
        let layer = LoraLinear::load(vb.pp("l"), 4, 6, false, 2, 8).unwrap();
        let a = vars[0].1.as_tensor();
        let update = (x.reshape((15, 4)).unwrap().matmul(&a.t().unwrap()).unwrap())
            .sum_keepdim(1)
            .unwrap()
            .broadcast_as((15, 6))
            .unwrap()
            .reshape((3, 5, 6))
            .unwrap();
        let expected = (base + (update * 4.0).unwrap()).unwrap();
        let y = layer.forward(&x).unwrap();
        assert!(max_diff(&y, &expected) < 1e-4);
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(vars.iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
        let vb = store.var_builder(DType::F32, &dev);
        assert!(LoraLinear::load(vb.pp("l"), 4, 6, false, 0, 8).is_err());
    }

    /// Dropout drops parts of the adapter's input in training only: evaluation and the base see
    /// the whole input, and training with a dropout source changes only the update.
    #[test]
    fn dropout_applies_to_the_adapter_input_in_training_only() {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap();
        let store = ParamStore::from_tensors([("l.weight".to_string(), weight.clone())], |_| false)
            .unwrap();
        store.set_init_missing(Some(3));
        let vb = store.var_builder(DType::F32, &dev);
        LoraLinear::load(vb.pp("l"), 8, 6, false, 2, 4).unwrap();
        let vars = store.trainable_vars();
        vars[1]
            .1
            .set(&Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap())
            .unwrap();
        let layer = LoraLinear::load(vb.pp("l"), 8, 6, false, 2, 4)
            .unwrap()
            .with_dropout(0.5)
            .unwrap();
        assert_eq!(layer.dropout(), 0.5);
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let eval = layer.forward(&x).unwrap();
        assert_eq!(max_diff(&layer.forward_t(&x, None).unwrap(), &eval), 0.0);
        let rng = DropoutRng::new(11);
        let trained = layer.forward_t(&x, Some(&rng)).unwrap();
        assert!(max_diff(&trained, &eval) > 1e-3, "dropout changed nothing");
        // The base term is untouched: with a zero update, training and evaluation agree.
        let dense = DenseLinear::new(weight, None).unwrap();
        let base = dense.forward(&x).unwrap();
        let fresh = LoraLinear::on_base(vb.pp("fresh"), Arc::new(dense), 2, 4, None)
            .unwrap()
            .with_dropout(0.5)
            .unwrap();
        let fresh_trained = fresh.forward_t(&x, Some(&rng)).unwrap();
        assert_eq!(
            max_diff(&fresh_trained, &base),
            0.0,
            "dropout reached the base"
        );
        let grads = trained.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(vars[0].1.as_tensor()).is_some());
        assert!(LoraLinear::load(vb.pp("l"), 8, 6, false, 2, 4)
            .unwrap()
            .with_dropout(1.0)
            .is_err());
    }

    /// QLoRA on a tiny Llama: every projection an adapter over an int4 base (our Q4_1 kernel) and
    /// over an nf4 base (tiles of dequantized rows); every adapter weight gets a non-zero gradient
    /// through the quantized kernels, and the base none.
    #[test]
    fn qlora_on_an_int4_llama_gives_every_adapter_weight_a_gradient() {
        qlora_gives_every_adapter_weight_a_gradient(QuantScheme::Int4 { group_size: 32 });
    }

    #[test]
    fn qlora_on_an_nf4_llama_gives_every_adapter_weight_a_gradient() {
        qlora_gives_every_adapter_weight_a_gradient(QuantScheme::Nf4);
    }

    fn qlora_gives_every_adapter_weight_a_gradient(scheme: QuantScheme) {
        use crate::layers::{LinearFactory, LinearPlan};
        use crate::models::llama::{LlamaConfig, LlamaForCausalLm};

        let dev = Device::Cpu;
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 16, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": true
        }))
        .unwrap();
        let dense = ParamStore::new();
        dense.set_init_missing(Some(4));
        let vb = dense.var_builder(DType::F32, &dev);
        LlamaForCausalLm::load(vb, &cfg, &LinearFactory::default()).unwrap();
        // Missing linear weights are created as zeros; a base of zeros would pass no gradient.
        let base: Vec<(String, Tensor)> = dense
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                let t = if t.rank() == 2 {
                    Tensor::randn(0f32, 0.2, t.dims(), &dev).unwrap()
                } else {
                    t
                };
                (n, t)
            })
            .collect();
        let store = ParamStore::from_tensors(base, |_| false).unwrap();
        store.set_init_missing(Some(5));
        let kind = LinearKind::QLora {
            rank: 2,
            alpha: 4,
            base: scheme,
        };
        let plan = LinearPlan::uniform(LinearKind::Dense)
            .with_rule("model.layers.*", kind)
            .unwrap();
        let vb = store.var_builder(DType::F32, &dev);
        LlamaForCausalLm::load(vb.clone(), &cfg, &LinearFactory::new(plan.clone())).unwrap();
        // One optimizer step's worth of B: with B at zero, A's gradient would be zero too.
        for (name, var) in store.trainable_vars() {
            if name.ends_with("lora_B.weight") {
                var.set(&Tensor::randn(0f32, 0.1, var.dims(), &dev).unwrap())
                    .unwrap();
            }
        }
        store.set_init_missing(None);
        let lm = LlamaForCausalLm::load(vb, &cfg, &LinearFactory::new(plan)).unwrap();
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 9, 3]], &dev).unwrap();
        let logits = lm.forward(&ids, None, None).unwrap().logits;
        let grads = logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        let vars = store.trainable_vars();
        // 2 layers × (q, k, v, o, gate, up, down) × (A, B).
        assert_eq!(vars.len(), 28);
        for (name, var) in &vars {
            assert!(name.contains(".lora_"), "{name} is trainable");
            let grad = grads.get(var.as_tensor()).expect(name);
            let norm = grad
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }
}
