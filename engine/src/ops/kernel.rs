//! Shared plumbing for the CPU kernels: the float trait they are generic over, reading a contiguous
//! slice from a storage, and running a kernel on whichever float dtype the storage holds.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::{Float, NumAssign};
use rayon::iter::IndexedParallelIterator;

use super::simd::{self, Isa};

/// The float types our CPU kernels support (f32 for training, f64 for exact gradient checks).
pub(crate) trait KernelFloat:
    Float + NumAssign + WithDType + Send + Sync + std::iter::Sum
{
    /// Converts an `f64` constant.
    fn c(x: f64) -> Self;
    /// `out[i] = x[i] · Φ(x[i])` over a block (vectorised for f32).
    fn gelu_block(x: &[Self], out: &mut [Self]);
    /// `dx[i] = dy[i] · (Φ(x[i]) + x[i] φ(x[i]))` over a block (vectorised for f32).
    fn gelu_backward_block(x: &[Self], dy: &[Self], dx: &mut [Self]);
    /// `row[i] = e^{row[i] − shift}` in place, returning the sum (vectorised for f32).
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self;
}

impl KernelFloat for f32 {
    fn c(x: f64) -> Self {
        x as f32
    }
    fn gelu_block(x: &[Self], out: &mut [Self]) {
        simd::gelu(Isa::detected(), x, out);
    }
    fn gelu_backward_block(x: &[Self], dy: &[Self], dx: &mut [Self]) {
        simd::gelu_backward(Isa::detected(), x, dy, dx);
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        simd::exp_shifted_sum(Isa::detected(), row, shift)
    }
}

/// f64 is for exact gradient checks: plain libm, no approximation.
impl KernelFloat for f64 {
    fn c(x: f64) -> Self {
        x
    }
    fn gelu_block(x: &[Self], out: &mut [Self]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = 0.5 * v * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
        }
    }
    fn gelu_backward_block(x: &[Self], dy: &[Self], dx: &mut [Self]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = 0.5 * (1.0 + libm::erf(v * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            *o = g * (cdf + v * pdf);
        }
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        let mut sum = 0.0;
        for x in row {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }
}

/// Rows per rayon task: small rows are batched so task overhead stays negligible.
pub(crate) const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// The number of rows to give one parallel task for rows of `row_len` elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (MIN_ELEMS_PER_TASK / row_len.max(1)).max(1)
}

/// Adds per-chunk partial results (a gradient's column sums, a norm's squares) in chunk order.
///
/// Rayon's `reduce` combines partials in a tree whose shape depends on which thread stole which
/// half of the work, and float addition is not associative, so the same training step gave
/// gradients that differed in their last bits from run to run, and a seeded QAT job (whose
/// rounding amplifies such bits) ended at different accuracies. Partials computed in parallel,
/// collected in order and added left to right give the same bits on every run and every thread
/// count, since the chunks have fixed sizes.
pub(crate) fn sum_in_order<P: Send>(
    partials: impl IndexedParallelIterator<Item = P>,
    add: impl Fn(P, P) -> P,
) -> Option<P> {
    partials.collect::<Vec<P>>().into_iter().reduce(add)
}

/// The contiguous element slice a layout describes.
///
/// # Errors
/// Fails when the dtype is not `T` or the layout is not contiguous (the public wrappers make inputs
/// contiguous before calling a kernel, so this is an internal invariant).
pub(crate) fn slice<'a, T: WithDType>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [T]> {
    let data = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("kernel input must be contiguous"),
    }
}

/// Length of the last dimension of a layout (the row length of row-wise kernels).
pub(crate) fn last_dim(layout: &Layout) -> Result<usize> {
    match layout.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => candle_core::bail!("row-wise kernel needs a non-empty last dimension"),
    }
}

/// Runs `$body` with `$T` bound to the storage's float type, failing for other dtypes.
macro_rules! dispatch_float {
    ($storage:expr, $name:expr, |$T:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $T = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $T = f64;
                $body
            }
            other => candle_core::bail!(
                "{} supports f32 and f64, not {:?}",
                $name,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch_float;
