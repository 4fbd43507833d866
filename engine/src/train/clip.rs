//! Gradient clipping by value and by global norm.
//!
//! Nothing is rewritten here: one read-only pass measures the gradients and returns a
//! [`GradTransform`], which the fused optimizer update applies element by element. Order, as in most
//! training code: average over micro-batches, clamp each element to `±max_value`, then scale all
//! gradients so that their global L2 norm is at most `max_norm`.

use candle_core::{DType, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::ops::simd::Isa;
use crate::train::grads::{dense_order, read_cpu, with_float_slice, Elem, GradView, Gradients};
use crate::{EngineError, Result};

/// Clipping options (both off by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipConfig {
    /// Scale gradients down so their global L2 norm is at most this.
    #[serde(default)]
    pub max_norm: Option<f64>,
    /// Clamp every gradient element to `[-max_value, max_value]`.
    #[serde(default)]
    pub max_value: Option<f64>,
}

impl ClipConfig {
    /// Checks that the thresholds are positive and finite.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [("max_norm", self.max_norm), ("max_value", self.max_value)] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    return Err(EngineError::InvalidSetting(format!(
                        "clip.{name} must be a positive number, got {v}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// What the optimizer does to each raw gradient element `g`:
/// `clamp(g * average, ±clamp) * norm_scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradTransform {
    /// `1 / micro_batches`.
    pub average: f32,
    /// Element clamp, if clipping by value.
    pub clamp: Option<f32>,
    /// Global-norm clipping factor (1 when not clipping).
    pub norm_scale: f32,
}

impl GradTransform {
    /// Applies the transform to one element.
    #[inline(always)]
    pub fn apply(&self, g: f32) -> f32 {
        let g = g * self.average;
        let g = match self.clamp {
            Some(c) => g.clamp(-c, c),
            None => g,
        };
        g * self.norm_scale
    }
}

/// The result of measuring the gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipOutcome {
    /// Global L2 norm of the averaged gradients before any clipping (what progress reports).
    pub pre_clip_norm: f64,
    /// The transform the optimizer must apply.
    pub transform: GradTransform,
}

/// Measures the gradients of `vars` and decides the clipping transform.
///
/// # Errors
/// Fails when a gradient cannot be read (unsupported dtype or a device error).
pub fn measure(
    vars: &[(String, Var)],
    grads: Gradients<'_>,
    cfg: &ClipConfig,
) -> Result<ClipOutcome> {
    let average = 1.0 / grads.micro_batches() as f32;
    let clamp = cfg.max_value.map(|v| v as f32);
    // Each gradient's sums in parameter order: host ones now, device ones once all are queued.
    let mut parts = Vec::with_capacity(vars.len());
    let mut on_device = DeviceSums::default();
    for (i, (_, var)) in vars.iter().enumerate() {
        let Some(view) = grads.get(i, var) else {
            continue;
        };
        parts.push(squared_norms(view, average, clamp, &mut on_device)?);
    }
    let device_sums = on_device.read()?;
    let (mut raw_sq, mut clamped_sq) = (0f64, 0f64);
    // Added in f64 in parameter order, whatever device each gradient is on, so the norm (and
    // the clip factor) is the same on every run.
    for part in parts {
        let (raw, clamped) = match part {
            Part::Host(sums) => sums,
            Part::Device(index) => device_sums[index],
        };
        raw_sq += raw;
        clamped_sq += clamped;
    }
    let pre_clip_norm = raw_sq.sqrt();
    let post_value_norm = clamped_sq.sqrt();
    let norm_scale = match cfg.max_norm {
        Some(max) if post_value_norm > max => (max / (post_value_norm + 1e-6)) as f32,
        _ => 1.0,
    };
    Ok(ClipOutcome {
        pre_clip_norm,
        transform: GradTransform {
            average,
            clamp,
            norm_scale,
        },
    })
}

/// Sum of squares of the averaged gradient, before and after the element clamp: summed now for a
/// gradient in host memory, queued in `on_device` for one on a device (or strided).
fn squared_norms(
    view: GradView<'_>,
    average: f32,
    clamp: Option<f32>,
    on_device: &mut DeviceSums,
) -> Result<Part> {
    let probe = GradTransform {
        average,
        clamp,
        norm_scale: 1.0,
    };
    match view {
        GradView::Host(buf) => Ok(Part::Host(sum_squares_slice(buf, &probe))),
        // Storage order does not matter for a sum of squares, so transposed views are read as is.
        GradView::Tensor(t) if t.device().is_cpu() && dense_order(t.layout()).is_some() => {
            read_cpu(t, |s, _| {
                with_float_slice!(s, |s| sum_squares_slice(s, &probe))
            })
            .map(Part::Host)
        }
        GradView::Tensor(t) => Ok(Part::Device(on_device.add(t, average, clamp)?)),
    }
}

/// Where one gradient's sums of squares are.
enum Part {
    /// Summed on the host: raw and clamped.
    Host((f64, f64)),
    /// Queued in [`DeviceSums`] at this index.
    Device(usize),
}

/// Sums of squares of device gradients, kept on the device and read back once for all of them:
/// a read per tensor would wait for the device ~200 times per step for BERT-base.
#[derive(Default)]
struct DeviceSums {
    /// Per gradient, `[raw, clamped]` as a 2-element f32 tensor on its device.
    pending: Vec<candle_core::Tensor>,
}

impl DeviceSums {
    /// Queues a gradient's sums; returns their index in [`Self::read`]'s result.
    fn add(
        &mut self,
        grad: &candle_core::Tensor,
        average: f32,
        clamp: Option<f32>,
    ) -> Result<usize> {
        let g = (grad.to_dtype(DType::F32)? * f64::from(average))?;
        let raw = g.sqr()?.sum_all()?;
        let clamped = match clamp {
            Some(c) => g.clamp(-c, c)?.sqr()?.sum_all()?,
            None => raw.clone(),
        };
        let pair = candle_core::Tensor::stack(&[raw, clamped], 0)?;
        // Gradients of one run share a device; a stray one elsewhere is moved to the first's.
        let pair = match self.pending.first() {
            Some(first) if !first.device().same_device(pair.device()) => {
                pair.to_device(first.device())?
            }
            _ => pair,
        };
        self.pending.push(pair);
        Ok(self.pending.len() - 1)
    }

    /// Each queued gradient's raw and clamped sums, in the order they were added.
    fn read(self) -> Result<Vec<(f64, f64)>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        Ok(candle_core::Tensor::stack(&self.pending, 0)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|pair| (f64::from(pair[0]), f64::from(pair[1])))
            .collect())
    }
}

/// Sums of squares of a gradient buffer, raw and after the transform: chunks in parallel, each
/// summed in f32 over 16 lanes (so the loop vectorises), chunks added in f64 — fast, and accurate
/// for millions of terms.
fn sum_squares_slice<T: Elem>(values: &[T], probe: &GradTransform) -> (f64, f64) {
    let isa = Isa::detected();
    let chunks = values.par_chunks(1 << 14).map(|chunk| match isa {
        // SAFETY: `Isa::detected` only returns a path this CPU supports.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { chunk_squares_avx512(chunk, probe) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { chunk_squares_avx2(chunk, probe) },
        _ => chunk_squares(chunk, probe),
    });
    // In chunk order, so the norm (and the clip factor) is the same on every run.
    crate::ops::sum_in_order(chunks, |a, b| (a.0 + b.0, a.1 + b.1)).unwrap_or((0.0, 0.0))
}

const LANES: usize = 16;

#[inline(always)]
fn chunk_squares<T: Elem>(chunk: &[T], probe: &GradTransform) -> (f64, f64) {
    let (mut raw, mut clamped) = ([0f32; LANES], [0f32; LANES]);
    let mut add = |lane: usize, g: f32| {
        let a = g * probe.average;
        let c = probe.apply(g);
        raw[lane] += a * a;
        clamped[lane] += c * c;
    };
    let blocks = chunk.chunks_exact(LANES);
    let tail = blocks.remainder();
    for block in blocks {
        for (lane, g) in block.iter().enumerate() {
            add(lane, g.to_f32());
        }
    }
    for (lane, g) in tail.iter().enumerate() {
        add(lane, g.to_f32());
    }
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&x| f64::from(x)).sum::<f64>();
    (total(raw), total(clamped))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn chunk_squares_avx512<T: Elem>(chunk: &[T], probe: &GradTransform) -> (f64, f64) {
    chunk_squares(chunk, probe)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk_squares_avx2<T: Elem>(chunk: &[T], probe: &GradTransform) -> (f64, f64) {
    chunk_squares(chunk, probe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn grads_of(values: &[f32]) -> (Vec<(String, Var)>, candle_core::backprop::GradStore) {
        let w = Var::zeros(values.len(), DType::F32, &Device::Cpu).unwrap();
        let coeffs = Tensor::new(values, &Device::Cpu).unwrap();
        let loss = (w.as_tensor() * coeffs).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        (vec![("w".into(), w)], store)
    }

    #[test]
    fn norm_clipping_scales_to_max_norm() {
        let (vars, store) = grads_of(&[3.0, 4.0]);
        let cfg = ClipConfig {
            max_norm: Some(1.0),
            max_value: None,
        };
        let out = measure(&vars, Gradients::Store(&store), &cfg).unwrap();
        assert!((out.pre_clip_norm - 5.0).abs() < 1e-6);
        assert!((out.transform.norm_scale - 0.2).abs() < 1e-6);
        assert!((out.transform.apply(3.0) - 0.6).abs() < 1e-6);
    }

    #[test]
    fn value_clipping_happens_before_norm_clipping() {
        let (vars, store) = grads_of(&[3.0, 4.0]);
        // Clamped to [2, 2]: norm 2.83 > 2, so scale = 2 / 2.83.
        let cfg = ClipConfig {
            max_norm: Some(2.0),
            max_value: Some(2.0),
        };
        let out = measure(&vars, Gradients::Store(&store), &cfg).unwrap();
        assert!((out.pre_clip_norm - 5.0).abs() < 1e-6);
        let expected = 2.0 / 8f32.sqrt();
        assert!((out.transform.norm_scale - expected).abs() < 1e-5);
        assert!((out.transform.apply(4.0) - 2.0 * expected).abs() < 1e-5);
    }

    #[test]
    fn strided_gradients_are_measured_like_dense_ones_in_one_read() {
        // A transposed-then-narrowed gradient is not in dense order: it takes the device path
        // (what every CUDA gradient takes), summed on the device and read back once.
        let w = Var::zeros((3, 4), DType::F32, &Device::Cpu).unwrap();
        let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let values: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
        let dense = Tensor::from_vec(values.clone(), (3, 4), &Device::Cpu).unwrap();
        // The same values in the first 4 columns of a (3, 5) tensor: row stride 5, not dense.
        let padded: Vec<f32> = values
            .chunks(4)
            .flat_map(|row| row.iter().copied().chain([100.0]))
            .collect();
        let strided = Tensor::from_vec(padded, (3, 5), &Device::Cpu)
            .and_then(|t| t.narrow(1, 0, 4))
            .unwrap();
        assert!(dense_order(strided.layout()).is_none());
        let mut store = candle_core::backprop::GradStore::default();
        let vars = vec![("w".into(), w.clone()), ("v".into(), v.clone())];
        store.insert(
            v.as_tensor(),
            Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap(),
        );
        let cfg = ClipConfig {
            max_norm: Some(1.0),
            max_value: Some(5.0),
        };
        store.insert(w.as_tensor(), dense);
        let reference = measure(&vars, Gradients::Store(&store), &cfg).unwrap();
        store.insert(w.as_tensor(), strided);
        let measured = measure(&vars, Gradients::Store(&store), &cfg).unwrap();
        assert!((reference.pre_clip_norm - measured.pre_clip_norm).abs() < 1e-4);
        assert!((reference.transform.norm_scale - measured.transform.norm_scale).abs() < 1e-6);
        let expected: f64 = (0..12).map(|i| (i as f64 - 5.5).powi(2)).sum::<f64>() + 25.0;
        assert!((measured.pre_clip_norm - expected.sqrt()).abs() < 1e-4);
    }

    #[test]
    fn no_clipping_leaves_gradients_alone() {
        let (vars, store) = grads_of(&[0.1, -0.2]);
        let out = measure(&vars, Gradients::Store(&store), &ClipConfig::default()).unwrap();
        assert_eq!(out.transform.norm_scale, 1.0);
        assert_eq!(out.transform.apply(-0.2), -0.2);
    }

    #[test]
    fn rejects_non_positive_thresholds() {
        assert!(ClipConfig {
            max_norm: Some(0.0),
            max_value: None
        }
        .validate()
        .is_err());
        assert!(ClipConfig {
            max_norm: None,
            max_value: Some(f64::NAN)
        }
        .validate()
        .is_err());
        assert!(ClipConfig {
            max_norm: Some(1.0),
            max_value: Some(0.5)
        }
        .validate()
        .is_ok());
    }
}
