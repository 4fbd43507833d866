//! A linear layer that records what goes into it: the sum of squares of every input feature over
//! all the rows it sees, the calibration statistic of Wanda-style activation importance
//! (|w| · ‖x‖). It wraps whatever layer the plan built, so the model computes exactly as before.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};

use super::{LinearKind, LinearLayer};
use crate::models::common::DropoutRng;

/// Per module path, the running sum over all input rows of each input feature's square; with
/// [`InputRecorder::with_samples`], also what static quantization calibrates on.
#[derive(Debug, Default)]
pub struct InputRecorder {
    sums: Mutex<BTreeMap<String, Vec<f64>>>,
    samples: Option<SampleLimits>,
    sampled: Mutex<BTreeMap<String, ActivationSample>>,
}

/// How much of each module's inputs a sampling recorder keeps.
#[derive(Clone, Copy, Debug)]
pub struct SampleLimits {
    /// Values taken (evenly strided) from each input a module sees.
    pub values_per_input: usize,
    /// Values kept per module in all.
    pub max_values: usize,
    /// Whole input rows kept per module (the first ones seen).
    pub max_rows: usize,
}

/// What a sampling recorder kept of one module's inputs.
#[derive(Clone, Debug, Default)]
pub struct ActivationSample {
    /// The largest |x| seen, over every input.
    pub absmax: f32,
    /// Values taken evenly from every input seen, up to the limit.
    pub values: Vec<f32>,
    /// The first input rows seen, row-major, `width` values each.
    pub rows: Vec<f32>,
    /// Values per row.
    pub width: usize,
}

impl InputRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty recorder that also keeps, per module, the largest |x|, a strided sample of input
    /// values and the first input rows (static quantization's calibration).
    pub fn with_samples(limits: SampleLimits) -> Self {
        Self {
            samples: Some(limits),
            ..Self::default()
        }
    }

    /// What was kept of the inputs of the module at `path` (a sampling recorder).
    pub fn sample(&self, path: &str) -> Option<ActivationSample> {
        self.sampled.lock().ok()?.get(path).cloned()
    }

    /// Adds `x` (`(…, in_features)`) seen by the module at `path`.
    fn record(&self, path: &str, x: &Tensor) -> Result<()> {
        // A recomputed forward pass ([`super::replay`]) sees inputs already counted.
        if super::replay::is_replaying() {
            return Ok(());
        }
        if let Some(limits) = self.samples {
            self.record_sample(path, x, limits)?;
        }
        let features = x.dim(x.rank() - 1)?;
        let squares = x
            .detach()
            .to_dtype(DType::F32)?
            .reshape(((), features))?
            .sqr()?
            .sum(0)?
            .to_vec1::<f32>()?;
        let mut sums = self
            .sums
            .lock()
            .map_err(|_| candle_core::Error::Msg("input recorder poisoned".into()))?;
        let entry = sums
            .entry(path.to_owned())
            .or_insert_with(|| vec![0.0; features]);
        if entry.len() != features {
            candle_core::bail!("{path}: inputs of width {features} after {}", entry.len());
        }
        for (sum, square) in entry.iter_mut().zip(squares) {
            *sum += f64::from(square);
        }
        Ok(())
    }

    fn record_sample(&self, path: &str, x: &Tensor, limits: SampleLimits) -> Result<()> {
        let width = x.dim(x.rank() - 1)?;
        let values = x
            .detach()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let absmax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut sampled = self
            .sampled
            .lock()
            .map_err(|_| candle_core::Error::Msg("input recorder poisoned".into()))?;
        let entry = sampled.entry(path.to_owned()).or_default();
        if entry.width != 0 && entry.width != width {
            candle_core::bail!("{path}: inputs of width {width} after {}", entry.width);
        }
        entry.width = width;
        entry.absmax = entry.absmax.max(absmax);
        let room = limits.max_values.saturating_sub(entry.values.len());
        let take = limits.values_per_input.min(room).min(values.len());
        if let Some(stride) = values.len().checked_div(take) {
            entry
                .values
                .extend(values.iter().step_by(stride.max(1)).take(take));
        }
        let rows_room = limits
            .max_rows
            .saturating_sub(entry.rows.len() / width.max(1));
        let rows = (values.len() / width.max(1)).min(rows_room);
        entry.rows.extend_from_slice(&values[..rows * width]);
        Ok(())
    }

    /// The L2 norm of each input feature of the module at `path` over everything recorded.
    pub fn input_norms(&self, path: &str) -> Option<Vec<f64>> {
        let sums = self.sums.lock().ok()?;
        sums.get(path).map(|s| s.iter().map(|v| v.sqrt()).collect())
    }
}

/// `inner`, with its inputs recorded under `path`.
#[derive(Debug)]
pub struct RecordingLinear {
    inner: Arc<dyn LinearLayer>,
    path: String,
    recorder: Arc<InputRecorder>,
}

impl RecordingLinear {
    /// Wraps `inner`, the module at `path`.
    pub fn new(inner: Arc<dyn LinearLayer>, path: String, recorder: Arc<InputRecorder>) -> Self {
        Self {
            inner,
            path,
            recorder,
        }
    }
}

impl LinearLayer for RecordingLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.recorder.record(&self.path, x)?;
        self.inner.forward(x)
    }

    fn forward_t(&self, x: &Tensor, rng: Option<&DropoutRng>) -> Result<Tensor> {
        self.recorder.record(&self.path, x)?;
        self.inner.forward_t(x, rng)
    }

    fn weight(&self) -> Option<&Tensor> {
        self.inner.weight()
    }

    fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    fn in_features(&self) -> usize {
        self.inner.in_features()
    }

    fn out_features(&self) -> usize {
        self.inner.out_features()
    }

    fn kind(&self) -> LinearKind {
        self.inner.kind()
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::layers::DenseLinear;

    #[test]
    fn records_feature_norms_and_passes_outputs_through() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &dev)?;
        let dense: Arc<dyn LinearLayer> = Arc::new(DenseLinear::new(weight, None)?);
        let recorder = Arc::new(InputRecorder::new());
        let layer = RecordingLinear::new(dense.clone(), "m".into(), recorder.clone());
        // Two batches of (1, 2, 2): feature 0 sees 1, 3, 0, 0; feature 1 sees 2, 0, 0, 0.
        let a = Tensor::new(&[[[1f32, 2.0], [3.0, 0.0]]], &dev)?;
        let b = Tensor::zeros((1, 2, 2), DType::F32, &dev)?;
        let out = layer.forward(&a)?;
        layer.forward(&b)?;
        let direct = dense.forward(&a)?;
        assert_eq!(
            out.flatten_all()?.to_vec1::<f32>()?,
            direct.flatten_all()?.to_vec1::<f32>()?
        );
        let norms = recorder.input_norms("m").expect("recorded");
        assert!((norms[0] - 10f64.sqrt()).abs() < 1e-9, "{norms:?}");
        assert!((norms[1] - 2.0).abs() < 1e-9, "{norms:?}");
        assert!(recorder.input_norms("other").is_none());
        Ok(())
    }
}
