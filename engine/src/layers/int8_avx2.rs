//! The AVX2 kernel of [`super::int8_matmul`]: the crate's only SIMD `unsafe` code, kept to the
//! loads and stores the intrinsics take as raw pointers.
//!
//! Per pair of input columns `k, k+1`: the panel's 32 packed weights (16 channels × 2) are widened
//! from i8 to i16 into two registers, and each of up to six activation rows broadcasts its i16 pair
//! as one 32-bit value; `vpmaddwd` multiplies the pairs and adds each pair into an i32 lane, giving
//! 8 channels' partial sums per instruction. i8 × i8 products summed in i32 cannot overflow for any
//! row shorter than 2³¹ / 127² ≈ 133,000 values.
//!
//! The function is compiled with AVX2 enabled whatever the build's target, and is only ever entered
//! after [`available`] has confirmed the CPU has AVX2 (runtime detection).

use super::int8_matmul::{PANEL, ROWS};

/// Whether this CPU can run [`panel_sums`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Integer sums of `count` rows (each `k_pad` i16 values, `k_pad` even) against one packed panel
/// (`k_pad / 2 × PANEL × 2` i8), into `acc[row][channel]`.
///
/// # Panics
/// When called on a CPU without AVX2 or with slices shorter than the shapes say; the caller
/// ([`super::int8_matmul::Int8Kernel::Avx2`]) is only chosen after detection and passes whole blocks.
pub(crate) fn panel_sums(
    rows: &[i16],
    count: usize,
    k_pad: usize,
    panel: &[i8],
    acc: &mut [[i32; PANEL]; ROWS],
) {
    assert!(available(), "the AVX2 kernel needs AVX2");
    assert!(count <= ROWS && k_pad.is_multiple_of(2));
    assert!(rows.len() >= count * k_pad && panel.len() >= k_pad * PANEL);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (checked above), and the slice lengths checked above bound every
    // pointer the kernel reads: row r's pair p at `r * k_pad + 2p < count * k_pad`, panel bytes
    // `32p..32p + 32 <= k_pad * PANEL`.
    unsafe {
        match count {
            1 => x86::panel_sums::<1>(rows, k_pad, panel, acc),
            2 => x86::panel_sums::<2>(rows, k_pad, panel, acc),
            3 => x86::panel_sums::<3>(rows, k_pad, panel, acc),
            4 => x86::panel_sums::<4>(rows, k_pad, panel, acc),
            5 => x86::panel_sums::<5>(rows, k_pad, panel, acc),
            _ => x86::panel_sums::<ROWS>(rows, k_pad, panel, acc),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_add_epi32, _mm256_cvtepi8_epi16, _mm256_madd_epi16,
        _mm256_set1_epi32, _mm256_setzero_si256, _mm256_storeu_si256, _mm_loadu_si128,
    };

    use super::{PANEL, ROWS};

    /// The kernel for `R` rows; see [`super::panel_sums`] for the contract.
    ///
    /// # Safety
    /// The CPU must have AVX2, `rows` must hold `R * k_pad` values and `panel` `k_pad * PANEL`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn panel_sums<const R: usize>(
        rows: &[i16],
        k_pad: usize,
        panel: &[i8],
        acc: &mut [[i32; PANEL]; ROWS],
    ) {
        let mut sums = [[_mm256_setzero_si256(); 2]; R];
        let x = rows.as_ptr();
        let w = panel.as_ptr();
        for pair in 0..k_pad / 2 {
            // SAFETY: `32 * pair + 32 <= k_pad * PANEL` bytes of the panel (the caller's contract).
            let (lo, hi) = unsafe {
                let at = w.add(pair * 2 * PANEL);
                (
                    _mm_loadu_si128(at.cast::<__m128i>()),
                    _mm_loadu_si128(at.add(PANEL).cast::<__m128i>()),
                )
            };
            let (w_lo, w_hi) = (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi));
            for (r, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `r * k_pad + 2 * pair + 1 < R * k_pad` values of `rows`; read unaligned.
                let xs = unsafe { x.add(r * k_pad + 2 * pair).cast::<i32>().read_unaligned() };
                let xs = _mm256_set1_epi32(xs);
                sum[0] = _mm256_add_epi32(sum[0], _mm256_madd_epi16(xs, w_lo));
                sum[1] = _mm256_add_epi32(sum[1], _mm256_madd_epi16(xs, w_hi));
            }
        }
        for (out, sum) in acc.iter_mut().zip(&sums) {
            // SAFETY: each row of `acc` holds 16 i32, the two 8-lane stores fill it exactly.
            unsafe {
                let at = out.as_mut_ptr().cast::<__m256i>();
                _mm256_storeu_si256(at, sum[0]);
                _mm256_storeu_si256(at.add(1), sum[1]);
            }
        }
    }
}
