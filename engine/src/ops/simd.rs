//! Vectorised f32 kernels for the element-wise and row-wise work of a transformer (softmax's `exp`,
//! GELU's `erf`), chosen at run time for the CPU at hand: AVX-512, AVX2 + FMA, or portable scalar
//! code. One binary serves every x86-64 machine; each path is tested against the scalar one
//! (`tests` below).
//!
//! Profiles of MiniLM's forward pass put 14% of the time in scalar `erff` and 8% in scalar `expf`;
//! these kernels evaluate the same functions 16 (or 8) lanes at a time:
//! - `exp` is Cephes' `expf`: `x = n·ln 2 + r` with `|r| ≤ ½ ln 2`, a degree-6 polynomial for `eʳ`
//!   and `2ⁿ` built in the exponent bits; about 1 ulp. Inputs below `ln(f32::MIN_POSITIVE)` give
//!   exactly 0, so masked attention scores (−1e9) still get zero weight.
//! - `erf` is Abramowitz & Stegun 7.1.26, `1 − (a₁t + … + a₅t⁵)·e^{−x²}` with `t = 1/(1 + p|x|)`,
//!   absolute error below 1.5e-7 (f32's own resolution near 1). GELU's backward reuses its `e^{−x²/2}`
//!   for the normal density.
//!
//! The f64 kernels (gradient checks) keep libm; these are f32 only.

use std::sync::OnceLock;

/// The instruction sets the kernels are written for, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// AVX2 with FMA (x86-64-v3): 8 lanes.
    Avx2,
    /// AVX-512 F/BW/DQ/VL (x86-64-v4): 16 lanes.
    Avx512,
}

impl Isa {
    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && Self::Avx2.available()
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run (the tests compare each with the scalar one).
    pub fn all_available() -> Vec<Self> {
        [Self::Scalar, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|isa| isa.available())
            .collect()
    }

    /// The path the kernels take: the fastest available, capped by `COMPRESSD_CPU_ISA`
    /// (`scalar`, `avx2` or `avx512`) when set, so benchmarks can compare paths on one machine.
    pub fn detected() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let cap = match std::env::var("COMPRESSD_CPU_ISA").as_deref() {
                Ok("scalar") => Self::Scalar,
                Ok("avx2") => Self::Avx2,
                _ => Self::Avx512,
            };
            Self::all_available()
                .into_iter()
                .filter(|&isa| isa <= cap)
                .max()
                .unwrap_or(Self::Scalar)
        })
    }
}

mod consts {
    pub const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// ln 2 split in two so `x − n·ln 2` stays exact for |n| ≤ 127.
    pub const LN2_HI: f32 = 0.693_359_4;
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Below this `eˣ` is under f32's smallest normal; the kernels return 0 there.
    pub const EXP_MIN: f32 = -87.336_55;
    /// Above this `2ⁿ` would leave f32's exponent range; larger inputs give `e⁸⁸`.
    pub const EXP_MAX: f32 = 88.0;
    /// Cephes' `expf` polynomial, highest degree first.
    pub const EXP_P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    /// Abramowitz & Stegun 7.1.26.
    pub const ERF_P: f32 = 0.327_591_1;
    pub const ERF_A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152,
        1.061_405_4,
    ];
    pub const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    /// 1/√(2π), the standard normal density at 0.
    pub const INV_SQRT_2PI: f32 = 0.398_942_3;
}

/// The scalar reference of every kernel (and the tail of the vector loops).
mod scalar {
    use super::consts::*;

    pub fn exp(x: f32) -> f32 {
        if x < EXP_MIN {
            return 0.0;
        }
        // Written so a NaN goes through (and comes out NaN).
        let x = if x > EXP_MAX { EXP_MAX } else { x };
        let n = (x * LOG2E).round();
        let r = x - n * LN2_HI - n * LN2_LO;
        let mut p = EXP_P[0];
        for c in &EXP_P[1..] {
            p = p * r + c;
        }
        let y = p * r * r + r + 1.0;
        y * f32::from_bits(((n as i32 + 127) as u32) << 23)
    }

    /// `(erf(z), e^{−z²})`.
    pub fn erf_and_gauss(z: f32) -> (f32, f32) {
        let a = z.abs();
        let t = 1.0 / (1.0 + ERF_P * a);
        let mut p = ERF_A[4];
        for c in ERF_A[..4].iter().rev() {
            p = p * t + c;
        }
        let g = exp(-a * a);
        let e = 1.0 - p * t * g;
        (if z.is_sign_negative() { -e } else { e }, g)
    }

    pub fn gelu(x: f32) -> f32 {
        let (e, _) = erf_and_gauss(x * FRAC_1_SQRT_2);
        0.5 * x * (1.0 + e)
    }

    pub fn gelu_grad(x: f32) -> f32 {
        let (e, g) = erf_and_gauss(x * FRAC_1_SQRT_2);
        0.5 * (1.0 + e) + x * INV_SQRT_2PI * g
    }
}

/// `out[i] = gelu(x[i])` (exact, erf-based GELU).
///
/// # Panics
/// When the slices differ in length.
pub fn gelu(isa: Isa, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len());
    let done = match isa {
        // SAFETY: the path is only taken when the CPU has the instruction set (`Isa::available`).
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { x86::gelu_avx512(x, out) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => unsafe { x86::gelu_avx2(x, out) },
        _ => 0,
    };
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = scalar::gelu(v);
    }
}

/// `dx[i] = dy[i] · gelu'(x[i])`.
///
/// # Panics
/// When the slices differ in length.
pub fn gelu_backward(isa: Isa, x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    let done = match isa {
        // SAFETY: as in `gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { x86::gelu_backward_avx512(x, dy, dx) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => unsafe { x86::gelu_backward_avx2(x, dy, dx) },
        _ => 0,
    };
    for ((o, &v), &g) in dx[done..].iter_mut().zip(&x[done..]).zip(&dy[done..]) {
        *o = g * scalar::gelu_grad(v);
    }
}

/// Softmax of one row in place, after adding `bias` (an additive mask, same length) when given.
///
/// # Panics
/// When `bias` differs in length from `row`.
pub fn softmax_in_place(isa: Isa, row: &mut [f32], bias: Option<&[f32]>) {
    if let Some(bias) = bias {
        assert_eq!(bias.len(), row.len());
        row.iter_mut().zip(bias).for_each(|(x, b)| *x += b);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted_sum(isa, row, max);
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `row[i] = e^{row[i] − shift}` in place; returns the sum of the results.
pub fn exp_shifted_sum(isa: Isa, row: &mut [f32], shift: f32) -> f32 {
    let (done, mut sum) = match isa {
        // SAFETY: as in `gelu`.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.available() => unsafe { x86::exp_shifted_sum_avx512(row, shift) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.available() => unsafe { x86::exp_shifted_sum_avx2(row, shift) },
        _ => (0, 0.0),
    };
    for x in &mut row[done..] {
        *x = scalar::exp(*x - shift);
        sum += *x;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector paths. Each function handles whole vectors and returns how many elements it did;
    //! the caller finishes the tail with the scalar code.
    use std::arch::x86_64::*;

    use super::consts::*;

    /// Defines the kernels for one vector width from the intrinsics' names, so the AVX-512 and AVX2
    /// paths are one text and cannot drift apart.
    macro_rules! kernels {
        (
            features = $features:literal,
            lanes = $lanes:literal,
            vec = $v:ty,
            ivec = $iv:ty,
            exp = $exp:ident,
            erf_and_gauss = $erfg:ident,
            gelu = $gelu:ident,
            gelu_backward = $gelu_bwd:ident,
            exp_shifted_sum = $exp_sum:ident,
            set1 = $set1:ident,
            loadu = $loadu:ident,
            storeu = $storeu:ident,
            add = $add:ident,
            sub = $sub:ident,
            mul = $mul:ident,
            div = $div:ident,
            min = $min:ident,
            fmadd = $fmadd:ident,
            fnmadd = $fnmadd:ident,
            round = |$rx:ident| $round:expr,
            cvt_int = $cvt:ident,
            add_int = $add_i:ident,
            set1_int = $set1_int:ident,
            slli = $slli:ident,
            cast_float = $cast:ident,
            below = |$bx:ident, $by:ident| $below:expr,
            and_not_mask = |$mm:ident, $mv:ident| $and_not:expr,
            abs = |$ax:ident| $abs:expr,
            negate_where_negative = |$cm:ident, $cs:ident| $copysign:expr,
            reduce_add = |$rv:ident| $reduce:expr,
        ) => {
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $exp(x: $v) -> $v {
                let too_small = {
                    let $bx = x;
                    let $by = $set1(EXP_MIN);
                    $below
                };
                // `min(MAX, x)` returns x when x is NaN, so NaN goes through as in the scalar code.
                let x = $min($set1(EXP_MAX), x);
                let n = {
                    let $rx = $mul(x, $set1(LOG2E));
                    $round
                };
                let r = $fnmadd(n, $set1(LN2_HI), x);
                let r = $fnmadd(n, $set1(LN2_LO), r);
                let mut p = $set1(EXP_P[0]);
                for c in &EXP_P[1..] {
                    p = $fmadd(p, r, $set1(*c));
                }
                let y = $fmadd($mul(p, r), r, $add(r, $set1(1.0)));
                let bits: $iv = $slli::<23>($add_i($cvt(n), $set1_int(127)));
                let y = $mul(y, $cast(bits));
                let $mm = too_small;
                let $mv = y;
                $and_not
            }

            /// `(erf(z), e^{−z²})`.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn $erfg(z: $v) -> ($v, $v) {
                let a = {
                    let $ax = z;
                    $abs
                };
                let one = $set1(1.0);
                let t = $div(one, $fmadd($set1(ERF_P), a, one));
                let mut p = $set1(ERF_A[4]);
                for c in ERF_A[..4].iter().rev() {
                    p = $fmadd(p, t, $set1(*c));
                }
                let g = $exp($mul($sub($set1(0.0), a), a));
                let e = $fnmadd($mul(p, t), g, one);
                let e = {
                    let $cm = e;
                    let $cs = z;
                    $copysign
                };
                (e, g)
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $gelu(x: &[f32], out: &mut [f32]) -> usize {
                let whole = x.len() / $lanes * $lanes;
                for i in (0..whole).step_by($lanes) {
                    let v = $loadu(x.as_ptr().add(i));
                    let (e, _) = $erfg($mul(v, $set1(FRAC_1_SQRT_2)));
                    let half_x = $mul(v, $set1(0.5));
                    $storeu(out.as_mut_ptr().add(i), $fmadd(half_x, e, half_x));
                }
                whole
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $gelu_bwd(x: &[f32], dy: &[f32], dx: &mut [f32]) -> usize {
                let whole = x.len() / $lanes * $lanes;
                for i in (0..whole).step_by($lanes) {
                    let v = $loadu(x.as_ptr().add(i));
                    let (e, g) = $erfg($mul(v, $set1(FRAC_1_SQRT_2)));
                    let cdf = $mul($add(e, $set1(1.0)), $set1(0.5));
                    let grad = $fmadd($mul(v, $set1(INV_SQRT_2PI)), g, cdf);
                    $storeu(
                        dx.as_mut_ptr().add(i),
                        $mul(grad, $loadu(dy.as_ptr().add(i))),
                    );
                }
                whole
            }

            #[target_feature(enable = $features)]
            pub(super) unsafe fn $exp_sum(row: &mut [f32], shift: f32) -> (usize, f32) {
                let whole = row.len() / $lanes * $lanes;
                let shift = $set1(shift);
                let mut sum = $set1(0.0);
                for i in (0..whole).step_by($lanes) {
                    let p = row.as_mut_ptr().add(i);
                    let y = $exp($sub($loadu(p), shift));
                    $storeu(p, y);
                    sum = $add(sum, y);
                }
                let $rv = sum;
                (whole, $reduce)
            }
        };
    }

    kernels! {
        features = "avx512f,avx512dq,avx2,fma",
        lanes = 16,
        vec = __m512,
        ivec = __m512i,
        exp = exp_avx512,
        erf_and_gauss = erf_and_gauss_avx512,
        gelu = gelu_avx512,
        gelu_backward = gelu_backward_avx512,
        exp_shifted_sum = exp_shifted_sum_avx512,
        set1 = _mm512_set1_ps,
        loadu = _mm512_loadu_ps,
        storeu = _mm512_storeu_ps,
        add = _mm512_add_ps,
        sub = _mm512_sub_ps,
        mul = _mm512_mul_ps,
        div = _mm512_div_ps,
        min = _mm512_min_ps,
        fmadd = _mm512_fmadd_ps,
        fnmadd = _mm512_fnmadd_ps,
        round = |x| _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x),
        cvt_int = _mm512_cvtps_epi32,
        add_int = _mm512_add_epi32,
        set1_int = _mm512_set1_epi32,
        slli = _mm512_slli_epi32,
        cast_float = _mm512_castsi512_ps,
        below = |x, y| _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, y),
        and_not_mask = |m, v| _mm512_maskz_mov_ps(!m, v),
        abs = |x| _mm512_abs_ps(x),
        negate_where_negative = |m, s| _mm512_xor_ps(
            m,
            _mm512_and_ps(s, _mm512_castsi512_ps(_mm512_set1_epi32(i32::MIN)))
        ),
        reduce_add = |v| _mm512_reduce_add_ps(v),
    }

    kernels! {
        features = "avx2,fma",
        lanes = 8,
        vec = __m256,
        ivec = __m256i,
        exp = exp_avx2,
        erf_and_gauss = erf_and_gauss_avx2,
        gelu = gelu_avx2,
        gelu_backward = gelu_backward_avx2,
        exp_shifted_sum = exp_shifted_sum_avx2,
        set1 = _mm256_set1_ps,
        loadu = _mm256_loadu_ps,
        storeu = _mm256_storeu_ps,
        add = _mm256_add_ps,
        sub = _mm256_sub_ps,
        mul = _mm256_mul_ps,
        div = _mm256_div_ps,
        min = _mm256_min_ps,
        fmadd = _mm256_fmadd_ps,
        fnmadd = _mm256_fnmadd_ps,
        round = |x| _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x),
        cvt_int = _mm256_cvtps_epi32,
        add_int = _mm256_add_epi32,
        set1_int = _mm256_set1_epi32,
        slli = _mm256_slli_epi32,
        cast_float = _mm256_castsi256_ps,
        below = |x, y| _mm256_cmp_ps::<_CMP_LT_OQ>(x, y),
        and_not_mask = |m, v| _mm256_andnot_ps(m, v),
        abs = |x| _mm256_andnot_ps(_mm256_set1_ps(-0.0), x),
        negate_where_negative = |m, s| _mm256_xor_ps(m, _mm256_and_ps(s, _mm256_set1_ps(-0.0))),
        reduce_add = |v| {
            let half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let pairs = _mm_add_ps(half, _mm_movehl_ps(half, half));
            _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps::<1>(pairs, pairs)))
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs spanning GELU's and exp's interesting ranges, including the tails past each cut-off,
    /// zeros of both signs and a length that leaves a scalar tail for every vector width.
    fn inputs() -> Vec<f32> {
        let mut xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 200.0).collect();
        xs.extend([-0.0, 0.0, -100.0, 100.0, -1e9, 1e-8, -1e-8, 5.5, -5.5]);
        xs
    }

    /// The scalar kernels against libm's f64 functions. A&S 7.1.26 bounds erf's *absolute* error,
    /// so GELU's error is bounded by `½|x| · 1.5e-7` plus f32 rounding (relative error grows in the far negative tail,
    /// where GELU is nearly 0), the gradient's by `0.75e-7` plus rounding.
    #[test]
    fn scalar_kernels_match_libm() {
        for &x in &inputs() {
            let (xd, x64) = (x as f64, x as f64);
            let gelu = 0.5 * xd * (1.0 + libm::erf(x64 * std::f64::consts::FRAC_1_SQRT_2));
            assert!(
                (scalar::gelu(x) as f64 - gelu).abs() <= 2e-7 * (1.0 + xd.abs()),
                "gelu({x})"
            );
            let cdf = 0.5 * (1.0 + libm::erf(x64 * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x64 * x64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let grad = cdf + x64 * pdf;
            assert!(
                (scalar::gelu_grad(x) as f64 - grad).abs() <= 3e-7,
                "gelu'({x})"
            );
            if x > -87.0 && x < 88.0 {
                let e = x64.exp();
                assert!(
                    (scalar::exp(x) as f64 - e).abs() <= 3e-7 * e,
                    "exp({x}) = {} not {e}",
                    scalar::exp(x)
                );
            }
        }
        assert_eq!(scalar::exp(-1e9), 0.0);
        assert_eq!(scalar::exp(-88.0), 0.0);
    }

    #[test]
    fn every_path_matches_the_scalar_one() {
        let xs = inputs();
        let dy: Vec<f32> = xs.iter().map(|x| 1.0 - x * 0.1).collect();
        for isa in Isa::all_available() {
            let mut out = vec![0.0; xs.len()];
            gelu(isa, &xs, &mut out);
            let mut dx = vec![0.0; xs.len()];
            gelu_backward(isa, &xs, &dy, &mut dx);
            for (i, &x) in xs.iter().enumerate() {
                let want = scalar::gelu(x);
                assert!(
                    (out[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{isa:?} gelu({x})"
                );
                let want = dy[i] * scalar::gelu_grad(x);
                assert!(
                    (dx[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{isa:?} gelu'({x})"
                );
            }
            let mut row: Vec<f32> = xs.iter().map(|x| x.clamp(-200.0, 50.0)).collect();
            let sum = exp_shifted_sum(isa, &mut row, 10.0);
            let mut want_sum = 0.0f64;
            for (&got, &x) in row.iter().zip(&xs) {
                let want = scalar::exp(x.clamp(-200.0, 50.0) - 10.0);
                want_sum += want as f64;
                assert!((got - want).abs() <= 1e-6 * want, "{isa:?} exp({x} - 10)");
            }
            assert!(
                ((sum as f64) - want_sum).abs() <= 1e-5 * want_sum,
                "{isa:?} sum"
            );
        }
    }

    #[test]
    fn softmax_gives_masked_entries_exactly_zero() {
        for isa in Isa::all_available() {
            let mut row: Vec<f32> = (0..37).map(|i| (i as f32).sin() * 3.0).collect();
            let bias: Vec<f32> = (0..37)
                .map(|i| if i % 5 == 0 { -1e9 } else { 0.0 })
                .collect();
            softmax_in_place(isa, &mut row, Some(&bias));
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-6, "{isa:?} sums to {total}");
            for (i, p) in row.iter().enumerate() {
                assert!(
                    if i % 5 == 0 { *p == 0.0 } else { *p > 0.0 },
                    "{isa:?} p[{i}] = {p}"
                );
            }
        }
    }
}
