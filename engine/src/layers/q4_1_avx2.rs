//! The AVX2 dot product of [`super::q4_1_matmul`]: `unsafe` only for the intrinsics' raw loads.
//!
//! Per block of 32: the 16 nibble bytes are split into a 32-byte register (low nibbles in the low
//! half, high nibbles in the high half, which is the order of the 32 values), `vpmaddubsw`
//! multiplies those unsigned 4-bit values by the i8 activations and adds neighbours into i16 (at
//! most 2 · 15 · 127, no saturation), `vpmaddwd` against ones widens and adds them into 8 i32
//! lanes, and the block's `d · s` scales their f32 conversion into the running sum.
//!
//! Compiled with AVX2 enabled whatever the build's target; only entered after
//! [`super::int8_avx2::available`] has confirmed the CPU has AVX2.

use super::q4_1_matmul::{BLOCK, NIBBLE_BYTES};

/// `Σ_b scales[b] · activation_scales[b] · Σ_i q_b[i] · values_b[i]`, as
/// [`super::q4_1_matmul::scalar_scaled_dot`] computes it.
///
/// # Panics
/// When called on a CPU without AVX2 or with slices whose block counts differ; the caller
/// ([`super::int8_matmul::Int8Kernel::Avx2`]) is only chosen after detection and passes whole rows.
pub(crate) fn scaled_dot(
    nibbles: &[u8],
    scales: &[f32],
    values: &[i8],
    activation_scales: &[f32],
) -> f32 {
    assert!(super::int8_avx2::available(), "the AVX2 kernel needs AVX2");
    let blocks = scales.len();
    assert!(
        nibbles.len() == blocks * NIBBLE_BYTES
            && values.len() == blocks * BLOCK
            && activation_scales.len() == blocks
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (checked above) and the lengths checked above bound every load:
    // block b reads nibbles `16b..16b + 16` and values `32b..32b + 32`.
    unsafe {
        x86::scaled_dot(nibbles, scales, values, activation_scales)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_add_ps, _mm256_and_si256, _mm256_castps256_ps128,
        _mm256_cvtepi32_ps, _mm256_extractf128_ps, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_maddubs_epi16, _mm256_mul_ps, _mm256_set1_epi16, _mm256_set1_epi8, _mm256_set1_ps,
        _mm256_set_m128i, _mm256_setzero_ps, _mm_add_ps, _mm_add_ss, _mm_cvtss_f32,
        _mm_loadu_si128, _mm_movehl_ps, _mm_shuffle_ps, _mm_srli_epi16,
    };

    use super::{BLOCK, NIBBLE_BYTES};

    /// See [`super::scaled_dot`].
    ///
    /// # Safety
    /// The CPU must have AVX2; `nibbles` must hold 16 and `values` 32 entries per entry of `scales`
    /// (and `activation_scales` as many as `scales`).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn scaled_dot(
        nibbles: &[u8],
        scales: &[f32],
        values: &[i8],
        activation_scales: &[f32],
    ) -> f32 {
        let low_nibble = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for (b, (&d, &s)) in scales.iter().zip(activation_scales).enumerate() {
            // SAFETY: `16b + 16 <= nibbles.len()` and `32b + 32 <= values.len()` (the contract).
            let (raw, a) = unsafe {
                (
                    _mm_loadu_si128(nibbles.as_ptr().add(b * NIBBLE_BYTES).cast::<__m128i>()),
                    _mm256_loadu_si256(values.as_ptr().add(b * BLOCK).cast::<__m256i>()),
                )
            };
            let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low_nibble);
            let pairs = _mm256_maddubs_epi16(q, a);
            let sums = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
            acc = _mm256_add_ps(acc, _mm256_mul_ps(sums, _mm256_set1_ps(d * s)));
        }
        let half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
        _mm_cvtss_f32(_mm_add_ss(quarter, _mm_shuffle_ps(quarter, quarter, 1)))
    }
}
