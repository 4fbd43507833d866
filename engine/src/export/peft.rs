//! LoRA adapters in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`, loadable
//! with `peft.PeftModel.from_pretrained(base, dir)` onto the transformers model they were trained
//! from.
//!
//! Tensor names are those `PeftModel.save_pretrained` writes: `base_model.model.<module>.lora_A.weight`
//! and `….lora_B.weight` for each adapted module, and `base_model.model.<module>.weight` / `.bias`
//! for each module trained in full (`modules_to_save`), with `<module>` the transformers name.
//! Nothing else is written: no embedding or `lm_head` copy unless it is one of `modules_to_save`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use serde_json::json;

use super::transformers::HfArchitecture;
use crate::error::{EngineError, Result};

/// The prefix PEFT puts before the base model's names (a `PeftModel`'s `base_model.model`).
const PEFT_PREFIX: &str = "base_model.model.";

/// A LoRA adapter under the engine's names.
#[derive(Clone, Debug)]
pub struct LoraExport<'a> {
    /// The adapters' rank (`r`).
    pub rank: u32,
    /// `lora_alpha`.
    pub alpha: u32,
    /// The adapter input's dropout in training (`lora_dropout`).
    pub dropout: f64,
    /// Adapted module paths.
    pub target_modules: &'a [String],
    /// Module paths trained in full.
    pub modules_to_save: &'a [String],
    /// The adapter and saved modules' tensors.
    pub tensors: &'a [(String, Tensor)],
}

/// Writes `adapter` into `dir` as PEFT writes a LoRA adapter of the transformers class `arch`.
///
/// # Errors
/// I/O errors, or a tensor safetensors cannot store.
pub fn export_peft_adapter(dir: &Path, arch: HfArchitecture, adapter: &LoraExport) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let module_name = |path: &String| {
        let name = arch.export_name(&format!("{path}.weight"));
        name.strip_suffix(".weight").unwrap_or(&name).to_owned()
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": arch.peft_task_type(),
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": adapter.dropout,
        "target_modules": adapter.target_modules.iter().map(module_name).collect::<Vec<_>>(),
        "modules_to_save": if adapter.modules_to_save.is_empty() {
            serde_json::Value::Null
        } else {
            adapter.modules_to_save.iter().map(module_name).collect()
        },
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "base_model_name_or_path": null,
        "revision": null,
    });
    let config_path = dir.join("adapter_config.json");
    let text =
        serde_json::to_string_pretty(&config).map_err(|e| EngineError::json(&config_path, e))?;
    std::fs::write(&config_path, text).map_err(|e| EngineError::io(&config_path, e))?;
    let tensors: HashMap<String, Tensor> = adapter
        .tensors
        .iter()
        .map(|(name, t)| {
            let name = format!("{PEFT_PREFIX}{}", arch.export_name(name));
            Ok((name, t.contiguous()?))
        })
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}
