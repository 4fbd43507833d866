//! 4-bit NormalFloat (NF4, Dettmers et al. 2023, the QLoRA paper): each block of 64 consecutive
//! values of a row is scaled by its largest magnitude (`absmax`, kept in f32) into `[-1, 1]` and
//! each value becomes the index of the nearest of 16 fixed levels. The levels are the quantiles
//! of a standard normal distribution rescaled to `[-1, 1]`, with an exact zero, so weights that
//! are roughly normal (as trained weights are) spend the levels where the values are.
//!
//! An exact zero (a pruned weight) stays exactly zero: the level 0.0 is one of the sixteen.
//! Values are packed two per byte, the even column in the low nibble, as our int4 does.
//! bitsandbytes' optional second quantization of `absmax` (8-bit, blocks of 256) is not done:
//! `absmax` costs 0.5 bit per weight here instead of about 0.13.

use super::parallel::rows_per_task;
use super::rows_cols;

/// Values per `absmax` block (bitsandbytes' and PEFT's QLoRA default).
pub const NF4_BLOCK: usize = 64;

/// The sixteen NF4 levels, in code order (the QLoRA paper's appendix; bitsandbytes' table).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// An NF4 weight: 4-bit level indices and one `absmax` per block of [`NF4_BLOCK`] values.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// Logical shape; rows are all dimensions but the last (a multiple of [`NF4_BLOCK`]).
    pub dims: Vec<usize>,
    /// Two level indices per byte, row-major; the even column is the low nibble.
    pub packed: Vec<u8>,
    /// One scale per block, `[rows, cols / NF4_BLOCK]` row-major.
    pub absmax: Vec<f32>,
}

impl Nf4Weight {
    /// Quantizes row-major f32 values of shape `dims`, whose last entry must be a non-zero
    /// multiple of [`NF4_BLOCK`] (checked by [`super::QuantScheme::unsupported_reason`]).
    pub fn quantize(values: &[f32], dims: &[usize]) -> Self {
        let (rows, cols) = rows_cols(dims);
        let mut packed = vec![0u8; values.len() / 2];
        let mut absmax = vec![0f32; values.len() / NF4_BLOCK];
        if cols > 0 {
            let per_task = rows_per_task(rows, cols);
            let blocks_per_task = per_task * cols / NF4_BLOCK;
            std::thread::scope(|s| {
                let tasks = values
                    .chunks(per_task * cols)
                    .zip(packed.chunks_mut(per_task * cols / 2))
                    .zip(absmax.chunks_mut(blocks_per_task));
                for ((xs, ps), ms) in tasks {
                    s.spawn(move || quantize_blocks(xs, ps, ms));
                }
            });
        }
        Self {
            dims: dims.to_vec(),
            packed,
            absmax,
        }
    }

    /// Dequantizes the values `[start, start + out.len())` (whole blocks) into `out`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        debug_assert!(start.is_multiple_of(NF4_BLOCK) && out.len().is_multiple_of(NF4_BLOCK));
        let bytes = &self.packed[start / 2..(start + out.len()) / 2];
        let scales = &self.absmax[start / NF4_BLOCK..];
        for ((block, codes), &scale) in out
            .chunks_mut(NF4_BLOCK)
            .zip(bytes.chunks(NF4_BLOCK / 2))
            .zip(scales)
        {
            for (pair, &byte) in block.chunks_mut(2).zip(codes) {
                pair[0] = NF4_LEVELS[usize::from(byte & 0x0F)] * scale;
                pair[1] = NF4_LEVELS[usize::from(byte >> 4)] * scale;
            }
        }
    }

    /// The dequantized values, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.packed.len() * 2];
        self.dequantize_into(0, &mut out);
        out
    }

    /// Bytes of packed indices and block scales.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + 4 * self.absmax.len()
    }
}

/// The index of the level nearest to `x` (already divided by its block's `absmax`, so in
/// `[-1, 1]`): the levels are sorted, so it is the number of midpoints below `x`.
fn nearest_level(x: f32) -> u8 {
    let mut code = 0u8;
    for pair in NF4_LEVELS.windows(2) {
        if x > (pair[0] + pair[1]) * 0.5 {
            code += 1;
        }
    }
    code
}

/// Quantizes consecutive blocks of `xs` (whole rows, so whole blocks).
fn quantize_blocks(xs: &[f32], packed: &mut [u8], absmax: &mut [f32]) {
    let blocks = xs.chunks(NF4_BLOCK).zip(packed.chunks_mut(NF4_BLOCK / 2));
    for ((block, out), scale) in blocks.zip(absmax.iter_mut()) {
        let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        *scale = if max.is_finite() { max } else { 0.0 };
        let inv = if *scale > 0.0 { 1.0 / *scale } else { 0.0 };
        for (byte, pair) in out.iter_mut().zip(block.chunks(2)) {
            *byte = nearest_level(pair[0] * inv) | (nearest_level(pair[1] * inv) << 4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_on_its_nearest_level_and_zeros_stay_zero() {
        let mut values: Vec<f32> = (0..256)
            .map(|i| ((i * 53 % 97) as f32 - 40.0) / 30.0)
            .collect();
        values[5] = 0.0;
        values[130] = 0.0;
        let w = Nf4Weight::quantize(&values, &[2, 128]);
        assert_eq!(w.absmax.len(), 4);
        assert_eq!(w.packed.len(), 128);
        assert_eq!(w.storage_bytes(), 128 + 16);
        let back = w.dequantize();
        for (i, (&x, &q)) in values.iter().zip(&back).enumerate() {
            let scale = w.absmax[i / NF4_BLOCK];
            // No level is nearer to x than the one chosen.
            let best = NF4_LEVELS
                .iter()
                .map(|l| (l * scale - x).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((q - x).abs() <= best + 1e-6, "{i}: {x} became {q}");
        }
        assert_eq!(back[5], 0.0);
        assert_eq!(back[130], 0.0);
        // The block's extreme is kept exactly.
        let first_max = values[..64].iter().fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(w.absmax[0], first_max);
    }

    #[test]
    fn zero_blocks_and_partial_ranges_dequantize_exactly() {
        let w = Nf4Weight::quantize(&[0.0; 128], &[1, 128]);
        assert!(w.dequantize().iter().all(|&v| v == 0.0));
        let values: Vec<f32> = (0..192).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = Nf4Weight::quantize(&values, &[3, 64]);
        let whole = w.dequantize();
        let mut middle = vec![0f32; 64];
        w.dequantize_into(64, &mut middle);
        assert_eq!(middle, whole[64..128]);
    }

    /// The point of the levels: on normal values, with the same absmax blocks, NF4 loses less than
    /// sixteen evenly spaced levels over `[-1, 1]`.
    #[test]
    fn normal_weights_lose_less_than_with_evenly_spaced_levels() {
        let mut state = 12345u64;
        let mut uniform = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 + 0.5) / (1u64 << 24) as f32
        };
        // Box–Muller.
        let values: Vec<f32> = (0..64 * 64)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
            })
            .collect();
        let nf4 = Nf4Weight::quantize(&values, &[64, 64]).dequantize();
        let even: Vec<f32> = values
            .chunks(NF4_BLOCK)
            .flat_map(|block| {
                let scale = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                block
                    .iter()
                    .map(move |x| ((x / scale + 1.0) * 7.5).round() / 7.5 * scale - scale)
            })
            .collect();
        let sq =
            |back: &[f32]| -> f32 { values.iter().zip(back).map(|(a, b)| (a - b).powi(2)).sum() };
        assert!(
            sq(&nf4) < 0.9 * sq(&even),
            "nf4 {} vs even {}",
            sq(&nf4),
            sq(&even)
        );
    }
}
