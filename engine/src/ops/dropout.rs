//! Inverted dropout on the CPU as one autograd node whose mask is never stored.
//!
//! Multiplying by a mask tensor costs the mask's memory, and candle's backward of that product
//! also computes the mask's gradient (a full-size product, a zero-filled buffer and an add) though
//! nothing needs it. Here the forward and the backward both regenerate each element's factor from
//! the seed ([`super::dropout_factor`]), in parallel, and the backward gives `x` alone a gradient.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{slice, MIN_ELEMS_PER_TASK};

/// `x ⊙ mask(seed)`, the mask drawn as [`super::dropout_factors`] draws it.
#[derive(Clone, Copy)]
pub(crate) struct Dropout {
    pub seed: u64,
    pub p: f32,
}

impl Dropout {
    /// `values ⊙ mask`, element `i` of `values` being element `i` of the mask.
    fn apply(self, values: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; values.len()];
        out.par_chunks_mut(MIN_ELEMS_PER_TASK)
            .zip(values.par_chunks(MIN_ELEMS_PER_TASK))
            .enumerate()
            .for_each(|(chunk, (out, values))| {
                let first = (chunk * MIN_ELEMS_PER_TASK) as u64;
                for (i, (o, &v)) in out.iter_mut().zip(values).enumerate() {
                    *o = v * super::dropout_factor(self.seed, self.p, first + i as u64);
                }
            });
        out
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "compressd-dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.apply(slice::<f32>(x, l)?);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        // The same factors multiply the gradient: d(x ⊙ m)/dx = m.
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}
