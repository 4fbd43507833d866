//! Saving a [`WorkingModel`] after a stage and loading it back to resume.
//!
//! Saved folders use transformers' config and tensor names for the job's family
//! ([`HfArchitecture`]), so a dense one loads with `AutoModelForSequenceClassification` or
//! `AutoModelForCausalLM`; reading one back maps the names to the engine's again.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};

use super::model::WorkingModel;
use crate::error::{EngineError, Result};
use crate::export::{
    export_compressed_tensors, export_hf_folder, export_llama_gguf, export_peft_adapter,
    export_transformers_folder, tokenizer_metadata, CompressedTensorsExport, GgufExportOptions,
    HfArchitecture, LoraExport,
};
use crate::family::{cut_padding, family_for_task, pad_to_config, parse_config};
use crate::loading::{read_hf_folder, Checkpoint};
use crate::models::llama::LlamaConfig;
use crate::params::{Param, ParamStore};
use crate::prune::MaskSet;
use crate::quant::layout::{self, StoredTensor};
use crate::quant::{QuantScheme, QuantizedWeight};
use crate::spec::TaskType;

/// The transformers class a model with `config` is saved as for `task`: its family's
/// ([`crate::family::ModelFamily::hf_architecture`]).
///
/// # Errors
/// A config whose family is unknown or cannot do `task`, or a class with no export naming.
pub(super) fn architecture(config: &serde_json::Value, task: TaskType) -> Result<HfArchitecture> {
    let family = family_for_task(config, task)?;
    let class = family.hf_architecture(task);
    HfArchitecture::from_class_name(class)
        .ok_or_else(|| EngineError::Unsupported(format!("no transformers export for {class}")))
}

/// The `model.safetensors` metadata key saying how a dynamically quantized model's activations are
/// quantized, and its value.
pub const DYNAMIC_METADATA_KEY: &str = "quantization_activations";
/// See [`DYNAMIC_METADATA_KEY`].
pub const DYNAMIC_METADATA_VALUE: &str = "int8_per_token_dynamic";
/// The [`DYNAMIC_METADATA_KEY`] value of a statically quantized model (one calibrated scale per
/// layer, in [`INPUT_SCALES_METADATA_KEY`]).
pub const STATIC_METADATA_VALUE: &str = "int8_per_tensor_static";
/// The `model.safetensors` metadata key holding a static model's input scales (JSON, by module).
pub const INPUT_SCALES_METADATA_KEY: &str = "quantization_input_scales";

/// Writes `config.json`, the tokenizer files and `model.safetensors` into `dir`, with the config and
/// tensor names of `arch` ([`HfArchitecture`]). A dense model's folder loads in transformers as
/// that class; a quantized one keeps its weights in the layout of [`crate::quant::layout`] (under the
/// same names), which only the engine reads.
///
/// # Errors
/// I/O errors, a config that is not the family's, or a weight that cannot be read.
pub(super) fn save(
    model: &WorkingModel,
    dir: &Path,
    tokenizer_dir: Option<&Path>,
    task: TaskType,
) -> Result<()> {
    let arch = architecture(&model.config, task)?;
    let tensors = model.store.tensors();
    // The HF writer also copies the tokenizer files; a quantized model then replaces its weights.
    let Some(state) = model.quantized() else {
        // Structurally pruned layers of uneven width are written padded (family::uneven).
        let tensors = pad_to_config(&model.modules()?, &model.config, tensors)?;
        return export_transformers_folder(dir, arch, &model.config, tensors, tokenizer_dir);
    };
    export_hf_folder(dir, &arch.export_config(&model.config)?, &[], tokenizer_dir)?;
    let mut stored = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        // Quantized weights are written as the stage packed them, not quantized again.
        let entry = match state.weights.get(&name) {
            Some(packed) => StoredTensor::Quantized((**packed).clone()),
            None => StoredTensor::Dense(tensor),
        };
        stored.push((arch.export_name(&name), entry));
    }
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    if state.dynamic {
        // For readers of the file alone: the int8 weights expect int8 activations per token.
        metadata.insert(
            DYNAMIC_METADATA_KEY.to_string(),
            DYNAMIC_METADATA_VALUE.to_string(),
        );
    }
    if !state.input_scales.is_empty() {
        // Static W8A8: each layer's inputs are quantized with its calibrated scale.
        metadata.insert(
            DYNAMIC_METADATA_KEY.to_string(),
            STATIC_METADATA_VALUE.to_string(),
        );
        let scales: BTreeMap<String, f32> = state
            .input_scales
            .iter()
            .map(|(module, scale)| {
                let name = arch.export_name(&format!("{module}.weight"));
                let module = name.strip_suffix(".weight").unwrap_or(&name).to_string();
                (module, *scale)
            })
            .collect();
        let json =
            serde_json::to_string(&scales).map_err(|e| EngineError::InvalidModel(e.to_string()))?;
        metadata.insert(INPUT_SCALES_METADATA_KEY.to_string(), json);
    }
    layout::save(&dir.join("model.safetensors"), &stored, &metadata)
}

/// Writes a quantized model into `dir` in the compressed-tensors layout
/// ([`export_compressed_tensors`]): its quantized linear layers as stored, everything else (the
/// embedding tables included) dense with the values the model computes with.
///
/// # Errors
/// A model that is not quantized, a scheme the layout cannot store, layers pruned to uneven widths
/// (transformers' classes take one width per kind of layer), or I/O errors.
pub(super) fn save_compressed_tensors(
    model: &WorkingModel,
    dir: &Path,
    tokenizer_dir: Option<&Path>,
    task: TaskType,
) -> Result<()> {
    let state = model.quantized().ok_or_else(|| {
        EngineError::InvalidSetting("compressed-tensors: the model is not quantized".into())
    })?;
    let arch = architecture(&model.config, task)?;
    let map = model.modules()?;
    let linear: BTreeMap<String, Arc<QuantizedWeight>> = state
        .weights
        .iter()
        .filter(|(name, _)| map.is_linear_weight(name))
        .map(|(name, weight)| (name.clone(), weight.clone()))
        .collect();
    let padded = pad_to_config(&map, &model.config, model.store.tensors())?;
    let uneven = padded.iter().find(|(name, t)| {
        linear
            .get(name)
            .is_some_and(|w| w.dims() != t.dims().to_vec())
    });
    if let Some((name, _)) = uneven {
        return Err(EngineError::Unsupported(format!(
            "compressed-tensors: {name} was pruned to another width than its config's; \
             transformers takes one width per kind of layer"
        )));
    }
    let dense_linear = model
        .weight_shapes()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| map.is_linear_weight(name) && !linear.contains_key(name))
        .map(|name| name.strip_suffix(".weight").unwrap_or(&name).to_string())
        .collect();
    let export = CompressedTensorsExport {
        arch,
        config: &model.config,
        tensors: padded,
        linear: &linear,
        dense_linear,
        dynamic: state.dynamic,
        input_scales: &state.input_scales,
        sparse: model
            .masks()
            .map(|masks| masks.names())
            .unwrap_or_default()
            .into_iter()
            .filter(|name| map.is_linear_weight(name))
            .collect(),
    };
    export_compressed_tensors(dir, export, tokenizer_dir)
}

/// Writes the adapter merged into `model` into `dir` in PEFT's layout, for the transformers class
/// the model is saved as.
///
/// # Errors
/// A model without an adapter, or as [`export_peft_adapter`].
pub(super) fn save_adapter(model: &WorkingModel, dir: &Path, task: TaskType) -> Result<()> {
    let adapter = model.adapter().ok_or_else(|| {
        EngineError::InvalidSetting(
            "an adapter output needs a pipeline that ends in `finetune` with `method: \"lora\"`"
                .into(),
        )
    })?;
    let export = LoraExport {
        rank: adapter.rank,
        alpha: adapter.alpha,
        dropout: adapter.dropout,
        target_modules: &adapter.target_modules,
        modules_to_save: &adapter.modules_to_save,
        tensors: &adapter.tensors,
    };
    export_peft_adapter(dir, architecture(&model.config, task)?, &export)
}

/// Reads a model folder (an input or one written by [`save`] for a dense model) with its tensors
/// under the engine's names for its family's class for `task`.
///
/// # Errors
/// A missing or malformed file, or a family that cannot do `task`.
pub(super) fn read_dense(dir: &Path, device: &Device, task: TaskType) -> Result<Checkpoint> {
    let mut checkpoint = read_hf_folder(dir, DType::F32, device)?;
    let arch = architecture(&checkpoint.config, task)?;
    let tensors = arch.import_names(std::mem::take(&mut checkpoint.tensors));
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    let map = family_for_task(&checkpoint.config, task)?.modules(&checkpoint.config, &names)?;
    checkpoint.tensors = cut_padding(&map, &checkpoint.config, tensors)?;
    Ok(checkpoint)
}

/// Writes a Llama model as GGUF; quantized with the model's GGUF type when it has one, else f32.
/// The tokenizer metadata is copied from `source` when it is a GGUF file, else rebuilt from the
/// `tokenizer.json` in `tokenizer_dir` (see [`tokenizer_metadata`]); a tokenizer that cannot be
/// rebuilt leaves the file without it, with a warning, since candle still loads such a file.
///
/// # Errors
/// A config that is not Llama's, or a write error.
pub(super) fn save_gguf(
    model: &WorkingModel,
    path: &Path,
    source: &Path,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    let tokenizer_json = tokenizer_dir
        .map(|d| d.join("tokenizer.json"))
        .filter(|p| p.is_file());
    let extra_metadata =
        tokenizer_metadata(source, tokenizer_json.as_deref()).unwrap_or_else(|e| {
            tracing::warn!("GGUF export without tokenizer metadata: {e}");
            Vec::new()
        });
    let config: LlamaConfig = parse_config(&model.config)?;
    // Each quantized weight keeps the type the quantize stage chose for it (fallbacks included);
    // int8, int4 and nf4 have no GGUF twin, so they map to the nearest GGUF block types (int4 to
    // Q4_1 exactly; nf4's levels are not on Q4_1's even grid, so its weights are rounded again).
    let gguf_type = |scheme: QuantScheme| match scheme {
        QuantScheme::Gguf(dtype) => dtype,
        QuantScheme::Int8 => GgmlDType::Q8_0,
        QuantScheme::Int4 { .. } | QuantScheme::Nf4 => GgmlDType::Q4_1,
    };
    let tensor_types = model.quantized().map(|state| {
        state
            .schemes()
            .into_iter()
            .map(|(name, scheme)| (name, gguf_type(scheme)))
            .collect()
    });
    // Weights the stage stored in a GGUF block type go into the file as they are.
    let packed = model
        .quantized()
        .map(|state| {
            state
                .weights
                .iter()
                .filter_map(|(name, weight)| match &**weight {
                    QuantizedWeight::Gguf(q) => Some((name.clone(), q.clone())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    export_llama_gguf(
        path,
        &config,
        &model.store.tensors(),
        GgufExportOptions {
            tensor_types,
            extra_metadata,
            packed,
            ..GgufExportOptions::default()
        },
    )
}

/// Packed quantized weights by the engine's parameter names.
pub(super) type PackedByName = BTreeMap<String, Arc<QuantizedWeight>>;

/// Loads a folder written by [`save`] for a quantized model, tensors under the engine's names for
/// its family's class: the store gets every weight's (dequantized) values, and the packed
/// quantized weights come back as stored, for [`restore`].
///
/// # Errors
/// A missing or malformed file.
pub(super) fn load_quantized(
    dir: &Path,
    device: &Device,
    task: TaskType,
) -> Result<(WorkingModel, PackedByName)> {
    let config_path = dir.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| EngineError::io(&config_path, e))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::json(&config_path, e))?;
    let arch = architecture(&config, task)?;
    let store = ParamStore::new();
    let mut packed = PackedByName::new();
    for (name, tensor) in layout::load(&dir.join("model.safetensors"), device)? {
        let dense = match tensor {
            StoredTensor::Dense(t) => t.to_dtype(DType::F32)?,
            StoredTensor::Quantized(w) => {
                let values = w.dequantize(device)?;
                packed.insert(arch.import_name(&name), Arc::new(w));
                values
            }
        };
        store.insert(arch.import_name(&name), Param::Frozen(dense));
    }
    Ok((WorkingModel::new(store, config), packed))
}

/// Restores masks (from the zeros of the pruned weights) and the quantization: `quantized` is the
/// record next to the model and the packed weights read from it.
///
/// # Errors
/// A named weight is missing, a scheme name is unknown, or a packed weight's scheme is not the one
/// recorded.
pub(super) fn restore(
    model: &mut WorkingModel,
    pruned: &[String],
    quantized: Option<(&SavedQuantization, PackedByName)>,
) -> Result<()> {
    if !pruned.is_empty() {
        let mut masks = BTreeMap::new();
        for name in pruned {
            let param = model.store.get(name).ok_or_else(|| {
                EngineError::InvalidModel(format!("pruned weight {name} is missing"))
            })?;
            let t = param.tensor();
            masks.insert(name.clone(), t.ne(0f64)?.to_dtype(t.dtype())?);
        }
        model.set_masks(MaskSet::new(masks));
    }
    if let Some((saved, mut packed)) = quantized {
        let mut weights = BTreeMap::new();
        for (name, scheme) in &saved.weights {
            let scheme: QuantScheme = scheme.parse()?;
            let weight = packed.remove(name).ok_or_else(|| {
                EngineError::InvalidModel(format!(
                    "quantized weight {name} is not stored quantized"
                ))
            })?;
            if weight.scheme() != scheme {
                return Err(EngineError::InvalidModel(format!(
                    "{name} is stored as {} but recorded as {scheme}",
                    weight.scheme()
                )));
            }
            weights.insert(name.clone(), weight);
        }
        model.set_quantized(saved.scheme.parse()?, weights)?;
        if saved.dynamic {
            model.mark_dynamic();
        }
        if !saved.input_scales.is_empty() {
            model.set_input_scales(saved.input_scales.clone());
        }
    }
    Ok(())
}

/// The quantization recorded next to a saved model.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct SavedQuantization {
    /// The stage's scheme.
    pub scheme: String,
    /// Each quantized weight's scheme.
    pub weights: BTreeMap<String, String>,
    /// `method: "dynamic"`: int8 activations per token at run time (absent in older records).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dynamic: bool,
    /// `method: "static"`: each int8 module's calibrated input scale, by module path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub input_scales: BTreeMap<String, f32>,
}

impl SavedQuantization {
    /// What `model` records, if it is quantized.
    pub fn of(model: &WorkingModel) -> Option<Self> {
        model.quantized().map(|state| Self {
            scheme: state.scheme.to_string(),
            weights: state
                .schemes()
                .into_iter()
                .map(|(n, s)| (n, s.to_string()))
                .collect(),
            dynamic: state.dynamic,
            input_scales: (*state.input_scales).clone(),
        })
    }
}
