//! The `quantize` stage's spec: its fields and defaults, checks, preconditions and estimate.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::QuantizeStage;
use crate::error::Result;
use crate::spec::{Checker, Estimate, ModelState, Precondition, Recover, StageKind, Workload};
use crate::stages::Stage;

/// Group sizes `int4` takes.
const INT4_GROUP_SIZES: &[u32] = &[32, 64, 128];

/// Settings of a quantization stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuantizeSpec {
    /// How activations are treated: `ptq` quantizes the weights only; `dynamic` quantizes the linear
    /// layers' weights to int8 and their inputs to int8 per token at run time (`scheme`: `int8`).
    #[serde(default)]
    pub method: QuantizeMethod,
    /// Number format of the quantized weights.
    pub scheme: QuantScheme,
    /// Weights per scale for group-wise schemes (`int4`: 32, 64 or 128); `null` means the
    /// scheme's default.
    #[serde(default)]
    #[schemars(extend("enum" = [32, 64, 128, null]))]
    pub group_size: Option<u32>,
    /// Globs over parameter names kept in full precision; `null` means norms and the task head
    /// (embedding tables are quantized: they are most of a small model's size).
    #[serde(default)]
    pub exclude: Option<Vec<String>>,
    /// Quantization-aware training after quantizing; `null` means post-training quantization only.
    #[serde(default)]
    pub qat: Option<Recover>,
}

/// How a quantize stage treats activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum QuantizeMethod {
    /// Post-training quantization of the weights, embeddings included.
    #[default]
    #[serde(rename = "ptq")]
    Ptq,
    /// int8 linear weights per channel, inputs quantized to int8 per token at run time.
    #[serde(rename = "dynamic")]
    Dynamic,
}

/// Quantized number formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum QuantScheme {
    /// 8-bit symmetric, one scale per output channel.
    #[serde(rename = "int8")]
    Int8,
    /// 4-bit asymmetric, one scale and zero point per group.
    #[serde(rename = "int4")]
    Int4,
    /// 4-bit NormalFloat (QLoRA's format), one absmax per block of 64.
    #[serde(rename = "nf4")]
    Nf4,
    /// GGML block format, 8-bit, blocks of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// GGML k-quant, 6-bit.
    #[serde(rename = "q6_k")]
    Q6K,
    /// GGML k-quant, 5-bit.
    #[serde(rename = "q5_k")]
    Q5K,
    /// GGML block format, 5-bit, blocks of 32.
    #[serde(rename = "q5_0")]
    Q5_0,
    /// GGML block format, 5-bit with a minimum, blocks of 32.
    #[serde(rename = "q5_1")]
    Q5_1,
    /// GGML k-quant, 4-bit.
    #[serde(rename = "q4_k")]
    Q4K,
    /// GGML block format, 4-bit with a minimum, blocks of 32.
    #[serde(rename = "q4_1")]
    Q4_1,
    /// GGML block format, 4-bit, blocks of 32.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// GGML k-quant, 3-bit.
    #[serde(rename = "q3_k")]
    Q3K,
    /// GGML k-quant, 2-bit.
    #[serde(rename = "q2_k")]
    Q2K,
}

impl QuantScheme {
    /// The scheme's name as the spec spells it (`int8`, `q4_k`…).
    pub fn name(self) -> String {
        // The serde rename is the one spelling; a unit enum always serializes to a string.
        match serde_json::to_value(self) {
            Ok(serde_json::Value::String(name)) => name,
            _ => format!("{self:?}"),
        }
    }
}

impl StageKind for QuantizeSpec {
    const TYPE: &'static str = "quantize";

    fn check(&self, c: &mut Checker, at: &str) {
        if self.method == QuantizeMethod::Dynamic {
            c.check(self.scheme == QuantScheme::Int8, &format!("{at}/scheme"), || {
                format!(
                    "method \"dynamic\" quantizes weights and activations to int8: scheme must be \"int8\", got \"{}\"",
                    self.scheme.name()
                )
            });
            c.check(self.qat.is_none(), &format!("{at}/qat"), || {
                "method \"dynamic\" is post-training: it takes no `qat`".to_string()
            });
        }
        if let Some(group) = self.group_size {
            let pointer = format!("{at}/group_size");
            if self.scheme == QuantScheme::Int4 {
                c.check(INT4_GROUP_SIZES.contains(&group), &pointer, || {
                    format!("must be one of {INT4_GROUP_SIZES:?}, got {group}")
                });
            } else {
                c.fail(pointer, "only int4 takes a group size (the other schemes have fixed blocks or per-channel scales)");
            }
        }
        if let Some(exclude) = &self.exclude {
            c.globs(exclude, &format!("{at}/exclude"));
        }
        if let Some(qat) = &self.qat {
            qat.check(c, &format!("{at}/qat"));
        }
    }

    fn preconditions(&self, model: &ModelState) -> std::result::Result<(), Precondition> {
        model.require_full_precision(Self::TYPE)
    }

    fn transform(&self, model: &mut ModelState, index: usize) {
        model.quantized_at.get_or_insert(index);
    }

    /// About one evaluation's work (reading every weight), in inference memory.
    fn estimate(&self, work: &Workload) -> Estimate {
        Estimate {
            seconds: work.evaluation_seconds(),
            peak_bytes: work.inference_peak_bytes(),
        }
    }

    fn build(&self) -> Result<Box<dyn Stage>> {
        Ok(Box::new(QuantizeStage::from_spec(self)?))
    }
}
