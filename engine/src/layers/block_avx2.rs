//! The AVX2 dot product of [`super::block_matmul`]: `unsafe` only for the intrinsics' raw loads.
//!
//! Per block of 32, the weight values go into one 32-byte register:
//! - 4-bit blocks: the 16 nibble bytes are split, low nibbles into the low half and high nibbles
//!   into the high half, which is the order of the 32 values;
//! - byte blocks: loaded as they are, then `vpsignb` moves each weight's sign onto its activation
//!   (and takes the weight's absolute value), because the multiply below takes one unsigned side.
//!
//! `vpmaddubsw` multiplies the unsigned weights by the i8 activations and adds neighbours into i16
//! (at most 2 · 128 · 127 = 32,512, no saturation), `vpmaddwd` against ones widens and adds them
//! into 8 i32 lanes, and the block's `d · s` scales their f32 conversion into the running sum.
//!
//! Compiled with AVX2 enabled whatever the build's target; only entered after
//! [`super::int8_avx2::available`] has confirmed the CPU has AVX2.

use super::block_matmul::{RowValues, BLOCK, NIBBLE_BYTES};

/// `Σ_b scales[b] · activation_scales[b] · Σ_i w_b[i] · values_b[i]`, as
/// [`super::block_matmul::scalar_scaled_dot`] computes it.
///
/// # Panics
/// When called on a CPU without AVX2 or with slices whose block counts differ; the caller
/// ([`super::int8_matmul::Int8Kernel::Avx2`]) is only chosen after detection and passes whole rows.
pub(crate) fn scaled_dot(
    weights: RowValues<'_>,
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    assert!(super::int8_avx2::available(), "the AVX2 kernel needs AVX2");
    let blocks = scales.len();
    let weight_len = match weights {
        RowValues::Nibbles(q) => q.len() == blocks * NIBBLE_BYTES,
        RowValues::Bytes(q) => q.len() == blocks * BLOCK,
    };
    assert!(weight_len && values.len() == blocks * BLOCK && activation_scales.len() == blocks);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (checked above) and the lengths checked above bound every load:
    // block b reads nibbles `16b..16b + 16` or bytes `32b..32b + 32`, and values `32b..32b + 32`.
    unsafe {
        match weights {
            RowValues::Nibbles(q) => x86::nibble_dot(q, scales, values, activation_scales),
            RowValues::Bytes(q) => x86::byte_dot(q, scales, values, activation_scales),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm256_add_ps, _mm256_and_si256, _mm256_castps256_ps128,
        _mm256_cvtepi32_ps, _mm256_extractf128_ps, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi16, _mm256_set1_epi8, _mm256_set1_ps,
        _mm256_set_m128i, _mm256_setzero_ps, _mm256_sign_epi8, _mm_add_ps, _mm_add_ss,
        _mm_cvtss_f32, _mm_loadu_si128, _mm_movehl_ps, _mm_shuffle_ps, _mm_srli_epi16,
    };

    use super::{BLOCK, NIBBLE_BYTES};

    /// One block's scaled integer sum added to `acc`: unsigned weights `w` times signed `a`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn accumulate(acc: __m256, w: __m256i, a: __m256i, scale: f32) -> __m256 {
        let pairs = _mm256_maddubs_epi16(w, a);
        let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
        _mm256_add_ps(acc, _mm256_mul_ps(sums, _mm256_set1_ps(scale)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn horizontal_sum(acc: __m256) -> f32 {
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)))
    }

    /// 4-bit blocks; see [`super::scaled_dot`].
    ///
    /// # Safety
    /// The CPU must have AVX2; `nibbles` must hold 16 and `values` 32 entries per entry of `scales`
    /// (and `activation_scales` as many as `scales`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn nibble_dot(
        nibbles: &[u8],
        scales: &[f32],
        values: &[i8],
        activation_scales: &[f32],
    ) -> f32 {
        let low_nibble = _mm256_set1_epi8(0x0F);
        let mut acc = _mm256_setzero_ps();
        for (b, (&d, &s)) in scales.iter().zip(activation_scales).enumerate() {
            // SAFETY: `16b + 16 <= nibbles.len()` and `32b + 32 <= values.len()` (the contract).
            let (raw, a) = unsafe {
                (
                    _mm_loadu_si128(nibbles.as_ptr().add(b * NIBBLE_BYTES).cast::<__m128i>()),
                    _mm256_loadu_si256(values.as_ptr().add(b * BLOCK).cast::<__m256i>()),
                )
            };
            let w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low_nibble);
            acc = accumulate(acc, w, a, d * s);
        }
        horizontal_sum(acc)
    }

    /// Byte blocks; see [`super::scaled_dot`].
    ///
    /// # Safety
    /// The CPU must have AVX2; `bytes` and `values` must hold 32 entries per entry of `scales`
    /// (and `activation_scales` as many as `scales`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn byte_dot(
        bytes: &[i8],
        scales: &[f32],
        values: &[i8],
        activation_scales: &[f32],
    ) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, (&d, &s)) in scales.iter().zip(activation_scales).enumerate() {
            // SAFETY: `32b + 32` is within both `bytes` and `values` (the contract).
            let (w, a) = unsafe {
                (
                    _mm256_loadu_si256(bytes.as_ptr().add(b * BLOCK).cast::<__m256i>()),
                    _mm256_loadu_si256(values.as_ptr().add(b * BLOCK).cast::<__m256i>()),
                )
            };
            let magnitude = _mm256_sign_epi8(w, w);
            let signed = _mm256_sign_epi8(a, w);
            acc = accumulate(acc, magnitude, signed, d * s);
        }
        horizontal_sum(acc)
    }
}
