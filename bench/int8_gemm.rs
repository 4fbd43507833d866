//! The int8 × int8 → i32 GEMM of `layers::int8_matmul` against the f32 GEMM our dense layers run
//! (candle's `matmul`, the gemm crate), on all-MiniLM-L6-v2's linear shapes at 128 tokens, batch 1
//! and 32, in the same run. Times are the median of `--runs` calls after `--warmup`, on rayon's
//! default pool (every core). Before timing it checks that the kernel agrees with the f32 product.
//!
//! ```text
//! cargo run --release -p compressd-engine --example int8_gemm -- [--runs 30] [--warmup 5]
//! ```
//!
//! Results go to BENCHMARKS.md ("int8 × int8 GEMM").

use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use compressd_engine::layers::int8_matmul::{matmul, Int8Kernel, PackedInt8};
use compressd_engine::quant::Int8Weight;

/// MiniLM's linear layers as (in_features, out_features): attention projections, FFN up, FFN down.
const SHAPES: [(usize, usize); 3] = [(384, 384), (384, 1536), (1536, 384)];
const TOKENS: usize = 128;

fn median_ms(runs: usize, warmup: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[runs / 2])
}

fn main() -> Result<()> {
    let mut runs = 30;
    let mut warmup = 5;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value: usize = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()?;
        match flag.as_str() {
            "--runs" => runs = value,
            "--warmup" => warmup = value,
            other => bail!("unknown flag {other} (expected --runs N, --warmup N)"),
        }
    }
    ensure!(runs > 0, "--runs must be at least 1");
    let device = Device::Cpu;
    println!(
        "kernel {:?}, {} threads",
        Int8Kernel::detect(),
        rayon::current_num_threads()
    );
    println!("| batch | in × out | f32 ms | int8 ms | f32 / int8 |");
    println!("|---|---|---|---|---|");
    for batch in [1, 32] {
        let rows = batch * TOKENS;
        for (k, n) in SHAPES {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &device)?;
            let w = Tensor::randn(0f32, 0.05, (n, k), &device)?;
            let w_values = w.flatten_all()?.to_vec1::<f32>()?;
            let x_values = x.flatten_all()?.to_vec1::<f32>()?;
            let packed = PackedInt8::pack(&Int8Weight::quantize(&w_values, &[n, k]))
                .context("a 2-D weight packs")?;
            let reference = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
            let ours = matmul(&x_values, &packed, None);
            let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = ours
                .iter()
                .zip(&reference)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            ensure!(
                worst < 0.05 * scale,
                "{k}x{n}: int8 differs from f32 by {worst} (scale {scale})"
            );
            let wt = w.t()?;
            let f32_ms = median_ms(runs, warmup, || {
                std::hint::black_box(x.matmul(&wt)?);
                Ok(())
            })?;
            let int8_ms = median_ms(runs, warmup, || {
                std::hint::black_box(matmul(&x_values, &packed, None));
                Ok(())
            })?;
            println!(
                "| {batch} | {k} × {n} | {f32_ms:.3} | {int8_ms:.3} | {:.2}x |",
                f32_ms / int8_ms
            );
        }
    }
    Ok(())
}
