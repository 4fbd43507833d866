//! Per-channel symmetric int8: one scale per output row, `w ≈ scale * q` with `q ∈ [-127, 127]`.
//!
//! Scales are stored as f16 and chosen to be exactly representable in f16 (rounded up, so no value
//! clips). That lets the inference kernel reuse candle's Q8_0 blocks — 32 int8 values and an f16
//! scale — with every block of a row carrying the row's scale: the kernel computes with exactly the
//! stored weights, so reported accuracy and latency are those of the saved model.

use half::f16;

use super::parallel::rows_per_task;
use super::rows_cols;

/// Q8_0's block: 32 values.
const Q8_0_BLOCK: usize = 32;

/// An int8 weight with one scale per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Weight {
    /// Logical shape; rows are all dimensions but the last.
    pub dims: Vec<usize>,
    /// Row-major quantized values.
    pub qweight: Vec<i8>,
    /// One scale per row.
    pub scales: Vec<f16>,
}

impl Int8Weight {
    /// Quantizes row-major f32 values of shape `dims`.
    pub fn quantize(values: &[f32], dims: &[usize]) -> Self {
        let (rows, _) = rows_cols(dims);
        let mut qweight = vec![0i8; values.len()];
        let mut scales = vec![f16::ZERO; rows];
        quantize_parallel(values, dims, &mut qweight, &mut scales, |q| q as i8);
        Self {
            dims: dims.to_vec(),
            qweight,
            scales,
        }
    }

    /// Quantizes like [`Int8Weight::quantize`] but straight into the file layout's bytes (values as
    /// two's-complement bytes, scales as little-endian f16), reusing the caller's buffers so that
    /// streaming a large file does not allocate (and fault in) fresh memory for every tensor.
    pub fn quantize_to_bytes(
        values: &[f32],
        dims: &[usize],
        qbytes: &mut Vec<u8>,
        scale_bytes: &mut Vec<u8>,
    ) {
        let (rows, _) = rows_cols(dims);
        qbytes.resize(values.len(), 0);
        let mut scales = vec![f16::ZERO; rows];
        quantize_parallel(values, dims, qbytes, &mut scales, |q| q as i8 as u8);
        scale_bytes.clear();
        scale_bytes.extend(scales.iter().flat_map(|s| s.to_le_bytes()));
    }

    /// The dequantized values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (_, cols) = rows_cols(&self.dims);
        let mut out = Vec::with_capacity(self.qweight.len());
        for (row, scale) in self.qweight.chunks(cols.max(1)).zip(&self.scales) {
            let scale = scale.to_f32();
            out.extend(row.iter().map(|&q| f32::from(q) * scale));
        }
        out
    }

    /// Bytes of values and scales.
    pub fn storage_bytes(&self) -> usize {
        self.qweight.len() + 2 * self.scales.len()
    }

    /// The same weight as raw GGML Q8_0 blocks (f16 scale then 32 int8 values, little-endian), for
    /// candle's quantized matmul; `None` when the row length is not a multiple of 32.
    pub fn to_q8_0_bytes(&self) -> Option<Vec<u8>> {
        let (_, cols) = rows_cols(&self.dims);
        if cols == 0 || cols % Q8_0_BLOCK != 0 {
            return None;
        }
        let blocks = self.qweight.len() / Q8_0_BLOCK;
        let mut out = Vec::with_capacity(blocks * (2 + Q8_0_BLOCK));
        for (row, scale) in self.qweight.chunks(cols).zip(&self.scales) {
            for block in row.chunks(Q8_0_BLOCK) {
                out.extend_from_slice(&scale.to_le_bytes());
                out.extend(block.iter().map(|&q| q as u8));
            }
        }
        Some(out)
    }
}

/// Quantizes rows of `values` into `qs` and `scales`, a contiguous range of rows per core; `store`
/// turns a rounded value in [-127, 127] into the output element.
fn quantize_parallel<Q: Send>(
    values: &[f32],
    dims: &[usize],
    qs: &mut [Q],
    scales: &mut [f16],
    store: impl Fn(i32) -> Q + Copy + Send,
) {
    let (rows, cols) = rows_cols(dims);
    if cols == 0 {
        return;
    }
    let per_task = rows_per_task(rows, cols);
    std::thread::scope(|s| {
        let tasks = values
            .chunks(per_task * cols)
            .zip(qs.chunks_mut(per_task * cols))
            .zip(scales.chunks_mut(per_task));
        for ((xs, qs), sc) in tasks {
            s.spawn(move || quantize_rows(xs, qs, sc, cols, store));
        }
    });
}

/// Quantizes whole rows of `xs` into `qs`, writing one scale per row.
fn quantize_rows<Q>(
    xs: &[f32],
    qs: &mut [Q],
    scales: &mut [f16],
    cols: usize,
    store: impl Fn(i32) -> Q,
) {
    for ((row, qrow), scale) in xs
        .chunks(cols)
        .zip(qs.chunks_mut(cols))
        .zip(scales.iter_mut())
    {
        // A compare-and-select maximum vectorizes; `f32::max`'s NaN rules keep it scalar.
        let amax = row
            .iter()
            .fold(0f32, |m, &x| if x.abs() > m { x.abs() } else { m });
        *scale = f16_at_least(amax / 127.0);
        let inv = if scale.to_f32() > 0.0 {
            1.0 / scale.to_f32()
        } else {
            0.0
        };
        for (q, &x) in qrow.iter_mut().zip(row) {
            *q = store(round_clamped(x * inv, 127.0) as i32);
        }
    }
}

/// The smallest f16 not below `x` (for finite, non-negative `x`); `x` itself when exact.
pub(crate) fn f16_at_least(x: f32) -> f16 {
    let h = f16::from_f32(x);
    if h.to_f32() < x && h.is_finite() {
        f16::from_bits(h.to_bits() + 1)
    } else {
        h
    }
}

/// The scale (`max |x| / 127`) and its inverse for quantizing `xs` to symmetric i8, as the
/// inference kernels do with activations at run time; the inverse is 0 for an all-zero or
/// non-finite `xs`, which then quantizes to zeros.
/// The step and its inverse for a fixed `scale` (static activation quantization): the inverse is
/// 0 for a zero or non-finite scale, which then quantizes to zeros.
#[inline]
pub(crate) fn fixed_scale(scale: f32) -> (f32, f32) {
    if scale > 0.0 && scale.is_finite() {
        (scale, 1.0 / scale)
    } else {
        (0.0, 0.0)
    }
}

/// The row's own scale, or `fixed` when given (see [`symmetric_scale`] and [`fixed_scale`]).
#[inline]
pub(crate) fn row_scale(xs: &[f32], fixed: Option<f32>) -> (f32, f32) {
    match fixed {
        Some(scale) => fixed_scale(scale),
        None => symmetric_scale(xs),
    }
}

#[inline]
pub(crate) fn symmetric_scale(xs: &[f32]) -> (f32, f32) {
    // Compare-and-select keeps this loop vectorized (`f32::max` handles NaN and does not).
    let amax = xs
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
    scale_of_max(amax)
}

/// `(step, 1 / step)` for the largest magnitude `amax` of a row (NaNs left out of it): `(0, 0)`
/// for a row of zeros or an infinite value, so it quantizes to zeros.
#[inline]
pub(crate) fn scale_of_max(amax: f32) -> (f32, f32) {
    let inverse = if amax > 0.0 && amax.is_finite() {
        127.0 / amax
    } else {
        0.0
    };
    (amax / 127.0, inverse)
}

/// Rounds to nearest (ties to even) after clamping to `[-limit, limit]`.
///
/// Adding and subtracting 1.5·2²³ rounds in plain SSE2 code, which vectorizes; `f32::round` would be
/// a library call per element on a baseline x86-64 build. Valid for |v| < 2²².
#[inline(always)]
pub(crate) fn round_clamped(v: f32, limit: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v.clamp(-limit, limit) + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_their_own_scale_and_error_is_half_a_step() {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 32.0) / 8.0)
            .collect();
        let mut scaled = values.clone();
        scaled[32..].iter_mut().for_each(|v| *v *= 0.01);
        let w = Int8Weight::quantize(&scaled, &[2, 32]);
        assert!(w.scales[0].to_f32() > 50.0 * w.scales[1].to_f32());
        let back = w.dequantize();
        for (row, scale) in [(0usize, w.scales[0].to_f32()), (1, w.scales[1].to_f32())] {
            for c in 0..32 {
                let i = row * 32 + c;
                assert!((back[i] - scaled[i]).abs() <= scale * 0.5 + 1e-7, "{i}");
            }
        }
        assert_eq!(w.qweight.iter().map(|q| q.unsigned_abs()).max(), Some(127));
    }

    #[test]
    fn zero_rows_and_non_finite_values_do_not_panic() {
        let w = Int8Weight::quantize(&[0.0; 8], &[2, 4]);
        assert!(w.dequantize().iter().all(|&v| v == 0.0));
        let w = Int8Weight::quantize(&[f32::NAN, 1.0, f32::INFINITY, 2.0], &[1, 4]);
        assert_eq!(w.qweight.len(), 4);
        assert!(
            w.to_q8_0_bytes().is_none(),
            "4 columns cannot form Q8_0 blocks"
        );
    }

    #[test]
    fn byte_output_equals_the_weight_layout() {
        let values: Vec<f32> = (0..96).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Int8Weight::quantize(&values, &[3, 32]);
        let (mut q, mut s) = (vec![9u8; 5], Vec::new());
        Int8Weight::quantize_to_bytes(&values, &[3, 32], &mut q, &mut s);
        assert_eq!(q, w.qweight.iter().map(|&v| v as u8).collect::<Vec<_>>());
        assert_eq!(
            s,
            w.scales
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn f16_scale_rounds_up() {
        let x = 0.1f32;
        let h = f16_at_least(x);
        assert!(h.to_f32() >= x);
        assert!(f16::from_bits(h.to_bits() - 1).to_f32() < x);
        assert_eq!(round_clamped(2.5, 127.0), 2.0);
        assert_eq!(round_clamped(-3.5, 127.0), -4.0);
        assert_eq!(round_clamped(300.0, 127.0), 127.0);
    }
}
