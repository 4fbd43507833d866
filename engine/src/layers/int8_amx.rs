//! The AMX kernel of [`super::int8_matmul`] (Intel Xeon from Sapphire Rapids on): `tdpbusd` multiplies
//! a 16 × 64 tile of unsigned activation bytes by a 64 × 16 tile of signed weight bytes into a
//! 16 × 16 tile of i32 sums, 16,384 products per instruction where AVX-512 VNNI's `vpdpbusd` does 64.
//!
//! It reads the VNNI kernel's operands ([`super::int8_vnni`]) as they are:
//! - activations as `q + 128` unsigned bytes, so the `128 · Σₖ w[n, k]` offset of each output
//!   channel is subtracted after the sum, and the sums are the exact integers of the scalar kernel
//!   (no 16-bit intermediate, nothing saturates);
//! - the weight in panels of 32 output channels where each group of 4 input columns holds channel
//!   0's 4 values, channel 1's 4 values, …: 128 bytes per group. Sixteen consecutive groups read
//!   with a 128-byte stride are exactly the weight tile `tdpbusd` takes (64 input columns × 16
//!   channels), the first 64 bytes of each group for channels 0–15 and the next 64 for 16–31.
//!
//! Only two things differ: the input dimension is padded to a whole tile row of 64 columns (with
//! zero weights), and the quantized activation rows to whole 16-row tiles, so the tile loads never
//! read past a buffer.
//!
//! One call computes up to 32 rows (two activation tiles) against each panel (two weight tiles)
//! into four accumulator tiles. Linux hands out the tile registers only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, made once by [`available`]). Rust has no stable AMX
//! intrinsics, so the instructions are inline assembly: they touch only the tile registers, which
//! compiled code never uses, and the memory passed to them. Each call configures the tiles and
//! releases them before it returns, so no tile state outlives it.

use std::mem::MaybeUninit;
use std::ops::Range;

use super::int8_vnni::{Weight, PANEL};

/// Rows of activations one call handles: two tiles of 16.
pub(crate) const ROWS: usize = 32;
/// Rows of one tile.
pub(crate) const TILE_ROWS: usize = 16;
/// Input columns of one tile row (64 bytes), the multiple the input dimension is padded to.
pub(crate) const K_STEP: usize = 64;

/// Whether this process can run the kernel: the CPU has AMX-TILE and AMX-INT8 and the AVX-512 VNNI
/// kernel's quantization, the kernel granted the tile registers, and `COMPRESSD_CPU_ISA` does not
/// cap the choice below AMX (`scalar`, `avx2` or `avx512`). Decided once per process.
pub(crate) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let capped = matches!(
            std::env::var("COMPRESSD_CPU_ISA").as_deref(),
            Ok("scalar" | "avx2" | "avx512")
        );
        !capped && super::int8_vnni::available() && x86::cpu_has_amx_int8() && x86::request_tiles()
    })
}

/// `out = x · Wᵀ (+ bias)` for `count = row_scales.len() ≤ ROWS` rows of quantized `x` and the
/// panels `panels` of `w`, into `out` (`count × n`, only the panels' columns, which it may leave
/// uninitialised before: the outputs are written, never read). `x` holds the
/// `count` rows, `k_pad` bytes each, followed by padding up to a whole tile of rows (16, or 32 when
/// `count > 16`).
///
/// # Panics
/// When called in a process where [`available`] is false, with `k_pad` not a multiple of
/// [`K_STEP`] or with slices shorter than the shapes say; the caller only picks this kernel after
/// detection and passes padded blocks.
pub(crate) fn block_product(
    x: &[u8],
    row_scales: &[f32],
    w: &Weight<'_>,
    panels: Range<usize>,
    out: &mut [MaybeUninit<f32>],
) {
    assert!(
        available(),
        "the AMX kernel needs AMX-INT8 and the tile registers"
    );
    let count = row_scales.len();
    let row_tiles = count.div_ceil(TILE_ROWS);
    assert!(count <= ROWS && w.k_pad.is_multiple_of(K_STEP));
    assert!(x.len() >= row_tiles * TILE_ROWS * w.k_pad && out.len() >= count * w.n);
    assert!(w.packed.len() >= panels.end * w.k_pad * PANEL);
    assert!(w.offsets.len() >= panels.end * PANEL && w.scales.len() >= panels.end * PANEL);
    assert!(panels.end * PANEL < w.n + PANEL && w.bias.is_none_or(|b| b.len() >= w.n));
    if count == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the tile registers are granted (checked above), and the lengths checked above bound
    // every tile load: activation tile t's rows `16t + i` at `(16t + i) · k_pad + kk + 64 ≤
    // row_tiles · 16 · k_pad`, panel p's weight rows `p · k_pad · 32 + 128 · (kk/4 + j) + 128 ≤
    // (p + 1) · k_pad · 32`.
    unsafe {
        x86::block_product(x, row_scales, row_tiles, w, panels, out);
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::{
        __m512i, __mmask16, _mm512_add_ps, _mm512_cvtepi32_ps, _mm512_loadu_ps, _mm512_loadu_si512,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_sub_epi32,
    };
    use std::mem::MaybeUninit;
    use std::ops::Range;

    use super::super::int8_vnni::{Weight, PANEL};
    use super::{K_STEP, ROWS, TILE_ROWS};

    /// CPUID leaf 7, sub-leaf 0: EDX bit 24 is AMX-TILE, bit 25 AMX-INT8.
    pub(super) fn cpu_has_amx_int8() -> bool {
        // CPUID is present on every x86_64 CPU (safe to call); leaf 7 is only read when the
        // maximum leaf reaches it.
        let max_leaf = std::arch::x86_64::__cpuid(0).eax;
        let edx = if max_leaf >= 7 {
            std::arch::x86_64::__cpuid_count(7, 0).edx
        } else {
            0
        };
        max_leaf >= 7 && edx & (1 << 24) != 0 && edx & (1 << 25) != 0
    }

    /// Asks Linux for the tile data registers for this process (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); false where the kernel refuses or is not Linux.
    pub(super) fn request_tiles() -> bool {
        #[cfg(target_os = "linux")]
        {
            const SYS_ARCH_PRCTL: i64 = 158;
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            let result: i64;
            // SAFETY: the arch_prctl system call with these arguments only changes which extended
            // register states the process may use; it reads and writes no memory of ours. The
            // syscall instruction clobbers rcx and r11, declared here.
            unsafe {
                asm!(
                    "syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => result,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack),
                );
            }
            result == 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// The tile configuration (`ldtilecfg`'s 64-byte operand, palette 1): tiles 0–7 each 16 rows
    /// of 64 bytes. Tiles 0–3 accumulate (16 × 16 i32), 4–5 hold activations (16 rows × 64
    /// bytes), 6–7 weights (16 groups × 16 channels × 4 bytes).
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        column_bytes: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = {
        let mut column_bytes = [0u16; 16];
        let mut rows = [0u8; 16];
        let mut t = 0;
        while t < 8 {
            column_bytes[t] = K_STEP as u16;
            rows[t] = TILE_ROWS as u8;
            t += 1;
        }
        TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            column_bytes,
            rows,
        }
    };

    /// The i32 sums of 32 rows × one panel, as the accumulator tiles are stored.
    #[repr(C, align(64))]
    struct Sums([[i32; PANEL]; ROWS]);

    /// See [`super::block_product`].
    ///
    /// # Safety
    /// The tile registers must be granted (so AVX-512 F and BW are present, which the conversion
    /// of the sums is compiled for), and the slices as long as `super::block_product` checks.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn block_product(
        x: &[u8],
        row_scales: &[f32],
        row_tiles: usize,
        w: &Weight<'_>,
        panels: Range<usize>,
        out: &mut [MaybeUninit<f32>],
    ) {
        let k_pad = w.k_pad;
        let mut sums = Sums([[0; PANEL]; ROWS]);
        // Bytes between rows: of the activations, of a weight group, of the stored sums.
        let x_stride = k_pad;
        let w_stride = 4 * PANEL;
        let sums_stride = 4 * PANEL;
        let steps = k_pad / K_STEP;
        // SAFETY (all asm below): `ldtilecfg` reads the 64-byte config; the tile loads read only
        // what `super::block_product` bounds; the stores write the 32 × 32 i32 of `sums`. Every
        // block declares the tile registers it changes. Tile data never has to survive from one
        // block to the next (each panel's products run in one block); only the configuration
        // does, which compiled code never touches.
        unsafe {
            asm!(
                "ldtilecfg [{}]",
                in(reg) &CONFIG,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly, preserves_flags)
            );
        }
        for p in panels {
            if steps == 0 {
                // No input columns: every sum is zero (the tiles are not used).
                sums.0 = [[0; PANEL]; ROWS];
            } else {
                // SAFETY: see `super::block_product`; each step moves 64 bytes along the rows of
                // `x` and 16 groups (2,048 bytes) along the panel.
                let at = sums.0.as_mut_ptr().cast::<u8>();
                unsafe {
                    let panel = w.packed.as_ptr().add(p * k_pad * PANEL);
                    if row_tiles == 2 {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "tilezero tmm2",
                            "tilezero tmm3",
                            "2:",
                            "tileloadd tmm4, [{xa} + {xs}*1]",
                            "tileloadd tmm5, [{xb} + {xs}*1]",
                            "tileloadd tmm6, [{wb} + {ws}*1]",
                            "tileloadd tmm7, [{wb} + {ws}*1 + 64]",
                            "tdpbusd tmm0, tmm4, tmm6",
                            "tdpbusd tmm1, tmm4, tmm7",
                            "tdpbusd tmm2, tmm5, tmm6",
                            "tdpbusd tmm3, tmm5, tmm7",
                            "add {xa}, 64",
                            "add {xb}, 64",
                            "add {wb}, 2048",
                            "dec {n}",
                            "jnz 2b",
                            "tilestored [{a} + {ss}*1], tmm0",
                            "tilestored [{a} + {ss}*1 + 64], tmm1",
                            "tilestored [{b} + {ss}*1], tmm2",
                            "tilestored [{b} + {ss}*1 + 64], tmm3",
                            xa = inout(reg) x.as_ptr() => _,
                            xb = inout(reg) x.as_ptr().add(TILE_ROWS * x_stride) => _,
                            wb = inout(reg) panel => _,
                            n = inout(reg) steps => _,
                            xs = in(reg) x_stride,
                            ws = in(reg) w_stride,
                            a = in(reg) at,
                            b = in(reg) at.add(TILE_ROWS * sums_stride),
                            ss = in(reg) sums_stride,
                            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                            options(nostack)
                        );
                    } else {
                        asm!(
                            "tilezero tmm0",
                            "tilezero tmm1",
                            "2:",
                            "tileloadd tmm4, [{xa} + {xs}*1]",
                            "tileloadd tmm6, [{wb} + {ws}*1]",
                            "tileloadd tmm7, [{wb} + {ws}*1 + 64]",
                            "tdpbusd tmm0, tmm4, tmm6",
                            "tdpbusd tmm1, tmm4, tmm7",
                            "add {xa}, 64",
                            "add {wb}, 2048",
                            "dec {n}",
                            "jnz 2b",
                            "tilestored [{a} + {ss}*1], tmm0",
                            "tilestored [{a} + {ss}*1 + 64], tmm1",
                            xa = inout(reg) x.as_ptr() => _,
                            wb = inout(reg) panel => _,
                            n = inout(reg) steps => _,
                            xs = in(reg) x_stride,
                            ws = in(reg) w_stride,
                            a = in(reg) at,
                            ss = in(reg) sums_stride,
                            out("tmm0") _, out("tmm1") _, out("tmm4") _, out("tmm6") _,
                            out("tmm7") _,
                            options(nostack)
                        );
                    }
                }
            }
            let first = p * PANEL;
            let cols = PANEL.min(w.n - first);
            // SAFETY: the panel's offsets, scales (padded to whole panels) and bias (`n` long,
            // read only below `first + cols ≤ n`) and row r's `cols` outputs; AVX-512 F is
            // present with AMX.
            unsafe {
                dequantize(&sums, row_scales, w, first, cols, &mut out[first..]);
            }
        }
        unsafe {
            asm!(
                "tilerelease",
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, nomem, preserves_flags)
            );
        }
    }

    /// `y[r, c] = (sums[r][c] − offset[c]) · (row_scale[r] · scale[c]) + bias[c]` for the panel's
    /// `cols` channels from `first`, into row r of `out` (whose rows are `w.n` apart, from column
    /// `first`). The scalar kernel's formula, multiply then add (no fused multiply-add), so every
    /// kernel gives identical floats.
    ///
    /// # Safety
    /// AVX-512 F; `w.offsets` and `w.scales` hold `first + 32` values, `w.bias` (when given)
    /// `first + cols`, and `out` `(rows − 1) · w.n + cols` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn dequantize(
        sums: &Sums,
        row_scales: &[f32],
        w: &Weight<'_>,
        first: usize,
        cols: usize,
        out: &mut [MaybeUninit<f32>],
    ) {
        let masks: [__mmask16; 2] = [
            (1u32 << cols.min(16)).wrapping_sub(1) as __mmask16,
            (1u32 << cols.saturating_sub(16)).wrapping_sub(1) as __mmask16,
        ];
        // SAFETY (every load and store): within the lengths the caller guarantees.
        unsafe {
            let half = |h: usize| {
                let at = first + 16 * h;
                (
                    _mm512_loadu_si512(w.offsets.as_ptr().add(at).cast::<__m512i>()),
                    _mm512_loadu_ps(w.scales.as_ptr().add(at)),
                    match w.bias {
                        Some(bias) => _mm512_maskz_loadu_ps(masks[h], bias.as_ptr().add(at)),
                        None => _mm512_setzero_ps(),
                    },
                )
            };
            // The second half only when the panel has columns there: its bias pointer would
            // point past the bias otherwise.
            let halves = [Some(half(0)), (masks[1] != 0).then(|| half(1))];
            for (r, (row, &row_scale)) in sums.0.iter().zip(row_scales).enumerate() {
                let row_scale = _mm512_set1_ps(row_scale);
                for (h, half) in halves.iter().enumerate() {
                    let Some((offsets, scales, bias)) = *half else {
                        continue;
                    };
                    let sum = _mm512_loadu_si512(row.as_ptr().add(16 * h).cast::<__m512i>());
                    let sum = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, offsets));
                    let y =
                        _mm512_add_ps(_mm512_mul_ps(sum, _mm512_mul_ps(row_scale, scales)), bias);
                    _mm512_mask_storeu_ps(
                        out.as_mut_ptr().add(r * w.n + 16 * h).cast::<f32>(),
                        masks[h],
                        y,
                    );
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    pub(super) fn cpu_has_amx_int8() -> bool {
        false
    }
    pub(super) fn request_tiles() -> bool {
        false
    }
}
