//! The f32 GEMMs of one training step of the `bench/train_step` config (rows 8 × 128 = 1024,
//! hidden 256, FFN 1024), in the layouts `ops::linear` calls the gemm crate with: forward
//! `y = x Wᵀ`, backward `dx = dy W` and `dW = dyᵀ x`. Prints GFLOP/s per call, median of `--runs`;
//! `bench/pytorch_gemm_shapes.py` times the same products in PyTorch. Where the CPU has AVX-512
//! BF16, the same products follow with bf16 operands and f32 sums (`ops::bf16_gemm`, CPU mixed
//! precision), `"impl": "bf16"`.
//!
//! ```text
//! cargo build --release -p compressd-engine --example f32_gemm_shapes
//! target/release/examples/f32_gemm_shapes [--runs 50]
//! ```

use std::time::Instant;

use anyhow::Result;
use gemm::Parallelism;

const ROWS: usize = 1024;
/// (in, out) of the attention projections, FFN up and FFN down.
const SHAPES: [(usize, usize); 3] = [(256, 256), (256, 1024), (1024, 256)];

fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// `dst (m × n) = lhs (m × k) · rhs (k × n)` with the given (column, row) strides.
#[allow(clippy::too_many_arguments)]
fn product(
    bf16: bool,
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dst_cs, dst_rs): (isize, isize),
    lhs: &[f32],
    (lhs_cs, lhs_rs): (isize, isize),
    rhs: &[f32],
    (rhs_cs, rhs_rs): (isize, isize),
) {
    if bf16 {
        use compressd_engine::ops::bf16_gemm::{gemm, MatMut, MatRef};
        // SAFETY: as below; `main` only asks for bf16 where the kernel is available.
        unsafe {
            gemm(
                m,
                n,
                k,
                MatMut {
                    ptr: dst.as_mut_ptr(),
                    rs: dst_rs,
                    cs: dst_cs,
                },
                false,
                MatRef {
                    ptr: lhs.as_ptr(),
                    rs: lhs_rs,
                    cs: lhs_cs,
                },
                MatRef {
                    ptr: rhs.as_ptr(),
                    rs: rhs_rs,
                    cs: rhs_cs,
                },
            );
        }
        return;
    }
    // SAFETY: the callers size every buffer to the strides given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_cs,
            dst_rs,
            false,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

fn main() -> Result<()> {
    compressd_engine::perf::tune_threads();
    let mut runs = 50;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    let fill = |n: usize| {
        (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect::<Vec<f32>>()
    };
    let mut kinds = vec![("gemm-crate", false)];
    if compressd_engine::ops::bf16_gemm::available() {
        kinds.push(("bf16", true));
    }
    for (name, bf16) in kinds {
        for (inp, out) in SHAPES {
            let x = fill(ROWS * inp);
            let w = fill(out * inp);
            let dy = fill(ROWS * out);
            let mut y = vec![0f32; ROWS * out];
            let mut dx = vec![0f32; ROWS * inp];
            let mut dw = vec![0f32; out * inp];
            let flops = 2.0 * (ROWS * inp * out) as f64;
            let (inp_s, out_s) = (inp as isize, out as isize);
            let fwd = median_ms(runs, || {
                product(
                    bf16,
                    (ROWS, out, inp),
                    &mut y,
                    (1, out_s),
                    &x,
                    (1, inp_s),
                    &w,
                    (inp_s, 1),
                )
            });
            let dxt = median_ms(runs, || {
                product(
                    bf16,
                    (ROWS, inp, out),
                    &mut dx,
                    (1, inp_s),
                    &dy,
                    (1, out_s),
                    &w,
                    (1, inp_s),
                )
            });
            let dwt = median_ms(runs, || {
                product(
                    bf16,
                    (out, inp, ROWS),
                    &mut dw,
                    (1, inp_s),
                    &dy,
                    (out_s, 1),
                    &x,
                    (1, inp_s),
                )
            });
            let gf = |ms: f64| (flops / ms / 1e6 * 10.0).round() / 10.0;
            println!(
                "{}",
                serde_json::json!({"impl": name, "in": inp, "out": out,
                "fwd_ms": fwd, "dx_ms": dxt, "dw_ms": dwt,
                "fwd_gflops": gf(fwd), "dx_gflops": gf(dxt), "dw_gflops": gf(dwt)})
            );
        }
    }
    Ok(())
}
