//! Exact (erf) GELU with a hand-written backward.
//!
//! candle's own `gelu_erf` is differentiable but its backward takes six tensor passes and a rounded
//! constant; this one computes `Φ(x) + x·φ(x)` in one pass. In f32 both directions run the
//! vectorised kernels of [`super::simd`] (candle's forward calls scalar `erf` per element).

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{dispatch_float, slice, KernelFloat, MIN_ELEMS_PER_TASK};

/// `x ↦ x·Φ(x)`; its backward is [`GeluBackward`].
pub(crate) struct Gelu;

/// `(x, dy) → dx`.
pub(crate) struct GeluBackward;

/// `x·Φ(x)` element-wise, on rayon's threads in blocks.
pub(crate) fn gelu<T: KernelFloat>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(MIN_ELEMS_PER_TASK)
        .zip(x.par_chunks(MIN_ELEMS_PER_TASK))
        .for_each(|(o, x)| T::gelu_block(x, o));
    out
}

fn gelu_backward<T: KernelFloat>(x: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    let chunk = MIN_ELEMS_PER_TASK;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .for_each(|(o, (x, dy))| T::gelu_backward_block(x, dy, o));
    out
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "compressd-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(storage, self.name(), |T| {
            let out = gelu::<T>(slice(storage, layout)?);
            Ok((T::to_cpu_storage_owned(out), layout.shape().clone()))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GeluBackward,
        )?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "compressd-gelu-erf-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch_float!(x, self.name(), |T| {
            let out = gelu_backward::<T>(slice(x, lx)?, slice(dy, ldy)?);
            Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
        })
    }
}
