//! The `quantize` stage, `method: ptq`: weight-only post-training quantization of linear layers.
//!
//! The stage decides which weights are quantized (2-D `*.weight` not matched by `exclude`, whose
//! row length the scheme takes) and records it in the model's linear plan, so every later build of
//! the model runs those layers on quantized kernels ([`crate::layers::QuantizedLinear`]). Weights the
//! scheme cannot take stay in full precision and are listed in the stage report, with a warning.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Stage, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::layers::LinearKind;
use crate::pipeline::StageContext;
use crate::prune::select_targets;
use crate::quant::QuantScheme;
use crate::spec::{QuantScheme as SpecScheme, QuantizeSpec};

/// The stage, built from its spec.
#[derive(Clone, Debug)]
pub struct QuantizeStage {
    scheme: QuantScheme,
    exclude: Option<Vec<String>>,
}

/// What the stage reports.
#[derive(Clone, Debug, Serialize)]
pub struct QuantizeReport {
    /// The scheme's name.
    pub scheme: String,
    /// Weights quantized.
    pub quantized: Vec<String>,
    /// Weights the scheme could not take, kept in full precision, with the reason.
    pub kept_full_precision: BTreeMap<String, String>,
    /// Scalars in quantized weights.
    pub quantized_parameters: usize,
}

impl QuantizeStage {
    /// Builds the stage from its spec.
    ///
    /// # Errors
    /// Fails for quantization-aware training (not available yet) or a bad group size.
    pub fn from_spec(spec: &QuantizeSpec) -> Result<Self> {
        if spec.qat.is_some() {
            return Err(EngineError::Unsupported("quantize: `qat` is not implemented; use post-training quantization".into()));
        }
        let name = match spec.scheme {
            SpecScheme::Int8 => "int8",
            SpecScheme::Int4 => "int4",
            SpecScheme::Q8_0 => "q8_0",
            SpecScheme::Q6K => "q6_k",
            SpecScheme::Q5K => "q5_k",
            SpecScheme::Q5_0 => "q5_0",
            SpecScheme::Q4K => "q4_k",
            SpecScheme::Q4_1 => "q4_1",
            SpecScheme::Q4_0 => "q4_0",
        };
        let scheme = QuantScheme::parse(name, spec.group_size.map(|g| g as usize))?;
        Ok(Self { scheme, exclude: spec.exclude.clone() })
    }

    /// The weights this stage would quantize and those it must keep, with reasons.
    fn plan(&self, model: &WorkingModel, ctx: Option<&StageContext>) -> Result<(Vec<String>, BTreeMap<String, String>)> {
        let shapes = model.weight_shapes();
        let targets = select_targets(shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())), self.exclude.as_deref())?;
        if let Some(ctx) = ctx {
            for glob in &targets.unmatched_globs {
                ctx.warn(format!("quantize: exclude glob {glob:?} matches no parameter"));
            }
        }
        let mut quantize = Vec::new();
        let mut kept = BTreeMap::new();
        for name in targets.names {
            let dims = &shapes.iter().find(|(n, _)| *n == name).map(|(_, s)| s.clone()).unwrap_or_default();
            match self.scheme.unsupported_reason(dims) {
                Some(reason) => {
                    kept.insert(name, reason);
                }
                None if model.is_linear_weight(&name) => quantize.push(name),
                None => {
                    kept.insert(name, "not a linear layer's weight".into());
                }
            }
        }
        Ok((quantize, kept))
    }
}

impl Stage for QuantizeStage {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting("quantize: the model is already quantized".into()));
        }
        self.plan(model, None).map(|_| ())
    }

    fn run(&self, model: &mut WorkingModel, _trainer: &dyn Trainer, ctx: &StageContext) -> Result<serde_json::Value> {
        self.validate(model)?;
        let (quantize, kept) = self.plan(model, Some(ctx))?;
        for (name, reason) in &kept {
            ctx.warn(format!("quantize: {name} stays in full precision: {reason}"));
        }
        let shapes = model.weight_shapes();
        let quantized_parameters = shapes
            .iter()
            .filter(|(n, _)| quantize.contains(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        model.set_quantized(self.scheme, &quantize, LinearKind::Quantized(self.scheme))?;
        let report = QuantizeReport {
            scheme: self.scheme.to_string(),
            quantized: quantize,
            kept_full_precision: kept,
            quantized_parameters,
        };
        serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }
}
