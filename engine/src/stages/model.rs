//! The model passed from stage to stage: parameters, the linear plan, masks and quantization.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::family::{family_of, ModelFamily, ModuleMap};
use crate::layers::{LinearKind, LinearPlan};
use crate::params::ParamStore;
use crate::prune::MaskSet;
use crate::quant::QuantScheme;

/// A model between stages.
///
/// Not `Clone`: a clone would share the parameter store, so training one copy would change the
/// other. [`WorkingModel::deep_clone`] makes an independent copy (a teacher beside its student).
#[derive(Debug)]
pub struct WorkingModel {
    /// The parameters (dense values; quantized layers are quantized from them when built).
    pub store: ParamStore,
    /// The model's `config.json`.
    pub config: serde_json::Value,
    /// Which linear variant each module path gets.
    plan: LinearPlan,
    /// Pruning masks that later training must keep applied.
    masks: Option<MaskSet>,
    /// The stage's scheme and each quantized weight's own scheme (a fallback where the stage's
    /// scheme cannot take the row length), once quantized.
    quantized: Option<(QuantScheme, BTreeMap<String, QuantScheme>)>,
}

impl WorkingModel {
    /// A dense, unpruned model.
    pub fn new(store: ParamStore, config: serde_json::Value) -> Self {
        Self {
            store,
            config,
            plan: LinearPlan::default(),
            masks: None,
            quantized: None,
        }
    }

    /// An independent copy: parameters, plan, masks and quantization state.
    ///
    /// # Errors
    /// Fails when a parameter cannot be copied.
    pub fn deep_clone(&self) -> Result<Self> {
        Ok(Self {
            store: self.store.deep_clone()?,
            config: self.config.clone(),
            plan: self.plan.clone(),
            masks: self.masks.clone(),
            quantized: self.quantized.clone(),
        })
    }

    /// The model's family, from its config's `model_type`.
    ///
    /// # Errors
    /// A config whose `model_type` no family loads.
    pub fn family(&self) -> Result<&'static dyn ModelFamily> {
        family_of(&self.config)
    }

    /// What each parameter is (see [`ModuleMap`]).
    ///
    /// # Errors
    /// As [`WorkingModel::family`], or an invalid config.
    pub fn modules(&self) -> Result<ModuleMap> {
        self.family()?.modules(&self.config, &self.store.names())
    }

    /// Every parameter's name and shape, sorted by name.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.store
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, t.dims().to_vec()))
            .collect()
    }

    /// The linear plan models are built with.
    pub fn plan(&self) -> &LinearPlan {
        &self.plan
    }

    /// The pruning masks, if the model was pruned.
    pub fn masks(&self) -> Option<&MaskSet> {
        self.masks.as_ref()
    }

    /// Records pruning masks (they are applied by the caller).
    pub fn set_masks(&mut self, masks: MaskSet) {
        self.masks = Some(masks);
    }

    /// The stage's scheme and the quantized weights with their schemes, if quantized.
    pub fn quantized(&self) -> Option<(QuantScheme, &BTreeMap<String, QuantScheme>)> {
        self.quantized.as_ref().map(|(s, n)| (*s, n))
    }

    /// Marks weights as quantized: linear layers' modules get [`LinearKind::Quantized`] with their
    /// weight's scheme in the linear plan; other weights (embedding tables) are looked up as they are
    /// stored, so the caller stores their dequantized values.
    ///
    /// # Errors
    /// Fails when a module path is not a valid glob.
    pub fn set_quantized(
        &mut self,
        scheme: QuantScheme,
        weights: BTreeMap<String, QuantScheme>,
    ) -> Result<()> {
        let mut plan = self.plan.clone();
        let map = self.modules()?;
        for (name, weight_scheme) in weights.iter().filter(|(n, _)| map.is_linear_weight(n)) {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            plan = plan.with_rule(&escape_glob(module), LinearKind::Quantized(*weight_scheme))?;
        }
        self.plan = plan;
        self.quantized = Some((scheme, weights));
        Ok(())
    }
}

/// Escapes glob metacharacters so a module path matches only itself.
fn escape_glob(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\') {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    out
}
