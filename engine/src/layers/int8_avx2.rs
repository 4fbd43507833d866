//! The AVX2 kernel of [`super::int8_matmul`]: the crate's only SIMD `unsafe` code for it, kept to
//! the loads and stores the intrinsics take as raw pointers.
//!
//! Per pair of input columns `k, k+1`: the panel's 32 packed weights (16 channels × 2) are widened
//! from i8 to i16 into two registers, and each of up to six activation rows broadcasts its i16 pair
//! as one 32-bit value; `vpmaddwd` multiplies the pairs and adds each pair into an i32 lane, giving
//! 8 channels' partial sums per instruction. i8 × i8 products summed in i32 cannot overflow for any
//! row shorter than 2³¹ / 127² ≈ 133,000 values. (`vpmaddubsw`, which would take the bytes as they
//! are, adds its pairs in *saturating* i16 and so cannot take full-range int8 on both sides.)
//!
//! On a Zen 3 this inner loop runs at its instruction ceiling with its data in cache (about 74 GMAC/s
//! per core, against about 45 for f32 FMAs: `BENCHMARKS.md`). Around it, [`block_product`] walks
//! the rows in chunks that stay in L2 and runs every panel over a chunk before moving on, so the
//! weight is read from memory once per chunk rather than once per six rows, and it turns the sums
//! into floats with vector instructions; with the rows quantized under AVX2 too, that made the
//! product 10–15% faster in a release build.
//!
//! The functions are compiled with AVX2 enabled whatever the build's target, and are only ever
//! entered after [`available`] has confirmed the CPU has AVX2 (runtime detection).

use std::ops::Range;

use super::int8_matmul::{CHUNK_BYTES, PANEL, ROWS};

/// Whether this CPU can run [`block_product`].
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // `COMPRESSD_CPU_ISA=scalar` caps it (README, "CPU kernels").
        std::arch::is_x86_feature_detected!("avx2")
            && crate::ops::simd::Isa::detected() >= crate::ops::simd::Isa::Avx2
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A packed weight as the kernel reads it.
pub(crate) struct Weight<'a> {
    /// `panels × (k_pad / 2) × PANEL × 2` values.
    pub packed: &'a [i8],
    /// One scale per output channel, padded to whole panels.
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// Output channels (the width of `out`'s rows).
    pub n: usize,
    /// Input columns, padded to an even count.
    pub k_pad: usize,
}

/// Rows of `x` (`k` values each) quantized to i8 values held as i16, `k_pad` per row (zero padded),
/// with one scale per row (or `fixed` for every row): the scalar code of
/// [`super::int8_matmul`], compiled here with AVX2 so that its loops are vectorized (the build's
/// baseline target has only SSE2).
pub(crate) fn quantize_rows(
    x: &[f32],
    k: usize,
    k_pad: usize,
    fixed: Option<f32>,
) -> (Vec<i16>, Vec<f32>) {
    assert!(available(), "the AVX2 kernel needs AVX2");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (checked above); the function only uses safe slice code.
    unsafe {
        x86::quantize_rows(x, k, k_pad, fixed)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// `out = x · Wᵀ (+ bias)` for the rows of `x` (`row_scales.len()` rows of `k_pad` i16 values) and
/// the panels `panels` of `w`, into `out` (`rows × n`, only the panels' columns).
///
/// # Panics
/// When called on a CPU without AVX2 or with slices shorter than the shapes say; the caller
/// ([`super::int8_matmul::Int8Kernel::Avx2`]) is only chosen after detection and passes whole rows.
pub(crate) fn block_product(
    x: &[i16],
    row_scales: &[f32],
    w: &Weight<'_>,
    panels: Range<usize>,
    out: &mut [f32],
) {
    assert!(available(), "the AVX2 kernel needs AVX2");
    let rows = row_scales.len();
    assert!(w.k_pad.is_multiple_of(2));
    assert!(x.len() >= rows * w.k_pad && out.len() >= rows * w.n);
    assert!(w.packed.len() >= panels.end * w.k_pad * PANEL);
    assert!(w.scales.len() >= panels.end * PANEL);
    assert!(panels.end * PANEL < w.n + PANEL && w.bias.is_none_or(|b| b.len() >= w.n));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is present (checked above), and the lengths checked above bound every pointer
    // the kernel reads or writes: row r's pair p at `r * k_pad + 2p < rows * k_pad`, panel p's bytes
    // `p * k_pad * PANEL + 32 q + 32 <= (p + 1) * k_pad * PANEL`, and the full-panel stores at
    // `r * n + 16 p + 16 <= rows * n` (a panel is stored whole only when it ends within `n`).
    unsafe {
        x86::block_product(x, row_scales, w, panels, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_cvtepi32_ps,
        _mm256_cvtepi8_epi16, _mm256_loadu_ps, _mm256_loadu_si256, _mm256_madd_epi16,
        _mm256_mul_ps, _mm256_set1_epi32, _mm256_set1_ps, _mm256_setzero_ps, _mm256_setzero_si256,
        _mm256_storeu_ps, _mm256_storeu_si256, _mm_loadu_si128,
    };
    use std::ops::Range;

    use super::{Weight, CHUNK_BYTES, PANEL, ROWS};

    /// See [`super::quantize_rows`].
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_rows(
        x: &[f32],
        k: usize,
        k_pad: usize,
        fixed: Option<f32>,
    ) -> (Vec<i16>, Vec<f32>) {
        super::super::int8_matmul::quantize_rows_i16(x, k, k_pad, fixed)
    }

    /// See [`super::block_product`].
    ///
    /// # Safety
    /// The CPU must have AVX2 and the slices the lengths `super::block_product` checks.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn block_product(
        x: &[i16],
        row_scales: &[f32],
        w: &Weight<'_>,
        panels: Range<usize>,
        out: &mut [f32],
    ) {
        let rows = row_scales.len();
        let chunk = (CHUNK_BYTES / (2 * w.k_pad.max(1)) / ROWS).max(1) * ROWS;
        let mut acc = [[0i32; PANEL]; ROWS];
        for first in (0..rows).step_by(chunk) {
            let last = (first + chunk).min(rows);
            for p in panels.clone() {
                let panel = &w.packed[p * w.k_pad * PANEL..(p + 1) * w.k_pad * PANEL];
                for block in (first..last).step_by(ROWS) {
                    let count = ROWS.min(last - block);
                    let x = &x[block * w.k_pad..(block + count) * w.k_pad];
                    // SAFETY: `x` holds `count * k_pad` values and `panel` `k_pad * PANEL`.
                    unsafe {
                        match count {
                            1 => sums::<1>(x, w.k_pad, panel, &mut acc),
                            2 => sums::<2>(x, w.k_pad, panel, &mut acc),
                            3 => sums::<3>(x, w.k_pad, panel, &mut acc),
                            4 => sums::<4>(x, w.k_pad, panel, &mut acc),
                            5 => sums::<5>(x, w.k_pad, panel, &mut acc),
                            _ => sums::<ROWS>(x, w.k_pad, panel, &mut acc),
                        }
                    }
                    let out = &mut out[block * w.n..(block + count) * w.n];
                    // SAFETY: `out` holds `count` rows of `n`; see `floats`.
                    unsafe { floats(&acc[..count], &row_scales[block..block + count], w, p, out) };
                }
            }
        }
    }

    /// `y = sum · (row scale · channel scale) + bias` for panel `p` of `count` rows, into `out`
    /// (`count × n`): the scalar kernel's formula (a multiply, then an add, never fused), so every
    /// kernel gives identical floats.
    ///
    /// # Safety
    /// AVX2; `out` holds `sums.len()` rows of `n`, `w.scales` covers the panel.
    #[target_feature(enable = "avx2")]
    unsafe fn floats(
        sums: &[[i32; PANEL]],
        row_scales: &[f32],
        w: &Weight<'_>,
        p: usize,
        out: &mut [f32],
    ) {
        let first = p * PANEL;
        let cols = PANEL.min(w.n - first);
        if cols < PANEL {
            for ((sums, &row_scale), y) in sums.iter().zip(row_scales).zip(out.chunks_mut(w.n)) {
                for (c, y) in y[first..first + cols].iter_mut().enumerate() {
                    let b = w.bias.map_or(0.0, |b| b[first + c]);
                    *y = sums[c] as f32 * (row_scale * w.scales[first + c]) + b;
                }
            }
            return;
        }
        // SAFETY: `first + 16 <= n` (a whole panel), so each row's 16 floats at `first` lie in
        // `out`, `scales` and `bias`.
        unsafe {
            let load_bias = |half: usize| -> __m256 {
                match w.bias {
                    Some(b) => _mm256_loadu_ps(b.as_ptr().add(first + 8 * half)),
                    None => _mm256_setzero_ps(),
                }
            };
            let bias = [load_bias(0), load_bias(1)];
            let scales = [
                _mm256_loadu_ps(w.scales.as_ptr().add(first)),
                _mm256_loadu_ps(w.scales.as_ptr().add(first + 8)),
            ];
            for ((sums, &row_scale), y) in sums.iter().zip(row_scales).zip(out.chunks_mut(w.n)) {
                let row_scale = _mm256_set1_ps(row_scale);
                for half in 0..2 {
                    let sum = _mm256_loadu_si256(sums.as_ptr().add(8 * half).cast::<__m256i>());
                    let scale = _mm256_mul_ps(row_scale, scales[half]);
                    let value = _mm256_mul_ps(_mm256_cvtepi32_ps(sum), scale);
                    let at = y.as_mut_ptr().add(first + 8 * half);
                    _mm256_storeu_ps(at, _mm256_add_ps(value, bias[half]));
                }
            }
        }
    }

    /// The integer sums of `R` rows against one panel into `acc[row][channel]`.
    ///
    /// # Safety
    /// AVX2; `rows` holds `R * k_pad` values and `panel` `k_pad * PANEL`.
    #[target_feature(enable = "avx2")]
    unsafe fn sums<const R: usize>(
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
