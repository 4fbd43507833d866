//! Checkpoints: everything needed to resume a run and end with bit-identical weights.
//!
//! A checkpoint folder holds `weights.safetensors` (the trainable variables), `optimizer.safetensors`
//! (AdamW moments and master weights, f32) and `state.json` (step, epoch position, RNG state,
//! early-stopping state). The schedule needs no state of its own: it is a function of the step.
//! Files are written into a temporary sibling folder that is then renamed over the old checkpoint,
//! so a crash mid-save leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::train::AdamW;
use crate::{EngineError, Result};

const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// The trainer's position and random state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Micro-batches of the current epoch already consumed.
    pub batch_in_epoch: usize,
    /// Source of per-step dropout seeds.
    pub rng: ChaCha8Rng,
    /// Best validation metric so far.
    pub best_metric: Option<f64>,
    /// Step at which the best metric was seen.
    pub best_step: Option<u64>,
    /// Validations since the last improvement.
    pub evals_without_improvement: u32,
    /// Set when the run ended (all steps made, or stopped early): a resumed run ends at once with
    /// the checkpoint's weights, which are then the run's final ones (the best validation's when
    /// early stopping restored them).
    #[serde(default)]
    pub ended: Option<crate::train::trainer::StopReason>,
    /// The loss scale reached, with loss scaling (f16 training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<crate::train::LossScaler>,
}

/// Writes a checkpoint of the optimizer's variables and state into `dir` (replacing it).
///
/// # Errors
/// An I/O or serialization failure.
pub fn save(dir: &Path, optimizer: &AdamW, state: &TrainState) -> Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let weights: HashMap<String, Tensor> = optimizer
        .vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    candle_core::safetensors::save(&weights, tmp.join(WEIGHTS))?;
    let moments: HashMap<String, Tensor> = optimizer.state_tensors()?.into_iter().collect();
    candle_core::safetensors::save(&moments, tmp.join(OPTIMIZER))?;
    let json = serde_json::to_string_pretty(&Saved {
        optimizer_steps: optimizer.steps(),
        state: state.clone(),
    })
    .map_err(|e| EngineError::json(tmp.join(STATE), e))?;
    std::fs::write(tmp.join(STATE), json).map_err(|e| EngineError::io(tmp.join(STATE), e))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| EngineError::io(dir, e))
}

/// Whether `dir` holds a complete checkpoint.
pub fn exists(dir: &Path) -> bool {
    [WEIGHTS, OPTIMIZER, STATE]
        .iter()
        .all(|f| dir.join(f).is_file())
}

/// Restores the variables and optimizer from `dir` and returns the trainer state.
///
/// # Errors
/// Missing files, a variable missing from the checkpoint or of another shape.
pub fn load(dir: &Path, optimizer: &mut AdamW) -> Result<TrainState> {
    let state_path = dir.join(STATE);
    let text = std::fs::read_to_string(&state_path).map_err(|e| EngineError::io(&state_path, e))?;
    let saved: Saved =
        serde_json::from_str(&text).map_err(|e| EngineError::json(&state_path, e))?;
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS), &Device::Cpu)?;
    for (name, var) in optimizer.vars() {
        let value = weights.get(&name).ok_or_else(|| {
            EngineError::InvalidSetting(format!("checkpoint lacks weight {name}"))
        })?;
        if value.shape() != var.shape() {
            return Err(EngineError::InvalidSetting(format!(
                "checkpoint weight {name} has another shape"
            )));
        }
        var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    let moments = candle_core::safetensors::load(dir.join(OPTIMIZER), &Device::Cpu)?;
    optimizer.load_state(&moments, saved.optimizer_steps)?;
    Ok(saved.state)
}

#[derive(Serialize, Deserialize)]
struct Saved {
    optimizer_steps: u64,
    state: TrainState,
}
