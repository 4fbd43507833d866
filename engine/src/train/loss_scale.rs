//! Dynamic loss scaling, for training whose products run in f16.
//!
//! f16 holds magnitudes from about 6e-8 (6e-5 at full precision) to 65,504. The gradients that flow
//! back through a model's f16 products are often far smaller than the loss, and those below the
//! range become zero: the weights they belong to stop learning. So the loss is multiplied by a
//! scale `S` before backward (every gradient is then `S` times larger, lifted into range) and the
//! gradients are divided by `S` in f32 before anything reads them. Too large an `S` overflows: a
//! gradient becomes infinite or NaN. That step is skipped (no update: the weights and the
//! optimizer's moments stay as they were) and `S` shrinks; after `growth_interval` steps in a row
//! without overflow `S` grows again, so it settles just under the largest scale that fits
//! (Micikevicius et al. 2018, "Mixed Precision Training"; PyTorch's `GradScaler` does the same,
//! and these defaults are its).
//!
//! bf16 keeps f32's exponent range and needs none of this.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// How the loss scale starts and moves.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossScaling {
    /// The first step's scale.
    pub init_scale: f64,
    /// Factor applied after `growth_interval` steps in a row without overflow.
    pub growth_factor: f64,
    /// Factor applied after an overflowed (skipped) step.
    pub backoff_factor: f64,
    /// Steps without overflow before the scale grows.
    pub growth_interval: u32,
}

impl Default for LossScaling {
    fn default() -> Self {
        Self {
            init_scale: 65_536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

/// Below this scale an overflow is not the scale's fault: the unscaled gradients (or the forward
/// pass itself) exceed f16's range, and skipping more steps would only hide that nothing trains.
pub const MIN_LOSS_SCALE: f64 = 1.0;

impl LossScaling {
    /// Checks the factors.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, value: f64| {
            EngineError::InvalidSetting(format!("loss_scaling.{field} is invalid: {value}"))
        };
        if !(self.init_scale.is_finite() && self.init_scale >= MIN_LOSS_SCALE) {
            return Err(bad("init_scale", self.init_scale));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor >= 1.0) {
            return Err(bad("growth_factor", self.growth_factor));
        }
        if !(self.backoff_factor > 0.0 && self.backoff_factor < 1.0) {
            return Err(bad("backoff_factor", self.backoff_factor));
        }
        if self.growth_interval == 0 {
            return Err(bad("growth_interval", 0.0));
        }
        Ok(())
    }
}

/// The scale now and the steps since it last changed; part of a training checkpoint so a resumed
/// run goes on with the scale it had reached.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    /// The scale the next step's loss is multiplied by.
    pub scale: f64,
    /// Steps in a row without overflow at this scale.
    pub good_steps: u32,
    /// Steps that updated the weights since the run began.
    #[serde(default)]
    pub updated_steps: u64,
    /// Steps skipped for overflow since the run began.
    pub skipped_steps: u64,
    /// Skipped steps in a row (to tell a model that does not fit f16 from a scale too high).
    pub skipped_in_a_row: u32,
}

impl LossScaler {
    /// A scaler at `cfg`'s initial scale.
    pub fn new(cfg: &LossScaling) -> Self {
        Self {
            scale: cfg.init_scale,
            good_steps: 0,
            updated_steps: 0,
            skipped_steps: 0,
            skipped_in_a_row: 0,
        }
    }

    /// Records a step whose gradients were all finite; grows the scale when due.
    pub fn record_good_step(&mut self, cfg: &LossScaling) {
        self.skipped_in_a_row = 0;
        self.good_steps += 1;
        self.updated_steps += 1;
        if self.good_steps >= cfg.growth_interval {
            let grown = self.scale * cfg.growth_factor;
            // f32 gradients times the scale must stay finite for the unscale to mean anything.
            if grown.is_finite() && grown <= f64::from(f32::MAX) {
                self.scale = grown;
            }
            self.good_steps = 0;
        }
    }

    /// Records a skipped step and shrinks the scale.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] when the scale has fallen below [`MIN_LOSS_SCALE`]: even
    /// unscaled, this model's activations or gradients overflow f16 too often to train.
    pub fn record_overflow(&mut self, cfg: &LossScaling) -> Result<()> {
        self.skipped_steps += 1;
        self.skipped_in_a_row += 1;
        self.good_steps = 0;
        self.scale *= cfg.backoff_factor;
        if self.scale < MIN_LOSS_SCALE {
            return Err(EngineError::InvalidSetting(format!(
                "mixed_precision: f16 overflowed often enough to bring the loss scale below \
                 {MIN_LOSS_SCALE} ({} steps skipped, {} in a row at the end, {} steps trained): \
                 this model's activations or gradients do not fit f16's range (largest 65504); \
                 train it with bf16 or in f32",
                self.skipped_steps, self.skipped_in_a_row, self.updated_steps
            )));
        }
        Ok(())
    }
}

/// Divides the gradients of `vars` in `grads` by `scale` (in their own dtype, f32 for f32
/// weights) and says whether they are all finite. One reduction over all of them and one read
/// back to the host, whatever the number of tensors. Gradients of other tensors are left as they
/// are: nothing reads them.
///
/// # Errors
/// A device error.
pub fn unscale(grads: &mut GradStore, vars: &[(String, Var)], scale: f64) -> Result<bool> {
    let inverse = 1.0 / scale;
    let mut sums = Vec::with_capacity(vars.len());
    for (_, var) in vars {
        let Some(grad) = grads.remove(var.as_tensor()) else {
            continue;
        };
        let unscaled = grad.affine(inverse, 0.0)?;
        // A sum is NaN or infinite when any term is (inf − inf is NaN). Summed in f32, where
        // finite unscaled gradients cannot add up to an overflow (an f16 parameter's could
        // in f16).
        sums.push(unscaled.to_dtype(DType::F32)?.sum_all()?);
        grads.insert(var.as_tensor(), unscaled);
    }
    if sums.is_empty() {
        return Ok(true);
    }
    let total = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok(total.is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_the_interval() {
        let cfg = LossScaling {
            init_scale: 1024.0,
            growth_interval: 3,
            ..LossScaling::default()
        };
        let mut scaler = LossScaler::new(&cfg);
        scaler.record_overflow(&cfg).unwrap();
        assert_eq!(scaler.scale, 512.0);
        scaler.record_good_step(&cfg);
        scaler.record_good_step(&cfg);
        assert_eq!(scaler.scale, 512.0);
        scaler.record_good_step(&cfg);
        assert_eq!(scaler.scale, 1024.0);
        assert_eq!(scaler.good_steps, 0);
        // An overflow restarts the count.
        scaler.record_good_step(&cfg);
        scaler.record_overflow(&cfg).unwrap();
        scaler.record_good_step(&cfg);
        scaler.record_good_step(&cfg);
        assert_eq!(scaler.scale, 512.0);
        assert_eq!(scaler.skipped_steps, 2);
    }

    #[test]
    fn a_model_that_overflows_at_any_scale_fails_with_a_reason() {
        let cfg = LossScaling {
            init_scale: 4.0,
            ..LossScaling::default()
        };
        let mut scaler = LossScaler::new(&cfg);
        scaler.record_overflow(&cfg).unwrap();
        scaler.record_overflow(&cfg).unwrap();
        let err = scaler.record_overflow(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("mixed_precision")
                && err.contains("bf16")
                && err.contains("3 steps skipped"),
            "{err}"
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        for (cfg, field) in [
            (
                LossScaling {
                    init_scale: 0.5,
                    ..LossScaling::default()
                },
                "init_scale",
            ),
            (
                LossScaling {
                    backoff_factor: 1.0,
                    ..LossScaling::default()
                },
                "backoff_factor",
            ),
            (
                LossScaling {
                    growth_interval: 0,
                    ..LossScaling::default()
                },
                "growth_interval",
            ),
        ] {
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
        LossScaling::default().validate().unwrap();
    }

    #[test]
    fn unscaling_divides_the_vars_gradients_and_sees_any_non_finite_value() -> Result<()> {
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1f32, 2.0, 3.0], &dev)?)?;
        let b = Var::from_tensor(&Tensor::new(&[4f32], &dev)?)?;
        let vars = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        // loss = 512 * (a·[1,2,3] + b²): gradients 512·[1,2,3] and 512·2b.
        let weights = Tensor::new(&[1f32, 2.0, 3.0], &dev)?;
        let loss = (a.as_tensor().mul(&weights)?.sum_all()? + b.as_tensor().sqr()?.sum_all()?)?;
        let mut grads = (loss * 512.0)?.backward()?;
        assert!(unscale(&mut grads, &vars, 512.0)?);
        let ga = grads.get(a.as_tensor()).unwrap().to_vec1::<f32>()?;
        let gb = grads.get(b.as_tensor()).unwrap().to_vec1::<f32>()?;
        assert_eq!(ga, vec![1.0, 2.0, 3.0]);
        assert_eq!(gb, vec![8.0]);

        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut grads = GradStore::default();
            grads.insert(a.as_tensor(), Tensor::new(&[1f32, bad, 3.0], &dev)?);
            grads.insert(b.as_tensor(), Tensor::new(&[1f32], &dev)?);
            assert!(!unscale(&mut grads, &vars, 2.0)?, "{bad} not seen");
        }
        Ok(())
    }
}
