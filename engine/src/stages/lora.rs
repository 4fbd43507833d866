//! `finetune` with `method: "lora"`: low-rank adapters (Hu et al. 2021) on a frozen base.
//!
//! The stage marks the target modules [`LinearKind::Lora`], creates their `lora_A` (seeded normal)
//! and `lora_B` (zero) weights, freezes every other weight except `modules_to_save`, and trains
//! through the shared [`Trainer`], whose optimizer sees only the trainable variables. At the end it
//! folds each update into its base weight (`W + (alpha / rank) · B·A`), so later stages and the saved
//! model are a plain dense model, and keeps the adapter beside the model
//! ([`WorkingModel::adapter`]) for the `adapter` output (PEFT's layout, [`crate::export::peft`]).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use serde_json::json;

use super::{TrainSettings, Trainer, WorkingModel};
use crate::error::{EngineError, Result};
use crate::family::ModuleRole;
use crate::layers::{LinearKind, LoraLinear};
use crate::params::Param;
use crate::pipeline::StageContext;
use crate::prune::compile_glob;
use crate::quant::{quantize, QuantScheme, Quantized};
use crate::spec::{FinetuneSpec, LinearModule, Precondition};

/// The roles that get adapters when the spec names no `target_modules`: attention and FFN
/// projections (PEFT's usual choice for encoders and decoders alike).
const DEFAULT_TARGET_ROLES: &[ModuleRole] = &[
    ModuleRole::Query,
    ModuleRole::Key,
    ModuleRole::Value,
    ModuleRole::AttentionOutput,
    ModuleRole::FfnUp,
    ModuleRole::FfnGate,
    ModuleRole::FfnDown,
];

/// The group size of an `int4` QLoRA base: the finest int4 takes (QLoRA's own blocks are 64
/// values; 32 costs 6% more memory and loses less).
const QLORA_INT4_GROUP: usize = 32;

/// What a LoRA fine-tune adapts.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoraSettings {
    /// The adapters' rank.
    pub rank: u32,
    /// The update's scale numerator.
    pub alpha: u32,
    /// The probability of dropping an element of an adapter's input in training.
    pub dropout: f64,
    /// Module-path globs that get adapters (`None`: [`DEFAULT_TARGET_ROLES`]).
    pub target_modules: Option<Vec<String>>,
    /// Module-path globs trained in full and saved with the adapter (`None`: the task head).
    pub modules_to_save: Option<Vec<String>>,
    /// The scheme the frozen base is quantized with (QLoRA), by its spec name; `None`: f32.
    pub base_quantization: Option<String>,
    /// QLoRA: requantize the merged weights with the base's scheme instead of passing them on in
    /// f32.
    pub requantize_merged: bool,
}

/// The modules a [`LoraSettings`] picks in one model.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraTargets {
    /// Module paths that get adapters, sorted.
    pub adapted: Vec<String>,
    /// Module paths trained in full, sorted.
    pub saved: Vec<String>,
    /// `target_modules` / `modules_to_save` globs that matched no module.
    pub unmatched: Vec<String>,
}

/// A trained adapter, kept beside the merged model for the `adapter` output.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// The adapters' rank.
    pub rank: u32,
    /// The update's scale numerator.
    pub alpha: u32,
    /// The adapter input's dropout it was trained with.
    pub dropout: f64,
    /// Adapted module paths (the engine's names).
    pub target_modules: Vec<String>,
    /// Module paths trained in full (the engine's names).
    pub modules_to_save: Vec<String>,
    /// `<module>.lora_A.weight`, `<module>.lora_B.weight` and the saved modules' parameters, by the
    /// engine's names.
    pub tensors: Vec<(String, Tensor)>,
}

impl LoraSettings {
    /// The modules these settings adapt and train in `model`.
    ///
    /// # Errors
    /// [`EngineError::InvalidSetting`] when no module is targeted, a rank exceeds the smaller side
    /// of a target matrix, a module is both adapted and saved, or a glob is invalid.
    pub fn resolve(&self, model: &WorkingModel) -> Result<LoraTargets> {
        let map = model.modules()?;
        let linear: Vec<(&str, ModuleRole)> = map
            .iter()
            .filter(|m| m.role.is_linear())
            .map(|m| (m.path.as_str(), m.role))
            .collect();
        let mut unmatched = Vec::new();
        let mut pick = |globs: &Option<Vec<String>>, default: &dyn Fn(ModuleRole) -> bool| {
            let Some(globs) = globs else {
                let paths = linear.iter().filter(|(_, r)| default(*r));
                return Ok(paths.map(|(p, _)| p.to_string()).collect::<Vec<_>>());
            };
            let matchers = globs
                .iter()
                .map(|g| compile_glob(g))
                .collect::<Result<Vec<_>>>()?;
            for (glob, m) in globs.iter().zip(&matchers) {
                if !linear.iter().any(|(p, _)| m.is_match(p)) {
                    unmatched.push(glob.clone());
                }
            }
            let paths = linear
                .iter()
                .filter(|(p, _)| matchers.iter().any(|m| m.is_match(p)));
            Ok::<_, EngineError>(paths.map(|(p, _)| p.to_string()).collect())
        };
        let adapted = pick(&self.target_modules, &|r| DEFAULT_TARGET_ROLES.contains(&r))?;
        let saved = pick(&self.modules_to_save, &|r| r == ModuleRole::TaskHead)?;
        if adapted.is_empty() {
            return Err(EngineError::InvalidSetting(format!(
                "finetune: target_modules {:?} match no linear module of the model (its modules \
                 are named like {:?})",
                self.target_modules.as_deref().unwrap_or_default(),
                linear.iter().take(3).map(|(p, _)| *p).collect::<Vec<_>>()
            )));
        }
        if let Some(both) = adapted.iter().find(|p| saved.contains(p)) {
            return Err(EngineError::InvalidSetting(format!(
                "finetune: {both} is in both target_modules and modules_to_save; a module is \
                 either adapted or trained in full"
            )));
        }
        for path in &adapted {
            let weight = format!("{path}.weight");
            let Some(param) = model.store.get(&weight) else {
                return Err(EngineError::InvalidModel(format!("{weight} is missing")));
            };
            let (rows, cols) = param.tensor().dims2()?;
            if self.rank as usize > rows.min(cols) {
                return Err(EngineError::InvalidSetting(format!(
                    "finetune: rank {} is larger than the smaller side of {weight} ({rows}×{cols})",
                    self.rank
                )));
            }
        }
        Ok(LoraTargets {
            adapted,
            saved,
            unmatched,
        })
    }
}

/// The linear modules of a checkpoint (its config and tensor shapes by name), as LoRA picks from
/// them: what the service records when a model is registered, so [`check_fit`] can refuse LoRA
/// settings that cannot fit at submission.
///
/// # Errors
/// A config no family loads.
pub fn linear_modules(
    config: &serde_json::Value,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<Vec<LinearModule>> {
    let names: Vec<String> = shapes.keys().cloned().collect();
    let map = crate::family::family_of(config)?.modules(config, &names)?;
    let linear = map.iter().filter(|m| m.role.is_linear());
    Ok(linear
        .filter_map(|m| {
            let [out_features, in_features] = shapes.get(&format!("{}.weight", m.path))?[..] else {
                return None;
            };
            Some(LinearModule {
                path: m.path.clone(),
                out_features,
                in_features,
                default_lora_target: DEFAULT_TARGET_ROLES.contains(&m.role),
            })
        })
        .collect())
}

/// Whether a LoRA `spec` fits the linear `modules` of the model it receives (as
/// [`LoraSettings::resolve`] checks at run time): its `target_modules` match a module, and its
/// `rank` is at most the smaller side of every targeted weight.
///
/// # Errors
/// The failed precondition, at `target_modules` or `rank`.
pub fn check_fit(
    spec: &FinetuneSpec,
    modules: &[LinearModule],
) -> std::result::Result<(), Precondition> {
    let targeted: Vec<&LinearModule> = match &spec.target_modules {
        None => modules.iter().filter(|m| m.default_lora_target).collect(),
        Some(globs) => {
            // Invalid globs are reported by the field checks.
            let matchers: Vec<_> = globs.iter().filter_map(|g| compile_glob(g).ok()).collect();
            modules
                .iter()
                .filter(|m| matchers.iter().any(|g| g.is_match(&m.path)))
                .collect()
        }
    };
    if targeted.is_empty() {
        let examples: Vec<&str> = modules.iter().take(3).map(|m| m.path.as_str()).collect();
        return Err(Precondition {
            name: "LoRA targets",
            field: Some("target_modules"),
            message: format!(
                "{:?} match no linear module of the model (its modules are named like {examples:?})",
                spec.target_modules.as_deref().unwrap_or_default()
            ),
        });
    }
    let narrowest = targeted
        .iter()
        .min_by_key(|m| m.out_features.min(m.in_features));
    if let Some(m) = narrowest {
        let side = m.out_features.min(m.in_features);
        if spec.rank as usize > side {
            return Err(Precondition {
                name: "LoRA rank",
                field: Some("rank"),
                message: format!(
                    "rank {} is larger than the smaller side of {}.weight ({}×{}); use at most {side}",
                    spec.rank, m.path, m.out_features, m.in_features
                ),
            });
        }
    }
    Ok(())
}

/// Runs a LoRA fine-tune on `model`: adapters on, base frozen, training, merge. Returns the stage
/// report.
///
/// # Errors
/// As [`LoraSettings::resolve`], or whatever training fails with.
pub(super) fn run(
    lora: &LoraSettings,
    settings: &TrainSettings,
    model: &mut WorkingModel,
    trainer: &dyn Trainer,
    ctx: &StageContext,
) -> Result<serde_json::Value> {
    let targets = lora.resolve(model)?;
    for glob in &targets.unmatched {
        ctx.warn(format!("finetune: module glob {glob:?} matches no module"));
    }
    let base = lora
        .base_quantization
        .as_deref()
        // int4 in groups of 32 (see QLORA_INT4_GROUP).
        .map(|name| QuantScheme::parse(name, Some(QLORA_INT4_GROUP)))
        .transpose()?;
    let kind = LinearKind::Lora {
        rank: lora.rank,
        alpha: lora.alpha,
    };
    add_adapters(model, &targets.adapted, kind, ctx.seed ^ ctx.index as u64)?;
    let base_error = match base {
        Some(base) => {
            // Marked first: the module map is read from the store's names, which packing changes.
            for path in &targets.adapted {
                let (rank, alpha) = (lora.rank, lora.alpha);
                model.set_linear_kind(path, LinearKind::QLora { rank, alpha, base })?;
            }
            pack_base(model, &targets.adapted, base)?
        }
        None => 0.0,
    };
    let is_trained = |name: &str| is_adapter_param(name) || owned_by(name, &targets.saved);
    model.store.set_trainable(|n| !is_trained(n), false)?;
    let trainable_parameters: usize = model
        .store
        .trainable_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    // The quantized base is out of the store while training; it is still the model's.
    let packed_parameters: usize = model
        .qlora_base()
        .map(|packed| {
            packed
                .values()
                .map(|w| w.dims().iter().product::<usize>())
                .sum()
        })
        .unwrap_or(0);
    let total_parameters = model.store.parameter_count() + packed_parameters;
    model.set_lora_dropout(lora.dropout);
    let outcome = trainer.train(model, settings, ctx);
    model.set_lora_dropout(0.0);
    let adapter = merge_adapters(model, lora, &targets, base);
    // The merged model is a plain model again: every weight trainable for later stages.
    model.store.set_trainable(|_| true, true)?;
    let summary = outcome?;
    let (adapter, merge_difference) = adapter?;
    let adapter_parameters: usize = adapter.tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let report = json!({
        "method": "lora",
        "rank": lora.rank,
        "alpha": lora.alpha,
        "dropout": lora.dropout,
        "target_modules": targets.adapted,
        "modules_to_save": targets.saved,
        "trainable_parameters": trainable_parameters,
        "total_parameters": total_parameters,
        "trainable_share": trainable_parameters as f64 / total_parameters.max(1) as f64,
        "adapter_parameters": adapter_parameters,
        "adapter_bytes": adapter_parameters * DType::F32.size_in_bytes(),
        "base_quantization": base.map(|s| s.to_string()),
        // How far the dequantized base the adapter was trained on (and merged into) lies from the
        // f32 base: the largest relative Frobenius error over the adapted weights.
        "base_quantization_relative_error": base.map(|_| base_error),
        // For a quantized base: how far requantizing the merged weights (dequantize → merge →
        // requantize) moves the layers' outputs from the unmerged ones (base plus adapter), the
        // largest relative difference over the adapted layers on a fixed random probe; whether
        // the merged model was requantized (`requantize_merged`) or passed on in f32.
        "merge_output_relative_difference": base.map(|_| merge_difference),
        "merged_requantized": base.map(|_| lora.requantize_merged),
        "settings": settings,
        "training": summary,
    });
    model.set_adapter(Some(adapter));
    Ok(report)
}

/// Whether `name` is an adapter weight (`….lora_A.weight`, `….lora_B.weight`).
fn is_adapter_param(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// Whether parameter `name` belongs to one of the modules `paths`.
fn owned_by(name: &str, paths: &[String]) -> bool {
    paths.iter().any(|p| {
        name.strip_prefix(p.as_str())
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// Marks `paths` as `kind` and creates their `lora_A` / `lora_B` weights in the store (`A` drawn
/// with `seed`, `B` zero) by loading each adapter layer once.
fn add_adapters(
    model: &mut WorkingModel,
    paths: &[String],
    kind: LinearKind,
    seed: u64,
) -> Result<()> {
    let LinearKind::Lora { rank, alpha } = kind else {
        return Err(EngineError::InvalidSetting("not a LoRA kind".into()));
    };
    model.store.set_init_missing(Some(seed));
    let created = paths.iter().try_for_each(|path| {
        model.set_linear_kind(path, kind)?;
        let weight = model
            .store
            .get(&format!("{path}.weight"))
            .ok_or_else(|| EngineError::InvalidModel(format!("{path}.weight is missing")))?;
        let (out_features, in_features) = weight.tensor().dims2()?;
        let bias = model.store.contains(&format!("{path}.bias"));
        let vb = model
            .store
            .var_builder(DType::F32, weight.tensor().device());
        LoraLinear::load(vb.pp(path), in_features, out_features, bias, rank, alpha)?;
        Ok::<_, EngineError>(())
    });
    model.store.set_init_missing(None);
    created
}

/// Folds every adapter into its base weight, removes the adapter weights from the store, builds
/// the adapted modules dense again, and re-applies pruning masks (a merged update would otherwise
/// fill pruned weights). A quantized base (QLoRA) is dequantized and merged, and requantized with
/// its scheme when `requantize_merged` asks. Returns the adapter as trained and, for a quantized
/// base, the largest relative difference between a requantized merged layer's outputs and the
/// unmerged layer's (0 otherwise).
fn merge_adapters(
    model: &mut WorkingModel,
    lora: &LoraSettings,
    targets: &LoraTargets,
    base: Option<QuantScheme>,
) -> Result<(LoraAdapter, f64)> {
    let scale = f64::from(lora.alpha) / f64::from(lora.rank);
    let packed = model.qlora_base().cloned();
    let mut requantized = BTreeMap::new();
    let mut merge_difference = 0f64;
    let mut tensors = Vec::new();
    for path in &targets.adapted {
        let get = |suffix: &str| {
            let name = format!("{path}.{suffix}");
            model
                .store
                .get(&name)
                .map(|p| p.tensor().detach())
                .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))
        };
        let (a, b) = (get("lora_A.weight")?, get("lora_B.weight")?);
        let name = format!("{path}.weight");
        // QLoRA trained against the quantized base: that is what the update is merged into.
        let weight = match packed.as_ref().and_then(|p| p.get(&name)) {
            Some(quantized) => quantized.dequantize(a.device())?,
            None => get("weight")?,
        };
        let merged = (&weight + (b.matmul(&a)? * scale)?)?;
        // A quantized base: what requantizing the merged weight would do to the layer's outputs is
        // measured either way, and done only when asked.
        let requantize = base.map(|scheme| quantize(&merged, scheme)).transpose()?;
        match requantize {
            Some(Quantized::Weight(packed_merged)) => {
                let values = packed_merged.dequantize(a.device())?;
                merge_difference =
                    merge_difference.max(probe_difference(&weight, &a, &b, scale, &values)?);
                if lora.requantize_merged {
                    model.store.insert(name.clone(), Param::Frozen(values));
                    let kind = LinearKind::Quantized(packed_merged.scheme());
                    requantized.insert(name, std::sync::Arc::new(packed_merged));
                    model.set_linear_kind(path, kind)?;
                } else {
                    model.store.insert(name, Param::Frozen(merged));
                    model.set_linear_kind(path, LinearKind::Dense)?;
                }
            }
            // Dense base, or a weight the scheme cannot take (kept in f32 all along).
            Some(Quantized::Kept { .. }) | None => {
                model.store.insert(name, Param::Frozen(merged));
                model.set_linear_kind(path, LinearKind::Dense)?;
            }
        }
        for (suffix, t) in [("lora_A.weight", a), ("lora_B.weight", b)] {
            let name = format!("{path}.{suffix}");
            model.store.remove(&name);
            tensors.push((name, t));
        }
    }
    model.set_qlora_base(None);
    if let (Some(scheme), false) = (base, requantized.is_empty()) {
        model.add_quantized_weights(scheme, requantized);
    }
    for (name, tensor) in model.store.tensors() {
        if owned_by(&name, &targets.saved) {
            tensors.push((name, tensor.detach()));
        }
    }
    if let Some(masks) = model.masks() {
        masks.apply(&model.store)?;
    }
    let adapter = LoraAdapter {
        rank: lora.rank,
        alpha: lora.alpha,
        dropout: lora.dropout,
        target_modules: targets.adapted.clone(),
        modules_to_save: targets.saved.clone(),
        tensors,
    };
    Ok((adapter, merge_difference))
}

/// Quantizes the adapted modules' base weights with `scheme` once for the whole stage and takes
/// their f32 values out of the store, so the frozen base costs its quantized size while the
/// adapters train (QLoRA). A weight the scheme cannot take stays in f32. Returns the largest
/// relative error of a quantized base weight.
fn pack_base(model: &mut WorkingModel, paths: &[String], scheme: QuantScheme) -> Result<f64> {
    let mut packed = BTreeMap::new();
    let mut base_error = 0f64;
    for path in paths {
        let name = format!("{path}.weight");
        let weight = model
            .store
            .get(&name)
            .map(|p| p.tensor().detach())
            .ok_or_else(|| EngineError::InvalidModel(format!("{name} is missing")))?;
        if let Quantized::Weight(quantized) = quantize(&weight, scheme)? {
            let dequantized = quantized.dequantize(weight.device())?;
            base_error = base_error.max(relative_error(&dequantized, &weight)?);
            model.store.remove(&name);
            packed.insert(name, std::sync::Arc::new(quantized));
        }
    }
    model.set_qlora_base(Some(std::sync::Arc::new(packed)));
    Ok(base_error)
}

/// `‖y_merged − y‖ / ‖y‖` for one layer on a fixed random probe `x` (16 rows): `y` the unmerged
/// layer (`x Wᵀ + scale · x Aᵀ Bᵀ`), `y_merged` the merged, requantized weight's `x W'ᵀ`.
fn probe_difference(
    weight: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    merged: &Tensor,
) -> Result<f64> {
    let in_features = weight.dim(1)?;
    let values: Vec<f32> = (0..16 * in_features)
        .map(|i| {
            // A fixed pseudo-random probe in [-1, 1), the same for every run.
            let h = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            (h as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let x = Tensor::from_vec(values, (16, in_features), weight.device())?;
    let unmerged = (x.matmul(&weight.t()?)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?)?;
    let merged = x.matmul(&merged.t()?)?;
    relative_error(&merged, &unmerged)
}

/// `‖a − b‖ / ‖b‖` (Frobenius).
pub(crate) fn relative_error(a: &Tensor, b: &Tensor) -> Result<f64> {
    let norm = |t: &Tensor| -> Result<f64> {
        Ok(f64::from(t.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt()))
    };
    Ok(norm(&(a - b)?)? / norm(b)?.max(f64::MIN_POSITIVE))
}

/// Adapters on a frozen base for a stage that scores and trains through LoRA (LoRAPrune): the
/// targets resolved, their `lora_A` (drawn with `seed`) and `lora_B` (zero) created, and every
/// other weight frozen except `modules_to_save` (the task head by default).
///
/// # Errors
/// As [`LoraSettings::resolve`].
pub(crate) fn attach_adapters(
    model: &mut WorkingModel,
    lora: &LoraSettings,
    seed: u64,
) -> Result<LoraTargets> {
    let targets = lora.resolve(model)?;
    let kind = LinearKind::Lora {
        rank: lora.rank,
        alpha: lora.alpha,
    };
    add_adapters(model, &targets.adapted, kind, seed)?;
    let is_trained = |name: &str| is_adapter_param(name) || owned_by(name, &targets.saved);
    model.store.set_trainable(|n| !is_trained(n), false)?;
    Ok(targets)
}

/// Folds the adapters [`attach_adapters`] made into their base weights and makes every weight
/// trainable again: the model is a plain dense one.
///
/// # Errors
/// A missing adapter weight.
pub(crate) fn merge_attached(
    model: &mut WorkingModel,
    lora: &LoraSettings,
    targets: &LoraTargets,
) -> Result<()> {
    let merged = merge_adapters(model, lora, targets, None);
    model.store.set_trainable(|_| true, true)?;
    merged.map(|_| ())
}
