//! Keeps a copy of the weights at the best validation metric, so a run with early stopping ends
//! with the model it judged best rather than the one from its last (worse) steps.
//!
//! The copy lives in memory only: a run resumed from a checkpoint restores the best weights seen
//! since the resume (the checkpoint holds the latest weights, not the best ones).

use candle_core::{Tensor, Var};

use crate::Result;

/// The trainable weights at the best validation step, if one has been seen.
#[derive(Default)]
pub struct BestWeights {
    step: Option<u64>,
    tensors: Vec<Tensor>,
}

impl BestWeights {
    /// Copies the current values of `vars` as the best ones (a deep copy: the optimizer updates
    /// the variables in place afterwards).
    ///
    /// # Errors
    /// Fails when a tensor cannot be copied.
    pub fn capture(&mut self, vars: &[(String, Var)], step: u64) -> Result<()> {
        self.tensors = vars
            .iter()
            .map(|(_, var)| var.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        self.step = Some(step);
        Ok(())
    }

    /// Writes the captured values back into `vars` (in the same order as captured); returns the
    /// step they were taken at, or `None` when nothing was captured.
    ///
    /// # Errors
    /// Fails when a variable's shape changed since the capture.
    pub fn restore(&self, vars: &[(String, Var)]) -> Result<Option<u64>> {
        let Some(step) = self.step else {
            return Ok(None);
        };
        for ((_, var), saved) in vars.iter().zip(&self.tensors) {
            var.set(saved)?;
        }
        Ok(Some(step))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn restore_brings_back_captured_values_after_in_place_updates() -> Result<()> {
        let var = Var::new(&[1f32, 2.0], &Device::Cpu)?;
        let vars = vec![("w".to_string(), var.clone())];
        let mut best = BestWeights::default();
        assert_eq!(best.restore(&vars)?, None);
        best.capture(&vars, 3)?;
        var.set(&Tensor::new(&[5f32, 6.0], &Device::Cpu)?)?;
        assert_eq!(best.restore(&vars)?, Some(3));
        assert_eq!(var.as_tensor().to_vec1::<f32>()?, vec![1.0, 2.0]);
        Ok(())
    }
}
