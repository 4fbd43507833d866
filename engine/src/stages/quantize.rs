//! The `quantize` stage, `method: ptq`: weight-only post-training quantization of linear layers.
//!
//! The stage decides which weights are quantized (2-D `*.weight` not matched by `exclude`, whose
//! row length the scheme takes) and records it in the model's linear plan, so every later build of
//! the model runs those layers on quantized kernels ([`crate::layers::QuantizedLinear`]). Weights the
//! scheme cannot take stay in full precision and are listed in the stage report, with a warning.

use std::collections::BTreeMap;

use candle_core::quantized::GgmlDType;
use serde::Serialize;

use super::{Stage, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::params::Param;
use crate::pipeline::StageContext;
use crate::prune::select_targets;
use crate::quant::{quantize, QuantScheme, Quantized};
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
    /// Weights the scheme could not take, with the reason (kept in full precision, or stored with
    /// the fallback type the reason names).
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
            return Err(EngineError::Unsupported(
                "quantize: `qat` is not implemented; use post-training quantization".into(),
            ));
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
        Ok(Self {
            scheme,
            exclude: spec.exclude.clone(),
        })
    }

    /// The weights this stage quantizes with their scheme (the stage's, or a fallback), and those
    /// it must keep in full precision, with reasons.
    fn plan(
        &self,
        model: &WorkingModel,
        ctx: Option<&StageContext>,
    ) -> Result<(BTreeMap<String, QuantScheme>, BTreeMap<String, String>)> {
        let shapes = model.weight_shapes();
        let exclude = self.exclude.clone().unwrap_or_else(|| {
            QUANTIZE_DEFAULT_EXCLUDE
                .iter()
                .map(|g| g.to_string())
                .collect()
        });
        let targets = select_targets(
            shapes.iter().map(|(n, s)| (n.as_str(), s.as_slice())),
            Some(&exclude),
        )?;
        if let (Some(ctx), Some(_)) = (ctx, &self.exclude) {
            for glob in &targets.unmatched_globs {
                ctx.warn(format!(
                    "quantize: exclude glob {glob:?} matches no parameter"
                ));
            }
        }
        let mut chosen = BTreeMap::new();
        let mut kept = BTreeMap::new();
        for name in targets.names {
            let dims = shapes
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_default();
            let Some(reason) = self.scheme.unsupported_reason(&dims) else {
                chosen.insert(name, self.scheme);
                continue;
            };
            match fallback(self.scheme).filter(|f| f.unsupported_reason(&dims).is_none()) {
                Some(f) => {
                    kept.insert(name.clone(), format!("{reason}; stored as {f} instead"));
                    chosen.insert(name, f);
                }
                None => {
                    kept.insert(name, reason);
                }
            }
        }
        Ok((chosen, kept))
    }
}

/// Embedding tables are quantized too (they are most of a small model's size); norms and task
/// heads are not.
const QUANTIZE_DEFAULT_EXCLUDE: &[&str] =
    &["*norm*", "*LayerNorm*", "classifier*", "score*", "lm_head*"];

/// The type llama.cpp falls back to when a k-quant's 256-wide super-blocks do not divide a row.
fn fallback(scheme: QuantScheme) -> Option<QuantScheme> {
    let QuantScheme::Gguf(dtype) = scheme else {
        return None;
    };
    let to = match dtype {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => return None,
    };
    Some(QuantScheme::Gguf(to))
}

/// Replaces each chosen weight's values by its quantized-then-dequantized values, so whatever
/// reads the store (embedding lookups, export) sees exactly the stored quantized weights.
fn store_dequantized(model: &WorkingModel, chosen: &BTreeMap<String, QuantScheme>) -> Result<()> {
    for (name, scheme) in chosen {
        let param = model
            .store
            .get(name)
            .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))?;
        let tensor = param.tensor();
        let Quantized::Weight(weight) = quantize(tensor, *scheme)? else {
            continue;
        };
        let values = weight
            .dequantize(tensor.device())?
            .to_dtype(tensor.dtype())?;
        model.store.insert(name.clone(), Param::Frozen(values));
    }
    Ok(())
}

impl Stage for QuantizeStage {
    fn name(&self) -> &'static str {
        "quantize"
    }

    fn validate(&self, model: &WorkingModel) -> Result<()> {
        if model.quantized().is_some() {
            return Err(EngineError::InvalidSetting(
                "quantize: the model is already quantized".into(),
            ));
        }
        self.plan(model, None).map(|_| ())
    }

    fn run(
        &self,
        model: &mut WorkingModel,
        _trainer: &dyn Trainer,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        self.validate(model)?;
        let (chosen, kept) = self.plan(model, Some(ctx))?;
        for (name, reason) in &kept {
            ctx.warn(format!("quantize: {name}: {reason}"));
        }
        let shapes = model.weight_shapes();
        let quantized_parameters = shapes
            .iter()
            .filter(|(n, _)| chosen.contains_key(n))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        store_dequantized(model, &chosen)?;
        let quantized: Vec<String> = chosen.keys().cloned().collect();
        model.set_quantized(self.scheme, chosen)?;
        let report = QuantizeReport {
            scheme: self.scheme.to_string(),
            quantized,
            kept_full_precision: kept,
            quantized_parameters,
        };
        serde_json::to_value(report).map_err(|e| EngineError::InvalidModel(e.to_string()))
    }
}
