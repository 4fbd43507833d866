//! The matrix product of GGML's 32-value block types behind [`super::QuantizedLinear`] on the CPU:
//! `y = x Wᵀ` with `W` in Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 blocks and `x` quantized to 8 bits per
//! 32-value block at run time.
//!
//! Why our own: candle computes Q4_1, Q5_0 and Q5_1 (and int4, stored as Q4_1 blocks) only in
//! scalar code, which made a q4_k SmolLM2 (most of whose rows fall back to q4_1) ten times slower
//! than f32, and its Q8_0 path was still 3x slower than f32 there. This is the arithmetic of
//! llama.cpp's `× q8_0`/`× q8_1` dot products: every type is written as `w = d · q + m` per block
//! (`m = 0` for Q8_0, `−8d` for Q4_0, `−16d` for Q5_0, the stored minimum for Q4_1/Q5_1), an
//! activation block as `s · a` with `a` an i8, so one block contributes `d · s · Σ q·a + m · s · Σ a`.
//! The first sum is exact integer arithmetic ([`super::block_avx2`], or plain loops); `s · Σ a` is
//! computed once per activation block.
//!
//! 4-bit types keep their nibbles as stored (16 bytes a block); 5- and 8-bit types are unpacked to
//! one byte a value at load time (32 bytes a block, against 22–34 stored), so the memory read per
//! product is that of the stored weights, within 1.5x.
//!
//! Work is split over rayon's threads by output channels: each task keeps one weight row (a few
//! hundred bytes) in cache while it runs through every activation row.

use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::int8_matmul::Int8Kernel;

/// Values per block (weights and activations).
pub(crate) const BLOCK: usize = 32;
/// Bytes of 4-bit values per block: value `i < 16` in the low nibble of byte `i`, value `16 + i`
/// in its high nibble (GGML's order).
pub(crate) const NIBBLE_BYTES: usize = 16;

/// The integer values of a weight's blocks, in the form the kernel reads.
#[derive(Clone, Debug)]
enum BlockValues {
    /// Unsigned 4-bit values as stored (Q4_0, Q4_1).
    Nibbles(Vec<u8>),
    /// One i8 a value (Q5_0 and Q5_1 as 0..=31, Q8_0 as stored).
    Bytes(Vec<i8>),
}

/// A weight `(out_features, in_features)` of a 32-value GGML block type, unpacked for [`matmul`].
#[derive(Clone, Debug)]
pub struct PackedBlocks {
    dtype: GgmlDType,
    scales: Vec<f32>,
    /// Per-block `m` (none for Q8_0).
    offsets: Option<Vec<f32>>,
    values: BlockValues,
    out_features: usize,
    in_features: usize,
}

/// Bytes per stored block of the types [`PackedBlocks`] takes.
fn block_bytes(dtype: GgmlDType) -> Option<usize> {
    match dtype {
        GgmlDType::Q4_0 => Some(18),
        GgmlDType::Q4_1 => Some(20),
        GgmlDType::Q5_0 => Some(22),
        GgmlDType::Q5_1 => Some(24),
        GgmlDType::Q8_0 => Some(34),
        _ => None,
    }
}

impl PackedBlocks {
    /// Whether [`Self::from_ggml`] takes this type.
    pub fn supports(dtype: GgmlDType) -> bool {
        block_bytes(dtype).is_some()
    }

    /// Unpacks GGML block bytes of type `dtype` of a `(out_features, in_features)` weight; `None`
    /// for another type, a byte count that does not match, or rows that are not whole blocks.
    pub fn from_ggml(
        bytes: &[u8],
        dtype: GgmlDType,
        out_features: usize,
        in_features: usize,
    ) -> Option<Self> {
        let size = block_bytes(dtype)?;
        if in_features == 0 || !in_features.is_multiple_of(BLOCK) {
            return None;
        }
        let blocks = out_features * in_features / BLOCK;
        if bytes.len() != blocks * size {
            return None;
        }
        let mut scales = Vec::with_capacity(blocks);
        let mut offsets = Vec::with_capacity(blocks);
        let mut nibbles = Vec::new();
        let mut values = Vec::new();
        for block in bytes.chunks_exact(size) {
            let half = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
            let d = half(0);
            scales.push(d);
            match dtype {
                GgmlDType::Q4_0 => {
                    offsets.push(-8.0 * d);
                    nibbles.extend_from_slice(&block[2..]);
                }
                GgmlDType::Q4_1 => {
                    offsets.push(half(2));
                    nibbles.extend_from_slice(&block[4..]);
                }
                GgmlDType::Q5_0 => {
                    offsets.push(-16.0 * d);
                    push_five_bit(&block[2..6], &block[6..], &mut values);
                }
                GgmlDType::Q5_1 => {
                    offsets.push(half(2));
                    push_five_bit(&block[4..8], &block[8..], &mut values);
                }
                _ => values.extend(block[2..].iter().map(|&b| b as i8)),
            }
        }
        let values = if nibbles.is_empty() {
            BlockValues::Bytes(values)
        } else {
            BlockValues::Nibbles(nibbles)
        };
        Some(Self {
            dtype,
            scales,
            offsets: (dtype != GgmlDType::Q8_0).then_some(offsets),
            values,
            out_features,
            in_features,
        })
    }

    /// The GGML type the weight was stored in.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Size of the input's last dimension.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Size of the output's last dimension.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    fn blocks_per_row(&self) -> usize {
        self.in_features / BLOCK
    }
}

/// A 5-bit block's 32 values (0..=31): the low nibbles from `qs` in GGML's order, bit `j` of the
/// little-endian `qh` as value `j`'s fifth bit.
fn push_five_bit(qh: &[u8], qs: &[u8], out: &mut Vec<i8>) {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let bit = |j: usize| (((high >> j) & 1) << 4) as u8;
    out.extend((0..NIBBLE_BYTES).map(|j| ((qs[j] & 0x0F) | bit(j)) as i8));
    out.extend((0..NIBBLE_BYTES).map(|j| ((qs[j] >> 4) | bit(j + NIBBLE_BYTES)) as i8));
}

/// Activations quantized per block of 32: `x ≈ scale · value`, with `scale · Σ value` kept per block.
struct QuantizedBlocks {
    values: Vec<i8>,
    scales: Vec<f32>,
    scaled_sums: Vec<f32>,
}

impl QuantizedBlocks {
    fn new(x: &[f32]) -> Self {
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i8; blocks * BLOCK];
        let mut scales = vec![0f32; blocks];
        let mut scaled_sums = vec![0f32; blocks];
        for (((block, out), scale), scaled_sum) in x
            .chunks_exact(BLOCK)
            .zip(values.chunks_exact_mut(BLOCK))
            .zip(scales.iter_mut())
            .zip(scaled_sums.iter_mut())
        {
            let (step, inv) = crate::quant::int8::symmetric_scale(block);
            *scale = step;
            let mut sum = 0i32;
            for (q, &v) in out.iter_mut().zip(block) {
                *q = crate::quant::int8::round_clamped(v * inv, 127.0) as i8;
                sum += i32::from(*q);
            }
            *scaled_sum = *scale * sum as f32;
        }
        Self {
            values,
            scales,
            scaled_sums,
        }
    }
}

/// One weight row's blocks, in the form the kernel reads.
#[derive(Clone, Copy)]
pub(crate) enum RowValues<'a> {
    Nibbles(&'a [u8]),
    Bytes(&'a [i8]),
}

/// `Σ_b d_b · s_b · Σ q·a` over one weight row and one activation row (the integer part of each
/// block's contribution, scaled).
fn scaled_dot(
    kernel: Int8Kernel,
    weights: RowValues<'_>,
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    match kernel {
        // Any CPU with VNNI or AMX has AVX2; the block product has no VNNI or AMX version.
        Int8Kernel::Avx2 | Int8Kernel::Avx512Vnni | Int8Kernel::Amx => {
            super::block_avx2::scaled_dot(weights, scales, values, activation_scales)
        }
        Int8Kernel::Scalar => scalar_scaled_dot(weights, scales, values, activation_scales),
    }
}

/// The portable version of [`super::block_avx2::scaled_dot`]: the same integer sums per block.
pub(crate) fn scalar_scaled_dot(
    weights: RowValues<'_>,
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    let mut total = 0f32;
    for (b, ((&d, a), &s)) in scales
        .iter()
        .zip(values.chunks_exact(BLOCK))
        .zip(activation_scales)
        .enumerate()
    {
        let mut sum = 0i32;
        match weights {
            RowValues::Nibbles(q) => {
                let q = &q[b * NIBBLE_BYTES..(b + 1) * NIBBLE_BYTES];
                for (i, &byte) in q.iter().enumerate() {
                    sum += i32::from(byte & 0x0F) * i32::from(a[i]);
                    sum += i32::from(byte >> 4) * i32::from(a[i + NIBBLE_BYTES]);
                }
            }
            RowValues::Bytes(q) => {
                for (&w, &x) in q[b * BLOCK..(b + 1) * BLOCK].iter().zip(a) {
                    sum += i32::from(w) * i32::from(x);
                }
            }
        }
        total += d * s * sum as f32;
    }
    total
}

/// `x · Wᵀ (+ bias)` for row-major `x` of `rows × in_features`, giving `rows × out_features`.
///
/// The caller checks that `x.len()` is a multiple of `in_features` (the layer does).
pub fn matmul(
    x: &[f32],
    weight: &PackedBlocks,
    bias: Option<&[f32]>,
    kernel: Int8Kernel,
) -> Vec<f32> {
    let (n, k) = (weight.out_features, weight.in_features);
    let rows = x.len() / k;
    if rows == 0 || n == 0 {
        return Vec::new();
    }
    let quantized = QuantizedBlocks::new(x);
    let nb = weight.blocks_per_row();
    // Computed transposed (one output channel's values for every row are contiguous), so each
    // task writes its own slice; transposed back at the end.
    let mut transposed = vec![0f32; n * rows];
    let channels_per_task = n.div_ceil(rayon::current_num_threads() * 4).max(1);
    transposed
        .par_chunks_mut(channels_per_task * rows)
        .enumerate()
        .for_each(|(task, out)| {
            let first = task * channels_per_task;
            for (i, channel_out) in out.chunks_mut(rows).enumerate() {
                let c = first + i;
                let blocks = c * nb..(c + 1) * nb;
                let row_values = match &weight.values {
                    BlockValues::Nibbles(all) => RowValues::Nibbles(
                        &all[blocks.start * NIBBLE_BYTES..blocks.end * NIBBLE_BYTES],
                    ),
                    BlockValues::Bytes(all) => {
                        RowValues::Bytes(&all[blocks.start * BLOCK..blocks.end * BLOCK])
                    }
                };
                let scales = &weight.scales[blocks.clone()];
                let offsets = weight.offsets.as_ref().map(|o| &o[blocks]);
                let b = bias.map_or(0.0, |b| b[c]);
                for (r, y) in channel_out.iter_mut().enumerate() {
                    let row = r * nb..(r + 1) * nb;
                    let integer = scaled_dot(
                        kernel,
                        row_values,
                        scales,
                        &quantized.values[row.start * BLOCK..row.end * BLOCK],
                        &quantized.scales[row.clone()],
                    );
                    let offset: f32 = offsets.map_or(0.0, |offsets| {
                        offsets
                            .iter()
                            .zip(&quantized.scaled_sums[row])
                            .map(|(m, s)| m * s)
                            .sum()
                    });
                    *y = integer + offset + b;
                }
            }
        });
    let mut y = vec![0f32; rows * n];
    for (c, column) in transposed.chunks(rows).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            y[r * n + c] = v;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gguf;
    use candle_core::Device;

    use crate::layers::kernel_tests::{reference_product as reference, values};

    const TYPES: [GgmlDType; 5] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
    ];

    fn dequantized(bytes: &[u8], dtype: GgmlDType, n: usize, k: usize) -> Vec<f32> {
        let q = gguf::qtensor_from_bytes(bytes, &[n, k], dtype, &Device::Cpu).unwrap();
        q.dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// The unpacked `d · q + m` equals candle's dequantization of the same blocks, value by value.
    #[test]
    fn unpacking_matches_candles_dequantization() {
        let (n, k) = (6, 96);
        let w = values(n * k, 11);
        for dtype in TYPES {
            let bytes = gguf::quantize_to_bytes(&w, &[n, k], dtype).unwrap();
            let expected = dequantized(&bytes, dtype, n, k);
            let packed = PackedBlocks::from_ggml(&bytes, dtype, n, k).unwrap();
            for (b, (&d, chunk)) in packed.scales.iter().zip(expected.chunks(BLOCK)).enumerate() {
                let m = packed.offsets.as_ref().map_or(0.0, |o| o[b]);
                for (i, &want) in chunk.iter().enumerate() {
                    let q = match &packed.values {
                        BlockValues::Nibbles(all) => {
                            let byte = all[b * NIBBLE_BYTES + i % NIBBLE_BYTES];
                            f32::from(if i < NIBBLE_BYTES {
                                byte & 0x0F
                            } else {
                                byte >> 4
                            })
                        }
                        BlockValues::Bytes(all) => f32::from(all[b * BLOCK + i]),
                    };
                    let got = d * q + m;
                    assert!(
                        (got - want).abs() <= 1e-6 * (1.0 + want.abs()),
                        "{dtype:?} block {b} value {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_match_the_dequantized_product_and_each_other() {
        // Odd block counts (which candle's kernels refuse), one row (decoding) and many.
        for (rows, n, k) in [(1, 5, 32), (3, 40, 96), (13, 33, 64), (70, 17, 576)] {
            let x = values(rows * k, 1 + rows as u64);
            let w = values(n * k, 7 + n as u64);
            let bias = values(n, 3);
            for dtype in TYPES {
                let bytes = gguf::quantize_to_bytes(&w, &[n, k], dtype).unwrap();
                let deq = dequantized(&bytes, dtype, n, k);
                let packed = PackedBlocks::from_ggml(&bytes, dtype, n, k).unwrap();
                let expected = reference(&x, &deq, n, k, &bias);
                let scalar = matmul(&x, &packed, Some(&bias), Int8Kernel::Scalar);
                let fast = matmul(&x, &packed, Some(&bias), Int8Kernel::detect());
                // Quantizing x to 8 bits per block moves each product by at most half a step of
                // x (|x| ≤ 1: 0.5/127) times |w| ≤ 1; independent errors grow like √k.
                let tolerance = 0.5 / 127.0 * (k as f32).sqrt() * 3.0;
                for (i, ((a, b), e)) in fast.iter().zip(&scalar).zip(&expected).enumerate() {
                    let at = format!("{dtype:?} {rows}x{n}x{k} [{i}]");
                    assert!((a - b).abs() <= 1e-4 * (1.0 + e.abs()), "{at}: {a} vs {b}");
                    assert!((a - e).abs() <= tolerance, "{at}: {a} vs {e}");
                }
            }
        }
    }

    #[test]
    fn malformed_blocks_and_empty_inputs() {
        let q4_1 = GgmlDType::Q4_1;
        assert!(
            PackedBlocks::from_ggml(&[0; 20], q4_1, 1, 16).is_none(),
            "not whole blocks"
        );
        assert!(
            PackedBlocks::from_ggml(&[0; 19], q4_1, 1, 32).is_none(),
            "short"
        );
        assert!(PackedBlocks::from_ggml(&[0; 144], GgmlDType::Q4K, 1, 256).is_none());
        let packed = PackedBlocks::from_ggml(&[0; 40], q4_1, 2, 32).unwrap();
        assert!(matmul(&[], &packed, None, Int8Kernel::detect()).is_empty());
        let y = matmul(&[0.5; 32], &packed, Some(&[1.0, 2.0]), Int8Kernel::detect());
        assert_eq!(y, [1.0, 2.0], "zero blocks give the bias");
    }
}
