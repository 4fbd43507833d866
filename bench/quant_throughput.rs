//! Quantization throughput on a 1 GiB synthetic safetensors file, one scheme per child process.
//!
//! Run: `cargo bench -p compressd-engine --bench quant_throughput` (add `-- --size-mib 256` for a
//! quicker run). The parent writes the input file (64 f32 tensors of 4096 × 1024, values from a
//! seeded generator) into a temporary folder, then re-runs itself once per scheme so each scheme's
//! peak resident memory (VmHWM) is its own. The input sits in the page cache, so the numbers measure
//! quantization, not the disk. Throughput counts input bytes (f32) per second, in MB (10⁶ bytes).
//! Because the machine is often shared, each child also reports its CPU time (user + system, from
//! /proc/self/stat) and the throughput per CPU-second, which other processes' load does not change;
//! on an idle machine with N cores the wall-clock rate approaches N times it when both cores work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use compressd_engine::quant::st_file::{EntryPlan, SafetensorsWriter};
use compressd_engine::quant::stream::quantize_file;
use compressd_engine::quant::QuantScheme;

const ROWS: usize = 4096;
const COLS: usize = 1024;
const SCHEMES: [&str; 6] = ["int8", "q8_0", "int4-g128", "q4_0", "q4_k", "q6_k"];

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let (scheme, input) = (&args[i + 1], PathBuf::from(&args[i + 2]));
        return child(scheme, &input);
    }
    let size_mib: usize = match args.iter().position(|a| a == "--size-mib") {
        Some(i) => args
            .get(i + 1)
            .context("--size-mib needs a number")?
            .parse()?,
        None => 1024,
    };
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("synthetic.safetensors");
    let tensors = (size_mib * (1 << 20) / (ROWS * COLS * 4)).max(1);
    write_synthetic(&input, tensors)?;
    let largest_mb = (ROWS * COLS * 4) as f64 / 1e6;
    println!("input: {tensors} tensors of {ROWS}x{COLS} f32 = {:.0} MB; largest tensor {largest_mb:.1} MB", (tensors * ROWS * COLS * 4) as f64 / 1e6);
    println!("| scheme | MB/s (f32 input) | seconds | MB per CPU-second | output MB | peak RSS MB | RSS bound (2x largest + 200 MB) |");
    println!("|---|---|---|---|---|---|---|");
    let exe = std::env::current_exe()?;
    for scheme in SCHEMES {
        let out = Command::new(&exe)
            .args(["--child", scheme])
            .arg(&input)
            .output()?;
        if !out.status.success() {
            bail!("{scheme}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let line = String::from_utf8_lossy(&out.stdout);
        let fields: BTreeMap<String, f64> = serde_json::from_str(line.trim())?;
        let bound = 2.0 * largest_mb + 200.0;
        println!(
            "| {scheme} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} | {} |",
            fields["mb_per_s"],
            fields["seconds"],
            fields["mb_per_cpu_s"],
            fields["output_mb"],
            fields["peak_rss_mb"],
            if fields["peak_rss_mb"] < bound {
                "met"
            } else {
                "MISSED"
            }
        );
    }
    Ok(())
}

/// Quantizes `input` with one scheme and prints throughput, output size and peak RSS as JSON.
fn child(scheme: &str, input: &Path) -> Result<()> {
    let scheme: QuantScheme = scheme.parse()?;
    let output = input.with_extension(format!("{scheme}.safetensors"));
    let cpu_before = cpu_seconds()?;
    let report = quantize_file(input, &output, scheme, |_| true)?;
    let cpu = cpu_seconds()? - cpu_before;
    let fields = BTreeMap::from([
        ("mb_per_s", report.megabytes_per_second()),
        (
            "mb_per_cpu_s",
            report.quantized_input_bytes as f64 / 1e6 / cpu.max(1e-3),
        ),
        ("seconds", report.seconds),
        ("output_mb", report.output_bytes as f64 / 1e6),
        ("peak_rss_mb", peak_rss_kib()? as f64 * 1024.0 / 1e6),
    ]);
    std::fs::remove_file(&output)?;
    println!("{}", serde_json::to_string(&fields)?);
    Ok(())
}

/// CPU time (user + system, all threads) this process has used, in seconds. /proc/self/stat counts
/// clock ticks, which are 1/100 s on Linux (USER_HZ).
fn cpu_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    // Fields after the parenthesised command name: state is field 3, utime 14 and stime 15.
    let after_name = stat
        .rsplit_once(')')
        .context("malformed /proc/self/stat")?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/self/stat")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// This process's peak resident set (VmHWM) in KiB.
fn peak_rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()?)
}

/// Writes `tensors` f32 tensors of `ROWS × COLS` with roughly normal values (sum of uniforms).
fn write_synthetic(path: &Path, tensors: usize) -> Result<()> {
    let plan = (0..tensors)
        .map(|i| EntryPlan {
            name: format!("layers.{i}.weight"),
            dtype: "F32".into(),
            shape: vec![ROWS, COLS],
            bytes: ROWS * COLS * 4,
        })
        .collect();
    let mut writer = SafetensorsWriter::create(path, plan, &BTreeMap::new())?;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut uniform = move || {
        // xorshift64*: fast and reproducible; quality is ample for synthetic weights.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut bytes = Vec::with_capacity(ROWS * COLS * 4);
    for _ in 0..tensors {
        bytes.clear();
        for _ in 0..ROWS * COLS {
            let v = (uniform() + uniform() + uniform()) * 0.05;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        writer.write_next(&bytes)?;
    }
    writer.finish()?;
    Ok(())
}
