//! Gradients as the optimizer sees them: straight from one backward pass, or accumulated over
//! several micro-batches.
//!
//! Accumulation adds into f32 buffers that are allocated once and reused (an in-place add on CPU),
//! rather than allocating a new tensor per micro-batch and parameter. The division by the number of
//! micro-batches is not done here: it is folded into the optimizer's gradient scale, so it costs no
//! extra pass over memory.

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use half::{bf16, f16};

use crate::Result;

/// A read-only view of one parameter's gradient.
#[derive(Clone, Copy)]
pub enum GradView<'a> {
    /// A gradient tensor produced by backward (any float dtype, any device).
    Tensor(&'a Tensor),
    /// An accumulated f32 host buffer, same element order as the (contiguous) parameter.
    Host(&'a [f32]),
}

/// Where the gradients of one optimizer step come from.
#[derive(Clone, Copy)]
pub enum Gradients<'a> {
    /// One backward pass.
    Store(&'a GradStore),
    /// Several micro-batches summed by a [`GradAccumulator`].
    Accumulated(&'a GradAccumulator),
}

impl<'a> Gradients<'a> {
    /// The gradient of the `index`-th trainable variable (`var`), if it received one.
    pub fn get(&self, index: usize, var: &Var) -> Option<GradView<'a>> {
        match *self {
            Gradients::Store(store) => store.get(var.as_tensor()).map(GradView::Tensor),
            Gradients::Accumulated(acc) => acc.view(index),
        }
    }

    /// How many micro-batches were summed into these gradients (the optimizer averages over them).
    pub fn micro_batches(&self) -> usize {
        match self {
            Gradients::Store(_) => 1,
            Gradients::Accumulated(acc) => acc.micro_batches.max(1),
        }
    }
}

/// One parameter's running gradient sum.
enum AccBuffer {
    Host(Vec<f32>),
    Device(Tensor),
}

/// Sums gradients of several backward passes, reusing its buffers across optimizer steps.
#[derive(Default)]
pub struct GradAccumulator {
    buffers: Vec<Option<AccBuffer>>,
    /// Whether `buffers[i]` holds data of the current accumulation window.
    live: Vec<bool>,
    micro_batches: usize,
}

impl GradAccumulator {
    /// An empty accumulator; buffers are sized on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the gradients of one backward pass for the given variables (in optimizer order).
    ///
    /// # Errors
    /// Fails when a gradient's shape differs from its buffer or a device copy fails.
    pub fn add(&mut self, vars: &[(String, Var)], store: &GradStore) -> Result<()> {
        if self.buffers.len() != vars.len() {
            self.buffers = (0..vars.len()).map(|_| None).collect();
            self.live = vec![false; vars.len()];
        }
        for (i, (_, var)) in vars.iter().enumerate() {
            let Some(grad) = store.get(var.as_tensor()) else {
                continue;
            };
            let first = !self.live[i];
            self.live[i] = true;
            accumulate_one(&mut self.buffers[i], grad, first)?;
        }
        self.micro_batches += 1;
        Ok(())
    }

    /// Starts a new accumulation window (keeps the allocated buffers).
    pub fn clear(&mut self) {
        self.live.iter_mut().for_each(|l| *l = false);
        self.micro_batches = 0;
    }

    /// Number of backward passes summed since the last [`clear`](Self::clear).
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    fn view(&self, index: usize) -> Option<GradView<'_>> {
        if !self.live.get(index).copied().unwrap_or(false) {
            return None;
        }
        match self.buffers.get(index)?.as_ref()? {
            AccBuffer::Host(buf) => Some(GradView::Host(buf)),
            AccBuffer::Device(t) => Some(GradView::Tensor(t)),
        }
    }
}

/// Copies (first micro-batch) or adds `grad` into `slot`, in place on CPU.
fn accumulate_one(slot: &mut Option<AccBuffer>, grad: &Tensor, first: bool) -> Result<()> {
    if !grad.device().is_cpu() {
        let next = match (slot.take(), first) {
            (Some(AccBuffer::Device(sum)), false) => (sum + grad.to_dtype(DType::F32)?)?,
            _ => grad.to_dtype(DType::F32)?,
        };
        *slot = Some(AccBuffer::Device(next));
        return Ok(());
    }
    let n = grad.elem_count();
    let buf = match slot {
        Some(AccBuffer::Host(buf)) if buf.len() == n => buf,
        _ => {
            *slot = Some(AccBuffer::Host(vec![0.0; n]));
            match slot {
                Some(AccBuffer::Host(buf)) => buf,
                _ => unreachable!("just stored a host buffer"),
            }
        }
    };
    let contiguous;
    let grad = if dense_order(grad.layout()).is_some() {
        grad
    } else {
        contiguous = grad.contiguous()?;
        &contiguous
    };
    read_cpu(grad, |src, order| {
        with_float_slice!(src, |src| copy_row_major(buf, src, order, !first))
    })
}

/// Element types the optimizer reads and writes on CPU, converted through f32.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// A borrowed contiguous CPU float buffer of one of the supported dtypes.
pub(crate) enum FloatSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// Calls a generic expression on the typed slice inside a [`FloatSlice`] (monomorphised per dtype,
/// so the inner loops stay free of dynamic dispatch).
macro_rules! with_float_slice {
    ($slice:expr, |$s:ident| $body:expr) => {
        match $slice {
            $crate::train::grads::FloatSlice::F32($s) => $body,
            $crate::train::grads::FloatSlice::F16($s) => $body,
            $crate::train::grads::FloatSlice::BF16($s) => $body,
        }
    };
}
pub(crate) use with_float_slice;

/// How the elements of a 2-D (or any contiguous) gradient lie in its storage slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Order {
    /// Logical order (C-contiguous).
    RowMajor,
    /// A transposed view: logical element `(i, j)` of a `rows x cols` tensor is at `i + j * rows`.
    /// Backward produces linear-layer weight gradients this way (the gradient of `w.t()`,
    /// transposed back), so it is handled without a copy.
    Transposed { rows: usize, cols: usize },
}

/// The storage range and element order of a layout, when it is dense.
pub(crate) fn dense_order(layout: &candle_core::Layout) -> Option<(usize, usize, Order)> {
    if let Some((start, end)) = layout.contiguous_offsets() {
        return Some((start, end, Order::RowMajor));
    }
    match (layout.dims(), layout.stride()) {
        (&[rows, cols], &[1, stride]) if stride == rows => {
            let start = layout.start_offset();
            Some((start, start + rows * cols, Order::Transposed { rows, cols }))
        }
        _ => None,
    }
}

/// Runs `f` on the storage elements of a dense CPU float tensor without copying it.
///
/// # Errors
/// Fails for non-CPU, non-dense or non-float (f32/f16/bf16) tensors.
pub(crate) fn read_cpu<R>(t: &Tensor, f: impl FnOnce(FloatSlice<'_>, Order) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end, order)) = dense_order(layout) else {
        return Err(candle_core::Error::Msg("tensor is not dense".into()).into());
    };
    let Storage::Cpu(cpu) = &*storage else {
        return Err(candle_core::Error::Msg("expected a CPU tensor".into()).into());
    };
    let slice = match cpu {
        CpuStorage::F32(v) => FloatSlice::F32(&v[start..end]),
        CpuStorage::F16(v) => FloatSlice::F16(&v[start..end]),
        CpuStorage::BF16(v) => FloatSlice::BF16(&v[start..end]),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "expected an f32, f16 or bf16 tensor, got {:?}",
                other.dtype()
            ))
            .into())
        }
    };
    Ok(f(slice, order))
}

/// Writes (or adds, when `add`) `src`, laid out in `order`, into the row-major `dst`.
pub(crate) fn copy_row_major<G: Elem>(dst: &mut [f32], src: &[G], order: Order, add: bool) {
    match order {
        Order::RowMajor if add => dst.iter_mut().zip(src).for_each(|(d, g)| *d += g.to_f32()),
        Order::RowMajor => dst.iter_mut().zip(src).for_each(|(d, g)| *d = g.to_f32()),
        Order::Transposed { rows, cols } => {
            // Tiled so both sides stay in cache.
            const TILE: usize = 32;
            for i0 in (0..rows).step_by(TILE) {
                for j0 in (0..cols).step_by(TILE) {
                    for i in i0..(i0 + TILE).min(rows) {
                        for j in j0..(j0 + TILE).min(cols) {
                            let g = src[i + j * rows].to_f32();
                            let d = &mut dst[i * cols + j];
                            *d = if add { *d + g } else { g };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn accumulates_in_place_and_reuses_buffers() {
        let dev = Device::Cpu;
        let w = Var::new(&[1f32, 2., 3.], &dev).unwrap();
        let vars = vec![("w".to_string(), w.clone())];
        let mut acc = GradAccumulator::new();
        for scale in [1f64, 2.0] {
            let loss = (w.as_tensor() * scale).unwrap().sum_all().unwrap();
            acc.add(&vars, &loss.backward().unwrap()).unwrap();
        }
        assert_eq!(acc.micro_batches(), 2);
        let grads = Gradients::Accumulated(&acc);
        assert_eq!(grads.micro_batches(), 2);
        match grads.get(0, &w) {
            Some(GradView::Host(buf)) => assert_eq!(buf, &[3.0, 3.0, 3.0]),
            _ => panic!("expected a host buffer"),
        }
        acc.clear();
        assert!(Gradients::Accumulated(&acc).get(0, &w).is_none());
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        acc.add(&vars, &loss.backward().unwrap()).unwrap();
        match Gradients::Accumulated(&acc).get(0, &w) {
            Some(GradView::Host(buf)) => assert_eq!(buf, &[2.0, 4.0, 6.0]),
            _ => panic!("expected a host buffer"),
        }
    }
}
