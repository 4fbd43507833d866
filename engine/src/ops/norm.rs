//! Layer norm and RMS norm with hand-written backward passes.
//!
//! candle's fused `layer_norm`/`rms_norm` cut gradients for contiguous inputs. Both norms share one
//! row kernel: layer norm centres each row before scaling, RMS norm does not. The backward kernels
//! return `dx`, `dw` (and `db`) packed in one buffer, split by the caller, so one pass over the rows
//! computes everything.

use candle_core::WithDType;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::kernel::{dispatch_float, last_dim, rows_per_task, slice, KernelFloat};

/// Which normalisation a kernel computes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowNorm {
    /// Subtract the row mean first (layer norm) or not (RMS norm).
    pub centered: bool,
    pub eps: f64,
}

/// Layer norm forward `(x, weight, bias) → y`.
pub(crate) struct LayerNormOp(pub RowNorm);
/// RMS norm forward `(x, weight) → y`.
pub(crate) struct RmsNormOp(pub RowNorm);
/// `(x, weight, dy) → [dx | dw | db]` (db only when centred).
struct NormBackward(RowNorm);

/// Independent partial sums per row: a single float accumulator is a serial chain of dependent
/// adds, which the compiler may not reorder, so the rows' reductions ran one element per add
/// latency; eight lanes vectorise. The lanes are then added in a fixed order, so results repeat.
const LANES: usize = 8;

/// `Σⱼ f(a[j], b[j])` over eight lanes.
#[inline(always)]
fn lane_sum<T: KernelFloat>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut lanes = [T::zero(); LANES];
    let (a_blocks, b_blocks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: T = a_blocks
        .remainder()
        .iter()
        .zip(b_blocks.remainder())
        .fold(T::zero(), |acc, (&x, &y)| acc + f(x, y));
    for (xs, ys) in a_blocks.zip(b_blocks) {
        for l in 0..LANES {
            lanes[l] += f(xs[l], ys[l]);
        }
    }
    lanes.iter().fold(T::zero(), |acc, &v| acc + v) + tail
}

/// Mean (zero when not centred) and reciprocal standard deviation of one row.
fn row_stats<T: KernelFloat>(x: &[T], norm: RowNorm) -> (T, T) {
    let n = T::c(x.len() as f64);
    let mean = if norm.centered {
        lane_sum(x, x, |v, _| v) / n
    } else {
        T::zero()
    };
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, (var + T::c(norm.eps)).sqrt().recip())
}

fn norm_forward<T: KernelFloat>(x: &[T], w: &[T], b: Option<&[T]>, norm: RowNorm) -> Vec<T> {
    let d = w.len();
    let mut out = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(out, x)| {
            for (o, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (mean, rstd) = row_stats(x, norm);
                for (j, (o, &v)) in o.iter_mut().zip(x).enumerate() {
                    let shift = b.map_or(T::zero(), |b| b[j]);
                    *o = (v - mean) * rstd * w[j] + shift;
                }
            }
        });
    out
}

/// Gradients of one block of rows: fills `dx`, returns this block's `(dw, db)` sums.
fn norm_backward_block<T: KernelFloat>(
    dx: &mut [T],
    x: &[T],
    dy: &[T],
    w: &[T],
    norm: RowNorm,
) -> (Vec<T>, Vec<T>) {
    let d = w.len();
    let n = T::c(d as f64);
    let (mut dw, mut db) = (vec![T::zero(); d], vec![T::zero(); d]);
    for ((dx, x), dy) in dx
        .chunks_exact_mut(d)
        .zip(x.chunks_exact(d))
        .zip(dy.chunks_exact(d))
    {
        let (mean, rstd) = row_stats(x, norm);
        // g = dy ⊙ w, x̂ = (x − mean) · rstd; the row's means of g and g ⊙ x̂ (lane sums), then
        // the element-wise updates, which vectorise as they are.
        let mean_g = if norm.centered {
            lane_sum(dy, w, |dy, w| dy * w) / n
        } else {
            T::zero()
        };
        let mut lanes = [T::zero(); LANES];
        let blocks = dy.chunks_exact(LANES).zip(w.chunks_exact(LANES));
        let mut tail = T::zero();
        let full = d - d % LANES;
        for (b, (dys, ws)) in blocks.enumerate() {
            let xs = &x[b * LANES..(b + 1) * LANES];
            for l in 0..LANES {
                lanes[l] += dys[l] * ws[l] * (xs[l] - mean);
            }
        }
        for j in full..d {
            tail += dy[j] * w[j] * (x[j] - mean);
        }
        let mean_gx = (lanes.iter().fold(T::zero(), |acc, &v| acc + v) + tail) * rstd / n;
        for j in 0..d {
            let xhat = (x[j] - mean) * rstd;
            dw[j] += dy[j] * xhat;
            db[j] += dy[j];
            dx[j] = rstd * (dy[j] * w[j] - mean_g - xhat * mean_gx);
        }
    }
    (dw, db)
}

fn norm_backward<T: KernelFloat>(x: &[T], w: &[T], dy: &[T], norm: RowNorm) -> Vec<T> {
    let d = w.len();
    let mut dx = vec![T::zero(); x.len()];
    let chunk = rows_per_task(d) * d;
    let blocks = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .map(|(dx, (x, dy))| norm_backward_block(dx, x, dy, w, norm));
    let (dw, db) = super::kernel::sum_in_order(blocks, |(mut aw, mut ab), (bw, bb)| {
        aw.iter_mut().zip(bw).for_each(|(a, b)| *a += b);
        ab.iter_mut().zip(bb).for_each(|(a, b)| *a += b);
        (aw, ab)
    })
    .unwrap_or_else(|| (vec![T::zero(); d], vec![T::zero(); d]));
    dx.extend(dw);
    if norm.centered {
        dx.extend(db);
    }
    dx
}

/// Splits a packed `[dx | dw | db]` gradient into tensors shaped like the arguments.
fn unpack(
    packed: &Tensor,
    x: &Tensor,
    d: usize,
    with_bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let n = x.elem_count();
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = packed.narrow(0, n, d)?;
    let db = if with_bias {
        Some(packed.narrow(0, n + d, d)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

fn check_weight(layout: &Layout, w: &Layout) -> Result<usize> {
    let d = last_dim(layout)?;
    if w.dims() != [d] {
        candle_core::bail!("norm weight {:?} does not match rows of {d}", w.dims());
    }
    Ok(d)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "compressd-layer-norm"
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
        check_weight(lx, lw)?;
        dispatch_float!(x, self.name(), |T| {
            let out = norm_forward::<T>(slice(x, lx)?, slice(w, lw)?, Some(slice(b, lb)?), self.0);
            Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &NormBackward(self.0))?;
        let (dx, dw, db) = unpack(&packed, x, w.elem_count(), true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "compressd-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        check_weight(lx, lw)?;
        dispatch_float!(x, self.name(), |T| {
            let out = norm_forward::<T>(slice(x, lx)?, slice(w, lw)?, None, self.0);
            Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &NormBackward(self.0))?;
        let (dx, dw, _) = unpack(&packed, x, w.elem_count(), false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for NormBackward {
    fn name(&self) -> &'static str {
        "compressd-norm-backward"
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
        let d = check_weight(lx, lw)?;
        dispatch_float!(x, self.name(), |T| {
            let packed = norm_backward::<T>(slice(x, lx)?, slice(w, lw)?, slice(dy, ldy)?, self.0);
            let len = lx.shape().elem_count() + d * if self.0.centered { 2 } else { 1 };
            debug_assert_eq!(packed.len(), len);
            Ok((T::to_cpu_storage_owned(packed), Shape::from(len)))
        })
    }
}
