//! The run report: `report.json` and `report.md`, for the baseline and after every stage.
//!
//! Each row holds what the issue promises a user: parameters, non-zero parameters, size on disk,
//! the task metric (accuracy and macro-F1, or perplexity), latency at batch 1 and 32, throughput,
//! the stage's wall time and peak memory. The report also carries the spec, the seed, sha256 of the
//! inputs and the software versions, so a run can be reproduced.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{EngineError, Result};

pub mod comparison;

pub use comparison::Comparison;

/// Measurements of one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelMetrics {
    /// Scalar parameters (quantized weights count once per weight).
    pub parameters: usize,
    /// Parameters that are not exactly zero.
    pub nonzero_parameters: usize,
    /// Bytes of the saved model folder.
    pub size_on_disk_bytes: u64,
    /// Share of correct predictions (classification).
    pub accuracy: Option<f64>,
    /// Unweighted mean of per-class F1 (classification).
    pub macro_f1: Option<f64>,
    /// exp(mean next-token NLL) (language modelling).
    pub perplexity: Option<f64>,
    /// Median latency of one example, in milliseconds.
    pub latency_batch1_ms: Option<f64>,
    /// Median latency of a batch of 32, in milliseconds.
    pub latency_batch32_ms: Option<f64>,
    /// Examples per second at batch 32.
    pub throughput_per_s: Option<f64>,
}

/// One row of the report: the baseline or a finished stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageRecord {
    /// `baseline`, or the stage's position and type (`1-prune`).
    pub label: String,
    /// The model's measurements after this stage.
    pub metrics: ModelMetrics,
    /// Wall time of the stage (or of the baseline evaluation), in seconds.
    pub wall_seconds: f64,
    /// Peak resident memory of the process during the stage, in bytes.
    pub peak_memory_bytes: u64,
    /// Whether the model met the acceptance contract; `None` without a contract.
    pub acceptance_met: Option<bool>,
    /// What the stage reports about itself (sparsity per layer, tensors kept in full precision...).
    pub details: serde_json::Value,
}

/// A file the run read, with its hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputHash {
    /// `model` or `dataset`.
    pub role: String,
    /// Where it was read from.
    pub path: String,
    /// sha256 of the file, or of the sorted (relative path, file sha256) list of a folder.
    pub sha256: String,
}

/// The software that produced the run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Software {
    /// This engine's version.
    pub engine: String,
    /// The candle version it is built on.
    pub candle: String,
    /// The device the run computed on.
    pub device: String,
    /// Target OS and architecture.
    pub platform: String,
}

impl Software {
    /// The running build, computing on `device`.
    pub fn current(device: &str) -> Self {
        Self {
            engine: env!("CARGO_PKG_VERSION").to_string(),
            candle: "0.11.1".to_string(),
            device: device.to_string(),
            platform: format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }
}

/// The whole report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The job spec as run (defaults filled).
    pub spec: serde_json::Value,
    /// The seed of every random choice.
    pub seed: u64,
    /// Hashes of the model and dataset.
    pub inputs: Vec<InputHash>,
    /// Versions.
    pub software: Software,
    /// The input model, measured before any stage.
    pub baseline: StageRecord,
    /// One row per finished stage, in order.
    pub stages: Vec<StageRecord>,
    /// The row acceptance is measured against (`baseline`, or the last leading fine-tune).
    pub reference: Option<String>,
    /// Whether the final model met the contract; `None` without a contract.
    pub acceptance_met: Option<bool>,
    /// The label of the `best` artifact's stage (the last one that met the contract).
    pub best: Option<String>,
}

impl Report {
    /// Writes `report.json` and `report.md` into `dir`.
    ///
    /// # Errors
    /// Fails when a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        let json_path = dir.join("report.json");
        let json = serde_json::to_vec_pretty(self).map_err(|e| EngineError::json(&json_path, e))?;
        std::fs::write(&json_path, json).map_err(|e| EngineError::io(&json_path, e))?;
        let md_path = dir.join("report.md");
        std::fs::write(&md_path, self.to_markdown()).map_err(|e| EngineError::io(&md_path, e))?;
        Ok((json_path, md_path))
    }

    /// The report as a Markdown document.
    pub fn to_markdown(&self) -> String {
        let mut md = String::from("# compressd run report\n\n");
        md.push_str("| stage | params | non-zero | size MB | accuracy | macro-F1 | perplexity | batch-1 ms | batch-32 ms | ex/s | wall s | peak MB | contract |\n");
        md.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for row in std::iter::once(&self.baseline).chain(&self.stages) {
            md.push_str(&markdown_row(row));
        }
        for row in &self.stages {
            md.push_str(&structures_kept(row));
        }
        md.push_str(&training_footprints(&self.stages));
        let verdict = match self.acceptance_met {
            Some(true) => "met by the final model",
            Some(false) => "**missed** by the final model",
            None => "none given",
        };
        for row in &self.stages {
            let side_by_side = row
                .details
                .get(comparison::DETAILS_KEY)
                .and_then(|c| serde_json::from_value::<Comparison>(c.clone()).ok());
            if let Some(c) = side_by_side {
                md.push_str(&c.to_markdown(&row.label));
            }
        }
        md.push_str(&format!("\nAcceptance contract: {verdict}"));
        if let Some(reference) = &self.reference {
            md.push_str(&format!(" (measured against `{reference}`)"));
        }
        if let Some(best) = &self.best {
            md.push_str(&format!("; `best` is the output of `{best}`"));
        }
        md.push_str(&format!(
            "\n\nSeed {}; engine {} on candle {}, {} ({}).\n\n",
            self.seed,
            self.software.engine,
            self.software.candle,
            self.software.device,
            self.software.platform
        ));
        for input in &self.inputs {
            md.push_str(&format!(
                "- {} `{}`: sha256 `{}`\n",
                input.role, input.path, input.sha256
            ));
        }
        md
    }
}

fn markdown_row(row: &StageRecord) -> String {
    let m = &row.metrics;
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    let contract = match row.acceptance_met {
        Some(true) => "met",
        Some(false) => "missed",
        None => "–",
    };
    format!(
        "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {} |\n",
        row.label,
        m.parameters,
        m.nonzero_parameters,
        m.size_on_disk_bytes as f64 / 1e6,
        opt(m.accuracy, 4),
        opt(m.macro_f1, 4),
        opt(m.perplexity, 3),
        opt(m.latency_batch1_ms, 2),
        opt(m.latency_batch32_ms, 1),
        opt(m.throughput_per_s, 1),
        row.wall_seconds,
        row.peak_memory_bytes as f64 / 1e6,
        contract,
    )
}

/// For the fine-tuning stages (their details carry `trainable_parameters` and the training
/// summary), what training held and how fast it stepped: full and LoRA fine-tunes side by side.
fn training_footprints(rows: &[StageRecord]) -> String {
    let trained: Vec<&StageRecord> = rows
        .iter()
        .filter(|r| r.details.get("trainable_parameters").is_some())
        .collect();
    if trained.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\n### Training footprint\n\n| stage | method | trainable | share | optimizer + gradient MB \
         | peak RSS MB | s / step | adapter MB |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in trained {
        let d = &row.details;
        let t = &d["training"];
        let mb = |v: &serde_json::Value| {
            v.as_f64()
                .map_or("–".to_string(), |b| format!("{:.2}", b / 1e6))
        };
        md.push_str(&format!(
            "| {} | {} | {} | {:.2}% | {} | {} | {:.3} | {} |\n",
            row.label,
            d["method"].as_str().unwrap_or("full"),
            d["trainable_parameters"],
            d["trainable_share"].as_f64().unwrap_or(0.0) * 100.0,
            mb(&t["optimizer_and_gradient_bytes"]),
            mb(&t["peak_rss_bytes"]),
            t["mean_step_seconds"].as_f64().unwrap_or(0.0),
            mb(&d["adapter_bytes"]),
        ));
    }
    md
}

/// For a structured prune stage (its details list `layers` with `kept` structures), what each layer
/// kept and the scores that decided it; empty for other stages.
fn structures_kept(row: &StageRecord) -> String {
    let Some(layers) = row.details.get("layers").and_then(|l| l.as_array()) else {
        return String::new();
    };
    let mut md = format!("\n### `{}`: structures kept\n\n", row.label);
    for t in row.details["targets"].as_array().into_iter().flatten() {
        md.push_str(&format!(
            "- {}: {:.1}% requested, {:.1}% removed ({} → {}){}\n",
            t["structure"].as_str().unwrap_or("?"),
            t["requested_share"].as_f64().unwrap_or(0.0) * 100.0,
            t["achieved_share"].as_f64().unwrap_or(0.0) * 100.0,
            t["before"],
            t["after"],
            t["note"]
                .as_str()
                .map(|n| format!("; {n}"))
                .unwrap_or_default(),
        ));
    }
    md.push_str(
        "\n| layer | structure | kept / before | kept scores (1 = layer mean) | best removed |\n",
    );
    md.push_str("|---|---|---|---|---|\n");
    for l in layers {
        let kept = l["kept"].as_array().map_or(0, Vec::len);
        let range = l["kept_score_range"]
            .as_array()
            .and_then(|r| {
                Some(format!(
                    "{:.3}–{:.3}",
                    r.first()?.as_f64()?,
                    r.get(1)?.as_f64()?
                ))
            })
            .unwrap_or_else(|| "–".into());
        let removed = l["removed_score_max"]
            .as_f64()
            .map_or("–".into(), |v| format!("{v:.3}"));
        md.push_str(&format!(
            "| {} | {} | {kept} / {} | {range} | {removed} |\n",
            l["layer"],
            l["structure"].as_str().unwrap_or("?"),
            l["before"],
        ));
    }
    md
}

/// sha256 of a file, or of a folder's files (each file's relative path and hash, sorted).
///
/// # Errors
/// Fails when a file cannot be read.
pub fn hash_path(path: &Path) -> Result<String> {
    if path.is_file() {
        return hash_file(path);
    }
    let mut files = Vec::new();
    collect_files(path, &mut files)?;
    files.sort();
    let mut hasher = Sha256::new();
    for file in files {
        let relative = file
            .strip_prefix(path)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        hasher.update(relative.as_bytes());
        hasher.update(hash_file(&file)?.as_bytes());
    }
    Ok(hex::encode(hasher.finalize()))
}

/// sha256 of one file, streamed.
///
/// # Errors
/// Fails when the file cannot be read.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|e| EngineError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))? {
        let path = entry.map_err(|e| EngineError::io(dir, e))?.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// Total bytes of the files under `path` (or of the file itself).
pub fn size_on_disk(path: &Path) -> u64 {
    if path.is_file() {
        return std::fs::metadata(path).map_or(0, |m| m.len());
    }
    let mut files = Vec::new();
    if collect_files(path, &mut files).is_err() {
        return 0;
    }
    files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// The process's peak resident memory since the last [`reset_peak_memory`], in bytes (Linux; 0
/// elsewhere).
pub fn peak_memory_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

/// Restarts peak-memory tracking so each stage reports its own peak (Linux ≥ 4.0: writing 5 to
/// `clear_refs` resets VmHWM). Best effort: elsewhere the peak stays process-wide.
pub fn reset_peak_memory() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(label: &str, accuracy: f64, met: Option<bool>) -> StageRecord {
        StageRecord {
            label: label.into(),
            metrics: ModelMetrics {
                parameters: 100,
                nonzero_parameters: 50,
                accuracy: Some(accuracy),
                ..Default::default()
            },
            wall_seconds: 1.5,
            peak_memory_bytes: 2_000_000,
            acceptance_met: met,
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn markdown_has_a_row_per_stage_and_the_verdict() {
        let report = Report {
            spec: serde_json::json!({"name": "t"}),
            seed: 7,
            inputs: vec![InputHash {
                role: "model".into(),
                path: "m".into(),
                sha256: "ab".into(),
            }],
            software: Software::current("cpu"),
            baseline: record("baseline", 0.9, None),
            stages: vec![record("0-prune", 0.85, Some(false))],
            reference: Some("baseline".into()),
            acceptance_met: Some(false),
            best: Some("baseline".into()),
        };
        let md = report.to_markdown();
        assert!(
            md.contains("| baseline | 100 | 50 | 0.00 | 0.9000 |"),
            "{md}"
        );
        assert!(md.contains("| 0-prune |") && md.contains("missed"), "{md}");
        assert!(md.contains("**missed** by the final model"));
        let dir = tempfile::tempdir().unwrap();
        report.write(dir.path()).unwrap();
        let back: Report =
            serde_json::from_slice(&std::fs::read(dir.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn folder_hash_depends_on_content_and_names() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        let first = hash_path(dir.path()).unwrap();
        std::fs::write(dir.path().join("a"), b"2").unwrap();
        assert_ne!(first, hash_path(dir.path()).unwrap());
        assert_eq!(size_on_disk(dir.path()), 1);
        assert!(peak_memory_bytes() > 0 || !cfg!(target_os = "linux"));
    }
}
