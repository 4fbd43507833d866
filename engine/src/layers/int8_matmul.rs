//! The int8 matrix product behind [`super::QuantizedLinear`] on the CPU: `y = x Wᵀ` with `W` stored
//! as i8 with one scale per output channel and `x` quantized to i8 per row at run time.
//!
//! Each row of `x` gets its own scale (`max |x| / 127`), so `y[m, n] = sx[m] · sw[n] · Σₖ qx[m, k] ·
//! qw[n, k]`: the sum is exact integer arithmetic (i32), only the two scales are floating point.
//!
//! The weight is packed once, at load time, into panels of [`PANEL`] output channels. Inside a
//! panel the values go in pairs of input columns — channel 0's `k, k+1`, channel 1's `k, k+1`, … —
//! because the AVX2 kernel multiplies pairs: `vpmaddwd` takes 16-bit pairs, multiplies and adds each
//! pair into one i32 lane, so one broadcast activation pair against a panel row gives 8 channels'
//! partial sums at once with no horizontal reduction. The input dimension is padded to an even
//! length and the output dimension to a whole panel with zeros, which add nothing.
//!
//! The AVX2 kernel lives in [`super::int8_avx2`] (the only `unsafe` code here); a portable scalar
//! kernel computes the very same integers on other CPUs. Work is split over rayon's threads by rows
//! of `x` (prompts, batches) or, for a handful of rows (decoding), by panels.

use rayon::prelude::*;

use crate::quant::Int8Weight;

/// Output channels per packed panel (two AVX2 registers of 8 i32 lanes).
pub(crate) const PANEL: usize = 16;
/// Rows of `x` one kernel call handles: 6 rows × 2 registers = 12 accumulators, which with two
/// weight registers and one broadcast fits AVX2's 16 registers.
pub(crate) const ROWS: usize = 6;

/// An int8 weight packed for [`matmul`].
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    /// `panels × (k_pad / 2) × PANEL × 2` values, see the module documentation.
    packed: Vec<i8>,
    /// One scale per output channel (`out_features` of them).
    scales: Vec<f32>,
    out_features: usize,
    in_features: usize,
    /// `in_features` rounded up to even.
    k_pad: usize,
}

impl PackedInt8 {
    /// Packs a 2-D int8 weight `(out_features, in_features)`; `None` when it is not 2-D.
    pub fn pack(weight: &Int8Weight) -> Option<Self> {
        let [out_features, in_features] = weight.dims[..] else {
            return None;
        };
        let k_pad = in_features.next_multiple_of(2);
        let panels = out_features.div_ceil(PANEL);
        let mut packed = vec![0i8; panels * k_pad * PANEL];
        for (n, row) in weight.qweight.chunks(in_features.max(1)).enumerate() {
            let panel = &mut packed[(n / PANEL) * k_pad * PANEL..];
            let lane = n % PANEL;
            for (k, &q) in row.iter().enumerate() {
                panel[(k / 2) * PANEL * 2 + lane * 2 + k % 2] = q;
            }
        }
        Some(Self {
            packed,
            scales: weight.scales.iter().map(|s| s.to_f32()).collect(),
            out_features,
            in_features,
            k_pad,
        })
    }

    /// Size of the input's last dimension.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Size of the output's last dimension.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn panels(&self) -> usize {
        self.out_features.div_ceil(PANEL)
    }

    fn panel(&self, p: usize) -> &[i8] {
        &self.packed[p * self.k_pad * PANEL..(p + 1) * self.k_pad * PANEL]
    }
}

/// Rows of `x` quantized to i8 values (held as i16, the kernel's multiplier width), one scale each.
struct QuantizedRows {
    values: Vec<i16>,
    scales: Vec<f32>,
    k_pad: usize,
}

impl QuantizedRows {
    fn new(x: &[f32], in_features: usize, k_pad: usize) -> Self {
        let rows = x.len() / in_features.max(1);
        let mut values = vec![0i16; rows * k_pad];
        let mut scales = vec![0f32; rows];
        for ((row, out), scale) in x
            .chunks(in_features.max(1))
            .zip(values.chunks_mut(k_pad))
            .zip(scales.iter_mut())
        {
            let (step, inv) = crate::quant::int8::symmetric_scale(row);
            *scale = step;
            for (q, &v) in out.iter_mut().zip(row) {
                *q = crate::quant::int8::round_clamped(v * inv, 127.0) as i16;
            }
        }
        Self {
            values,
            scales,
            k_pad,
        }
    }

    fn rows(&self, first: usize, count: usize) -> &[i16] {
        &self.values[first * self.k_pad..(first + count) * self.k_pad]
    }
}

/// Which integer kernel the CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AVX2 `vpmaddwd`, detected at run time.
    Avx2,
    /// Plain Rust loops, for CPUs without AVX2.
    Scalar,
}

impl Int8Kernel {
    /// The fastest kernel this CPU supports.
    pub fn detect() -> Self {
        if super::int8_avx2::available() {
            Self::Avx2
        } else {
            Self::Scalar
        }
    }

    /// The integer sums of `rows` (up to [`ROWS`] rows of `k_pad` values) against one panel, written
    /// to `acc` as `[row][channel]`.
    fn panel_sums(self, rows: &[i16], k_pad: usize, panel: &[i8], acc: &mut [[i32; PANEL]; ROWS]) {
        let count = rows.len() / k_pad;
        match self {
            Self::Avx2 => super::int8_avx2::panel_sums(rows, count, k_pad, panel, acc),
            Self::Scalar => scalar_panel_sums(rows, count, k_pad, panel, acc),
        }
    }
}

/// The portable kernel: the same sums as the AVX2 one, in the same integer arithmetic.
fn scalar_panel_sums(
    rows: &[i16],
    count: usize,
    k_pad: usize,
    panel: &[i8],
    acc: &mut [[i32; PANEL]; ROWS],
) {
    for (r, sums) in acc.iter_mut().enumerate().take(count) {
        let x = &rows[r * k_pad..(r + 1) * k_pad];
        *sums = [0; PANEL];
        for (pair, weights) in x.chunks_exact(2).zip(panel.chunks_exact(2 * PANEL)) {
            for (sum, w) in sums.iter_mut().zip(weights.chunks_exact(2)) {
                *sum += i32::from(pair[0]) * i32::from(w[0]) + i32::from(pair[1]) * i32::from(w[1]);
            }
        }
    }
}

/// `x · Wᵀ (+ bias)` for row-major `x` of `rows × in_features`, giving `rows × out_features`.
///
/// The caller checks that `x.len()` is a multiple of `in_features` (the layer does).
pub fn matmul(
    x: &[f32],
    weight: &PackedInt8,
    bias: Option<&[f32]>,
    kernel: Int8Kernel,
) -> Vec<f32> {
    let n = weight.out_features;
    let quantized = QuantizedRows::new(x, weight.in_features, weight.k_pad);
    let rows = quantized.scales.len();
    let mut y = vec![0f32; rows * n];
    if rows == 0 || n == 0 {
        return y;
    }
    let threads = rayon::current_num_threads();
    if rows >= ROWS * threads {
        // Enough rows: each task owns whole output rows, so it writes its slice directly.
        let per_task = rows.div_ceil(threads * 4).next_multiple_of(ROWS);
        y.par_chunks_mut(per_task * n)
            .enumerate()
            .for_each(|(t, out)| {
                let first = t * per_task;
                row_block(
                    &quantized,
                    first,
                    out.len() / n,
                    weight,
                    0..weight.panels(),
                    bias,
                    kernel,
                    out,
                );
            });
    } else {
        // Few rows (decoding): split the panels instead and gather each task's columns.
        let panels = weight.panels();
        let per_task = panels.div_ceil(threads).max(1);
        let parts: Vec<(usize, Vec<f32>)> = (0..panels)
            .step_by(per_task)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|start| {
                let end = (start + per_task).min(panels);
                let mut part = vec![0f32; rows * n];
                row_block(
                    &quantized,
                    0,
                    rows,
                    weight,
                    start..end,
                    bias,
                    kernel,
                    &mut part,
                );
                (start, part)
            })
            .collect();
        for (start, part) in parts {
            let cols = start * PANEL..((start + per_task) * PANEL).min(n);
            for (dst, src) in y.chunks_mut(n).zip(part.chunks(n)) {
                dst[cols.clone()].copy_from_slice(&src[cols.clone()]);
            }
        }
    }
    y
}

/// Computes output rows `first..first + count` for panels `panels` into `out` (`count × n`).
#[allow(clippy::too_many_arguments)]
fn row_block(
    x: &QuantizedRows,
    first: usize,
    count: usize,
    weight: &PackedInt8,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    kernel: Int8Kernel,
    out: &mut [f32],
) {
    let n = weight.out_features;
    let mut acc = [[0i32; PANEL]; ROWS];
    for block in (0..count).step_by(ROWS) {
        let block_rows = ROWS.min(count - block);
        let rows = x.rows(first + block, block_rows);
        for p in panels.clone() {
            kernel.panel_sums(rows, x.k_pad, weight.panel(p), &mut acc);
            let cols = p * PANEL..((p + 1) * PANEL).min(n);
            for (r, sums) in acc.iter().enumerate().take(block_rows) {
                let sx = x.scales[first + block + r];
                let y_row = &mut out[(block + r) * n..(block + r + 1) * n];
                for (c, &sum) in cols.clone().zip(sums) {
                    let b = bias.map_or(0.0, |b| b[c]);
                    y_row[c] = sum as f32 * sx * weight.scales[c] + b;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::layers::kernel_tests::{reference_product, values};

    fn reference(x: &[f32], w: &Int8Weight, bias: &[f32]) -> Vec<f32> {
        let [n, k] = w.dims[..] else { unreachable!() };
        reference_product(x, &w.dequantize(), n, k, bias)
    }

    /// Shapes with odd inputs, partial panels and partial row blocks, on both parallel splits.
    #[test]
    fn kernels_match_the_dequantized_product_and_each_other() {
        for (rows, n, k) in [
            (1, 5, 3),
            (3, 40, 77),
            (13, 33, 64),
            (40, 16, 384),
            (64, 70, 129),
        ] {
            let x = values(rows * k, 1 + rows as u64);
            let w = Int8Weight::quantize(&values(n * k, 7 + n as u64), &[n, k]);
            let bias = values(n, 3);
            let packed = PackedInt8::pack(&w).unwrap();
            let expected = reference(&x, &w, &bias);
            let scalar = matmul(&x, &packed, Some(&bias), Int8Kernel::Scalar);
            let fast = matmul(&x, &packed, Some(&bias), Int8Kernel::detect());
            assert_eq!(scalar, fast, "the two kernels must compute identical sums");
            // Quantizing x to 8 bits moves each product by at most half a step of x (|x| ≤ 1, so
            // 0.5/127) times |w| ≤ 1; the errors are independent, so they grow like √k, not k.
            let tolerance = 0.5 / 127.0 * (k as f32).sqrt() * 3.0;
            for (i, (a, b)) in fast.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "{rows}x{n}x{k} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn zero_rows_and_empty_inputs_give_the_bias() {
        let w = Int8Weight::quantize(&values(4 * 6, 5), &[4, 6]);
        let packed = PackedInt8::pack(&w).unwrap();
        let bias = [1.0, 2.0, 3.0, 4.0];
        let y = matmul(&[0.0; 6], &packed, Some(&bias), Int8Kernel::detect());
        assert_eq!(y, bias);
        assert!(matmul(&[], &packed, None, Int8Kernel::detect()).is_empty());
        assert!(PackedInt8::pack(&Int8Weight::quantize(&[1.0; 8], &[2, 2, 2])).is_none());
    }
}
