//! A linear layer `y = x Wᵀ + b` as one autograd node with a hand-written backward (CPU, f32).
//!
//! Composed from candle ops, a linear layer is five graph nodes (reshape, transpose, matmul,
//! broadcast add, reshape), and candle's backward gives every node a zero-filled gradient buffer
//! and adds into it: for a `(rows, out)` activation that is several passes over memory on top of
//! the two GEMMs that matter. Here the forward is one GEMM that accumulates onto the bias rows,
//! and the backward computes exactly the gradients its inputs need, each with one GEMM in the
//! layout gemm packs fastest: `dx = dy W`, `dW = dyᵀ x` (no transposed copy), `db = Σ dy`.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16_gemm::{self, MatMut, MatRef};
use super::kernel::slice;

/// What the GEMMs multiply: f32 as stored, or bfloat16 roundings of it with f32 sums (CPU mixed
/// precision, where the CPU has AVX-512 BF16: [`bf16_gemm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Products {
    /// f32 × f32 (the gemm crate).
    F32,
    /// bf16 × bf16 into f32 sums; inputs, outputs and gradients stay f32 in memory.
    Bf16,
}

/// `x (…, in) · Wᵀ + b` for `W (out, in)` and `b (out)`; the bias is optional (two-argument form).
/// With `transposed`, the weight argument holds `Wᵀ (in, out)` contiguous (a frozen layer's cached
/// copy, which gemm packs without gathering; see `layers::dense`).
pub(crate) struct Linear {
    pub transposed: bool,
    pub products: Products,
}

/// `gelu(x Wᵀ + b)` (exact GELU) with a trained `W (out, in)` and `b (out)`: the activation applied
/// to the GEMM's output in place of a separate node, so autograd neither keeps nor adds a gradient
/// for the `(rows, out)` pre-activation (BERT's FFN, where `out` is 4 × hidden). The forward keeps
/// the pre-activation for the backward, as the separate GELU node would.
pub(crate) struct LinearGelu {
    products: Products,
    pre_activation: OnceLock<Tensor>,
}

impl LinearGelu {
    pub(crate) fn new(products: Products) -> Self {
        Self {
            products,
            pre_activation: OnceLock::new(),
        }
    }
}

/// `(x, W, dy) → [dx | dW | db]` flattened, each part only when asked for (`dW` in the weight
/// argument's own orientation).
struct LinearBackward {
    transposed: bool,
    products: Products,
    dx: bool,
    dw: bool,
    db: bool,
}

/// Strides `(row, column)` of `W (out, in)` read from the weight argument.
fn weight_strides(transposed: bool, inp: usize, out: usize) -> (isize, isize) {
    if transposed {
        (1, out as isize)
    } else {
        (inp as isize, 1)
    }
}

fn parallelism() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads())
}

/// A matrix as gemm's arguments take it: pointer, column stride, row stride.
type View<P> = (P, isize, isize);

/// `dst = lhs · rhs` for `lhs (m × k)` and `rhs (k × n)`, added onto `dst` with `read_dst`.
///
/// # Safety
/// The views must cover their matrices, `dst` must not overlap the others, and `Bf16` products
/// must only be asked for where [`bf16_gemm::available`].
unsafe fn matmul(
    products: Products,
    (m, n, k): (usize, usize, usize),
    dst: View<*mut f32>,
    read_dst: bool,
    lhs: View<*const f32>,
    rhs: View<*const f32>,
) {
    match products {
        Products::F32 => gemm::gemm(
            m,
            n,
            k,
            dst.0,
            dst.1,
            dst.2,
            read_dst,
            lhs.0,
            lhs.1,
            lhs.2,
            rhs.0,
            rhs.1,
            rhs.2,
            if read_dst { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism(),
        ),
        Products::Bf16 => bf16_gemm::gemm(
            m,
            n,
            k,
            MatMut {
                ptr: dst.0,
                cs: dst.1,
                rs: dst.2,
            },
            read_dst,
            MatRef {
                ptr: lhs.0,
                cs: lhs.1,
                rs: lhs.2,
            },
            MatRef {
                ptr: rhs.0,
                cs: rhs.1,
                rs: rhs.2,
            },
        ),
    }
}

/// Sizes of one call: `rows` of `x`, `in`puts and `out`puts.
fn sizes(lx: &Layout, lw: &Layout, transposed: bool) -> Result<(usize, usize, usize)> {
    let (out, inp) = match lw.shape().dims2()? {
        (inp, out) if transposed => (out, inp),
        dims => dims,
    };
    let x_in = lx.dims().last().copied().unwrap_or(0);
    if x_in != inp || inp == 0 {
        candle_core::bail!(
            "linear: input {:?} does not fit a weight {:?}",
            lx.shape(),
            lw.shape()
        );
    }
    Ok((lx.shape().elem_count() / inp, inp, out))
}

/// The output shape: `x`'s with the last dimension replaced by `out`.
fn out_shape(lx: &Layout, out: usize) -> Shape {
    let mut dims = lx.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out;
    }
    Shape::from(dims)
}

/// `y = x Wᵀ (+ b)`.
fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    (rows, inp, out): (usize, usize, usize),
    transposed: bool,
    products: Products,
) -> Vec<f32> {
    let (w_rs, w_cs) = weight_strides(transposed, inp, out);
    let len = rows * out;
    if inp == 0 || len == 0 {
        // Nothing to multiply (the GEMM might not write an empty product): the bias alone.
        return match b {
            Some(b) => b.iter().copied().cycle().take(len).collect(),
            None => vec![0f32; len],
        };
    }
    // Not zero-filled: the GEMM writes every element (over the bias when there is one).
    let mut y: Vec<f32> = Vec::with_capacity(len);
    if let Some(b) = b {
        y.spare_capacity_mut()[..len]
            .par_chunks_mut(out * 64)
            .for_each(|block| {
                for row in block.chunks_exact_mut(out) {
                    for (d, &s) in row.iter_mut().zip(b) {
                        d.write(s);
                    }
                }
            });
    }
    // SAFETY: the views cover exactly `x` (rows × in), `W` (out × in, read as Wᵀ) and `y`'s
    // `rows × out` reserved elements, which the GEMM reads only when the bias was written there
    // and writes all of (k = in ≥ 1), so `y` is initialised when its length is set.
    unsafe {
        matmul(
            products,
            (rows, out, inp),
            (y.as_mut_ptr(), 1, out as isize),
            b.is_some(),
            (x.as_ptr(), 1, inp as isize),
            (w.as_ptr(), w_rs, w_cs),
        );
        y.set_len(len);
    }
    y
}

/// `x Wᵀ + b` with the bias checked against the weight, and the output's shape.
fn biased_forward(
    (x, lx): (&CpuStorage, &Layout),
    (w, lw): (&CpuStorage, &Layout),
    (b, lb): (&CpuStorage, &Layout),
    transposed: bool,
    products: Products,
) -> Result<(Vec<f32>, Shape)> {
    let dims = sizes(lx, lw, transposed)?;
    let out = dims.2;
    if lb.dims() != [out] {
        candle_core::bail!("linear: bias {:?} for {out} outputs", lb.shape());
    }
    let y = forward(
        slice(x, lx)?,
        slice(w, lw)?,
        Some(slice(b, lb)?),
        dims,
        transposed,
        products,
    );
    Ok((y, out_shape(lx, out)))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "compressd-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = sizes(lx, lw, self.transposed)?;
        let y = forward(
            slice(x, lx)?,
            slice(w, lw)?,
            None,
            dims,
            self.transposed,
            self.products,
        );
        let out = dims.2;
        Ok((CpuStorage::F32(y), out_shape(lx, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = backward(self.transposed, self.products, x, w, None, dy)?;
        Ok((dx, dw))
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "compressd-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, shape) = biased_forward((x, lx), (w, lw), (b, lb), self.transposed, self.products)?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        backward(self.transposed, self.products, x, w, Some(b), dy)
    }
}

impl CustomOp3 for LinearGelu {
    fn name(&self) -> &'static str {
        "compressd-linear-gelu"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (pre, shape) = biased_forward((x, lx), (w, lw), (b, lb), false, self.products)?;
        let y = super::gelu::gelu::<f32>(&pre);
        // Kept for the backward; a second forward of the same op (candle makes none) keeps the first.
        let _ = self.pre_activation.set(Tensor::from_vec(
            pre,
            shape.clone(),
            &candle_core::Device::Cpu,
        )?);
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(pre) = self.pre_activation.get() else {
            candle_core::bail!("linear-gelu backward before its forward");
        };
        let d_pre = pre.apply_op2_no_bwd(&dy.contiguous()?, &super::gelu::GeluBackward)?;
        backward(false, self.products, x, w, Some(b), &d_pre)
    }
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// The gradients of the inputs that track one (a frozen weight gets none computed).
fn backward(
    transposed: bool,
    products: Products,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    dy: &Tensor,
) -> Result<Grads> {
    let op = LinearBackward {
        transposed,
        products,
        dx: x.track_op(),
        dw: w.track_op(),
        db: b.is_some_and(Tensor::track_op),
    };
    if !(op.dx || op.dw || op.db) {
        return Ok((None, None, None));
    }
    let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &op)?;
    let mut at = 0;
    let mut take = |wanted: bool, like: &Tensor| -> Result<Option<Tensor>> {
        if !wanted {
            return Ok(None);
        }
        let n = like.elem_count();
        let part = packed.narrow(0, at, n)?.reshape(like.shape())?;
        at += n;
        Ok(Some(part))
    };
    let dx = take(op.dx, x)?;
    let dw = take(op.dw, w)?;
    let db = match b {
        Some(b) => take(op.db, b)?,
        None => None,
    };
    Ok((dx, dw, db))
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "compressd-linear-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, inp, out) = sizes(lx, lw, self.transposed)?;
        let (w_rs, w_cs) = weight_strides(self.transposed, inp, out);
        let (x, w, dy) = (
            slice::<f32>(x, lx)?,
            slice::<f32>(w, lw)?,
            slice::<f32>(dy, ldy)?,
        );
        if dy.len() != rows * out {
            candle_core::bail!(
                "linear backward: gradient {:?} for {rows} × {out}",
                ldy.shape()
            );
        }
        let len = usize::from(self.dx) * rows * inp
            + usize::from(self.dw) * out * inp
            + usize::from(self.db) * out;
        if rows == 0 || out == 0 {
            // Empty products, which the GEMM might not write: the gradients are zero.
            return Ok((CpuStorage::F32(vec![0f32; len]), Shape::from(len)));
        }
        // Not zero-filled: with rows and out at least 1, the two GEMMs (k = out, k = rows) write
        // every element of dx and dW, and the column sums every element of db.
        let mut grads: Vec<f32> = Vec::with_capacity(len);
        let (dx, rest) =
            grads.spare_capacity_mut()[..len].split_at_mut(if self.dx { rows * inp } else { 0 });
        let (dw, db) = rest.split_at_mut(if self.dw { out * inp } else { 0 });
        // SAFETY: each view covers exactly its buffer: dy (rows × out), W (out × in, in either
        // orientation), x (rows × in), dx (rows × in), dW (out × in, in the weight's orientation);
        // the GEMMs do not read their destinations (`read_dst` false).
        unsafe {
            if self.dx {
                // dx = dy W
                matmul(
                    self.products,
                    (rows, inp, out),
                    (dx.as_mut_ptr().cast::<f32>(), 1, inp as isize),
                    false,
                    (dy.as_ptr(), 1, out as isize),
                    (w.as_ptr(), w_cs, w_rs),
                );
            }
            if self.dw {
                // dW = dyᵀ x, reading dy column-major in place, written in W's orientation
                matmul(
                    self.products,
                    (out, inp, rows),
                    (dw.as_mut_ptr().cast::<f32>(), w_cs, w_rs),
                    false,
                    (dy.as_ptr(), out as isize, 1),
                    (x.as_ptr(), 1, inp as isize),
                );
            }
        }
        if self.db {
            // Column sums, a block of rows per task, then the blocks' sums added in order.
            let blocks = dy.par_chunks(out * 64).map(|block| {
                let mut acc = vec![0f32; out];
                for row in block.chunks_exact(out) {
                    acc.iter_mut().zip(row).for_each(|(a, g)| *a += g);
                }
                acc
            });
            let sums = super::kernel::sum_in_order(blocks, |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            });
            let sums = sums.unwrap_or_else(|| vec![0f32; out]);
            for (d, &s) in db.iter_mut().zip(&sums) {
                d.write(s);
            }
        }
        // SAFETY: every element was written above (dx and dW by the GEMMs, db by the loop).
        unsafe { grads.set_len(len) };
        Ok((CpuStorage::F32(grads), Shape::from(len)))
    }
}
