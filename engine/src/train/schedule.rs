//! Learning-rate schedules as a factor in `[0, 1]` applied to every group's base learning rate.
//!
//! A schedule is a pure function of the optimizer step, so resuming only needs the step count.

use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// The shape of the learning rate after warmup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    /// Stay at the base rate.
    #[default]
    Constant,
    /// Fall linearly to zero at the last step.
    Linear,
    /// Follow half a cosine down to zero at the last step.
    Cosine,
}

/// Warmup then decay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Decay after warmup.
    pub decay: Decay,
    /// Linear warmup length in optimizer steps (takes precedence over `warmup_ratio`).
    pub warmup_steps: Option<u64>,
    /// Warmup length as a fraction of all steps.
    pub warmup_ratio: Option<f64>,
}

impl ScheduleConfig {
    /// Checks the warmup ratio.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] when `warmup_ratio` is outside `[0, 1]`.
    pub fn validate(&self) -> Result<()> {
        match self.warmup_ratio {
            Some(r) if !(0.0..=1.0).contains(&r) => Err(EngineError::InvalidSetting(format!(
                "schedule.warmup_ratio must be in [0, 1], got {r}"
            ))),
            _ => Ok(()),
        }
    }

    /// Fixes the schedule for a run of `total_steps` optimizer steps.
    pub fn build(&self, total_steps: u64) -> Schedule {
        let warmup = self.warmup_steps.unwrap_or_else(|| {
            (self.warmup_ratio.unwrap_or(0.0) * total_steps as f64).round() as u64
        });
        Schedule {
            decay: self.decay,
            warmup: warmup.min(total_steps),
            total: total_steps.max(1),
        }
    }
}

/// A schedule fixed to a run length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    decay: Decay,
    warmup: u64,
    total: u64,
}

impl Schedule {
    /// The learning-rate factor for the update with 0-based index `step` (the first update is 0).
    ///
    /// Warmup ramps as `(step + 1) / warmup` so the first update already moves the weights, as in
    /// Hugging Face's schedulers evaluated after their first `step()`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.warmup {
            return (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay() {
        let s = ScheduleConfig {
            decay: Decay::Linear,
            warmup_steps: Some(4),
            warmup_ratio: None,
        }
        .build(14);
        let f: Vec<f64> = [0, 1, 3, 4, 9, 14].iter().map(|&i| s.factor(i)).collect();
        assert_eq!(f, vec![0.25, 0.5, 1.0, 1.0, 0.5, 0.0]);
    }

    #[test]
    fn cosine_hits_half_at_midpoint_and_zero_at_end() {
        let s = ScheduleConfig {
            decay: Decay::Cosine,
            warmup_steps: None,
            warmup_ratio: Some(0.0),
        }
        .build(10);
        assert_eq!(s.factor(0), 1.0);
        assert!((s.factor(5) - 0.5).abs() < 1e-12);
        assert!(s.factor(10).abs() < 1e-12);
    }

    #[test]
    fn warmup_ratio_and_constant() {
        let s = ScheduleConfig {
            decay: Decay::Constant,
            warmup_steps: None,
            warmup_ratio: Some(0.1),
        }
        .build(100);
        assert_eq!(s.factor(4), 0.5);
        assert_eq!(s.factor(50), 1.0);
        assert!(ScheduleConfig {
            warmup_ratio: Some(1.5),
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
