//! The low-rank adapter kind (LoRA, Hu et al. 2021): a base linear layer plus a trainable update
//! `(alpha / rank) · B·A`, with `A` `(rank, in)` and `B` `(out, rank)` read under the module as
//! `lora_A.weight` and `lora_B.weight` (PEFT's names). `B` starts at zero, so a fresh adapter
//! leaves the base's outputs unchanged; freezing the base is the training stage's choice.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::{DenseLinear, LinearKind, LinearLayer};

/// `y = base(x) + (alpha / rank) · x Aᵀ Bᵀ`.
#[derive(Clone, Debug)]
pub struct LoraLinear {
    base: Arc<dyn LinearLayer>,
    a: Tensor,
    b: Tensor,
    rank: u32,
    alpha: u32,
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
        if rank == 0 {
            candle_core::bail!("{}: a LoRA rank must be at least 1", vb.prefix());
        }
        let base = DenseLinear::load(vb.clone(), in_features, out_features, bias)?;
        let (out_features, in_features) = (base.out_features(), base.in_features());
        let r = rank as usize;
        let a_init = Init::Randn {
            mean: 0.0,
            stdev: (in_features as f64).sqrt().recip(),
        };
        let a = vb.get_with_hints((r, in_features), "lora_A.weight", a_init)?;
        let b = vb.get_with_hints((out_features, r), "lora_B.weight", Init::Const(0.0))?;
        Ok(Self {
            base: Arc::new(base),
            a,
            b,
            rank,
            alpha,
        })
    }

    /// `alpha / rank`, the update's scale.
    pub fn scale(&self) -> f64 {
        f64::from(self.alpha) / f64::from(self.rank)
    }
}

impl LinearLayer for LoraLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = self.base.forward(x)?;
        let dims = x.dims();
        let Some((&in_features, leading)) = dims.split_last() else {
            candle_core::bail!("linear layer applied to a scalar");
        };
        let rows: usize = leading.iter().product();
        let low = x
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
        LinearKind::Lora {
            rank: self.rank,
            alpha: self.alpha,
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
}
