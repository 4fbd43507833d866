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
//! The AVX2 kernel lives in [`super::int8_avx2`], AVX-512 VNNI's in [`super::int8_vnni`] and AMX's
//! in [`super::int8_amx`] (their `unsafe` code stays there, but for the uninitialised output the
//! AMX path writes here); a portable scalar kernel computes the very same integers and floats on
//! other CPUs. Work is split over rayon's threads by rows
//! of `x` (prompts, batches) or, for a handful of rows (decoding), by panels.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{int8_amx, int8_avx2, int8_vnni};
use crate::quant::Int8Weight;

/// Output channels per packed panel of the AVX2 and scalar kernels (two AVX2 registers of 8 i32
/// lanes).
pub(crate) const PANEL: usize = 16;
/// Rows of `x` one AVX2 kernel call handles: 6 rows × 2 registers = 12 accumulators, which with two
/// weight registers and one broadcast fits AVX2's 16 registers.
pub(crate) const ROWS: usize = 6;
/// Bytes of quantized activation rows the kernels run every panel over before moving on: they are
/// read once per panel, so they should stay in L2 (512 KiB on the machines we measured) beside the
/// panel and the output.
pub(crate) const CHUNK_BYTES: usize = 128 * 1024;

/// An int8 weight packed for [`matmul`] with one kernel's layout.
#[derive(Clone, Debug)]
pub struct PackedInt8 {
    /// The kernel the layout is for.
    kernel: Int8Kernel,
    /// AVX2/scalar: `panels × (k_pad / 2) × PANEL × 2` values; VNNI and AMX: `panels × (k_pad / 4)
    /// × 32 × 4` (see [`int8_vnni`]).
    packed: Vec<i8>,
    /// One scale per output channel, padded with zeros to whole panels.
    scales: Vec<f32>,
    /// VNNI and AMX only: `128 · Σₖ w[n, k]` per output channel (the unsigned activations'
    /// offset), padded.
    offsets: Vec<i32>,
    out_features: usize,
    in_features: usize,
    /// `in_features` rounded up to the kernel's multiple of input columns (2, 4 for VNNI, 64 for
    /// AMX's tile rows).
    k_pad: usize,
}

impl PackedInt8 {
    /// Packs a 2-D int8 weight `(out_features, in_features)` for the fastest kernel of this CPU;
    /// `None` when it is not 2-D.
    pub fn pack(weight: &Int8Weight) -> Option<Self> {
        Self::pack_for(weight, Int8Kernel::detect())
    }

    /// Packs a 2-D int8 weight for `kernel`; `None` when it is not 2-D.
    ///
    /// # Panics
    /// Later, in [`matmul`], when `kernel` is one this CPU cannot run.
    pub fn pack_for(weight: &Int8Weight, kernel: Int8Kernel) -> Option<Self> {
        let [out_features, in_features] = weight.dims[..] else {
            return None;
        };
        let (panel_width, group) = kernel.panel_shape();
        let k_pad = in_features.next_multiple_of(kernel.k_multiple());
        let panels = out_features.div_ceil(panel_width);
        let mut packed = vec![0i8; panels * k_pad * panel_width];
        let mut offsets = vec![0i32; panels * panel_width];
        for (n, row) in weight.qweight.chunks(in_features.max(1)).enumerate() {
            let panel = &mut packed[(n / panel_width) * k_pad * panel_width..];
            let lane = n % panel_width;
            for (k, &q) in row.iter().enumerate() {
                panel[(k / group) * panel_width * group + lane * group + k % group] = q;
            }
            if kernel.unsigned_activations() {
                offsets[n] = 128 * row.iter().map(|&q| i32::from(q)).sum::<i32>();
            }
        }
        let mut scales: Vec<f32> = weight.scales.iter().map(|s| s.to_f32()).collect();
        scales.resize(panels * panel_width, 0.0);
        Some(Self {
            kernel,
            packed,
            scales,
            offsets,
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

    /// The kernel this weight is packed for.
    pub fn kernel(&self) -> Int8Kernel {
        self.kernel
    }

    fn panels(&self) -> usize {
        self.out_features.div_ceil(self.kernel.panel_shape().0)
    }

    fn panel(&self, p: usize) -> &[i8] {
        &self.packed[p * self.k_pad * PANEL..(p + 1) * self.k_pad * PANEL]
    }

    fn avx2<'a>(&'a self, bias: Option<&'a [f32]>) -> int8_avx2::Weight<'a> {
        int8_avx2::Weight {
            packed: &self.packed,
            scales: &self.scales,
            bias,
            n: self.out_features,
            k_pad: self.k_pad,
        }
    }

    fn vnni<'a>(&'a self, bias: Option<&'a [f32]>) -> int8_vnni::Weight<'a> {
        int8_vnni::Weight {
            packed: &self.packed,
            offsets: &self.offsets,
            scales: &self.scales,
            bias,
            n: self.out_features,
            k_pad: self.k_pad,
        }
    }
}

/// Rows of `x` quantized to i8 values per row, one scale each: held as i16 (the AVX2 kernel's
/// multiplier width) or as `q + 128` unsigned bytes (VNNI's and AMX's).
struct QuantizedRows {
    values: RowValues,
    scales: Vec<f32>,
    k_pad: usize,
}

enum RowValues {
    I16(Vec<i16>),
    U8(Vec<u8>),
}

impl QuantizedRows {
    fn new(x: &[f32], weight: &PackedInt8, fixed: Option<f32>) -> Self {
        let (in_features, k_pad) = (weight.in_features, weight.k_pad);
        if weight.kernel.unsigned_activations() {
            // AMX: whole tiles of rows, so the last block's tile loads stay in the buffer (the
            // padding rows' sums are computed and dropped).
            let row_multiple = match weight.kernel {
                Int8Kernel::Amx => int8_amx::TILE_ROWS,
                _ => 1,
            };
            let (values, scales) =
                int8_vnni::quantize_rows(x, in_features, k_pad, fixed, row_multiple);
            return Self {
                values: RowValues::U8(values),
                scales,
                k_pad,
            };
        }
        let (values, scales) = if weight.kernel == Int8Kernel::Avx2 {
            int8_avx2::quantize_rows(x, in_features, k_pad, fixed)
        } else {
            quantize_rows_i16(x, in_features, k_pad, fixed)
        };
        Self {
            values: RowValues::I16(values),
            scales,
            k_pad,
        }
    }

    fn rows(&self) -> usize {
        self.scales.len()
    }
}

/// Rows of `x` (`k` values each) quantized to int8 per row, `k_pad` per row, with their scales
/// (each row's own, or `fixed` for every row): each rounded value `q ∈ [-127, 127]` is stored as
/// `store(q)` (an i16 for AVX2 and scalar), padding as `pad`. Inlined so each
/// kernel's caller compiles, and vectorizes, it with its own instruction set.
#[inline(always)]
pub(crate) fn quantize_rows_as<T: Copy>(
    x: &[f32],
    k: usize,
    k_pad: usize,
    fixed: Option<f32>,
    pad: T,
    store: impl Fn(f32) -> T,
) -> (Vec<T>, Vec<f32>) {
    let rows = x.len() / k.max(1);
    let mut values = vec![pad; rows * k_pad];
    let mut scales = vec![0f32; rows];
    for ((row, out), scale) in x
        .chunks(k.max(1))
        .zip(values.chunks_mut(k_pad.max(1)))
        .zip(scales.iter_mut())
    {
        let (step, inv) = crate::quant::int8::row_scale(row, fixed);
        *scale = step;
        for (q, &v) in out.iter_mut().zip(row) {
            *q = store(crate::quant::int8::round_clamped(v * inv, 127.0));
        }
    }
    (values, scales)
}

/// [`quantize_rows_as`] into i16 values (the AVX2 and scalar kernels' width).
#[inline(always)]
pub(crate) fn quantize_rows_i16(
    x: &[f32],
    k: usize,
    k_pad: usize,
    fixed: Option<f32>,
) -> (Vec<i16>, Vec<f32>) {
    quantize_rows_as(x, k, k_pad, fixed, 0, |q| q as i16)
}

/// Which integer kernel the CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AMX-INT8 `tdpbusd` on 16 × 64 tiles, on the VNNI kernel's operands, detected at run time.
    Amx,
    /// AVX-512 VNNI `vpdpbusd` on unsigned-offset activations, detected at run time.
    Avx512Vnni,
    /// AVX2 `vpmaddwd` on i16-widened values, detected at run time.
    Avx2,
    /// Plain Rust loops, for CPUs without AVX2.
    Scalar,
}

impl Int8Kernel {
    /// The fastest int8 × int8 kernel this CPU supports.
    pub fn detect() -> Self {
        if int8_amx::available() {
            Self::Amx
        } else if int8_vnni::available() {
            Self::Avx512Vnni
        } else {
            Self::detect_blocks()
        }
    }

    /// The kernel the 32-value block product ([`super::block_matmul`]) runs on this CPU: AVX2 or
    /// scalar (it has no VNNI version).
    pub fn detect_blocks() -> Self {
        if super::int8_avx2::available() {
            Self::Avx2
        } else {
            Self::Scalar
        }
    }

    /// Every kernel this CPU can run, fastest first (the tests compare them all).
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        if int8_amx::available() {
            kernels.push(Self::Amx);
        }
        if int8_vnni::available() {
            kernels.push(Self::Avx512Vnni);
        }
        if super::int8_avx2::available() {
            kernels.push(Self::Avx2);
        }
        kernels.push(Self::Scalar);
        kernels
    }

    /// Output channels per packed panel and input columns per packed group.
    fn panel_shape(self) -> (usize, usize) {
        match self {
            Self::Amx | Self::Avx512Vnni => (int8_vnni::PANEL, int8_vnni::GROUP),
            Self::Avx2 | Self::Scalar => (PANEL, 2),
        }
    }

    /// The multiple the input dimension is padded to: the packed group, or for AMX a whole tile
    /// row.
    fn k_multiple(self) -> usize {
        match self {
            Self::Amx => int8_amx::K_STEP,
            _ => self.panel_shape().1,
        }
    }

    /// Whether activations are stored as `q + 128` unsigned bytes, with the weight's offsets.
    fn unsigned_activations(self) -> bool {
        matches!(self, Self::Amx | Self::Avx512Vnni)
    }

    /// Rows of `x` one kernel call handles.
    fn rows_per_call(self) -> usize {
        match self {
            Self::Amx => int8_amx::ROWS,
            Self::Avx512Vnni => int8_vnni::ROWS,
            Self::Avx2 | Self::Scalar => ROWS,
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

/// `x · Wᵀ (+ bias)` for row-major `x` of `rows × in_features`, giving `rows × out_features`, on
/// the kernel the weight is packed for.
///
/// Each parallel task quantizes its own rows, so that work is split over the threads too.
/// The caller checks that `x.len()` is a multiple of `in_features` (the layer does).
pub fn matmul(x: &[f32], weight: &PackedInt8, bias: Option<&[f32]>) -> Vec<f32> {
    matmul_with_input_scale(x, weight, bias, None)
}

/// As [`matmul`], with every row of `x` quantized with `input_scale` when given (static
/// quantization: a scale calibrated beforehand, values beyond `127 · scale` clamped) instead of
/// its own.
pub fn matmul_with_input_scale(
    x: &[f32],
    weight: &PackedInt8,
    bias: Option<&[f32]>,
    input_scale: Option<f32>,
) -> Vec<f32> {
    let (n, k) = (weight.out_features, weight.in_features.max(1));
    let rows = x.len() / k;
    if rows == 0 || n == 0 {
        return vec![0f32; rows * n];
    }
    let threads = rayon::current_num_threads();
    let block = weight.kernel.rows_per_call();
    if weight.kernel == Int8Kernel::Amx && rows >= block * threads {
        // As below, into an output that is not zero-filled first: the AMX kernel writes every
        // output of its rows for every panel. (Filling it took a tenth of MiniLM's int8 forward at
        // batch 32, more than some of the products.)
        let per_task = rows.div_ceil(threads * 4).next_multiple_of(block);
        let mut y: Vec<f32> = Vec::with_capacity(rows * n);
        y.spare_capacity_mut()[..rows * n]
            .par_chunks_mut(per_task * n)
            .zip(x.par_chunks(per_task * k))
            .for_each(|(out, x)| {
                let quantized = QuantizedRows::new(x, weight, input_scale);
                amx_rows(&quantized, weight, 0..weight.panels(), bias, out);
            });
        // SAFETY: the tasks' chunks cover all `rows × n` outputs, and `amx_rows` writes every
        // column of every row of its chunk (all the panels).
        unsafe { y.set_len(rows * n) };
        return y;
    }
    let mut y = vec![0f32; rows * n];
    if rows >= block * threads {
        // Enough rows: each task owns whole output rows, so it writes its slice directly.
        let per_task = rows.div_ceil(threads * 4).next_multiple_of(block);
        y.par_chunks_mut(per_task * n)
            .zip(x.par_chunks(per_task * k))
            .for_each(|(out, x)| {
                let quantized = QuantizedRows::new(x, weight, input_scale);
                row_block(&quantized, weight, 0..weight.panels(), bias, out);
            });
    } else {
        // Few rows (decoding): split the panels instead and gather each task's columns.
        let quantized = QuantizedRows::new(x, weight, input_scale);
        let panels = weight.panels();
        let panel_width = weight.kernel.panel_shape().0;
        let per_task = panels.div_ceil(threads).max(1);
        let parts: Vec<(usize, Vec<f32>)> = (0..panels)
            .step_by(per_task)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|start| {
                let end = (start + per_task).min(panels);
                let mut part = vec![0f32; rows * n];
                row_block(&quantized, weight, start..end, bias, &mut part);
                (start, part)
            })
            .collect();
        for (start, part) in parts {
            let cols = start * panel_width..((start + per_task) * panel_width).min(n);
            for (dst, src) in y.chunks_mut(n).zip(part.chunks(n)) {
                dst[cols.clone()].copy_from_slice(&src[cols.clone()]);
            }
        }
    }
    y
}

/// [`row_block`] on the AMX kernel, into outputs that may be uninitialised before.
fn amx_rows(
    x: &QuantizedRows,
    weight: &PackedInt8,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) {
    let (n, k_pad) = (weight.out_features, x.k_pad);
    let RowValues::U8(values) = &x.values else {
        unreachable!("the AMX kernel's rows are unsigned bytes");
    };
    // Tile products are cheap enough that the weight's reads from L2 do not matter: each block of
    // rows runs over every panel.
    let w = weight.vnni(bias);
    for block in (0..x.rows()).step_by(int8_amx::ROWS) {
        let count = int8_amx::ROWS.min(x.rows() - block);
        int8_amx::block_product(
            &values[block * k_pad..],
            &x.scales[block..block + count],
            &w,
            panels.clone(),
            &mut out[block * n..(block + count) * n],
        );
    }
}

/// Computes every row of `x` for panels `panels` into `out` (`rows × n`).
fn row_block(
    x: &QuantizedRows,
    weight: &PackedInt8,
    panels: std::ops::Range<usize>,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let n = weight.out_features;
    let k_pad = x.k_pad;
    match &x.values {
        RowValues::U8(_) if weight.kernel == Int8Kernel::Amx => {
            // SAFETY: the same memory, viewed as possibly uninitialised; only initialised floats
            // are written through it.
            let out = unsafe { &mut *(std::ptr::from_mut(out) as *mut [MaybeUninit<f32>]) };
            amx_rows(x, weight, panels, bias, out);
        }
        RowValues::U8(values) => {
            // As the AVX2 kernel does: every panel over a chunk of rows that stays in L2, so the
            // weight is read from memory once per chunk, not once per kernel call.
            let w = weight.vnni(bias);
            let chunk = (CHUNK_BYTES / k_pad.max(1) / int8_vnni::ROWS).max(1) * int8_vnni::ROWS;
            for first in (0..x.rows()).step_by(chunk) {
                let last = (first + chunk).min(x.rows());
                for p in panels.clone() {
                    for block in (first..last).step_by(int8_vnni::ROWS) {
                        let count = int8_vnni::ROWS.min(last - block);
                        int8_vnni::block_product(
                            &values[block * k_pad..(block + count) * k_pad],
                            &x.scales[block..block + count],
                            &w,
                            p..p + 1,
                            &mut out[block * n..(block + count) * n],
                        );
                    }
                }
            }
        }
        RowValues::I16(values) if weight.kernel == Int8Kernel::Avx2 => {
            super::int8_avx2::block_product(values, &x.scales, &weight.avx2(bias), panels, out);
        }
        RowValues::I16(values) => {
            let mut acc = [[0i32; PANEL]; ROWS];
            for p in panels {
                for block in (0..x.rows()).step_by(ROWS) {
                    let count = ROWS.min(x.rows() - block);
                    let rows = &values[block * k_pad..(block + count) * k_pad];
                    scalar_panel_sums(rows, count, k_pad, weight.panel(p), &mut acc);
                    let cols = p * PANEL..((p + 1) * PANEL).min(n);
                    for (r, sums) in acc.iter().enumerate().take(count) {
                        let sx = x.scales[block + r];
                        let y_row = &mut out[(block + r) * n..(block + r + 1) * n];
                        for (c, &sum) in cols.clone().zip(sums) {
                            let b = bias.map_or(0.0, |b| b[c]);
                            // The VNNI kernel's formula, so every kernel gives identical floats.
                            y_row[c] = sum as f32 * (sx * weight.scales[c]) + b;
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

    use crate::layers::kernel_tests::{reference_product, values};

    fn reference(x: &[f32], w: &Int8Weight, bias: &[f32]) -> Vec<f32> {
        let [n, k] = w.dims[..] else { unreachable!() };
        reference_product(x, &w.dequantize(), n, k, bias)
    }

    /// Every kernel this CPU has against the scalar one, packed for each.
    fn every_kernel(
        x: &[f32],
        w: &Int8Weight,
        bias: Option<&[f32]>,
    ) -> Vec<(Int8Kernel, Vec<f32>)> {
        Int8Kernel::available()
            .into_iter()
            .map(|kernel| {
                let packed = PackedInt8::pack_for(w, kernel).unwrap();
                assert_eq!(packed.kernel(), kernel);
                (kernel, matmul(x, &packed, bias))
            })
            .collect()
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
            (50, 97, 6),
        ] {
            let x = values(rows * k, 1 + rows as u64);
            let w = Int8Weight::quantize(&values(n * k, 7 + n as u64), &[n, k]);
            let bias = values(n, 3);
            let expected = reference(&x, &w, &bias);
            let results = every_kernel(&x, &w, Some(&bias));
            let (_, scalar) = results.last().unwrap();
            for (kernel, fast) in &results {
                assert_eq!(
                    scalar, fast,
                    "{kernel:?} must compute the scalar kernel's sums"
                );
            }
            // Quantizing x to 8 bits moves each product by at most half a step of x (|x| ≤ 1, so
            // 0.5/127) times |w| ≤ 1; the errors are independent, so they grow like √k, not k.
            let tolerance = 0.5 / 127.0 * (k as f32).sqrt() * 3.0;
            for (i, (a, b)) in scalar.iter().zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "{rows}x{n}x{k} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    /// A task's rows beyond one L2 chunk, with a partial last chunk, a partial last row block and a
    /// partial last panel: the chunked walk writes every output once, with the scalar kernel's
    /// values. (Through [`matmul`] a task rarely holds more than a chunk, so this calls the
    /// per-task function directly.)
    #[test]
    fn rows_beyond_one_chunk_are_all_computed() {
        let (rows, n, k) = (100, 33, 1536);
        assert!(
            CHUNK_BYTES / (2 * k) < rows / 2,
            "the rows must span several chunks"
        );
        let x = values(rows * k, 5);
        let w = Int8Weight::quantize(&values(n * k, 9), &[n, k]);
        let bias = values(n, 2);
        let results: Vec<(Int8Kernel, Vec<f32>)> = Int8Kernel::available()
            .into_iter()
            .map(|kernel| {
                let packed = PackedInt8::pack_for(&w, kernel).unwrap();
                let quantized = QuantizedRows::new(&x, &packed, None);
                let mut out = vec![f32::NAN; rows * n];
                row_block(
                    &quantized,
                    &packed,
                    0..packed.panels(),
                    Some(&bias),
                    &mut out,
                );
                (kernel, out)
            })
            .collect();
        let (_, scalar) = results.last().unwrap();
        let expected = reference(&x, &w, &bias);
        let tolerance = 0.5 / 127.0 * (k as f32).sqrt() * 3.0;
        for (i, (a, b)) in scalar.iter().zip(&expected).enumerate() {
            assert!((a - b).abs() <= tolerance, "[{i}]: {a} vs {b}");
        }
        for (kernel, out) in &results {
            assert_eq!(
                out, scalar,
                "{kernel:?} must compute the scalar kernel's floats"
            );
        }
    }

    /// Activations and weights at ±127, the values whose pairwise u8 × i8 sums saturate AVX2's
    /// `vpmaddubsw` (2 · 255 · 127 > 32767): every kernel must give the exact integer sums.
    #[test]
    fn extreme_values_do_not_saturate() {
        let (rows, n, k) = (30, 40, 1536);
        // Each row's largest magnitude is 1, so its values quantize to exactly ±127 (and 0).
        let x: Vec<f32> = (0..rows * k)
            .map(|i| match (i / k + i % 7) % 3 {
                0 => 1.0,
                1 => -1.0,
                _ => 0.0,
            })
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| if (i / k) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let w = Int8Weight::quantize(&w, &[n, k]);
        assert!(w.qweight.iter().all(|&q| q.abs() == 127));
        for (kernel, y) in every_kernel(&x, &w, None) {
            for (i, &got) in y.iter().enumerate() {
                let (r, c) = (i / n, i % n);
                let sum: i64 = (0..k)
                    .map(|j| {
                        let qx = (x[r * k + j] * 127.0) as i64;
                        qx * i64::from(w.qweight[c * k + j])
                    })
                    .sum();
                let expected = sum as f32 * (1.0 / 127.0 * w.scales[c].to_f32());
                assert_eq!(got, expected, "{kernel:?} [{r}, {c}]");
            }
        }
    }

    /// A NaN among a row's values is left out of its scale and quantizes to 0 on every kernel,
    /// so the row's other products stay finite and the kernels agree bit for bit.
    #[test]
    fn nan_inputs_quantize_to_zero_on_every_kernel() {
        let (rows, n, k) = (37, 40, 70);
        let mut x = values(rows * k, 4);
        for r in 0..rows {
            x[r * k + (r * 13) % k] = f32::NAN;
        }
        let w = Int8Weight::quantize(&values(n * k, 6), &[n, k]);
        let results = every_kernel(&x, &w, Some(&values(n, 8)));
        let (_, scalar) = results.last().unwrap();
        assert!(scalar.iter().all(|v| v.is_finite()));
        for (kernel, fast) in &results {
            let bits = |v: &Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(fast), bits(scalar), "{kernel:?}");
        }
    }

    /// Static quantization: every row takes the given scale, values beyond `127 · scale` clamp,
    /// and every kernel computes the same integers as the reference.
    #[test]
    fn a_fixed_input_scale_quantizes_every_row_with_it() {
        let (rows, n, k) = (9, 20, 37);
        let w = Int8Weight::quantize(&values(n * k, 3), &[n, k]);
        // Rows of growing magnitude: the later ones exceed the clip of 2.0 and saturate.
        let x: Vec<f32> = values(rows * k, 11)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i / k) as f32)
            .collect();
        let scale = 2.0 / 127.0;
        let qx: Vec<f32> = x
            .iter()
            .map(|v| crate::quant::int8::round_clamped(v / scale, 127.0))
            .collect();
        for kernel in Int8Kernel::available() {
            let packed = PackedInt8::pack_for(&w, kernel).unwrap();
            let y = matmul_with_input_scale(&x, &packed, None, Some(scale));
            for r in 0..rows {
                for c in 0..n {
                    let dot: f32 = (0..k)
                        .map(|j| qx[r * k + j] * f32::from(w.qweight[c * k + j]))
                        .sum();
                    let expected = dot * scale * w.scales[c].to_f32();
                    let got = y[r * n + c];
                    assert!(
                        (got - expected).abs() <= 1e-4 * expected.abs().max(1.0),
                        "{kernel:?} [{r}, {c}]: {got} vs {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn zero_rows_and_empty_inputs_give_the_bias() {
        let w = Int8Weight::quantize(&values(4 * 6, 5), &[4, 6]);
        let bias = [1.0, 2.0, 3.0, 4.0];
        for kernel in Int8Kernel::available() {
            let packed = PackedInt8::pack_for(&w, kernel).unwrap();
            let y = matmul(&[0.0; 6], &packed, Some(&bias));
            assert_eq!(y, bias, "{kernel:?}");
            assert!(matmul(&[], &packed, None).is_empty());
        }
        assert!(PackedInt8::pack(&Int8Weight::quantize(&[1.0; 8], &[2, 2, 2])).is_none());
    }
}
