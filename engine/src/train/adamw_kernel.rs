//! The fused, in-place AdamW update on CPU storage.
//!
//! One pass per parameter reads the gradient, updates the first and second moments and writes the
//! weight, with no temporary tensors: candle's own AdamW builds ~10 intermediate tensors per
//! parameter and step (319 ms vs 11 ms per step on an 11M-parameter BERT). The weight is mutated
//! through candle's [`InplaceOp1`]/[`InplaceOp2`] hooks, which hand us the storage under its write
//! lock; the moments live in plain `Vec<f32>`s owned by the optimizer.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, InplaceOp1, InplaceOp2, Layout};
use rayon::prelude::*;

use crate::ops::simd::Isa;
use crate::train::clip::GradTransform;
use crate::train::grads::{copy_row_major, dense_order, Elem, Order};

/// Elements per parallel work item: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 14;

/// Optimizer state of one parameter held in host memory.
#[derive(Debug, Clone, Default)]
pub(crate) struct HostMoments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// f32 master weights, kept only when the parameter itself is f16/bf16.
    pub master: Option<Vec<f32>>,
    /// Reused buffer for gradients that arrive transposed (not checkpointed).
    pub scratch: Vec<f32>,
}

/// Hyper-parameters of one update, with the bias corrections already computed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepScalars {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay` (decoupled decay, as in PyTorch's AdamW).
    pub decay: f32,
    pub inv_bias_correction1: f32,
    pub inv_bias_correction2: f32,
    pub grad: GradTransform,
}

impl StepScalars {
    /// The new weight for one element; updates `m` and `v` in place.
    #[inline(always)]
    fn update(&self, w: f32, g: f32, m: &mut f32, v: &mut f32) -> f32 {
        let g = self.grad.apply(g);
        *m = self.beta1 * *m + (1.0 - self.beta1) * g;
        *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
        let denom = (*v * self.inv_bias_correction2).sqrt() + self.eps;
        w * self.decay - self.lr * (*m * self.inv_bias_correction1) / denom
    }
}

/// The in-place op: the weight tensor is the destination; the gradient is either the second tensor
/// (`inplace_op2`) or an accumulated host buffer (`inplace_op1`).
pub(crate) struct FusedAdamW<'a> {
    pub scalars: StepScalars,
    pub moments: RefCell<&'a mut HostMoments>,
    pub host_grad: Option<&'a [f32]>,
}

impl FusedAdamW<'_> {
    fn run<G: Elem>(
        &self,
        weight: &mut CpuStorage,
        wl: &Layout,
        grad: &[G],
    ) -> candle_core::Result<()> {
        let (start, end) = wl.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("fused AdamW needs a contiguous weight".into())
        })?;
        let mut moments = self.moments.borrow_mut();
        if grad.len() != end - start || moments.m.len() != grad.len() {
            candle_core::bail!(
                "fused AdamW: gradient has {} elements, weight {}",
                grad.len(),
                end - start
            );
        }
        let s = self.scalars;
        let HostMoments { m, v, master, .. } = &mut **moments;
        match (weight, master) {
            (CpuStorage::F32(w), None) => update_plain(&mut w[start..end], grad, m, v, &s),
            (CpuStorage::F32(w), Some(master)) => {
                update_master(&mut w[start..end], grad, m, v, master, &s)
            }
            (CpuStorage::F16(w), Some(master)) => {
                update_master(&mut w[start..end], grad, m, v, master, &s)
            }
            (CpuStorage::BF16(w), Some(master)) => {
                update_master(&mut w[start..end], grad, m, v, master, &s)
            }
            (other, _) => {
                candle_core::bail!("fused AdamW: unsupported weight dtype {:?}", other.dtype())
            }
        }
        Ok(())
    }
}

fn update_plain<G: Elem>(w: &mut [f32], g: &[G], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    let isa = Isa::detected();
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((w, g), m), v)| match isa {
            // SAFETY: `Isa::detected` only returns a path this CPU supports.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { update_chunk_avx512(w, g, m, v, s) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { update_chunk_avx2(w, g, m, v, s) },
            _ => update_chunk(w, g, m, v, s),
        });
}

/// One chunk of the update. Written over zipped slices (no bounds checks) and inlined into the
/// wrappers below, which compile it for wider vectors: the default x86-64 target has only SSE2,
/// where this loop ran 4 lanes at a time with scalar square roots and divisions.
#[inline(always)]
fn update_chunk<G: Elem>(w: &mut [f32], g: &[G], m: &mut [f32], v: &mut [f32], s: &StepScalars) {
    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *w = s.update(*w, g.to_f32(), m, v);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn update_chunk_avx512<G: Elem>(
    w: &mut [f32],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    update_chunk(w, g, m, v, s);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn update_chunk_avx2<G: Elem>(
    w: &mut [f32],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    s: &StepScalars,
) {
    update_chunk(w, g, m, v, s);
}

fn update_master<W: Elem, G: Elem>(
    w: &mut [W],
    g: &[G],
    m: &mut [f32],
    v: &mut [f32],
    master: &mut [f32],
    s: &StepScalars,
) {
    w.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(master.par_chunks_mut(CHUNK))
        .for_each(|((((w, g), m), v), master)| {
            for i in 0..w.len() {
                master[i] = s.update(master[i], g[i].to_f32(), &mut m[i], &mut v[i]);
                w[i] = W::from_f32(master[i]);
            }
        });
}

impl InplaceOp1 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(&self, weight: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let grad = self
            .host_grad
            .ok_or_else(|| candle_core::Error::Msg("fused AdamW: no host gradient given".into()))?;
        self.run(weight, layout, grad)
    }
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }

    fn cpu_fwd(
        &self,
        weight: &mut CpuStorage,
        wl: &Layout,
        grad: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (start, end, order) = dense_order(gl)
            .ok_or_else(|| candle_core::Error::Msg("fused AdamW needs a dense gradient".into()))?;
        if let Order::Transposed { .. } = order {
            // Put the gradient in the weight's order once, into a buffer reused every step.
            let mut scratch = std::mem::take(&mut self.moments.borrow_mut().scratch);
            scratch.resize(end - start, 0.0);
            match grad {
                CpuStorage::F32(g) => copy_row_major(&mut scratch, &g[start..end], order, false),
                CpuStorage::F16(g) => copy_row_major(&mut scratch, &g[start..end], order, false),
                CpuStorage::BF16(g) => copy_row_major(&mut scratch, &g[start..end], order, false),
                other => candle_core::bail!(
                    "fused AdamW: unsupported gradient dtype {:?}",
                    other.dtype()
                ),
            }
            let result = self.run(weight, wl, &scratch);
            self.moments.borrow_mut().scratch = scratch;
            return result;
        }
        match grad {
            CpuStorage::F32(g) => self.run(weight, wl, &g[start..end]),
            CpuStorage::F16(g) => self.run(weight, wl, &g[start..end]),
            CpuStorage::BF16(g) => self.run(weight, wl, &g[start..end]),
            other => candle_core::bail!(
                "fused AdamW: unsupported gradient dtype {:?}",
                other.dtype()
            ),
        }
    }
}
