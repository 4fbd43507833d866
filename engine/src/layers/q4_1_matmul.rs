//! The Q4_1 matrix product behind [`super::QuantizedLinear`] on the CPU: `y = x Wᵀ` with `W` in
//! GGML's Q4_1 blocks and `x` quantized to 8 bits per 32-value block at run time.
//!
//! Why our own: candle computes Q4_1 (and int4, which is stored as Q4_1 blocks) only in scalar code,
//! which made a q4_k SmolLM2 (most of whose rows fall back to q4_1) ten times slower than f32. This is
//! the same arithmetic as llama.cpp's `q4_1 × q8_1` dot product: a weight block is `d · q + m` with
//! `q` in 0..=15, an activation block `s · a` with `a` an i8, so one block contributes
//! `d · s · Σ q·a + m · s · Σ a`. The first sum is exact integer arithmetic (AVX2 `vpmaddubsw` then
//! `vpmaddwd` in [`super::q4_1_avx2`], or plain loops); `s · Σ a` is computed once per activation
//! block.
//!
//! Work is split over rayon's threads by output channels: each task keeps one weight row (a few
//! hundred bytes) in cache while it runs through every activation row.

use rayon::prelude::*;

use super::int8_matmul::Int8Kernel;

/// Values per Q4_1 (and activation) block.
pub(crate) const BLOCK: usize = 32;
/// Bytes of 4-bit values per block: value `i < 16` in the low nibble of byte `i`, value `16 + i`
/// in its high nibble.
pub(crate) const NIBBLE_BYTES: usize = 16;
/// Bytes per GGML Q4_1 block: f16 `d`, f16 `m`, then the nibbles.
const Q4_1_BLOCK_BYTES: usize = 20;

/// A Q4_1 weight `(out_features, in_features)` unpacked for [`matmul`]: the block scales and
/// offsets as f32, the nibbles as stored.
#[derive(Clone, Debug)]
pub struct PackedQ4_1 {
    scales: Vec<f32>,
    offsets: Vec<f32>,
    nibbles: Vec<u8>,
    out_features: usize,
    in_features: usize,
}

impl PackedQ4_1 {
    /// Unpacks GGML Q4_1 block bytes of a `(out_features, in_features)` weight; `None` when the
    /// byte count does not match or the rows are not whole blocks.
    pub fn from_ggml(bytes: &[u8], out_features: usize, in_features: usize) -> Option<Self> {
        if in_features == 0 || in_features % BLOCK != 0 {
            return None;
        }
        let blocks = out_features * in_features / BLOCK;
        if bytes.len() != blocks * Q4_1_BLOCK_BYTES {
            return None;
        }
        let mut packed = Self {
            scales: Vec::with_capacity(blocks),
            offsets: Vec::with_capacity(blocks),
            nibbles: Vec::with_capacity(blocks * NIBBLE_BYTES),
            out_features,
            in_features,
        };
        for block in bytes.chunks_exact(Q4_1_BLOCK_BYTES) {
            let half = |at: usize| half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32();
            packed.scales.push(half(0));
            packed.offsets.push(half(2));
            packed.nibbles.extend_from_slice(&block[4..]);
        }
        Some(packed)
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
            let amax = block
                .iter()
                .fold(0f32, |m, &v| if v.abs() > m { v.abs() } else { m });
            *scale = amax / 127.0;
            let inv = if amax > 0.0 && amax.is_finite() {
                127.0 / amax
            } else {
                0.0
            };
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

/// `Σ_b d_b · s_b · Σ q·a` over one weight row and one activation row (the integer part of each
/// block's contribution, scaled).
fn scaled_dot(
    kernel: Int8Kernel,
    nibbles: &[u8],
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    match kernel {
        Int8Kernel::Avx2 => {
            super::q4_1_avx2::scaled_dot(nibbles, scales, values, activation_scales)
        }
        Int8Kernel::Scalar => scalar_scaled_dot(nibbles, scales, values, activation_scales),
    }
}

/// The portable version of [`super::q4_1_avx2::scaled_dot`]: the same integer sums per block.
pub(crate) fn scalar_scaled_dot(
    nibbles: &[u8],
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    let mut total = 0f32;
    for (((q, &d), a), &s) in nibbles
        .chunks_exact(NIBBLE_BYTES)
        .zip(scales)
        .zip(values.chunks_exact(BLOCK))
        .zip(activation_scales)
    {
        let mut sum = 0i32;
        for (i, &byte) in q.iter().enumerate() {
            sum += i32::from(byte & 0x0F) * i32::from(a[i]);
            sum += i32::from(byte >> 4) * i32::from(a[i + NIBBLE_BYTES]);
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
    weight: &PackedQ4_1,
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
                let nibbles =
                    &weight.nibbles[blocks.start * NIBBLE_BYTES..blocks.end * NIBBLE_BYTES];
                let scales = &weight.scales[blocks.clone()];
                let offsets = &weight.offsets[blocks];
                let b = bias.map_or(0.0, |b| b[c]);
                for (r, y) in channel_out.iter_mut().enumerate() {
                    let row = r * nb..(r + 1) * nb;
                    let integer = scaled_dot(
                        kernel,
                        nibbles,
                        scales,
                        &quantized.values[row.start * BLOCK..row.end * BLOCK],
                        &quantized.scales[row.clone()],
                    );
                    let offset: f32 = offsets
                        .iter()
                        .zip(&quantized.scaled_sums[row])
                        .map(|(m, s)| m * s)
                        .sum();
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
    use candle_core::quantized::GgmlDType;

    use crate::layers::kernel_tests::{reference_product as reference, values};

    #[test]
    fn kernels_match_the_dequantized_product_and_each_other() {
        // Odd block counts (which candle's kernel refuses), one row (decoding) and many.
        for (rows, n, k) in [(1, 5, 32), (3, 40, 96), (13, 33, 64), (70, 17, 576)] {
            let x = values(rows * k, 1 + rows as u64);
            let w = values(n * k, 7 + n as u64);
            let bytes = gguf::quantize_to_bytes(&w, &[n, k], GgmlDType::Q4_1).unwrap();
            let q = gguf::qtensor_from_bytes(
                &bytes,
                &[n, k],
                GgmlDType::Q4_1,
                &candle_core::Device::Cpu,
            )
            .unwrap();
            let deq: Vec<f32> = q
                .dequantize(&candle_core::Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let bias = values(n, 3);
            let packed = PackedQ4_1::from_ggml(&bytes, n, k).unwrap();
            let expected = reference(&x, &deq, n, k, &bias);
            let scalar = matmul(&x, &packed, Some(&bias), Int8Kernel::Scalar);
            let fast = matmul(&x, &packed, Some(&bias), Int8Kernel::detect());
            // Quantizing x to 8 bits per block moves each product by at most half a step of x
            // (|x| ≤ 1: 0.5/127) times |w| ≤ 1; independent errors grow like √k.
            let tolerance = 0.5 / 127.0 * (k as f32).sqrt() * 3.0;
            for (i, ((a, b), e)) in fast.iter().zip(&scalar).zip(&expected).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + e.abs()),
                    "{rows}x{n}x{k} [{i}]: {a} vs {b}"
                );
                assert!(
                    (a - e).abs() <= tolerance,
                    "{rows}x{n}x{k} [{i}]: {a} vs {e}"
                );
            }
        }
    }

    #[test]
    fn malformed_blocks_and_empty_inputs() {
        assert!(
            PackedQ4_1::from_ggml(&[0; 20], 1, 16).is_none(),
            "not whole blocks"
        );
        assert!(PackedQ4_1::from_ggml(&[0; 19], 1, 32).is_none(), "short");
        let packed = PackedQ4_1::from_ggml(&[0; 40], 2, 32).unwrap();
        assert!(matmul(&[], &packed, None, Int8Kernel::detect()).is_empty());
        let y = matmul(&[0.5; 32], &packed, Some(&[1.0, 2.0]), Int8Kernel::detect());
        assert_eq!(y, [1.0, 2.0], "zero blocks give the bias");
    }
}
