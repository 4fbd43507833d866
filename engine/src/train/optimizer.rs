//! AdamW with f32 master weights, parameter groups and a fused in-place CPU update.
//!
//! Frozen parameters are simply not given to the optimizer (they are plain tensors in the
//! [`ParamStore`](crate::params::ParamStore)). Weight decay is skipped for biases and norm weights,
//! decided by name. Each parameter belongs to the first group whose glob matches its name, else to
//! the default group; a group has its own base learning rate, scaled by the schedule's factor.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::train::adamw_kernel::{FusedAdamW, HostMoments, StepScalars};
use crate::train::clip::GradTransform;
use crate::train::grads::{dense_order, GradView, Gradients};
use crate::{EngineError, Result};

/// A set of parameters, chosen by a glob on their names, with its own learning rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamGroupConfig {
    /// Glob over dotted parameter names, e.g. `classifier.*`.
    pub pattern: String,
    /// Base learning rate of the group.
    pub lr: f64,
    /// Weight decay of the group (default: the optimizer's).
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

/// AdamW hyper-parameters (PyTorch's defaults, except a fine-tuning learning rate).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Base learning rate of the default group.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (not applied to biases and norms).
    pub weight_decay: f64,
    /// Groups with their own learning rate; the first matching pattern wins.
    pub groups: Vec<ParamGroupConfig>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 2e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            groups: Vec::new(),
        }
    }
}

impl AdamWConfig {
    /// Checks ranges of every field.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] naming the bad field.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(EngineError::InvalidSetting(what));
        let lr_ok = |lr: f64| lr.is_finite() && lr >= 0.0;
        if !lr_ok(self.lr) {
            return bad(format!("optimizer.lr must be >= 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("optimizer.{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("optimizer.eps must be > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "optimizer.weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        for (i, g) in self.groups.iter().enumerate() {
            Glob::new(&g.pattern).map_err(|e| {
                EngineError::InvalidSetting(format!("optimizer.groups.{i}.pattern: {e}"))
            })?;
            if !lr_ok(g.lr)
                || g.weight_decay
                    .is_some_and(|wd| !(wd.is_finite() && wd >= 0.0))
            {
                return bad(format!(
                    "optimizer.groups.{i}: lr and weight_decay must be >= 0"
                ));
            }
        }
        Ok(())
    }
}

/// Whether weight decay applies to a parameter, by name: never to biases and normalisation weights.
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(lower.contains("bias") || lower.contains("norm"))
}

/// Where a parameter's moments live.
enum Moments {
    /// CPU parameter: plain vectors, updated by the fused kernel.
    Host(HostMoments),
    /// Other devices: tensors updated by ordinary tensor ops (allocates, but works anywhere).
    Device {
        m: Tensor,
        v: Tensor,
        master: Option<Tensor>,
    },
}

struct Slot {
    name: String,
    var: Var,
    group: usize,
    decays: bool,
    moments: Moments,
}

/// The optimizer.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Number of updates applied so far (AdamW's `t`).
    steps: u64,
}

impl AdamW {
    /// Creates the optimizer over trainable variables (frozen parameters are just left out).
    ///
    /// # Errors
    /// Invalid config, a non-contiguous or non-float variable.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let matchers: Vec<GlobMatcher> = cfg
            .groups
            .iter()
            .map(|g| Glob::new(&g.pattern).map(|g| g.compile_matcher()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| EngineError::InvalidSetting(e.to_string()))?;
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let group = matchers
                    .iter()
                    .position(|m| m.is_match(&name))
                    .map_or(0, |i| i + 1);
                let moments = init_moments(&name, &var)?;
                Ok(Slot {
                    decays: decays(&name),
                    name,
                    var,
                    group,
                    moments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            steps: 0,
        })
    }

    /// The variables in update order (the order gradient accumulators must use).
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.var.clone()))
            .collect()
    }

    /// Number of updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The group a parameter was put in: `None` for the default group, else the group's pattern.
    pub fn group_of(&self, name: &str) -> Option<&str> {
        let slot = self.slots.iter().find(|s| s.name == name)?;
        slot.group
            .checked_sub(1)
            .map(|g| self.cfg.groups[g].pattern.as_str())
    }

    /// The default group's learning rate at a schedule factor (what progress reports).
    pub fn base_lr(&self, factor: f64) -> f64 {
        self.cfg.lr * factor
    }

    /// Applies one AdamW update with learning rates `group_lr * lr_factor`.
    ///
    /// Parameters without a gradient are left untouched (and their moments do not decay).
    ///
    /// # Errors
    /// A gradient of the wrong size or dtype, or a device error.
    pub fn step(
        &mut self,
        grads: Gradients<'_>,
        lr_factor: f64,
        transform: GradTransform,
    ) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(grad) = grads.get(i, &slot.var) else {
                continue;
            };
            let (lr, wd) = match slot.group {
                0 => (self.cfg.lr, self.cfg.weight_decay),
                g => {
                    let group = &self.cfg.groups[g - 1];
                    (
                        group.lr,
                        group.weight_decay.unwrap_or(self.cfg.weight_decay),
                    )
                }
            };
            let lr = (lr * lr_factor) as f32;
            let wd = if slot.decays { wd as f32 } else { 0.0 };
            let scalars = StepScalars {
                lr,
                beta1: b1 as f32,
                beta2: b2 as f32,
                eps: self.cfg.eps as f32,
                decay: 1.0 - lr * wd,
                inv_bias_correction1: (1.0 / (1.0 - b1.powi(t))) as f32,
                inv_bias_correction2: (1.0 / (1.0 - b2.powi(t))) as f32,
                grad: transform,
            };
            update_slot(slot, grad, scalars)?;
        }
        Ok(())
    }

    /// The optimizer's tensors for a checkpoint: `m.NAME`, `v.NAME` and, for f16/bf16 params,
    /// `master.NAME`, all f32.
    ///
    /// # Errors
    /// A device error while copying device moments.
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.slots.len() * 2);
        for slot in &self.slots {
            let shape = slot.var.shape().clone();
            let cpu = candle_core::Device::Cpu;
            let (m, v, master) = match &slot.moments {
                Moments::Host(h) => (
                    Tensor::from_slice(&h.m, shape.clone(), &cpu)?,
                    Tensor::from_slice(&h.v, shape.clone(), &cpu)?,
                    h.master
                        .as_ref()
                        .map(|w| Tensor::from_slice(w, shape.clone(), &cpu))
                        .transpose()?,
                ),
                Moments::Device { m, v, master } => (m.clone(), v.clone(), master.clone()),
            };
            out.push((format!("m.{}", slot.name), m));
            out.push((format!("v.{}", slot.name), v));
            if let Some(master) = master {
                out.push((format!("master.{}", slot.name), master));
            }
        }
        Ok(out)
    }

    /// Restores the state saved by [`state_tensors`](Self::state_tensors) and the step count.
    ///
    /// # Errors
    /// A missing tensor or one whose shape differs from its parameter.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let fetch = |key: String, var: &Var| -> Result<Tensor> {
            let t = tensors
                .get(&key)
                .ok_or_else(|| EngineError::InvalidSetting(format!("checkpoint lacks {key}")))?;
            if t.shape() != var.shape() {
                return Err(EngineError::InvalidSetting(format!(
                    "checkpoint {key} has the wrong shape"
                )));
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        for slot in &mut self.slots {
            let m = fetch(format!("m.{}", slot.name), &slot.var)?;
            let v = fetch(format!("v.{}", slot.name), &slot.var)?;
            let master_key = format!("master.{}", slot.name);
            let master = tensors
                .contains_key(&master_key)
                .then(|| fetch(master_key, &slot.var))
                .transpose()?;
            slot.moments = match &slot.moments {
                Moments::Host(_) => Moments::Host(HostMoments {
                    m: m.flatten_all()?.to_vec1()?,
                    v: v.flatten_all()?.to_vec1()?,
                    master: master.map(|w| w.flatten_all()?.to_vec1()).transpose()?,
                    scratch: Vec::new(),
                }),
                Moments::Device { .. } => {
                    let dev = slot.var.device();
                    Moments::Device {
                        m: m.to_device(dev)?,
                        v: v.to_device(dev)?,
                        master: master.map(|w| w.to_device(dev)).transpose()?,
                    }
                }
            };
        }
        self.steps = steps;
        Ok(())
    }
}

fn init_moments(name: &str, var: &Var) -> Result<Moments> {
    let dtype = var.dtype();
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(EngineError::Unsupported(format!(
            "AdamW cannot train {name} of dtype {dtype:?}"
        )));
    }
    let needs_master = dtype != DType::F32;
    if var.device().is_cpu() {
        if !var.is_contiguous() {
            return Err(EngineError::Unsupported(format!(
                "parameter {name} is not contiguous"
            )));
        }
        let n = var.elem_count();
        let master = needs_master
            .then(|| {
                var.as_tensor()
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()
            })
            .transpose()?;
        return Ok(Moments::Host(HostMoments {
            m: vec![0.0; n],
            v: vec![0.0; n],
            master,
            scratch: Vec::new(),
        }));
    }
    let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
    let master = needs_master
        .then(|| var.as_tensor().to_dtype(DType::F32))
        .transpose()?;
    Ok(Moments::Device {
        m: zeros()?,
        v: zeros()?,
        master,
    })
}

fn update_slot(slot: &mut Slot, grad: GradView<'_>, s: StepScalars) -> Result<()> {
    match &mut slot.moments {
        Moments::Host(moments) => {
            let host_grad = match grad {
                GradView::Host(buf) => Some(buf),
                GradView::Tensor(_) => None,
            };
            let op = FusedAdamW {
                scalars: s,
                moments: RefCell::new(moments),
                host_grad,
            };
            match grad {
                GradView::Host(_) => slot.var.as_tensor().inplace_op1(&op)?,
                GradView::Tensor(g) if g.device().is_cpu() && dense_order(g.layout()).is_some() => {
                    slot.var.as_tensor().inplace_op2(g, &op)?
                }
                GradView::Tensor(g) => slot
                    .var
                    .as_tensor()
                    .inplace_op2(&g.to_device(&candle_core::Device::Cpu)?.contiguous()?, &op)?,
            }
            Ok(())
        }
        Moments::Device { m, v, master } => {
            let GradView::Tensor(g) = grad else {
                return Err(EngineError::Unsupported(
                    "host gradient for a device parameter".into(),
                ));
            };
            update_on_device(&slot.var, g, m, v, master, &s)
        }
    }
}

/// The same update as the fused kernel, written with tensor ops for non-CPU devices.
fn update_on_device(
    var: &Var,
    grad: &Tensor,
    m: &mut Tensor,
    v: &mut Tensor,
    master: &mut Option<Tensor>,
    s: &StepScalars,
) -> Result<()> {
    let mut g = (grad.to_dtype(DType::F32)? * s.grad.average as f64)?;
    if let Some(c) = s.grad.clamp {
        g = g.clamp(-c, c)?;
    }
    let g = (g * s.grad.norm_scale as f64)?;
    *m = ((&*m * s.beta1 as f64)? + (&g * (1.0 - s.beta1) as f64)?)?;
    *v = ((&*v * s.beta2 as f64)? + (g.sqr()? * (1.0 - s.beta2) as f64)?)?;
    let denom = ((&*v * s.inv_bias_correction2 as f64)?.sqrt()? + s.eps as f64)?;
    let step = ((&*m * (s.lr * s.inv_bias_correction1) as f64)? / denom)?;
    let weight = match master {
        Some(w) => w.clone(),
        None => var.as_tensor().detach(),
    };
    let updated = ((weight * s.decay as f64)? - step)?;
    var.set(&updated.to_dtype(var.dtype())?)?;
    if let Some(w) = master {
        *w = updated;
    }
    Ok(())
}
