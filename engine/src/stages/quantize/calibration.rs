//! Static int8 calibration: the clipping range of each linear layer's inputs, chosen from what a
//! few calibration batches showed ([`ActivationSample`]), and the error that choice leaves.
//!
//! - `minmax`: the largest |x| seen; nothing is clipped, so one outlier coarsens every step.
//! - `percentile`: that percentile of |x| over the sampled values; larger values clip.
//! - `mse`: the clip whose squared error is least, the trade-off both of the others make blindly:
//!   of the layer's output over the sampled rows (`Q(x)·Q(W)ᵀ` against `x·Wᵀ`), among 17 clips
//!   from 20% to 100% of the largest |x| and the one of least error over the sampled input values
//!   (81 tried). The output is what the next layer sees: in BERT's FFN output layers a few outlier
//!   features carry much of it, and the clip best for the inputs (about 20% of their largest
//!   value there) leaves 60–75% output error where a wider one leaves a fraction of it.
//!
//! The scale is `clip / 127`; inputs are rounded to the nearest step (ties to even) and clamped to
//! ±127, as the int8 kernel does.

use candle_core::{DType, Device, Tensor};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::layers::ActivationSample;
use crate::quant::int8::round_clamped;

/// How a static quantization's input ranges are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CalibrationMethod {
    /// The largest |x| seen.
    Minmax,
    /// The `percentile` of |x| seen.
    Percentile,
    /// The clip of least squared error over the values seen.
    #[default]
    Mse,
}

/// One layer's calibration: the clip chosen and what it costs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerCalibration {
    /// The largest |x| seen.
    pub absmax: f32,
    /// The clipping range chosen (|x| beyond it saturates).
    pub clip: f32,
    /// `clip / 127`, the scale the inputs are quantized with.
    pub scale: f32,
    /// `‖Q(x) − x‖ / ‖x‖` over the sampled input values.
    pub input_error: f64,
    /// `‖Q(x)·Q(W)ᵀ − x·Wᵀ‖ / ‖x·Wᵀ‖` over the sampled input rows: the layer's output error with
    /// its int8 weight and static int8 inputs.
    pub output_error: f64,
    /// Kept in full precision by the `fallback` rule.
    pub kept_full_precision: bool,
}

/// The clip `method` picks for `sample`.
pub fn choose_clip(sample: &ActivationSample, method: CalibrationMethod, percentile: f64) -> f32 {
    let absmax = sample.absmax;
    if sample.values.is_empty() || absmax <= 0.0 || !absmax.is_finite() {
        return absmax.max(0.0);
    }
    match method {
        CalibrationMethod::Minmax => absmax,
        CalibrationMethod::Percentile => {
            let mut magnitudes: Vec<f32> = sample.values.iter().map(|v| v.abs()).collect();
            let rank = ((percentile / 100.0) * (magnitudes.len() - 1) as f64).round() as usize;
            let rank = rank.min(magnitudes.len() - 1);
            let (_, value, _) = magnitudes.select_nth_unstable_by(rank, f32::total_cmp);
            // A percentile of zeros (a sparse input) would quantize everything to zero.
            if *value > 0.0 {
                *value
            } else {
                absmax
            }
        }
        CalibrationMethod::Mse => input_mse_clip(sample),
    }
}

/// The clip, among 81 from 20% to 100% of the largest |x|, of least squared error over the
/// sampled input values.
fn input_mse_clip(sample: &ActivationSample) -> f32 {
    (20..=100)
        .map(|percent| sample.absmax * percent as f32 / 100.0)
        .map(|clip| (clip, squared_error(&sample.values, clip / 127.0)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(sample.absmax, |(clip, _)| clip)
}

/// `mse` for a layer: the clip of least output error over the sampled rows, with `weight` the
/// float weight and `quantized` its dequantized int8 one; the input-error clip alone when no rows
/// were kept.
///
/// # Errors
/// Rows whose width is not the weight's.
pub fn output_mse_clip(
    sample: &ActivationSample,
    weight: &Tensor,
    quantized: &Tensor,
) -> Result<f32> {
    let by_input = input_mse_clip(sample);
    if sample.rows.is_empty() || sample.absmax <= 0.0 || !sample.absmax.is_finite() {
        return Ok(by_input);
    }
    let candidates = (4..=20)
        .map(|i| sample.absmax * i as f32 / 20.0)
        .chain(std::iter::once(by_input));
    let mut best = (by_input, f64::INFINITY);
    for clip in candidates {
        let error = output_error(sample, clip / 127.0, weight, quantized)?;
        if error < best.1 {
            best = (clip, error);
        }
    }
    Ok(best.0)
}

/// `Σ (Q(x) − x)²` over `values` with the fixed `scale`.
fn squared_error(values: &[f32], scale: f32) -> f64 {
    let inverse = 1.0 / scale;
    values
        .iter()
        .map(|&x| {
            let q = round_clamped(x * inverse, 127.0) * scale;
            f64::from(q - x).powi(2)
        })
        .sum()
}

/// `values` rounded with the fixed `scale` as the kernel rounds them.
pub fn quantize_with(values: &[f32], scale: f32) -> Vec<f32> {
    let (step, inverse) = crate::quant::int8::fixed_scale(scale);
    values
        .iter()
        .map(|&x| round_clamped(x * inverse, 127.0) * step)
        .collect()
}

/// `‖Q(x) − x‖ / ‖x‖` over the sampled values.
pub fn input_error(sample: &ActivationSample, scale: f32) -> f64 {
    let quantized = quantize_with(&sample.values, scale);
    relative(&quantized, &sample.values)
}

/// The layer's relative output error on the sampled rows: `x·Wᵀ` against `Q(x)·Q(W)ᵀ`, where
/// `weight` is the float weight and `quantized` its dequantized int8 one (`(out, in)`).
///
/// # Errors
/// Rows whose width is not the weight's.
pub fn output_error(
    sample: &ActivationSample,
    scale: f32,
    weight: &Tensor,
    quantized: &Tensor,
) -> Result<f64> {
    let width = sample.width.max(1);
    let rows = sample.rows.len() / width;
    if rows == 0 {
        return Ok(0.0);
    }
    let x = Tensor::from_vec(sample.rows.clone(), (rows, width), &Device::Cpu)?;
    let xq = Tensor::from_vec(
        quantize_with(&sample.rows, scale),
        (rows, width),
        &Device::Cpu,
    )?;
    let w = weight.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let wq = quantized.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let exact = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    let approx = xq.matmul(&wq.t()?)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(relative(&approx, &exact))
}

/// `‖a − b‖ / ‖b‖`.
fn relative(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mostly small values with a few large outliers, like a post-GELU FFN input.
    fn outlier_sample() -> ActivationSample {
        let mut values: Vec<f32> = (0..10_000)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        values[17] = 60.0;
        values[4242] = -45.0;
        ActivationSample {
            absmax: 60.0,
            rows: values[..400].to_vec(),
            width: 4,
            values,
        }
    }

    #[test]
    fn methods_order_their_clips_and_mse_has_the_least_error() {
        let sample = outlier_sample();
        let minmax = choose_clip(&sample, CalibrationMethod::Minmax, 99.99);
        let percentile = choose_clip(&sample, CalibrationMethod::Percentile, 99.9);
        let mse = input_mse_clip(&sample);
        assert_eq!(minmax, 60.0);
        assert!(percentile <= 1.0 + 1e-6, "{percentile}");
        assert!(mse < minmax, "{mse}");
        let error = |clip: f32| input_error(&sample, clip / 127.0);
        assert!(
            error(mse) <= error(minmax),
            "{} vs {}",
            error(mse),
            error(minmax)
        );
        // Among the candidates it searched, none has less error.
        for percent in 20..=100 {
            let clip = 60.0 * percent as f32 / 100.0;
            assert!(error(mse) <= error(clip) + 1e-12, "{percent}%");
        }
    }

    /// A layer whose output hangs on an outlier feature: the input-error clip cuts it, the
    /// output-error clip keeps it.
    #[test]
    fn the_layer_clip_follows_the_output_not_the_inputs() -> Result<()> {
        let width = 64;
        let mut rows = Vec::new();
        for r in 0..32 {
            for c in 0..width {
                let small = ((r * 31 + c * 17) % 200) as f32 / 100.0 - 1.0;
                rows.push(if c == 5 { 40.0 + r as f32 } else { small });
            }
        }
        // Over the sampled values (as over a real calibration run) the outlier is one in 200,000.
        let mut values: Vec<f32> = (0..200_000)
            .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
            .collect();
        values[99] = 71.0;
        let sample = ActivationSample {
            absmax: 71.0,
            values,
            rows,
            width,
        };
        // Output 0 reads only the outlier feature, output 1 only the small ones.
        let mut w = vec![0f32; 2 * width];
        w[5] = 1.0;
        for c in 0..width {
            if c != 5 {
                w[width + c] = 0.1;
            }
        }
        let w = Tensor::from_vec(w, (2, width), &Device::Cpu)?;
        let by_input = input_mse_clip(&sample);
        let by_output = output_mse_clip(&sample, &w, &w)?;
        assert!(
            by_input < 40.0,
            "the inputs' clip cuts the outlier: {by_input}"
        );
        assert!(by_output >= 40.0, "the outputs' keeps it: {by_output}");
        let error = |clip: f32| output_error(&sample, clip / 127.0, &w, &w);
        assert!(error(by_output)? < error(by_input)?);
        Ok(())
    }

    #[test]
    fn quantizing_clamps_beyond_the_clip_and_keeps_zero() {
        let scale = 1.0 / 127.0;
        let q = quantize_with(&[0.0, 0.5, 2.0, -7.0], scale);
        assert_eq!(q[0], 0.0);
        assert!((q[1] - 0.5).abs() <= scale / 2.0);
        assert_eq!(q[2], 1.0);
        assert_eq!(q[3], -1.0);
        // A zero scale (an input that was all zeros) quantizes everything to zero.
        assert_eq!(quantize_with(&[3.0], 0.0), [0.0]);
    }

    #[test]
    fn the_output_error_is_zero_for_exact_grids_and_grows_with_clipping() -> Result<()> {
        let sample = ActivationSample {
            absmax: 1.0,
            values: vec![1.0, -0.5, 0.25, 0.0],
            rows: vec![1.0, -0.5, 0.25, 0.0],
            width: 2,
        };
        let w = Tensor::new(&[[1.0f32, 0.0], [0.0, 2.0]], &Device::Cpu)?;
        // Every input is a multiple of 0.25 within ±127 steps: a scale of 0.25 is exact.
        let exact = output_error(&sample, 0.25, &w, &w)?;
        assert!(exact < 1e-7, "{exact}");
        let clipped = output_error(&sample, 0.25 / 127.0, &w, &w)?;
        assert!(clipped > 0.5, "{clipped}");
        Ok(())
    }
}
