//! The multiply-add ceilings of one core for the instructions our kernels are built on, so kernel
//! timings can be read against what the hardware allows: f32 FMA (the f32 GEMM), AVX2 `vpmaddwd`
//! (our int8 kernel, i16 × i16 pairs into i32), and `vpmaddubsw` (u8 × i8 pairs into saturating
//! i16), followed by the `vpmaddwd` against ones that widens its pairs to i32, the form a kernel
//! taking full-range int8 needs. `vpmaddubsw` with i16 accumulation alone is listed as the upper
//! bound it cannot reach without saturating. Where the CPU has AVX-512 BF16, two 512-bit rows
//! follow: f32 FMA on zmm registers and `vdpbf16ps` (bf16 pairs into f32, CPU mixed precision's
//! kernel, `engine/src/ops/bf16_gemm.rs`).
//!
//! Each loop is register-only inline assembly (independent accumulators, no loads), run on one
//! thread; the median of `--rounds` (default 5) is printed in GMAC/s.
//!
//! ```text
//! cargo run --release -p compressd-engine --example simd_ceilings -- [--rounds 5]
//! ```
//!
//! Results go to BENCHMARKS.md (issue 15, thirteenth session).

use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Loop iterations per timed round.
const ITERATIONS: u64 = 50_000_000;

#[cfg(target_arch = "x86_64")]
mod loops {
    use std::arch::asm;

    macro_rules! timed_loop {
        ($name:ident, $body:expr) => {
            /// Runs the loop body `n` times (the CPU must have AVX2 and FMA).
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name(n: u64) {
                // SAFETY: register-only arithmetic on ymm registers declared clobbered; the caller
                // has checked AVX2 and FMA.
                unsafe {
                    asm!("2:", $body, "dec {n}", "jnz 2b", n = inout(reg) n => _,
                        out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                        out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                        out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                        out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                        options(nostack));
                }
            }
        };
    }

    macro_rules! timed_loop_512 {
        ($name:ident, $body:expr) => {
            /// Runs the loop body `n` times (the CPU must have AVX-512 F and BF16).
            #[target_feature(enable = "avx512f,avx512bf16")]
            pub unsafe fn $name(n: u64) {
                // SAFETY: register-only arithmetic on zmm registers declared clobbered; the caller
                // has checked AVX-512 F and BF16.
                unsafe {
                    asm!("2:", $body, "dec {n}", "jnz 2b", n = inout(reg) n => _,
                        out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                        out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                        out("zmm8") _, out("zmm9") _, out("zmm10") _, out("zmm11") _,
                        out("zmm14") _, out("zmm15") _,
                        options(nostack));
                }
            }
        };
    }

    // 12 independent FMAs of 16 lanes: 192 multiply-adds per iteration.
    timed_loop_512!(
        fma_f32_zmm,
        "vfmadd231ps zmm0, zmm14, zmm15\nvfmadd231ps zmm1, zmm14, zmm15
         vfmadd231ps zmm2, zmm14, zmm15\nvfmadd231ps zmm3, zmm14, zmm15
         vfmadd231ps zmm4, zmm14, zmm15\nvfmadd231ps zmm5, zmm14, zmm15
         vfmadd231ps zmm6, zmm14, zmm15\nvfmadd231ps zmm7, zmm14, zmm15
         vfmadd231ps zmm8, zmm14, zmm15\nvfmadd231ps zmm9, zmm14, zmm15
         vfmadd231ps zmm10, zmm14, zmm15\nvfmadd231ps zmm11, zmm14, zmm15"
    );
    // 12 independent vdpbf16ps of 32 bf16 pairs: 384 multiply-adds per iteration.
    timed_loop_512!(
        dpbf16_zmm,
        "vdpbf16ps zmm0, zmm14, zmm15\nvdpbf16ps zmm1, zmm14, zmm15
         vdpbf16ps zmm2, zmm14, zmm15\nvdpbf16ps zmm3, zmm14, zmm15
         vdpbf16ps zmm4, zmm14, zmm15\nvdpbf16ps zmm5, zmm14, zmm15
         vdpbf16ps zmm6, zmm14, zmm15\nvdpbf16ps zmm7, zmm14, zmm15
         vdpbf16ps zmm8, zmm14, zmm15\nvdpbf16ps zmm9, zmm14, zmm15
         vdpbf16ps zmm10, zmm14, zmm15\nvdpbf16ps zmm11, zmm14, zmm15"
    );

    // 8 independent FMAs of 8 lanes: 64 multiply-adds per iteration.
    timed_loop!(
        fma_f32,
        "vfmadd231ps ymm0, ymm14, ymm15\nvfmadd231ps ymm1, ymm14, ymm15
         vfmadd231ps ymm2, ymm14, ymm15\nvfmadd231ps ymm3, ymm14, ymm15
         vfmadd231ps ymm4, ymm14, ymm15\nvfmadd231ps ymm5, ymm14, ymm15
         vfmadd231ps ymm6, ymm14, ymm15\nvfmadd231ps ymm7, ymm14, ymm15"
    );
    // 6 × (vpmaddwd + vpaddd): 16 multiply-adds each, 96 per iteration.
    timed_loop!(
        madd_i16,
        "vpmaddwd ymm8, ymm14, ymm15\nvpaddd ymm0, ymm0, ymm8
         vpmaddwd ymm9, ymm14, ymm15\nvpaddd ymm1, ymm1, ymm9
         vpmaddwd ymm10, ymm14, ymm15\nvpaddd ymm2, ymm2, ymm10
         vpmaddwd ymm11, ymm14, ymm15\nvpaddd ymm3, ymm3, ymm11
         vpmaddwd ymm12, ymm14, ymm15\nvpaddd ymm4, ymm4, ymm12
         vpmaddwd ymm13, ymm14, ymm15\nvpaddd ymm5, ymm5, ymm13"
    );
    // 4 × (vpmaddubsw + vpmaddwd by ones + vpaddd): 32 multiply-adds each, 128 per iteration.
    timed_loop!(
        maddubs_widened,
        "vpmaddubsw ymm8, ymm14, ymm15\nvpmaddwd ymm8, ymm8, ymm13\nvpaddd ymm0, ymm0, ymm8
         vpmaddubsw ymm9, ymm14, ymm15\nvpmaddwd ymm9, ymm9, ymm13\nvpaddd ymm1, ymm1, ymm9
         vpmaddubsw ymm10, ymm14, ymm15\nvpmaddwd ymm10, ymm10, ymm13\nvpaddd ymm2, ymm2, ymm10
         vpmaddubsw ymm11, ymm14, ymm15\nvpmaddwd ymm11, ymm11, ymm13\nvpaddd ymm3, ymm3, ymm11"
    );
    // 6 × (vpmaddubsw + vpaddw): 32 multiply-adds each, 192 per iteration, i16 sums (saturating).
    timed_loop!(
        maddubs_i16_sums,
        "vpmaddubsw ymm8, ymm14, ymm15\nvpaddw ymm0, ymm0, ymm8
         vpmaddubsw ymm9, ymm14, ymm15\nvpaddw ymm1, ymm1, ymm9
         vpmaddubsw ymm10, ymm14, ymm15\nvpaddw ymm2, ymm2, ymm10
         vpmaddubsw ymm11, ymm14, ymm15\nvpaddw ymm3, ymm3, ymm11
         vpmaddubsw ymm12, ymm14, ymm15\nvpaddw ymm4, ymm4, ymm12
         vpmaddubsw ymm7, ymm14, ymm15\nvpaddw ymm5, ymm5, ymm7"
    );
}

fn main() -> Result<()> {
    let mut rounds = 5usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .context("--rounds needs a value")?
                    .parse()
                    .context("--rounds takes a count")?;
            }
            other => bail!("unknown flag {other} (expected --rounds N)"),
        }
    }
    run(rounds.max(1))
}

#[cfg(target_arch = "x86_64")]
fn run(rounds: usize) -> Result<()> {
    if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
    {
        bail!("this benchmark needs AVX2 and FMA");
    }
    type Loop = unsafe fn(u64);
    let mut cases: Vec<(&str, Loop, u64)> = vec![
        ("f32 FMA (vfmadd231ps)", loops::fma_f32, 64),
        ("i16 vpmaddwd + vpaddd", loops::madd_i16, 96),
        (
            "u8×i8 vpmaddubsw, widened by vpmaddwd",
            loops::maddubs_widened,
            128,
        ),
        (
            "u8×i8 vpmaddubsw into i16 (saturates)",
            loops::maddubs_i16_sums,
            192,
        ),
    ];
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        cases.push(("f32 FMA on zmm (AVX-512)", loops::fma_f32_zmm, 192));
        cases.push((
            "bf16 vdpbf16ps on zmm (AVX-512 BF16)",
            loops::dpbf16_zmm,
            384,
        ));
    }
    println!("| instructions | GMAC/s per core (median of {rounds}) | vs f32 FMA |");
    println!("|---|---|---|");
    let mut fma = None;
    for (name, body, macs) in cases {
        let mut rates: Vec<f64> = (0..rounds)
            .map(|_| {
                let start = Instant::now();
                // SAFETY: AVX2 and FMA were detected above, and AVX-512 F and BF16 for the
                // loops that need them.
                unsafe { body(ITERATIONS) };
                (ITERATIONS * macs) as f64 / start.elapsed().as_secs_f64() / 1e9
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        let base = *fma.get_or_insert(median);
        println!("| {name} | {median:.1} | {:.2}x |", median / base);
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn run(_rounds: usize) -> Result<()> {
    bail!("this benchmark measures x86-64 instructions")
}
