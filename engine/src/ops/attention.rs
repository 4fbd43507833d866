//! Fused multi-head attention on the CPU, forward and backward: scores, padding mask, softmax,
//! dropout and the weighted sum of the values in one pass per (sequence, head), reading the
//! projections where they lie.
//!
//! The composed path (`split_heads` copies, a batched `matmul` whose every small product starts
//! its own parallel region, a `(batch, heads, seq, seq)` score tensor written and read several
//! times, and a copy back to `(batch, seq, width)`) spends most of its time outside arithmetic, and
//! its backward keeps every intermediate alive. Here each rayon task takes one (sequence, head)
//! pair: single-threaded GEMMs on strided views of `q`, `k`, `v` (gemm reads any strides), the
//! softmax on score buffers the task reuses, results written straight into the head's columns.
//!
//! Nothing of size `seq²` outlives a call: the backward recomputes the probabilities from `q` and
//! `k` (one small GEMM per head, cheaper than keeping them), and dropout draws its keep mask from a
//! hash of (seed, position) so the backward regenerates exactly the mask the forward used.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::kernel::slice;
use super::simd::{softmax_in_place, Isa};

/// Dropout on the attention probabilities.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionDropout {
    /// Probability of dropping a weight, in `(0, 1)`.
    pub p: f32,
    /// Drawn from the model's dropout generator once per call.
    pub seed: u64,
}

impl AttentionDropout {
    /// The multiplier of the probability at `index`: 0 (dropped) or `1 / (1 − p)`.
    pub(crate) fn factor(self, index: u64) -> f32 {
        // splitmix64's finaliser: a counter-based generator, so any position is drawn on its own.
        let mut z = self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let uniform = (z >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
        if uniform < self.p {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// `softmax(scale · q kᵀ + bias) v` per head, for `q` `(batch, seq_q, heads · head_dim)` and `k`,
/// `v` `(batch, seq_k, heads · head_dim)`, all contiguous f32; the output has `q`'s shape.
#[derive(Clone)]
pub(crate) struct FusedAttention {
    pub num_heads: usize,
    pub scale: f32,
    /// The additive padding bias, `batch × seq_k` values (0 for a real key, a large negative
    /// number for padding), or none.
    pub bias: Option<Arc<Vec<f32>>>,
    pub dropout: Option<AttentionDropout>,
}

/// `(q, k, v, d_out) → [dq | dk | dv]` flattened, the gradients of [`FusedAttention`].
struct FusedAttentionBackward(FusedAttention);

/// A raw pointer shared by the tasks; each task writes only its own head's columns of its own
/// sequence, so no two tasks touch the same element.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: see the type's comment: the writes through it are disjoint.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The output block starting `offset` elements in, with row stride `rs`. (A method, so closures
    /// capture the whole `Sync` wrapper rather than its raw-pointer field.)
    fn block(self, offset: usize, rs: usize) -> Out {
        Out {
            ptr: self.0.wrapping_add(offset),
            rs,
        }
    }
}

/// A row-major output block: element `(r, c)` at `ptr[r · rs + c]`.
#[derive(Clone, Copy)]
struct Out {
    ptr: *mut f32,
    rs: usize,
}

/// A strided matrix view: element `(r, c)` at `ptr[r · rs + c · cs]`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
}

impl View {
    /// The row-major matrix starting `offset` values into `buf`, rows `rs` apart (the slicing
    /// checks the offset; gemm reads the rest within the sizes the caller checked).
    fn rows(buf: &[f32], offset: usize, rs: usize) -> Self {
        Self {
            ptr: buf[offset..].as_ptr(),
            rs: rs as isize,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst = beta · lhs rhs` for an `m × k` `lhs` and a `k × n` `rhs`, on the calling thread.
///
/// # Safety
/// Every view must lie inside its buffer for the given sizes, and `dst` must not alias them.
unsafe fn matmul(m: usize, n: usize, k: usize, dst: Out, lhs: View, rhs: View, beta: f32) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr,
        1,
        dst.rs as isize,
        false,
        lhs.ptr,
        lhs.cs,
        lhs.rs,
        rhs.ptr,
        rhs.cs,
        rhs.rs,
        0.0,
        beta,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// The sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    s_q: usize,
    s_k: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
}

impl Dims {
    /// Offsets of (sequence, head)'s first element in `q`-shaped and `k`-shaped buffers.
    fn offsets(&self, task: usize) -> (usize, usize) {
        let (seq, head) = (task / self.heads, task % self.heads);
        (
            seq * self.s_q * self.width + head * self.head_dim,
            seq * self.s_k * self.width + head * self.head_dim,
        )
    }
}

impl FusedAttention {
    fn dims(&self, lq: &Layout, lk: &Layout, lv: &Layout) -> Result<Dims> {
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
        Ok(Dims {
            batch: b,
            s_q,
            s_k,
            width,
            heads: self.num_heads,
            head_dim: width / self.num_heads,
        })
    }

    /// The softmax probabilities of one (sequence, head) into `probs` (`s_q × s_k`).
    fn probabilities(&self, d: &Dims, task: usize, q: &[f32], k: &[f32], probs: &mut Vec<f32>) {
        let (q_at, k_at) = d.offsets(task);
        probs.resize(d.s_q * d.s_k, 0.0);
        // SAFETY: the views stay inside `q` and `k` (offsets and strides from the checked shapes).
        unsafe {
            matmul(
                d.s_q,
                d.s_k,
                d.head_dim,
                Out {
                    ptr: probs.as_mut_ptr(),
                    rs: d.s_k,
                },
                View::rows(q, q_at, d.width),
                View::rows(k, k_at, d.width).t(),
                self.scale,
            );
        }
        let seq = task / d.heads;
        let bias = self
            .bias
            .as_ref()
            .map(|b| &b[seq * d.s_k..(seq + 1) * d.s_k]);
        let isa = Isa::detected();
        for row in probs.chunks_exact_mut(d.s_k) {
            softmax_in_place(isa, row, bias);
        }
    }

    /// Multiplies one (sequence, head)'s probabilities by its dropout factors.
    fn apply_dropout(&self, d: &Dims, task: usize, probs: &mut [f32]) {
        if let Some(dropout) = self.dropout {
            let first = (task * d.s_q * d.s_k) as u64;
            for (i, p) in probs.iter_mut().enumerate() {
                *p *= dropout.factor(first + i as u64);
            }
        }
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
        let d = self.dims(lq, lk, lv)?;
        let (q, k, v) = (
            slice::<f32>(q, lq)?,
            slice::<f32>(k, lk)?,
            slice::<f32>(v, lv)?,
        );
        let mut out = vec![0f32; d.batch * d.s_q * d.width];
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..d.batch * d.heads)
            .into_par_iter()
            .for_each_init(Vec::new, |probs, task| {
                self.probabilities(&d, task, q, k, probs);
                self.apply_dropout(&d, task, probs);
                let (q_at, v_at) = d.offsets(task);
                // SAFETY: the views stay inside their buffers; the output block is this task's own.
                unsafe {
                    // out_h = probs v_h   (s_q × s_k times s_k × head_dim)
                    matmul(
                        d.s_q,
                        d.head_dim,
                        d.s_k,
                        out_ptr.block(q_at, d.width),
                        View::rows(probs, 0, d.s_k),
                        View::rows(v, v_at, d.width),
                        1.0,
                    );
                }
            });
        Ok((CpuStorage::F32(out), lq.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = FusedAttentionBackward(self.clone());
        let packed = Tensor::cat(&[&q.flatten_all()?, &d_out.flatten_all()?], 0)?
            .apply_op3_no_bwd(k, v, &backward)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Task scratch of the backward pass: probabilities, their gradient, and the dropped-out
/// probabilities (only with dropout).
#[derive(Default)]
struct BackwardScratch {
    probs: Vec<f32>,
    grad: Vec<f32>,
    dropped: Vec<f32>,
}

impl CustomOp3 for FusedAttentionBackward {
    fn name(&self) -> &'static str {
        "compressd-fused-attention-backward"
    }

    /// `q_and_d_out` is `q` and the output gradient flattened one after the other (a custom op
    /// takes three tensors, the backward needs four).
    fn cpu_fwd(
        &self,
        q_and_d_out: &CpuStorage,
        lqo: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let qo = slice::<f32>(q_and_d_out, lqo)?;
        let (b, s_k, width) = lk.shape().dims3()?;
        let n_q = qo.len() / 2;
        if qo.len() % 2 != 0 || n_q % (b * width).max(1) != 0 {
            candle_core::bail!(
                "attention backward: q and its gradient do not fit k {:?}",
                lk.shape()
            );
        }
        let lq = Layout::contiguous((b, n_q / (b * width), width));
        let d = op.dims(&lq, lk, lv)?;
        let (q, d_out) = qo.split_at(n_q);
        let (k, v) = (slice::<f32>(k, lk)?, slice::<f32>(v, lv)?);
        let n_k = b * s_k * width;
        let mut grads = vec![0f32; n_q + 2 * n_k];
        let (dq, rest) = grads.split_at_mut(n_q);
        let (dk, dv) = rest.split_at_mut(n_k);
        let (dq, dk, dv) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        (0..d.batch * d.heads).into_par_iter().for_each_init(
            BackwardScratch::default,
            |s, task| {
                let (q_at, k_at) = d.offsets(task);
                op.probabilities(&d, task, q, k, &mut s.probs);
                let dropped = if op.dropout.is_some() {
                    s.dropped.clone_from(&s.probs);
                    op.apply_dropout(&d, task, &mut s.dropped);
                    &s.dropped
                } else {
                    &s.probs
                };
                s.grad.resize(d.s_q * d.s_k, 0.0);
                let q_h = View::rows(q, q_at, d.width);
                let k_h = View::rows(k, k_at, d.width);
                let v_h = View::rows(v, k_at, d.width);
                let d_out_h = View::rows(d_out, q_at, d.width);
                // SAFETY: the views stay inside their buffers (offsets and strides from the
                // checked shapes); each output block is this task's own (sequence, head).
                unsafe {
                    // dv_h = dropped_probsᵀ d_out_h   (s_k × s_q times s_q × head_dim)
                    matmul(
                        d.s_k,
                        d.head_dim,
                        d.s_q,
                        dv.block(k_at, d.width),
                        View::rows(dropped, 0, d.s_k).t(),
                        d_out_h,
                        1.0,
                    );
                    // grad = d_out_h v_hᵀ   (the gradient of the dropped-out probabilities)
                    matmul(
                        d.s_q,
                        d.s_k,
                        d.head_dim,
                        Out {
                            ptr: s.grad.as_mut_ptr(),
                            rs: d.s_k,
                        },
                        d_out_h,
                        v_h.t(),
                        1.0,
                    );
                }
                op.apply_dropout(&d, task, &mut s.grad);
                // Softmax backward, row by row: d_scores = p ⊙ (grad − Σⱼ grad ⊙ p).
                for (g, p) in s
                    .grad
                    .chunks_exact_mut(d.s_k)
                    .zip(s.probs.chunks_exact(d.s_k))
                {
                    let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
                    g.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
                }
                let d_scores = View::rows(&s.grad, 0, d.s_k);
                // SAFETY: as above.
                unsafe {
                    // dq_h = scale · d_scores k_h;  dk_h = scale · d_scoresᵀ q_h
                    matmul(
                        d.s_q,
                        d.head_dim,
                        d.s_k,
                        dq.block(q_at, d.width),
                        d_scores,
                        k_h,
                        op.scale,
                    );
                    matmul(
                        d.s_k,
                        d.head_dim,
                        d.s_q,
                        dk.block(k_at, d.width),
                        d_scores.t(),
                        q_h,
                        op.scale,
                    );
                }
            },
        );
        let n = grads.len();
        Ok((CpuStorage::F32(grads), Shape::from(n)))
    }
}
