//! Softmax over the last dimension with a hand-written backward.
//!
//! candle's fused `softmax_last_dim` has no backward; this op keeps its speed on the CPU and gives the
//! exact gradient `dx = y ⊙ (dy − Σ dy ⊙ y)` in one pass per row.

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{dispatch_float, last_dim, rows_per_task, slice, KernelFloat};

/// Forward softmax; its backward is [`SoftmaxBackward`].
pub(crate) struct Softmax;

/// `(y, dy) → dx`, the gradient of softmax given its output.
struct SoftmaxBackward;

fn softmax_rows<T: KernelFloat>(x: &[T], d: usize) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let max = x
                    .iter()
                    .copied()
                    .fold(T::neg_infinity(), num_traits::Float::max);
                o.copy_from_slice(x);
                let sum = T::exp_shifted_sum(o, max);
                let inv = sum.recip();
                o.iter_mut().for_each(|o| *o *= inv);
            }
        });
    out
}

fn softmax_backward_rows<T: KernelFloat>(y: &[T], dy: &[T], d: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); y.len()];
    let chunk = rows_per_task(d) * d;
    dx.par_chunks_mut(chunk)
        .zip(y.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(dx, (y, dy))| {
            for (dx, (y, dy)) in dx
                .chunks_exact_mut(d)
                .zip(y.chunks_exact(d).zip(dy.chunks_exact(d)))
            {
                let dot: T = y.iter().zip(dy).map(|(&y, &g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = y * (g - dot);
                }
            }
        });
    dx
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "compressd-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(layout)?;
        dispatch_float!(storage, self.name(), |T| {
            let out = softmax_rows::<T>(slice::<T>(storage, layout)?, d);
            Ok((T::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = res.apply_op2_no_bwd(&grad_res.contiguous()?, &SoftmaxBackward)?;
        Ok(Some(grad))
    }
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "compressd-softmax-last-dim-backward"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = last_dim(ly)?;
        dispatch_float!(y, self.name(), |T| {
            let dx = softmax_backward_rows::<T>(slice::<T>(y, ly)?, slice::<T>(dy, ldy)?, d);
            Ok((T::to_cpu_storage_owned(dx), ly.shape().clone()))
        })
    }
}
