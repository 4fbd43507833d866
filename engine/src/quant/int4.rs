//! Group-wise asymmetric int4: `w ≈ scale * (q - zero)` with `q, zero ∈ [0, 15]`, one f16 scale and
//! one integer zero point per group of `group_size` consecutive values of a row.
//!
//! Each group's range is widened to include 0, so an exact zero (a pruned weight) stays exactly
//! zero after quantization. Values are packed two per byte, the even column in the low nibble.
//!
//! The inference kernel is candle's Q4_1 (blocks of 32 with an f16 scale `d` and an f16 offset `m`,
//! `w = d * q + m`): each group becomes `group_size / 32` blocks with `d = scale` and
//! `m = -scale * zero`. `d` is exact; `m` is rounded to f16, which moves a weight by at most
//! 15 · 2⁻¹¹ ≈ 0.7% of one quantization step.

use half::f16;

use super::int8::{f16_at_least, round_clamped};
use super::parallel::rows_per_task;
use super::rows_cols;

/// Q4_1's block: 32 values.
const Q4_1_BLOCK: usize = 32;

/// An int4 weight with a scale and a zero point per group.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Weight {
    /// Logical shape; rows are all dimensions but the last (a multiple of `group_size`).
    pub dims: Vec<usize>,
    /// Values per group along the last dimension.
    pub group_size: usize,
    /// Two 4-bit values per byte, row-major; the even column is the low nibble.
    pub packed: Vec<u8>,
    /// One scale per group, `[rows, cols / group_size]` row-major.
    pub scales: Vec<f16>,
    /// One zero point (0..=15) per group, same layout as `scales`.
    pub zeros: Vec<u8>,
}

impl Int4Weight {
    /// Quantizes row-major f32 values of shape `dims`; `dims`' last entry must be a non-zero
    /// multiple of `group_size` (checked by [`super::QuantScheme::unsupported_reason`]), which is even.
    pub fn quantize(values: &[f32], dims: &[usize], group_size: usize) -> Self {
        let (rows, cols) = rows_cols(dims);
        let groups_per_row = cols / group_size;
        let mut packed = vec![0u8; values.len() / 2];
        let mut scales = vec![f16::ZERO; rows * groups_per_row];
        let mut zeros = vec![0u8; rows * groups_per_row];
        if cols > 0 {
            let per_task = rows_per_task(rows, cols);
            std::thread::scope(|s| {
                let tasks = values
                    .chunks(per_task * cols)
                    .zip(packed.chunks_mut(per_task * cols / 2))
                    .zip(scales.chunks_mut(per_task * groups_per_row))
                    .zip(zeros.chunks_mut(per_task * groups_per_row));
                for (((xs, ps), sc), zs) in tasks {
                    s.spawn(move || quantize_groups(xs, ps, sc, zs, group_size));
                }
            });
        }
        Self {
            dims: dims.to_vec(),
            group_size,
            packed,
            scales,
            zeros,
        }
    }

    /// The 4-bit value at flat index `i` (0..=15).
    fn nibble(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte & 0x0F
        } else {
            byte >> 4
        }
    }

    /// The dequantized values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let n = self.packed.len() * 2;
        (0..n)
            .map(|i| {
                let g = i / self.group_size;
                self.scales[g].to_f32() * (f32::from(self.nibble(i)) - f32::from(self.zeros[g]))
            })
            .collect()
    }

    /// Bytes of packed values, scales and zero points.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + 2 * self.scales.len() + self.zeros.len()
    }

    /// The same weight as raw GGML Q4_1 blocks (f16 `d`, f16 `m`, 16 bytes holding value `j` in the
    /// low nibble and value `j + 16` in the high nibble), for candle's quantized matmul.
    pub fn to_q4_1_bytes(&self) -> Vec<u8> {
        let n = self.packed.len() * 2;
        let mut out = Vec::with_capacity(n / Q4_1_BLOCK * 20);
        for start in (0..n).step_by(Q4_1_BLOCK) {
            let g = start / self.group_size;
            let d = self.scales[g];
            let m = f16::from_f32(-d.to_f32() * f32::from(self.zeros[g]));
            out.extend_from_slice(&d.to_le_bytes());
            out.extend_from_slice(&m.to_le_bytes());
            for j in 0..Q4_1_BLOCK / 2 {
                out.push(self.nibble(start + j) | (self.nibble(start + j + Q4_1_BLOCK / 2) << 4));
            }
        }
        out
    }
}

/// Quantizes consecutive groups of `xs` (whole rows, so whole groups).
fn quantize_groups(
    xs: &[f32],
    packed: &mut [u8],
    scales: &mut [f16],
    zeros: &mut [u8],
    group_size: usize,
) {
    let groups = xs.chunks(group_size).zip(packed.chunks_mut(group_size / 2));
    for ((group, out), (scale, zero)) in groups.zip(scales.iter_mut().zip(zeros.iter_mut())) {
        // Including 0 in the range keeps pruned (zero) weights exactly zero.
        let (lo, hi) = group.iter().fold((0f32, 0f32), |(lo, hi), &x| {
            (if x < lo { x } else { lo }, if x > hi { x } else { hi })
        });
        *scale = f16_at_least((hi - lo) / 15.0);
        let s = scale.to_f32();
        let inv = if s > 0.0 && s.is_finite() {
            1.0 / s
        } else {
            0.0
        };
        let z = round_clamped(-lo * inv, 15.0).max(0.0);
        *zero = z as u8;
        for (byte, pair) in out.iter_mut().zip(group.chunks(2)) {
            let q0 = (round_clamped(pair[0] * inv + z, 15.0).max(0.0)) as u8;
            let q1 = (round_clamped(pair[1] * inv + z, 15.0).max(0.0)) as u8;
            *byte = q0 | (q1 << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_round_trip_within_half_a_step_and_zeros_stay_zero() {
        let mut values: Vec<f32> = (0..128)
            .map(|i| ((i * 53 % 97) as f32 - 40.0) / 30.0)
            .collect();
        values[5] = 0.0;
        values[70] = 0.0;
        let w = Int4Weight::quantize(&values, &[2, 64], 32);
        assert_eq!(w.scales.len(), 4);
        assert_eq!(w.packed.len(), 64);
        let back = w.dequantize();
        for (i, (&a, &b)) in values.iter().zip(&back).enumerate() {
            let step = w.scales[i / 32].to_f32();
            assert!((a - b).abs() <= step * 0.5 + 1e-6, "{i}: {a} vs {b}");
        }
        assert_eq!(back[5], 0.0);
        assert_eq!(back[70], 0.0);
    }

    #[test]
    fn constant_and_zero_groups_are_exact_enough() {
        let w = Int4Weight::quantize(&[0.0; 32], &[1, 32], 32);
        assert!(w.dequantize().iter().all(|&v| v == 0.0));
        let w = Int4Weight::quantize(&[-0.5; 32], &[1, 32], 32);
        assert!(w.dequantize().iter().all(|&v| (v + 0.5).abs() < 1e-3));
    }
}
