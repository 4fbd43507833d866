//! Our own Q8_0 and Q4_K block quantizers: the same arithmetic as candle's (and llama.cpp's
//! reference `quantize_row_*`), written straight into the block bytes, so the output is byte for
//! byte what candle's `from_float` produces (the tests compare them), only faster.
//!
//! candle's versions round with `f32::round`, a library call per value on a baseline x86-64 build,
//! and its Q4_K search allocates a vector for every 32 values. Here rounding is
//! [`round_half_away`] (plain adds and compares that vectorize) and all scratch space is on the stack.
//! Block layouts (little-endian), from llama.cpp's `ggml-common.h`:
//! - Q8_0, 34 bytes per 32 values: f16 `d`, then 32 i8 `q`; `x = d · q`.
//! - Q4_K, 144 bytes per 256 values: f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit scales and eight
//!   6-bit mins, then 128 bytes of 4-bit values; sub-block `j` of 32 values is
//!   `x = d · scale_j · q − dmin · min_j`.

use half::f16;

/// Values per Q8_0 block.
pub const Q8_0_VALUES: usize = 32;
/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Values per Q4_K super-block.
pub const Q4_K_VALUES: usize = 256;
/// Bytes per Q4_K super-block.
pub const Q4_K_BYTES: usize = 144;

/// Rounds to the nearest integer, ties away from zero, exactly as `f32::round` does for |v| < 2²²;
/// beyond that the result may be off by one, which no caller sees because they clamp to at most 127.
///
/// Adding and subtracting 1.5·2²³ rounds ties to even in plain SSE2 code; a tie that went towards
/// zero is then pushed one step away.
#[inline(always)]
pub(crate) fn round_half_away(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let r = (v + MAGIC) - MAGIC;
    let diff = v - r;
    if diff == 0.5 && v > 0.0 {
        r + 1.0
    } else if diff == -0.5 && v < 0.0 {
        r - 1.0
    } else {
        r
    }
}

/// Quantizes `xs` (a multiple of 32 values) into Q8_0 blocks in `out` (34 bytes per block).
pub fn quantize_q8_0(xs: &[f32], out: &mut [u8]) {
    for (x, block) in xs
        .chunks_exact(Q8_0_VALUES)
        .zip(out.chunks_exact_mut(Q8_0_BYTES))
    {
        // `f32::max` ignores NaN, as candle's loop does.
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in block[2..].iter_mut().zip(x) {
            // `as i8` saturates and maps NaN to 0, like candle's `f32::round(..) as i8`.
            *q = round_half_away(v * id) as i8 as u8;
        }
    }
}

/// Quantizes `xs` (a multiple of 256 values) into Q4_K super-blocks in `out` (144 bytes each).
pub fn quantize_q4_k(xs: &[f32], out: &mut [u8]) {
    for (x, block) in xs
        .chunks_exact(Q4_K_VALUES)
        .zip(out.chunks_exact_mut(Q4_K_BYTES))
    {
        quantize_q4_k_block(x, block);
    }
}

fn quantize_q4_k_block(x: &[f32], block: &mut [u8]) {
    let (scales, mins) = if x.iter().any(|v| v.is_nan()) {
        // NaN orders differently under `total_cmp` than under `<`; the scalar search follows candle.
        let mut pairs = [(0f32, 0f32); 8];
        for (pair, sub) in pairs.iter_mut().zip(x.chunks_exact(32)) {
            *pair = scale_and_min(sub);
        }
        (pairs.map(|p| p.0), pairs.map(|p| p.1))
    } else {
        scales_and_mins(x)
    };
    let max_scale = scales.iter().fold(0f32, |m, &v| v.max(m));
    let max_min = mins.iter().fold(0f32, |m, &v| v.max(m));
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut packed_scales = [0u8; 12];
    for j in 0..8 {
        let ls = (round_half_away(inv_scale * scales[j]) as i32).min(63) as u8;
        let lm = (round_half_away(inv_min * mins[j]) as i32).min(63) as u8;
        if j < 4 {
            packed_scales[j] = ls;
            packed_scales[j + 4] = lm;
        } else {
            packed_scales[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            packed_scales[j - 4] |= (ls >> 4) << 6;
            packed_scales[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    block[..2].copy_from_slice(&d.to_le_bytes());
    block[2..4].copy_from_slice(&dmin.to_le_bytes());
    block[4..16].copy_from_slice(&packed_scales);
    let mut levels = [0u8; Q4_K_VALUES];
    for (j, (sub, out)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(j, &packed_scales);
        let dj = d.to_f32() * f32::from(sc);
        if dj != 0.0 {
            let dm = dmin.to_f32() * f32::from(m);
            for (l, &v) in out.iter_mut().zip(sub) {
                // Division, not multiplication by an inverse, to round exactly as candle does.
                *l = (round_half_away((v + dm) / dj) as i32).clamp(0, 15) as u8;
            }
        }
    }
    // Each 64 values share 32 bytes: the first 32 in the low nibbles, the next 32 in the high ones.
    for (chunk, qs) in levels
        .chunks_exact(64)
        .zip(block[16..].chunks_exact_mut(32))
    {
        for (i, q) in qs.iter_mut().enumerate() {
            *q = chunk[i] | (chunk[i + 32] << 4);
        }
    }
}

/// The 6-bit scale and min of sub-block `j` from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The scale and (negated) minimum of 32 values for 4-bit levels: llama.cpp's `make_qkx1_quants`
/// with 15 levels and up to 5 refinements, in the same operation order (so the same bits).
fn scale_and_min(x: &[f32]) -> (f32, f32) {
    const NMAX: i32 = 15;
    const TRIES: usize = 5;
    let min = *x.iter().min_by(|a, b| a.total_cmp(b)).unwrap_or(&0.0);
    let max = *x.iter().max_by(|a, b| a.total_cmp(b)).unwrap_or(&0.0);
    if max == min {
        return (0.0, 0.0);
    }
    let mut min = min.min(0.0);
    let mut iscale = NMAX as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut levels = [0u8; 32];
    for _ in 0..TRIES {
        let mut sumlx = 0f32;
        let mut suml2 = 0i32;
        let mut changed = false;
        for (l, &v) in levels.iter_mut().zip(x) {
            let li = (round_half_away(iscale * (v - min)) as i32).clamp(0, NMAX);
            changed |= li as u8 != *l;
            *l = li as u8;
            sumlx += (v - min) * li as f32;
            suml2 += li * li;
        }
        scale = sumlx / suml2 as f32;
        let sum: f32 = x
            .iter()
            .zip(&levels)
            .map(|(&v, &l)| v - scale * f32::from(l))
            .sum();
        min = sum / x.len() as f32;
        if min > 0.0 {
            min = 0.0;
        }
        iscale = 1.0 / scale;
        if !changed {
            break;
        }
    }
    (scale, -min)
}

/// [`scale_and_min`] for the eight sub-blocks of a super-block at once, sub-block `j` in lane `j`.
///
/// Every lane performs exactly the scalar search's operations in the same order (its sums run over
/// its own 32 values one after another), so the results are bit-identical; the eight independent
/// chains just run side by side in SIMD registers instead of one after another. A lane that has
/// converged keeps its result while the others continue. The input must hold no NaN.
fn scales_and_mins(x: &[f32]) -> ([f32; 8], [f32; 8]) {
    const NMAX: i32 = 15;
    const TRIES: usize = 5;
    let mut xt = [[0f32; 8]; 32];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xt[i][j] = v;
        }
    }
    let (mut lo, mut hi) = (xt[0], xt[0]);
    for row in &xt {
        for j in 0..8 {
            lo[j] = if row[j] < lo[j] { row[j] } else { lo[j] };
            hi[j] = if row[j] > hi[j] { row[j] } else { hi[j] };
        }
    }
    let mut active: [bool; 8] = std::array::from_fn(|j| hi[j] != lo[j]);
    let mut scale = [0f32; 8];
    let mut min: [f32; 8] = std::array::from_fn(|j| lo[j].min(0.0));
    let mut iscale: [f32; 8] = std::array::from_fn(|j| NMAX as f32 / (hi[j] - min[j]));
    let mut levels = [[0u8; 8]; 32];
    for _ in 0..TRIES {
        if !active.contains(&true) {
            break;
        }
        let (mut sumlx, mut suml2, mut changed) = ([0f32; 8], [0i32; 8], [false; 8]);
        for (row, lv) in xt.iter().zip(levels.iter_mut()) {
            for j in 0..8 {
                let li = (round_half_away(iscale[j] * (row[j] - min[j])) as i32).clamp(0, NMAX);
                changed[j] |= li as u8 != lv[j];
                lv[j] = li as u8;
                sumlx[j] += (row[j] - min[j]) * li as f32;
                suml2[j] += li * li;
            }
        }
        let new_scale: [f32; 8] = std::array::from_fn(|j| sumlx[j] / suml2[j] as f32);
        // `Iterator::sum` for f32 starts from -0.0; so do these sums.
        let mut sum = [-0.0f32; 8];
        for (row, lv) in xt.iter().zip(&levels) {
            for j in 0..8 {
                sum[j] += row[j] - new_scale[j] * f32::from(lv[j]);
            }
        }
        for j in 0..8 {
            if !active[j] {
                continue;
            }
            scale[j] = new_scale[j];
            let m = sum[j] / 32.0;
            min[j] = if m > 0.0 { 0.0 } else { m };
            iscale[j] = 1.0 / scale[j];
            active[j] = changed[j];
        }
    }
    // Lanes whose values were all equal never ran: (0, 0) as in the scalar search.
    (
        std::array::from_fn(|j| if hi[j] == lo[j] { 0.0 } else { scale[j] }),
        std::array::from_fn(|j| if hi[j] == lo[j] { 0.0 } else { -min[j] }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn candle_bytes(values: &[f32], dtype: GgmlDType) -> Vec<u8> {
        let t = Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap();
        QTensor::quantize(&t, dtype)
            .unwrap()
            .data()
            .unwrap()
            .into_owned()
    }

    /// Values with ties (multiples of a power of two), zeros, constant blocks, outliers and a NaN.
    fn awkward_values() -> Vec<f32> {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut v: Vec<f32> = (0..64 * 256)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i / 256 {
                    0 => 0.0,
                    1 => 0.25,
                    2 => (i % 17) as f32 * 0.125 - 1.0,
                    3 => u * 1e-6,
                    4 if i % 64 == 3 => 40.0,
                    6 if i % 3 == 0 => -0.0,
                    7 => u * u * u * 8.0,
                    8 if i % 32 < 16 => 0.0,
                    _ => u,
                }
            })
            .collect();
        v[5 * 256 + 7] = f32::NAN;
        v
    }

    #[test]
    fn rounding_matches_f32_round() {
        for v in [
            0.5f32, 1.5, 2.5, -0.5, -2.5, 3.49999, -3.50001, 126.5, 1e9, -1e9, 0.0, -0.0,
        ] {
            assert_eq!(
                round_half_away(v).clamp(-127.0, 127.0),
                v.round().clamp(-127.0, 127.0),
                "{v}"
            );
        }
        assert!(round_half_away(f32::NAN).is_nan());
    }

    #[test]
    fn q8_0_bytes_equal_candles() {
        let values = awkward_values();
        let mut ours = vec![0u8; values.len() / Q8_0_VALUES * Q8_0_BYTES];
        quantize_q8_0(&values, &mut ours);
        assert_eq!(ours, candle_bytes(&values, GgmlDType::Q8_0));
    }

    #[test]
    fn q4_k_bytes_equal_candles() {
        let values = awkward_values();
        let mut ours = vec![0u8; values.len() / Q4_K_VALUES * Q4_K_BYTES];
        quantize_q4_k(&values, &mut ours);
        let theirs = candle_bytes(&values, GgmlDType::Q4K);
        for (b, (a, c)) in ours
            .chunks(Q4_K_BYTES)
            .zip(theirs.chunks(Q4_K_BYTES))
            .enumerate()
        {
            assert_eq!(a, c, "super-block {b}");
        }
    }
}
