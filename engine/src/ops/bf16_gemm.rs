//! f32 matrices multiplied with bfloat16 products and f32 sums, on AVX-512 BF16 (`vdpbf16ps`).
//!
//! This is CPU mixed precision (`mixed_precision: "bf16"` on a CPU worker): what PyTorch's
//! autocast does for `nn.Linear`, with the difference that activations and gradients stay f32 in
//! memory and only the products' operands are rounded to bfloat16 (nearest even) as they are
//! packed. `vdpbf16ps` multiplies 32 bf16 pairs per instruction into 16 f32 sums, twice the lanes
//! of an f32 FMA; measured on a Zen 4 core (`bench/simd_ceilings.rs`), the register-only loop runs
//! at about 2–3x the f32 FMA loop's multiply-adds.
//!
//! The layout is the classic one (Goto): the right operand is packed once per block of `KC` rows
//! into panels of `NR` columns, each row pair's two values side by side as `vdpbf16ps` wants them
//! (element `k` in the low half of a 32-bit lane, `k + 1` in the high half); the left operand is
//! packed per block of `MC` rows into micro-panels of `MR` rows; a `MR × NR` tile of sums lives in
//! 24 registers over one block of `k`. Blocks of rows run on rayon's threads.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use rayon::prelude::*;

/// Rows of one register tile.
const MR: usize = 12;
/// Columns of one register tile: two vectors of 16 f32.
const NR: usize = 32;
/// Depth of one packed block (even: whole pairs). A packed `KC × NR` panel is 16 KiB, in L1.
const KC: usize = 256;
/// Rows of one packed left block (a multiple of `MR`): 48 KiB at `KC`, in L2, one per task.
const MC: usize = 96;

/// Whether this process can run the kernel, and so where CPU mixed precision (`mixed_precision:
/// "bf16"`) is offered: the CPU has AVX-512 F, BW and BF16 and `COMPRESSD_CPU_ISA` does not cap the
/// choice below it (`scalar` or `avx2`; `avx512` keeps it, as BF16 is part of the AVX-512 family).
/// Decided once per process.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let capped = matches!(
            std::env::var("COMPRESSD_CPU_ISA").as_deref(),
            Ok("scalar" | "avx2")
        );
        !capped && cpu_has_avx512_bf16()
    })
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_avx512_bf16() -> bool {
    // BW as well: the packing is compiled with it (every CPU with BF16 has it).
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_avx512_bf16() -> bool {
    false
}

/// A matrix read through strides: element `(i, j)` at `ptr[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct MatRef {
    /// Element `(0, 0)`.
    pub ptr: *const f32,
    /// Row stride, in elements.
    pub rs: isize,
    /// Column stride, in elements.
    pub cs: isize,
}

/// A matrix written through strides.
#[derive(Clone, Copy)]
pub struct MatMut {
    /// Element `(0, 0)`.
    pub ptr: *mut f32,
    /// Row stride, in elements.
    pub rs: isize,
    /// Column stride, in elements.
    pub cs: isize,
}

impl MatRef {
    /// The view starting at `(row, col)`.
    ///
    /// # Safety
    /// `(row, col)` must be inside the matrix (or one past it, for an empty view).
    unsafe fn shifted(self, row: usize, col: usize) -> Self {
        Self {
            ptr: self
                .ptr
                .offset(row as isize * self.rs + col as isize * self.cs),
            ..self
        }
    }

    /// The transpose: rows become columns.
    fn transposed(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl MatMut {
    /// The view starting at `(row, col)`.
    ///
    /// # Safety
    /// As for [`MatRef::shifted`].
    unsafe fn shifted(self, row: usize, col: usize) -> Self {
        Self {
            ptr: self
                .ptr
                .offset(row as isize * self.rs + col as isize * self.cs),
            ..self
        }
    }
}

// SAFETY: the pointers are only dereferenced inside `gemm`, whose caller guarantees the views are
// valid for its duration; tasks write disjoint rows of the destination.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}
unsafe impl Send for MatMut {}
unsafe impl Sync for MatMut {}

/// bfloat16 bits of `x`, rounded to nearest even (NaN stays NaN).
fn bf16_bits(x: f32) -> u32 {
    u32::from(half::bf16::from_f32(x).to_bits())
}

/// Two consecutive elements of a row (`k` and `k + 1`, the second 0 past `depth`) as one lane.
///
/// # Safety
/// `(row, k)` and, when `k + 1 < depth`, `(row, k + 1)` must be inside the view.
unsafe fn pair(m: MatRef, row: usize, k: usize, depth: usize) -> u32 {
    let at = |k: usize| *m.ptr.offset(row as isize * m.rs + k as isize * m.cs);
    let lo = bf16_bits(at(k));
    let hi = if k + 1 < depth {
        bf16_bits(at(k + 1))
    } else {
        0
    };
    lo | (hi << 16)
}

/// Packs `width ≤ stride` rows of `src` over its first `depth` columns into `out`: lane
/// `q · stride + i` holds row `i`'s columns `2q` and `2q + 1` as bf16 (low half, high half; the
/// high half 0 past `depth`). Lanes of rows past `width` are left as they are (zero).
///
/// Two layouts are converted 16 values at a time: rows contiguous along the columns (`cs == 1`:
/// `x` and `dy` as left operands, `Wᵀ` as the forward's right one) and columns contiguous along
/// the rows (`rs == 1`: the right operands of the backward, `dyᵀ` for `dW`). Anything else goes
/// element by element.
///
/// # Safety
/// The `width × depth` block must be inside `src`; `out` must hold `depth.div_ceil(2) · stride`
/// lanes; the CPU must have AVX-512 BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_panel(src: MatRef, width: usize, depth: usize, stride: usize, out: &mut [u32]) {
    let pairs = depth.div_ceil(2);
    debug_assert!(out.len() >= pairs * stride && width <= stride);
    if src.cs == 1 {
        // Each row's 32 values → 16 pairs in order (`vcvtne2ps2bf16` keeps element order), then
        // written down the row's lane column.
        let mut lanes = [0u32; 16];
        for i in 0..width {
            let row = src.ptr.offset(i as isize * src.rs);
            for q0 in (0..pairs).step_by(16) {
                let k0 = 2 * q0;
                let take = |from: usize| -> __m512 {
                    let count = depth.saturating_sub(from).min(16);
                    let mask: __mmask16 = if count == 16 { !0 } else { (1u16 << count) - 1 };
                    // Masked-off lanes are not read; the pointer may pass the row's end.
                    _mm512_maskz_loadu_ps(mask, row.wrapping_add(from))
                };
                let packed = _mm512_cvtne2ps_pbh(take(k0 + 16), take(k0));
                _mm512_storeu_si512(
                    lanes.as_mut_ptr().cast(),
                    std::mem::transmute::<__m512bh, __m512i>(packed),
                );
                for (q, &lane) in lanes.iter().enumerate().take((pairs - q0).min(16)) {
                    *out.get_unchecked_mut((q0 + q) * stride + i) = lane;
                }
            }
        }
        return;
    }
    if src.rs == 1 {
        // Columns 2q and 2q + 1 are two runs of `width` values: convert 16 of each, interleave
        // into 16 lanes, store them as they are.
        for q in 0..pairs {
            let col = |k: usize| src.ptr.offset(k as isize * src.cs);
            for i0 in (0..width).step_by(16) {
                let count = (width - i0).min(16);
                let mask: __mmask16 = if count == 16 { !0 } else { (1u16 << count) - 1 };
                let lo = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, col(2 * q).add(i0)));
                let hi = if 2 * q + 1 < depth {
                    _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, col(2 * q + 1).add(i0)))
                } else {
                    std::mem::transmute::<__m256i, __m256bh>(_mm256_setzero_si256())
                };
                let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(lo));
                let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(hi));
                let lanes = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
                _mm512_mask_storeu_epi32(out.as_mut_ptr().add(q * stride + i0).cast(), mask, lanes);
            }
        }
        return;
    }
    for i in 0..width {
        for q in 0..pairs {
            out[q * stride + i] = pair(src, i, 2 * q, depth);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_panel(_: MatRef, _: usize, _: usize, _: usize, _: &mut [u32]) {
    unreachable!("the bf16 kernel is only chosen where `available` says so")
}

/// `c = a · b` (or `c += a · b` with `accumulate`) for `a` of `m × k`, `b` of `k × n` and `c` of
/// `m × n`, the products' operands rounded to bfloat16 and the sums kept in f32.
///
/// # Safety
/// The views must cover their matrices for the call, `c` must not overlap `a` or `b`, and
/// [`available`] must be true.
pub unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    c: MatMut,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    *c.ptr.offset(i as isize * c.rs + j as isize * c.cs) = 0.0;
                }
            }
        }
        return;
    }
    let panels = n.div_ceil(NR);
    // Row blocks of at most MC rows, as many as a multiple of the threads so each gets the same
    // share (m = 256 in three blocks of 96 left one thread idle a third of the time).
    let tiles_total = m.div_ceil(MR);
    let threads = rayon::current_num_threads().max(1);
    let tasks = (tiles_total.div_ceil(MC / MR).div_ceil(threads) * threads).min(tiles_total);
    let mut packed_b: Vec<u32> = Vec::new();
    for pc in (0..k).step_by(KC) {
        let kc = KC.min(k - pc);
        let pairs = kc.div_ceil(2);
        // The right operand's block, as panels of NR columns: lane (q, j) of panel p holds
        // b[pc + 2q][p·NR + j] and b[pc + 2q + 1][p·NR + j]; columns past n are zero.
        packed_b.clear();
        packed_b.resize(panels * pairs * NR, 0);
        // Read b's transpose as rows: row j of bᵀ is column j of b.
        let bt = b.shifted(pc, 0).transposed();
        packed_b
            .par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                // SAFETY: columns p·NR .. p·NR + width < n and rows pc .. pc + kc ≤ k of b;
                // `available` (the caller's contract).
                unsafe { pack_panel(bt.shifted(p * NR, 0), NR.min(n - p * NR), kc, NR, panel) };
            });
        let first = pc == 0 && !accumulate;
        let packed_b = &packed_b;
        (0..tasks).into_par_iter().for_each(|task| {
            let (first_tile, end_tile) =
                (task * tiles_total / tasks, (task + 1) * tiles_total / tasks);
            let ic = first_tile * MR;
            let mc = (end_tile * MR).min(m) - ic;
            let tiles = end_tile - first_tile;
            // The left operand's block: lane (q, i) of micro-panel t holds a[ic + t·MR + i][pc +
            // 2q] and the next column; rows past m are zero.
            let mut packed_a = vec![0u32; tiles * pairs * MR];
            // SAFETY: (ic, pc) is inside a.
            let a_block = unsafe { a.shifted(ic, pc) };
            for (t, tile) in packed_a.chunks_exact_mut(pairs * MR).enumerate() {
                // SAFETY: rows ic + t·MR .. + width < m, columns pc .. pc + kc ≤ k of a;
                // `available` (the caller's contract).
                unsafe {
                    pack_panel(
                        a_block.shifted(t * MR, 0),
                        MR.min(mc - t * MR),
                        kc,
                        MR,
                        tile,
                    )
                };
            }
            for p in 0..panels {
                let cols = NR.min(n - p * NR);
                let b_panel = &packed_b[p * pairs * NR..(p + 1) * pairs * NR];
                for t in 0..tiles {
                    let rows = MR.min(mc - t * MR);
                    let a_tile = &packed_a[t * pairs * MR..(t + 1) * pairs * MR];
                    // SAFETY: the tile's first element is inside c.
                    let tile_c = unsafe { c.shifted(ic + t * MR, p * NR) };
                    // SAFETY: `available` (the caller's contract); the tile's rows and columns are
                    // inside c; the packed slices hold `pairs` lanes of MR and NR.
                    unsafe { tile_kernel(pairs, a_tile, b_panel, tile_c, rows, cols, !first) };
                }
            }
        });
    }
}

/// One `MR × NR` tile over `pairs` row pairs, stored to the first `rows × cols` of `c` (added to
/// what is there with `accumulate`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_kernel(
    pairs: usize,
    a: &[u32],
    b: &[u32],
    c: MatMut,
    rows: usize,
    cols: usize,
    accumulate: bool,
) {
    debug_assert!(a.len() >= pairs * MR && b.len() >= pairs * NR);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (a, b) = (a.as_ptr(), b.as_ptr());
    for q in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR).cast()));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * NR + 16).cast()));
        let a_row = a.add(q * MR);
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a_row.add(i) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    if c.cs == 1 && cols == NR {
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let row = c.ptr.offset(i as isize * c.rs);
            let (mut lo, mut hi) = (acc[0], acc[1]);
            if accumulate {
                lo = _mm512_add_ps(lo, _mm512_loadu_ps(row));
                hi = _mm512_add_ps(hi, _mm512_loadu_ps(row.add(16)));
            }
            _mm512_storeu_ps(row, lo);
            _mm512_storeu_ps(row.add(16), hi);
        }
        return;
    }
    // A partial tile or a strided destination: through a buffer, element by element.
    let mut buf = [0f32; MR * NR];
    for (i, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(buf.as_mut_ptr().add(i * NR), acc[0]);
        _mm512_storeu_ps(buf.as_mut_ptr().add(i * NR + 16), acc[1]);
    }
    for i in 0..rows {
        for j in 0..cols {
            let dst = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
            let v = buf[i * NR + j];
            *dst = if accumulate { *dst + v } else { v };
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_kernel(_: usize, _: &[u32], _: &[u32], _: MatMut, _: usize, _: usize, _: bool) {
    unreachable!("the bf16 kernel is only chosen where `available` says so")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(x: f32) -> f32 {
        half::bf16::from_f32(x).to_f32()
    }

    /// The product of bf16-rounded operands, in f64.
    fn reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| f64::from(round(a[i * k + p])) * f64::from(round(b[p * n + j])))
                    .sum();
            }
        }
        c
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32 ^ seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13);
                (h % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn products_match_the_rounded_reference_in_every_layout() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Odd depth, partial tiles and blocks, more than one KC block and MC block.
        for &(m, n, k) in &[
            (1, 1, 1),
            (13, 33, 7),
            (97, 70, 300),
            (200, 64, 513),
            (5, 3, 2),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let want = reference(m, n, k, &a, &b);
            // a row-major, b row-major, c row-major.
            let mut c = vec![f32::NAN; m * n];
            // a as the transpose of a column-major copy, b read as the transpose of bᵀ.
            let a_cm: Vec<f32> = (0..m * k).map(|x| a[(x % m) * k + x / m]).collect();
            let bt: Vec<f32> = (0..k * n).map(|x| b[(x % k) * n + x / k]).collect();
            let mut c_cm = vec![f32::NAN; m * n];
            unsafe {
                gemm(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: c.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    false,
                    MatRef {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    MatRef {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                );
                gemm(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: c_cm.as_mut_ptr(),
                        rs: 1,
                        cs: m as isize,
                    },
                    false,
                    MatRef {
                        ptr: a_cm.as_ptr(),
                        rs: 1,
                        cs: m as isize,
                    },
                    MatRef {
                        ptr: bt.as_ptr(),
                        rs: 1,
                        cs: k as isize,
                    },
                );
            }
            for i in 0..m {
                for j in 0..n {
                    let w = want[i * n + j];
                    let tol = 1e-5 * (k as f64).sqrt().max(1.0) + 1e-6 * w.abs();
                    let row_major = f64::from(c[i * n + j]);
                    let col_major = f64::from(c_cm[j * m + i]);
                    assert!(
                        (row_major - w).abs() < tol,
                        "{m}×{n}×{k} ({i},{j}): {row_major} vs {w}"
                    );
                    assert!(
                        (col_major - w).abs() < tol,
                        "{m}×{n}×{k} ({i},{j}): {col_major} vs {w}"
                    );
                }
            }
            // Strides neither layout has (every other element): the element-by-element packing.
            let a_spread: Vec<f32> = a.iter().flat_map(|&v| [v, f32::NAN]).collect();
            let mut c_spread = vec![f32::NAN; m * n];
            unsafe {
                gemm(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: c_spread.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    false,
                    MatRef {
                        ptr: a_spread.as_ptr(),
                        rs: 2 * k as isize,
                        cs: 2,
                    },
                    MatRef {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                );
            }
            assert_eq!(c_spread, c, "{m}×{n}×{k}: strided a");
            // Accumulating adds onto what is there.
            let before = c.clone();
            unsafe {
                gemm(
                    m,
                    n,
                    k,
                    MatMut {
                        ptr: c.as_mut_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                    true,
                    MatRef {
                        ptr: a.as_ptr(),
                        rs: k as isize,
                        cs: 1,
                    },
                    MatRef {
                        ptr: b.as_ptr(),
                        rs: n as isize,
                        cs: 1,
                    },
                );
            }
            for (after, before) in c.iter().zip(&before) {
                assert!((after - 2.0 * before).abs() <= 1e-5 * (1.0 + before.abs()));
            }
        }
    }

    #[test]
    fn an_empty_depth_writes_zeros_or_leaves_the_sum() {
        if !available() {
            return;
        }
        let mut c = vec![3f32; 6];
        let view = MatMut {
            ptr: c.as_mut_ptr(),
            rs: 3,
            cs: 1,
        };
        let empty = MatRef {
            ptr: std::ptr::null(),
            rs: 0,
            cs: 0,
        };
        unsafe { gemm(2, 3, 0, view, true, empty, empty) };
        assert_eq!(c, vec![3.0; 6]);
        let view = MatMut {
            ptr: c.as_mut_ptr(),
            rs: 3,
            cs: 1,
        };
        unsafe { gemm(2, 3, 0, view, false, empty, empty) };
        assert_eq!(c, vec![0.0; 6]);
    }
}
