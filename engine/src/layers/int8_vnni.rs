//! The AVX-512 VNNI kernel of [`super::int8_matmul`]: `vpdpbusd` multiplies 4 unsigned bytes by 4
//! signed bytes and adds the four products into one i32 lane, 64 products per instruction.
//!
//! `vpdpbusd` takes unsigned activations, so each activation `qx ∈ [-127, 127]` is stored as
//! `qx + 128 ∈ [1, 255]` and the extra `128 · Σₖ w[n, k]` of each output channel is subtracted after
//! the sum (computed once, when the weight is packed). Unlike AVX2's `vpmaddubsw`, `vpdpbusd` adds
//! its products straight into i32 with no 16-bit intermediate, so nothing saturates: the sums are the
//! exact integers the scalar kernel computes (the tests check that with extreme values).
//!
//! The weight is packed in panels of [`PANEL`] output channels; inside a panel, per group of 4 input
//! columns, channel 0's 4 values, channel 1's 4 values, …: two 64-byte registers per group. Up to
//! [`ROWS`] activation rows each broadcast their 4 bytes of the group (one 32-bit value) against the
//! two registers: 2 × 12 = 24 accumulators of AVX-512's 32 registers.
//!
//! The functions are compiled with AVX-512 enabled whatever the build's target and only entered
//! after [`available`] has confirmed the CPU has it (runtime detection).

use std::ops::Range;

/// Output channels per packed panel (two registers of 16 i32 lanes).
pub(crate) const PANEL: usize = 32;
/// Rows of activations one kernel call handles.
pub(crate) const ROWS: usize = 12;
/// Input columns per `vpdpbusd` lane.
pub(crate) const GROUP: usize = 4;

/// Whether this CPU can run the kernel (AVX-512 F and BW, and VNNI).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // `COMPRESSD_CPU_ISA=avx2` or `scalar` caps it (README, "CPU kernels").
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && crate::ops::simd::Isa::detected() == crate::ops::simd::Isa::Avx512
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A packed weight as the kernel reads it.
pub(crate) struct Weight<'a> {
    /// `panels × (k_pad / 4) × PANEL × 4` values.
    pub packed: &'a [i8],
    /// `128 · Σₖ w[n, k]` per output channel, padded to whole panels.
    pub offsets: &'a [i32],
    /// One scale per output channel, padded to whole panels.
    pub scales: &'a [f32],
    pub bias: Option<&'a [f32]>,
    /// Output channels (the width of `out`'s rows).
    pub n: usize,
    /// Input columns, padded to a multiple of [`GROUP`].
    pub k_pad: usize,
}

/// Rows of `x` as unsigned bytes (`qx + 128`), `k_pad` per row, with one scale per row, quantized
/// in the kernel's instruction set (so the rounding loop is vectorized with it).
/// With `fixed`, every row takes that scale (static quantization) instead of its own. The byte
/// buffer holds a multiple of `row_multiple` rows, the extra ones all padding (AMX reads whole
/// tiles of rows).
pub(crate) fn quantize_rows(
    x: &[f32],
    k: usize,
    k_pad: usize,
    fixed: Option<f32>,
    row_multiple: usize,
) -> (Vec<u8>, Vec<f32>) {
    assert!(available(), "the VNNI kernel needs AVX-512 VNNI");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 F is present (checked above); the loads and stores stay in the slices.
    unsafe {
        x86::quantize_rows(x, k, k_pad, fixed, row_multiple)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

/// `out = x · Wᵀ (+ bias)` for `count` rows of quantized `x` (`count × k_pad` bytes and `count`
/// scales) and the panels `panels` of `w`, into `out` (`count × n`, only the panels' columns).
///
/// # Panics
/// When called on a CPU without AVX-512 VNNI or with slices shorter than the shapes say; the caller
/// only picks this kernel after detection and passes whole blocks.
pub(crate) fn block_product(
    x: &[u8],
    row_scales: &[f32],
    w: &Weight<'_>,
    panels: Range<usize>,
    out: &mut [f32],
) {
    assert!(available(), "the VNNI kernel needs AVX-512 VNNI");
    let count = row_scales.len();
    assert!(count <= ROWS && w.k_pad.is_multiple_of(GROUP));
    assert!(x.len() >= count * w.k_pad && out.len() >= count * w.n);
    assert!(w.packed.len() >= panels.end * w.k_pad * PANEL);
    assert!(w.offsets.len() >= panels.end * PANEL && w.scales.len() >= panels.end * PANEL);
    assert!(panels.end * PANEL < w.n + PANEL && w.bias.is_none_or(|b| b.len() >= w.n));
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 VNNI is present (checked above), and the lengths checked above bound every
    // pointer the kernel reads: row r's group g at `r * k_pad + 4g < count * k_pad`, panel p's bytes
    // `p * k_pad * PANEL + 128g + 128 <= (p + 1) * k_pad * PANEL`.
    unsafe {
        x86::block_product(x, row_scales, w, panels, out);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m512, __m512i, __mmask16, _mm512_abs_ps, _mm512_add_epi32, _mm512_cmp_ps_mask,
        _mm512_cvt_roundps_epi32, _mm512_cvtepi32_epi8, _mm512_dpbusd_epi32, _mm512_loadu_ps,
        _mm512_loadu_si512, _mm512_mask_cvtepi32_storeu_epi8, _mm512_maskz_loadu_ps,
        _mm512_maskz_mov_ps, _mm512_max_ps, _mm512_min_ps, _mm512_mul_ps, _mm512_reduce_max_ps,
        _mm512_set1_epi32, _mm512_set1_ps, _mm512_setzero_ps, _mm512_setzero_si512,
        _mm512_storeu_si512, _mm_storeu_si128, _CMP_ORD_Q, _MM_FROUND_NO_EXC,
        _MM_FROUND_TO_NEAREST_INT,
    };
    use std::ops::Range;

    use super::{Weight, GROUP, PANEL, ROWS};

    /// See [`super::quantize_rows`]: per row, the largest magnitude in 16-lane maxima (NaNs left
    /// out, as the scalar fold does), then `clamp(x / step, ±127)` rounded to nearest even, plus
    /// 128, narrowed to bytes 16 at a time. A NaN value quantizes to 0 (the byte 128), as the
    /// scalar kernel's `as i16` makes it. The bytes are those of `quantize_rows_as` for every
    /// other value (the tests compare the kernels' outputs exactly).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F (every intrinsic here is AVX-512 F's).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn quantize_rows(
        x: &[f32],
        k: usize,
        k_pad: usize,
        fixed: Option<f32>,
        row_multiple: usize,
    ) -> (Vec<u8>, Vec<f32>) {
        const LANES: usize = 16;
        let rows = x.len() / k.max(1);
        let mut values = vec![128u8; rows.next_multiple_of(row_multiple.max(1)) * k_pad];
        let mut scales = vec![0f32; rows];
        if k == 0 {
            return (values, scales);
        }
        let tail = k % LANES;
        let tail_mask: __mmask16 = (1u32 << tail).wrapping_sub(1) as __mmask16;
        for ((row, out), scale) in x
            .chunks_exact(k)
            .zip(values.chunks_exact_mut(k_pad))
            .zip(scales.iter_mut())
        {
            let (chunks, rest) = row.split_at(k - tail);
            let (step, inverse) = match fixed {
                Some(s) => crate::quant::int8::fixed_scale(s),
                None => {
                    let mut amax = _mm512_setzero_ps();
                    for c in chunks.chunks_exact(LANES) {
                        // SAFETY: `c` holds 16 floats.
                        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
                        // max(|v|, amax) returns amax where |v| is NaN.
                        amax = _mm512_max_ps(_mm512_abs_ps(v), amax);
                    }
                    if tail > 0 {
                        // SAFETY: the mask reads only the `tail` floats of `rest`.
                        let v = unsafe { _mm512_maskz_loadu_ps(tail_mask, rest.as_ptr()) };
                        amax = _mm512_max_ps(_mm512_abs_ps(v), amax);
                    }
                    crate::quant::int8::scale_of_max(_mm512_reduce_max_ps(amax))
                }
            };
            *scale = step;
            let inverse = _mm512_set1_ps(inverse);
            let (low, high) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            let offset = _mm512_set1_epi32(128);
            // `q + 128` in each i32 lane.
            let to_ints = |v: __m512| {
                let q = _mm512_mul_ps(v, inverse);
                // NaN to 0: the ordered compare is false only for NaN.
                let q = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(q, q), q);
                let q = _mm512_min_ps(_mm512_max_ps(q, low), high);
                let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    q,
                );
                _mm512_add_epi32(q, offset)
            };
            for (c, o) in chunks.chunks_exact(LANES).zip(out.chunks_exact_mut(LANES)) {
                // SAFETY: `c` holds 16 floats and `o` 16 bytes.
                unsafe {
                    let bytes = _mm512_cvtepi32_epi8(to_ints(_mm512_loadu_ps(c.as_ptr())));
                    _mm_storeu_si128(o.as_mut_ptr().cast::<__m128i>(), bytes);
                }
            }
            if tail > 0 {
                // SAFETY: the masks read the `tail` floats of `rest` and write `tail` bytes from
                // `k - tail`, inside the row's `k_pad ≥ k` bytes.
                unsafe {
                    let ints = to_ints(_mm512_maskz_loadu_ps(tail_mask, rest.as_ptr()));
                    _mm512_mask_cvtepi32_storeu_epi8(
                        out[k - tail..].as_mut_ptr().cast::<i8>(),
                        tail_mask,
                        ints,
                    );
                }
            }
        }
        (values, scales)
    }

    /// See [`super::block_product`].
    ///
    /// # Safety
    /// The CPU must have AVX-512 VNNI and the slices the lengths `super::block_product` checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn block_product(
        x: &[u8],
        row_scales: &[f32],
        w: &Weight<'_>,
        panels: Range<usize>,
        out: &mut [f32],
    ) {
        let count = row_scales.len();
        let mut acc = [[0i32; PANEL]; ROWS];
        for p in panels {
            let panel = &w.packed[p * w.k_pad * PANEL..(p + 1) * w.k_pad * PANEL];
            // SAFETY: the caller's lengths (see `super::block_product`).
            unsafe {
                match count {
                    1 => sums::<1>(x, w.k_pad, panel, &mut acc),
                    2 => sums::<2>(x, w.k_pad, panel, &mut acc),
                    3 => sums::<3>(x, w.k_pad, panel, &mut acc),
                    4 => sums::<4>(x, w.k_pad, panel, &mut acc),
                    5 => sums::<5>(x, w.k_pad, panel, &mut acc),
                    6 => sums::<6>(x, w.k_pad, panel, &mut acc),
                    7 => sums::<7>(x, w.k_pad, panel, &mut acc),
                    8 => sums::<8>(x, w.k_pad, panel, &mut acc),
                    9 => sums::<9>(x, w.k_pad, panel, &mut acc),
                    10 => sums::<10>(x, w.k_pad, panel, &mut acc),
                    11 => sums::<11>(x, w.k_pad, panel, &mut acc),
                    _ => sums::<ROWS>(x, w.k_pad, panel, &mut acc),
                }
            }
            let first = p * PANEL;
            let cols = PANEL.min(w.n - first);
            let offsets = &w.offsets[first..first + PANEL];
            let scales = &w.scales[first..first + PANEL];
            for (r, (sums, &row_scale)) in acc.iter().zip(row_scales).enumerate() {
                let y = &mut out[r * w.n + first..r * w.n + first + cols];
                // The same formula as the scalar kernel's, so both give identical floats.
                match w.bias {
                    Some(bias) => {
                        for (c, y) in y.iter_mut().enumerate() {
                            let sum = sums[c] - offsets[c];
                            *y = sum as f32 * (row_scale * scales[c]) + bias[first + c];
                        }
                    }
                    None => {
                        for (c, y) in y.iter_mut().enumerate() {
                            let sum = sums[c] - offsets[c];
                            *y = sum as f32 * (row_scale * scales[c]) + 0.0;
                        }
                    }
                }
            }
        }
    }

    /// The integer sums of `R` rows against one panel into `acc[row][channel]` (with the `+ 128`
    /// offset still in).
    ///
    /// # Safety
    /// AVX-512 VNNI; `x` holds `R * k_pad` bytes and `panel` `k_pad * PANEL`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn sums<const R: usize>(
        x: &[u8],
        k_pad: usize,
        panel: &[i8],
        acc: &mut [[i32; PANEL]; ROWS],
    ) {
        let mut sums = [[_mm512_setzero_si512(); 2]; R];
        let xs = x.as_ptr();
        let w = panel.as_ptr();
        for group in 0..k_pad / GROUP {
            // SAFETY: `128 * group + 128 <= k_pad * PANEL` bytes of the panel.
            let (w0, w1) = unsafe {
                let at = w.add(group * GROUP * PANEL);
                (
                    _mm512_loadu_si512(at.cast::<__m512i>()),
                    _mm512_loadu_si512(at.add(GROUP * PANEL / 2).cast::<__m512i>()),
                )
            };
            for (r, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `r * k_pad + 4 * group + 3 < R * k_pad` bytes of `x`; read unaligned.
                let four = unsafe {
                    xs.add(r * k_pad + GROUP * group)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let four = _mm512_set1_epi32(four);
                sum[0] = _mm512_dpbusd_epi32(sum[0], four, w0);
                sum[1] = _mm512_dpbusd_epi32(sum[1], four, w1);
            }
        }
        for (out, sum) in acc.iter_mut().zip(&sums) {
            // SAFETY: each row of `acc` holds 32 i32, the two 16-lane stores fill it exactly.
            unsafe {
                let at = out.as_mut_ptr().cast::<__m512i>();
                _mm512_storeu_si512(at, sum[0]);
                _mm512_storeu_si512(at.add(1), sum[1]);
            }
        }
    }
}
