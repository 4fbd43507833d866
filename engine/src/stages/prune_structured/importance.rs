//! Element-wise importance of the weights that make up heads and neurons: magnitudes, or
//! calibration passes over training batches for Taylor saliency, input norms and the first-order
//! loss change of masking each structure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{Tensor, Var};

use super::StructuredPrune;
use crate::error::{EngineError, Result};
use crate::family::ModuleRole;
use crate::layers::InputRecorder;
use crate::stages::{Trainer, WorkingModel};
use crate::train::GradientObserver;

/// How structures are scored.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Importance {
    /// Sum of absolute weights.
    #[default]
    L1,
    /// Euclidean norm of the weights.
    L2,
    /// Accumulated first-order Taylor saliency `|w · ∂L/∂w|` on calibration batches.
    Taylor,
    /// Wanda-style `|w| · ‖x‖` with input norms gathered on calibration batches.
    Activation,
    /// The loss change when the structure is masked, to first order (Michel et al. 2019, "Are
    /// Sixteen Heads Really Better than One?"): with a gate `ξ` on a head's (or neuron's) output,
    /// `|∂L/∂ξ|` at `ξ = 1`, summed over calibration batches. That derivative is the signed sum
    /// of `w · ∂L/∂w` over the structure's columns of the output projection, so it comes from the
    /// same gradients as Taylor saliency without a gate in the model; unlike Taylor the signs
    /// cancel within the structure before the absolute value is taken.
    Mask,
    /// LoRAPrune (Zhang et al. 2023): `|(W + BA) ⊙ (∂L/∂B·A + B·∂L/∂A)|` from LoRA adapters on the
    /// frozen base, smoothed over calibration batches; the base gets no gradient.
    Lora,
}

impl Importance {
    /// Whether scoring runs calibration batches of training data.
    pub fn needs_data(self) -> bool {
        matches!(
            self,
            Importance::Taylor | Importance::Activation | Importance::Mask | Importance::Lora
        )
    }

    /// The spec's name.
    pub fn name(self) -> &'static str {
        match self {
            Importance::L1 => "l1",
            Importance::L2 => "l2",
            Importance::Taylor => "taylor",
            Importance::Activation => "activation",
            Importance::Mask => "mask",
            Importance::Lora => "lora",
        }
    }
}

impl StructuredPrune {
    /// Each scored weight's element-wise importance, by parameter name.
    pub(crate) fn element_importance(
        &self,
        model: &mut WorkingModel,
        trainer: &dyn Trainer,
    ) -> Result<BTreeMap<String, Tensor>> {
        let map = model.modules()?;
        let names: Vec<String> = map
            .iter()
            .filter(|m| m.layer.is_some() && SCORED_ROLES.contains(&m.role))
            .map(|m| format!("{}.weight", m.path))
            .collect();
        let mut out = BTreeMap::new();
        match self.importance {
            Importance::L1 => {
                for name in &names {
                    out.insert(name.clone(), stored_weight(model, name)?.abs()?);
                }
            }
            Importance::L2 => {
                // Squares summed per unit; the square root is monotone, so rankings are the norm's.
                for name in &names {
                    out.insert(name.clone(), stored_weight(model, name)?.sqr()?);
                }
            }
            Importance::Taylor => {
                let mut taylor = TaylorSaliency {
                    names: names.iter().cloned().collect(),
                    sums: BTreeMap::new(),
                };
                self.calibrate(model, trainer, &mut taylor)?;
                out = taylor.sums;
            }
            Importance::Mask => {
                let mut mask = MaskSaliency {
                    units: mask_units(&map),
                    sums: BTreeMap::new(),
                };
                self.calibrate(model, trainer, &mut mask)?;
                out = mask.element_importance(model)?;
            }
            Importance::Lora => {
                let scale = self
                    .lora
                    .as_ref()
                    .map_or(1.0, |l| f64::from(l.alpha) / f64::from(l.rank));
                let modules = model
                    .store
                    .names()
                    .into_iter()
                    .filter_map(|n| n.strip_suffix(".lora_A.weight").map(str::to_owned))
                    .map(|path| {
                        let weight = stored_weight(model, &format!("{path}.weight"))?;
                        Ok((path, weight))
                    })
                    .collect::<Result<Vec<_>>>()?;
                if modules.is_empty() {
                    return Err(EngineError::InvalidModel(
                        "prune: importance lora found no adapters on the model".into(),
                    ));
                }
                let mut lora = LoraSaliency {
                    scale,
                    modules,
                    smoothed: BTreeMap::new(),
                };
                self.calibrate(model, trainer, &mut lora)?;
                out = lora.smoothed;
            }
            Importance::Activation => {
                let recorder = Arc::new(InputRecorder::new());
                model.set_input_recorder(Some(recorder.clone()));
                let ran = self.calibrate(model, trainer, &mut IgnoreGradients);
                model.set_input_recorder(None);
                ran?;
                for name in &names {
                    let path = name.trim_end_matches(".weight");
                    let norms = recorder.input_norms(path).ok_or_else(|| {
                        EngineError::InvalidModel(format!("no inputs reached {path}"))
                    })?;
                    let w = stored_weight(model, name)?;
                    let norms: Vec<f32> = norms.iter().map(|&v| v as f32).collect();
                    let norms = Tensor::from_vec(norms, (1, w.dim(1)?), w.device())?;
                    out.insert(name.clone(), w.abs()?.broadcast_mul(&norms)?);
                }
            }
        }
        Ok(out)
    }

    /// Runs the calibration batches through `observer`.
    fn calibrate(
        &self,
        model: &WorkingModel,
        trainer: &dyn Trainer,
        observer: &mut dyn GradientObserver,
    ) -> Result<()> {
        debug_assert!(self.importance.needs_data());
        let seen = trainer.observe_gradients(
            model,
            self.calibration_batches,
            self.calibration_batch_size,
            None,
            observer,
        )?;
        if seen == 0 {
            return Err(EngineError::InvalidSetting(format!(
                "prune: importance {:?} needs training data for its calibration batches, and \
                 the task's training split is empty; use l1 or l2",
                self.importance.name()
            )));
        }
        Ok(())
    }
}

/// Weights that make up heads and neurons.
const SCORED_ROLES: &[ModuleRole] = &[
    ModuleRole::Query,
    ModuleRole::Key,
    ModuleRole::Value,
    ModuleRole::AttentionOutput,
    ModuleRole::FfnUp,
    ModuleRole::FfnGate,
    ModuleRole::FfnDown,
];

fn stored_weight(model: &WorkingModel, name: &str) -> Result<Tensor> {
    model
        .store
        .get(name)
        .map(|p| p.tensor().detach())
        .ok_or_else(|| EngineError::InvalidModel(format!("parameter {name} is missing")))
}

/// Accumulates `|w · ∂L/∂w|` of the named weights over calibration batches.
struct TaylorSaliency {
    names: BTreeSet<String>,
    sums: BTreeMap<String, Tensor>,
}

impl GradientObserver for TaylorSaliency {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        for (name, var) in vars.iter().filter(|(n, _)| self.names.contains(n)) {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            let saliency = (var.as_tensor().detach() * grad.detach())?.abs()?;
            let sum = match self.sums.remove(name) {
                Some(acc) => (acc + saliency)?,
                None => saliency,
            };
            self.sums.insert(name.clone(), sum);
        }
        Ok(())
    }
}

/// The output projections a structure's gate sits before, with the columns each unit spans: a
/// head unit (a key/value group) spans `head_dim × kv_groups` columns of the attention output,
/// a neuron one column of the FFN down projection.
fn mask_units(map: &crate::family::ModuleMap) -> BTreeMap<String, usize> {
    let head_unit = map.head_dim * map.kv_groups;
    map.with_role(ModuleRole::AttentionOutput)
        .map(|m| (format!("{}.weight", m.path), head_unit))
        .chain(
            map.with_role(ModuleRole::FfnDown)
                .map(|m| (format!("{}.weight", m.path), 1)),
        )
        .filter(|(_, unit)| *unit > 0)
        .collect()
}

/// Accumulates, per unit of each output projection, `|Σ w · ∂L/∂w|` over the unit's columns, one
/// absolute value per calibration batch ([`Importance::Mask`]).
struct MaskSaliency {
    /// Output-projection weight name → columns per unit.
    units: BTreeMap<String, usize>,
    /// Weight name → per-unit sums.
    sums: BTreeMap<String, Vec<f64>>,
}

impl GradientObserver for MaskSaliency {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        for (name, var) in vars {
            let Some(&unit) = self.units.get(name) else {
                continue;
            };
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
            // ∂L/∂ξ for the gate on input column j of this projection: Σ_o W[o, j] ∂L/∂W[o, j].
            let columns = (var.as_tensor().detach() * grad.detach())?
                .to_dtype(candle_core::DType::F32)?
                .sum(0)?
                .to_vec1::<f32>()?;
            if columns.len() % unit != 0 {
                return Err(EngineError::InvalidModel(format!(
                    "{name}: {} columns do not split into units of {unit}",
                    columns.len()
                )));
            }
            let batch: Vec<f64> = columns
                .chunks(unit)
                .map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>().abs())
                .collect();
            let sums = self
                .sums
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; batch.len()]);
            sums.iter_mut().zip(&batch).for_each(|(s, b)| *s += b);
        }
        Ok(())
    }
}

impl MaskSaliency {
    /// Element-wise tensors whose column sums over each unit give the unit's score: the score
    /// spread evenly over the unit's elements of the output projection. The other weights of a
    /// structure (query/key/value, FFN up and gate) get none: the gate sits after them.
    fn element_importance(self, model: &WorkingModel) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (name, scores) in self.sums {
            let weight = stored_weight(model, &name)?;
            let (rows, cols) = weight.dims2()?;
            let unit = cols / scores.len().max(1);
            let per_element = (rows * unit).max(1) as f64;
            let row: Vec<f32> = scores
                .iter()
                .flat_map(|&s| std::iter::repeat_n((s / per_element) as f32, unit))
                .collect();
            let row = Tensor::from_vec(row, (1, cols), weight.device())?;
            out.insert(name, row.broadcast_as((rows, cols))?.contiguous()?);
        }
        Ok(out)
    }
}

/// How much of the running LoRAPrune importance each new batch keeps (LoRAPrune's moving average:
/// `Ī ← λ·Ī + (1 − λ)·I`).
pub(super) const LORA_SMOOTHING: f64 = 0.9;

/// LoRAPrune's importance of the adapted weights: the full weight's gradient approximated from the
/// adapters' (`∂L/∂W ≈ ∂L/∂B·A + B·∂L/∂A`), times the effective weight `W + (alpha / rank)·BA`,
/// smoothed over batches. Only `A` and `B` are variables, so the base never gets a gradient.
struct LoraSaliency {
    /// `alpha / rank`.
    scale: f64,
    /// Adapted module paths and their frozen base weights.
    modules: Vec<(String, Tensor)>,
    /// The smoothed importance, by weight name (`<module>.weight`).
    smoothed: BTreeMap<String, Tensor>,
}

impl GradientObserver for LoraSaliency {
    fn observe(
        &mut self,
        vars: &[(String, Var)],
        grads: &candle_core::backprop::GradStore,
    ) -> Result<()> {
        let vars: BTreeMap<&str, &Var> = vars.iter().map(|(n, v)| (n.as_str(), v)).collect();
        for (path, weight) in &self.modules {
            let var = |suffix: &str| vars.get(format!("{path}.{suffix}").as_str()).copied();
            let (Some(a), Some(b)) = (var("lora_A.weight"), var("lora_B.weight")) else {
                continue;
            };
            let (a_now, b_now) = (a.as_tensor().detach(), b.as_tensor().detach());
            // A fresh adapter's B is zero, and so is A's gradient: B's alone carries the signal.
            let Some(grad_b) = grads.get(b.as_tensor()) else {
                continue;
            };
            let mut gradient = grad_b.detach().matmul(&a_now)?;
            if let Some(grad_a) = grads.get(a.as_tensor()) {
                gradient = (gradient + b_now.matmul(&grad_a.detach())?)?;
            }
            let effective = (weight + (b_now.matmul(&a_now)? * self.scale)?)?;
            let importance = (effective * gradient)?.abs()?;
            let name = format!("{path}.weight");
            let smoothed = match self.smoothed.remove(&name) {
                Some(running) => {
                    ((running * LORA_SMOOTHING)? + (importance * (1.0 - LORA_SMOOTHING))?)?
                }
                None => importance,
            };
            self.smoothed.insert(name, smoothed);
        }
        Ok(())
    }
}

/// Calibration for activation importance only needs the forward passes.
struct IgnoreGradients;

impl GradientObserver for IgnoreGradients {
    fn observe(&mut self, _: &[(String, Var)], _: &candle_core::backprop::GradStore) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `|Σ w · ∂L/∂w|` over a unit's columns is the loss change per unit of a gate on those
    /// input columns: checked against central differences of the loss with the columns scaled.
    #[test]
    fn mask_saliency_is_the_gradient_of_a_gate_on_each_unit() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, cols, unit) = (5, 6, 2);
        let x = Tensor::randn(0f64, 1.0, (7, cols), &dev)?;
        let w0 = Tensor::randn(0f64, 1.0, (rows, cols), &dev)?;
        let target = Tensor::randn(0f64, 1.0, (7, rows), &dev)?;
        let loss_of = |w: &Tensor| -> Result<Tensor> {
            Ok(x.matmul(&w.t()?)?.tanh()?.sub(&target)?.sqr()?.mean_all()?)
        };
        let w = Var::from_tensor(&w0)?;
        let grads = loss_of(w.as_tensor())?.backward()?;
        let name = "layer.output.weight".to_string();
        let mut saliency = MaskSaliency {
            units: BTreeMap::from([(name.clone(), unit)]),
            sums: BTreeMap::new(),
        };
        saliency.observe(&[(name.clone(), w.clone())], &grads)?;
        let scores = saliency.sums[&name].clone();
        assert_eq!(scores.len(), cols / unit);
        let eps = 1e-5;
        for (u, &score) in scores.iter().enumerate() {
            let gate = |g: f64| -> Result<f64> {
                let scale: Vec<f64> = (0..cols)
                    .map(|j| if j / unit == u { g } else { 1.0 })
                    .collect();
                let scale = Tensor::from_vec(scale, (1, cols), &dev)?;
                Ok(loss_of(&w0.broadcast_mul(&scale)?)?.to_scalar::<f64>()?)
            };
            let numeric = ((gate(1.0 + eps)? - gate(1.0 - eps)?) / (2.0 * eps)).abs();
            // The observer sums in f32.
            assert!(
                (score - numeric).abs() <= 1e-4 * (1.0 + numeric),
                "unit {u}: {score} against {numeric}"
            );
        }
        // A second batch adds its own absolute value.
        saliency.observe(&[(name.clone(), w.clone())], &grads)?;
        for (twice, once) in saliency.sums[&name].iter().zip(&scores) {
            assert!((twice - 2.0 * once).abs() < 1e-9);
        }
        Ok(())
    }
}
