//! Evaluation: classification metrics, perplexity, latency and throughput, and model size.
//!
//! Metrics follow scikit-learn's definitions so numbers are comparable with Python reports: F1 of a
//! class with no true or predicted examples counts as 0 (`zero_division=0`), and macro-F1 averages
//! over the classes that occur in the labels or the predictions.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::params::ParamStore;
use crate::{EngineError, Result};

/// Accuracy and F1 scores of a classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassificationMetrics {
    /// Share of correct predictions.
    pub accuracy: f64,
    /// Unweighted mean of per-class F1 over the classes present in labels or predictions.
    pub macro_f1: f64,
    /// F1 of each class id (0 for classes that never occur).
    pub per_class_f1: Vec<f64>,
    /// Number of examples of each class in the labels.
    pub support: Vec<usize>,
    /// Number of examples scored.
    pub count: usize,
}

/// Scores `predictions` against `labels` for `num_classes` classes.
///
/// # Errors
/// Different lengths, no examples, or a class id `>= num_classes`.
pub fn classification_metrics(
    predictions: &[u32],
    labels: &[u32],
    num_classes: usize,
) -> Result<ClassificationMetrics> {
    if predictions.len() != labels.len() || labels.is_empty() {
        return Err(EngineError::InvalidSetting(format!(
            "need as many predictions as labels (and at least one): {} vs {}",
            predictions.len(),
            labels.len()
        )));
    }
    let (mut tp, mut predicted, mut support) = (
        vec![0usize; num_classes],
        vec![0usize; num_classes],
        vec![0usize; num_classes],
    );
    for (&p, &l) in predictions.iter().zip(labels) {
        let (p, l) = (p as usize, l as usize);
        if p >= num_classes || l >= num_classes {
            return Err(EngineError::InvalidSetting(format!(
                "class id out of range 0..{num_classes}"
            )));
        }
        predicted[p] += 1;
        support[l] += 1;
        if p == l {
            tp[p] += 1;
        }
    }
    let per_class_f1: Vec<f64> = (0..num_classes)
        .map(|c| {
            // F1 = 2·tp / (2·tp + fp + fn) = 2·tp / (predicted + support).
            let denom = predicted[c] + support[c];
            if denom == 0 {
                0.0
            } else {
                2.0 * tp[c] as f64 / denom as f64
            }
        })
        .collect();
    let present: Vec<usize> = (0..num_classes)
        .filter(|&c| predicted[c] + support[c] > 0)
        .collect();
    let macro_f1 = present.iter().map(|&c| per_class_f1[c]).sum::<f64>() / present.len() as f64;
    let correct: usize = tp.iter().sum();
    Ok(ClassificationMetrics {
        accuracy: correct as f64 / labels.len() as f64,
        macro_f1,
        per_class_f1,
        support,
        count: labels.len(),
    })
}

/// Perplexity from the mean negative log-likelihood per predicted token (natural log).
pub fn perplexity(mean_nll: f64) -> f64 {
    mean_nll.exp()
}

/// Latency and throughput at one batch size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Rows per call.
    pub batch_size: usize,
    /// Timed calls (after warm-up).
    pub runs: usize,
    /// Median wall time of one call, in milliseconds.
    pub p50_ms: f64,
    /// 90th percentile, in milliseconds.
    pub p90_ms: f64,
    /// Rows per second at the median latency.
    pub throughput_per_s: f64,
}

/// Times `call` (one forward pass over `batch_size` rows): `warmup` untimed calls, then `runs`
/// timed ones.
///
/// # Errors
/// `runs == 0`, or the first error `call` returns.
pub fn measure_latency(
    batch_size: usize,
    warmup: usize,
    runs: usize,
    mut call: impl FnMut() -> Result<()>,
) -> Result<LatencyReport> {
    if runs == 0 || batch_size == 0 {
        return Err(EngineError::InvalidSetting(
            "latency needs at least one run and one row".into(),
        ));
    }
    for _ in 0..warmup {
        call()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        call()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let p50_ms = percentile(&times, 0.5);
    Ok(LatencyReport {
        batch_size,
        runs,
        p50_ms,
        p90_ms: percentile(&times, 0.9),
        throughput_per_s: batch_size as f64 / (p50_ms / 1e3),
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Number of scalar parameters and how many of them are non-zero (pruning's effect).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParameterCounts {
    /// All scalars, trainable and frozen.
    pub total: usize,
    /// Scalars that are not exactly zero.
    pub nonzero: usize,
}

/// Counts the parameters of a store.
///
/// # Errors
/// A tensor that cannot be compared with zero (a device error).
pub fn parameter_counts(store: &ParamStore) -> Result<ParameterCounts> {
    let mut counts = ParameterCounts {
        total: 0,
        nonzero: 0,
    };
    for (_, tensor) in store.tensors() {
        counts.total += tensor.elem_count();
        counts.nonzero += count_nonzero(&tensor)?;
    }
    Ok(counts)
}

/// Number of elements of `t` that are not zero.
///
/// # Errors
/// A device error.
pub fn count_nonzero(t: &Tensor) -> Result<usize> {
    let zero = t.zeros_like()?;
    let nonzero = t
        .ne(&zero)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(nonzero as usize)
}

/// Total size in bytes of the files under `path` (a file or a folder, recursively; links are not
/// followed).
///
/// # Errors
/// An unreadable entry.
pub fn size_on_disk(path: &Path) -> Result<u64> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| EngineError::io(path, e))?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path).map_err(|e| EngineError::io(path, e))? {
        let entry = entry.map_err(|e| EngineError::io(path, e))?;
        total += size_on_disk(&entry.path())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn metrics_match_hand_computed_values() {
        // labels:      0 0 0 1 1 2
        // predictions: 0 0 1 1 2 2
        // class 0: tp 2, predicted 2, support 3 → F1 = 4/5 = 0.8
        // class 1: tp 1, predicted 2, support 2 → F1 = 2/4 = 0.5
        // class 2: tp 1, predicted 2, support 1 → F1 = 2/3
        let m = classification_metrics(&[0, 0, 1, 1, 2, 2], &[0, 0, 0, 1, 1, 2], 4).unwrap();
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((m.per_class_f1[0] - 0.8).abs() < 1e-12);
        assert!((m.per_class_f1[1] - 0.5).abs() < 1e-12);
        assert!((m.per_class_f1[2] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.per_class_f1[3], 0.0);
        // Class 3 never occurs, so it is not averaged (scikit-learn's behaviour).
        assert!((m.macro_f1 - (0.8 + 0.5 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(m.support, vec![3, 2, 1, 0]);
    }

    #[test]
    fn metrics_reject_bad_input() {
        assert!(classification_metrics(&[0], &[0, 1], 2).is_err());
        assert!(classification_metrics(&[], &[], 2).is_err());
        assert!(classification_metrics(&[5], &[0], 2).is_err());
    }

    #[test]
    fn perplexity_and_percentiles() {
        assert!((perplexity(2.9569) - 19.24).abs() < 0.01);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        let mut calls = 0;
        let r = measure_latency(32, 2, 5, || {
            calls += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(calls, 7);
        assert_eq!(r.runs, 5);
        assert!(r.p50_ms >= 0.0 && r.p90_ms >= r.p50_ms);
    }

    #[test]
    fn counts_parameters_and_nonzeros() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[0f32, 1.0], [2.0, 0.0]], &dev).unwrap();
        let b = Tensor::new(&[0f32, 3.0, 0.0], &dev).unwrap();
        let store =
            ParamStore::from_tensors([("w".into(), w), ("b".into(), b)], |n| n == "w").unwrap();
        assert_eq!(
            parameter_counts(&store).unwrap(),
            ParameterCounts {
                total: 7,
                nonzero: 3
            }
        );
    }

    #[test]
    fn folder_size_adds_files_recursively() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), [0u8; 10]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), [0u8; 5]).unwrap();
        assert_eq!(size_on_disk(dir.path()).unwrap(), 15);
        assert!(size_on_disk(&dir.path().join("missing")).is_err());
    }
}
