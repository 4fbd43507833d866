//! Shared plumbing for the CPU kernels: the float trait they are generic over, reading a contiguous
//! slice from a storage, and running a kernel on whichever float dtype the storage holds.

use candle_core::{CpuStorage, Layout, Result, WithDType};
use num_traits::{Float, NumAssign};

/// The float types our CPU kernels support (f32 for training, f64 for exact gradient checks).
pub(crate) trait KernelFloat:
    Float + NumAssign + WithDType + Send + Sync + std::iter::Sum
{
    /// The error function.
    fn erf(self) -> Self;
    /// Converts an `f64` constant.
    fn c(x: f64) -> Self;
}

impl KernelFloat for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn c(x: f64) -> Self {
        x as f32
    }
}

impl KernelFloat for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn c(x: f64) -> Self {
        x
    }
}

/// Rows per rayon task: small rows are batched so task overhead stays negligible.
pub(crate) const MIN_ELEMS_PER_TASK: usize = 16 * 1024;

/// The number of rows to give one parallel task for rows of `row_len` elements.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (MIN_ELEMS_PER_TASK / row_len.max(1)).max(1)
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
