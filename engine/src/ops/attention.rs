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
//! The projections come either as three tensors or as one packed `[q | k | v]` tensor, the output
//! of a single linear layer with the three weights stacked ([`PackedAttention`]): the kernel reads
//! each head's columns where they lie in either layout, and the packed backward writes one packed
//! gradient.
//!
//! Nothing of size `seq²` outlives a call: the backward recomputes the probabilities from `q` and
//! `k` (one small GEMM per head, cheaper than keeping them), and dropout draws its keep mask from a
//! hash of (seed, position) so the backward regenerates exactly the mask the forward used.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
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
    /// The multiplier of the probability at `index`: 0 (dropped) or `1 / (1 − p)`
    /// ([`super::dropout_factor`], so the composed path draws the same mask).
    pub(crate) fn factor(self, index: u64) -> f32 {
        super::dropout_factor(self.seed, self.p, index)
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

/// Where one of `q`, `k`, `v` (or its gradient) lies in its buffer: row `r` of head `h` in
/// sequence `n` starts at `n · seq · rs + col + h · head_dim`. Separate tensors have `col` 0 and
/// `rs` = width; a packed `[q | k | v]` projection has `rs` = 3 · width and `col` 0, width, 2 · width.
#[derive(Clone, Copy)]
struct Operand {
    col: usize,
    rs: usize,
}

/// The sizes of one call and where its operands lie.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    s_q: usize,
    s_k: usize,
    width: usize,
    heads: usize,
    head_dim: usize,
    q: Operand,
    k: Operand,
    v: Operand,
}

impl Dims {
    /// Offset of (sequence, head)'s first element of `operand`, whose sequences are `seq` rows.
    fn at(&self, operand: Operand, seq: usize, task: usize) -> usize {
        let (n, head) = (task / self.heads, task % self.heads);
        n * seq * operand.rs + operand.col + head * self.head_dim
    }

    /// Offset of (sequence, head)'s first element in the `(batch, s_q, width)` output.
    fn out_at(&self, task: usize) -> usize {
        self.at(
            Operand {
                col: 0,
                rs: self.width,
            },
            self.s_q,
            task,
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
        self.check_bias(b, s_k)?;
        Ok(Dims {
            batch: b,
            s_q,
            s_k,
            width,
            heads: self.num_heads,
            head_dim: width / self.num_heads,
            q: Operand { col: 0, rs: width },
            k: Operand { col: 0, rs: width },
            v: Operand { col: 0, rs: width },
        })
    }

    /// The sizes of a packed `[q | k | v]` projection `(batch, seq, 3 · width)` (self-attention).
    fn packed_dims(&self, lqkv: &Layout) -> Result<Dims> {
        let (b, s, packed) = lqkv.shape().dims3()?;
        let width = packed / 3;
        if packed % 3 != 0 || self.num_heads == 0 || width % self.num_heads != 0 {
            candle_core::bail!(
                "attention: packed projections of width {packed} are not 3 × {} whole heads",
                self.num_heads
            );
        }
        self.check_bias(b, s)?;
        let at = |col| Operand { col, rs: packed };
        Ok(Dims {
            batch: b,
            s_q: s,
            s_k: s,
            width,
            heads: self.num_heads,
            head_dim: width / self.num_heads,
            q: at(0),
            k: at(width),
            v: at(2 * width),
        })
    }

    fn check_bias(&self, b: usize, s_k: usize) -> Result<()> {
        match &self.bias {
            Some(bias) if bias.len() != b * s_k => {
                candle_core::bail!("attention: bias has {} values, not {b} × {s_k}", bias.len())
            }
            _ => Ok(()),
        }
    }

    /// The softmax probabilities of one (sequence, head) into `probs` (`s_q × s_k`).
    fn probabilities(&self, d: &Dims, task: usize, q: &[f32], k: &[f32], probs: &mut Vec<f32>) {
        let (q_at, k_at) = (d.at(d.q, d.s_q, task), d.at(d.k, d.s_k, task));
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
                View::rows(q, q_at, d.q.rs),
                View::rows(k, k_at, d.k.rs).t(),
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

impl FusedAttention {
    /// The attended values `(batch, s_q, width)` of the operands `d` describes.
    fn forward_core(&self, d: &Dims, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; d.batch * d.s_q * d.width];
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..d.batch * d.heads)
            .into_par_iter()
            .for_each_init(Vec::new, |probs, task| {
                self.probabilities(d, task, q, k, probs);
                self.apply_dropout(d, task, probs);
                // SAFETY: the views stay inside their buffers; the output block is this task's own.
                unsafe {
                    // out_h = probs v_h   (s_q × s_k times s_k × head_dim)
                    matmul(
                        d.s_q,
                        d.head_dim,
                        d.s_k,
                        out_ptr.block(d.out_at(task), d.width),
                        View::rows(probs, 0, d.s_k),
                        View::rows(v, d.at(d.v, d.s_k, task), d.v.rs),
                        1.0,
                    );
                }
            });
        out
    }

    /// The gradients of `q`, `k` and `v` given the output's, written through `grads` (`dq`,
    /// `dk`, `dv`), each laid out as `grad_dims` says; every element of their (sequence, head)
    /// blocks is written.
    fn backward_core(
        &self,
        d: &Dims,
        (q, k, v): (&[f32], &[f32], &[f32]),
        d_out: &[f32],
        grads: [SharedMut; 3],
        grad_dims: &Dims,
    ) {
        let [dq, dk, dv] = grads;
        (0..d.batch * d.heads).into_par_iter().for_each_init(
            BackwardScratch::default,
            |s, task| {
                let (q_at, k_at, v_at) = (
                    d.at(d.q, d.s_q, task),
                    d.at(d.k, d.s_k, task),
                    d.at(d.v, d.s_k, task),
                );
                let g = grad_dims;
                let (dq_at, dk_at, dv_at) = (
                    g.at(g.q, g.s_q, task),
                    g.at(g.k, g.s_k, task),
                    g.at(g.v, g.s_k, task),
                );
                self.probabilities(d, task, q, k, &mut s.probs);
                let dropped = if self.dropout.is_some() {
                    s.dropped.clone_from(&s.probs);
                    self.apply_dropout(d, task, &mut s.dropped);
                    &s.dropped
                } else {
                    &s.probs
                };
                s.grad.resize(d.s_q * d.s_k, 0.0);
                let q_h = View::rows(q, q_at, d.q.rs);
                let k_h = View::rows(k, k_at, d.k.rs);
                let v_h = View::rows(v, v_at, d.v.rs);
                let d_out_h = View::rows(d_out, d.out_at(task), d.width);
                // SAFETY: the views stay inside their buffers (offsets and strides from the
                // checked shapes); each output block is this task's own (sequence, head).
                unsafe {
                    // dv_h = dropped_probsᵀ d_out_h   (s_k × s_q times s_q × head_dim)
                    matmul(
                        d.s_k,
                        d.head_dim,
                        d.s_q,
                        dv.block(dv_at, g.v.rs),
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
                self.apply_dropout(d, task, &mut s.grad);
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
                        dq.block(dq_at, g.q.rs),
                        d_scores,
                        k_h,
                        self.scale,
                    );
                    matmul(
                        d.s_k,
                        d.head_dim,
                        d.s_q,
                        dk.block(dk_at, g.k.rs),
                        d_scores.t(),
                        q_h,
                        self.scale,
                    );
                }
            },
        );
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
        let out = self.forward_core(&d, q, k, v);
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
        let grad_ptrs = [
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        ];
        op.backward_core(&d, (q, k, v), d_out, grad_ptrs, &d);
        let n = grads.len();
        Ok((CpuStorage::F32(grads), Shape::from(n)))
    }
}

/// [`FusedAttention`] on one packed projection `[q | k | v]` `(batch, seq, 3 · width)`, as a
/// single linear layer gives it: the kernel reads the three where they lie, and the backward
/// returns one packed gradient, so autograd adds one tensor instead of three.
pub(crate) struct PackedAttention(pub FusedAttention);

/// `(qkv, d_out) → d_qkv`, the gradient of [`PackedAttention`] in the projection's layout.
struct PackedAttentionBackward(FusedAttention);

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "compressd-packed-attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.0.packed_dims(l)?;
        let qkv = slice::<f32>(qkv, l)?;
        let out = self.0.forward_core(&d, qkv, qkv, qkv);
        Ok((CpuStorage::F32(out), Shape::from((d.batch, d.s_q, d.width))))
    }

    fn bwd(&self, qkv: &Tensor, _out: &Tensor, d_out: &Tensor) -> Result<Option<Tensor>> {
        let backward = PackedAttentionBackward(self.0.clone());
        Ok(Some(qkv.apply_op2_no_bwd(&d_out.contiguous()?, &backward)?))
    }
}

impl CustomOp2 for PackedAttentionBackward {
    fn name(&self) -> &'static str {
        "compressd-packed-attention-backward"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        l: &Layout,
        d_out: &CpuStorage,
        l_out: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = self.0.packed_dims(l)?;
        if l_out.dims() != [d.batch, d.s_q, d.width] {
            candle_core::bail!(
                "attention backward: output gradient {:?} for projections {:?}",
                l_out.shape(),
                l.shape()
            );
        }
        let (qkv, d_out) = (slice::<f32>(qkv, l)?, slice::<f32>(d_out, l_out)?);
        // The gradient has the projection's layout: each (sequence, head) writes its q, k and v
        // columns, which together cover every element.
        let mut grads = vec![0f32; qkv.len()];
        let ptr = SharedMut(grads.as_mut_ptr());
        self.0
            .backward_core(&d, (qkv, qkv, qkv), d_out, [ptr, ptr, ptr], &d);
        Ok((CpuStorage::F32(grads), l.shape().clone()))
    }
}
