//! Fused multi-head attention on the CPU: scores, padding mask, softmax and the weighted sum of the
//! values in one pass per (sequence, head), reading the projections where they lie.
//!
//! The composed path (`split_heads` copies, a batched `matmul` whose every small product starts
//! its own parallel region, a `(batch, heads, seq, seq)` score tensor written and read three
//! times, and a copy back to `(batch, seq, width)`) spends most of its time outside arithmetic.
//! Here each rayon task takes one (sequence, head) pair: two single-threaded GEMMs on strided
//! views of `q`, `k`, `v` (gemm reads any strides), the softmax on a score buffer the task reuses,
//! and the result written straight into its head's columns of the output.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use gemm::Parallelism;
use rayon::prelude::*;

use super::kernel::slice;
use super::simd::{softmax_in_place, Isa};

/// `softmax(scale · q kᵀ + bias) v` per head, for `q` `(batch, seq_q, heads · head_dim)` and `k`,
/// `v` `(batch, seq_k, heads · head_dim)`, all contiguous f32; the output has `q`'s shape.
pub(crate) struct FusedAttention {
    pub num_heads: usize,
    pub scale: f32,
    /// The additive padding bias, `batch × seq_k` values (0 for a real key, a large negative
    /// number for padding), or none.
    pub bias: Option<Vec<f32>>,
}

/// A raw output pointer shared by the tasks; each task writes only its own head's columns of its
/// own sequence, so no two tasks touch the same element.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: see the type's comment: the writes through it are disjoint.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl FusedAttention {
    fn shapes(
        &self,
        lq: &Layout,
        lk: &Layout,
        lv: &Layout,
    ) -> Result<(usize, usize, usize, usize)> {
        let (b, s_q, width) = lq.shape().dims3()?;
        let (bk, s_k, wk) = lk.shape().dims3()?;
        if lk.shape() != lv.shape() || bk != b || wk != width {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit together",
                lq.shape(),
                lk.shape(),
                lv.shape()
            );
        }
        if self.num_heads == 0 || width % self.num_heads != 0 {
            candle_core::bail!(
                "attention: width {width} is not {} whole heads",
                self.num_heads
            );
        }
        if let Some(bias) = &self.bias {
            if bias.len() != b * s_k {
                candle_core::bail!("attention: bias has {} values, not {b} × {s_k}", bias.len());
            }
        }
        Ok((b, s_q, s_k, width))
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "compressd-fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s_q, s_k, width) = self.shapes(lq, lk, lv)?;
        let (q, k, v) = (
            slice::<f32>(q, lq)?,
            slice::<f32>(k, lk)?,
            slice::<f32>(v, lv)?,
        );
        let heads = self.num_heads;
        let head_dim = width / heads;
        let isa = Isa::detected();
        let mut out = vec![0f32; b * s_q * width];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let w = width as isize;
        (0..b * heads)
            .into_par_iter()
            .for_each_init(Vec::new, |scores, task| {
                let (seq, head) = (task / heads, task % heads);
                scores.resize(s_q * s_k, 0f32);
                let q_at = seq * s_q * width + head * head_dim;
                let kv_at = seq * s_k * width + head * head_dim;
                // SAFETY: every view stays inside its buffer (offsets and strides from the checked
                // shapes); the output view is this task's own (sequence, head) block.
                unsafe {
                    // scores = scale · q_h k_hᵀ   (s_q × head_dim times head_dim × s_k)
                    gemm::gemm(
                        s_q,
                        s_k,
                        head_dim,
                        scores.as_mut_ptr(),
                        1,
                        s_k as isize,
                        false,
                        q.as_ptr().add(q_at),
                        1,
                        w,
                        k.as_ptr().add(kv_at),
                        w,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                let bias = self.bias.as_ref().map(|b| &b[seq * s_k..(seq + 1) * s_k]);
                for row in scores.chunks_exact_mut(s_k) {
                    softmax_in_place(isa, row, bias);
                }
                let out_ptr = out_ptr;
                // SAFETY: as above.
                unsafe {
                    // out_h = probs v_h   (s_q × s_k times s_k × head_dim)
                    gemm::gemm(
                        s_q,
                        head_dim,
                        s_k,
                        out_ptr.0.add(q_at),
                        1,
                        w,
                        false,
                        scores.as_ptr(),
                        1,
                        s_k as isize,
                        v.as_ptr().add(kv_at),
                        1,
                        w,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }
}
