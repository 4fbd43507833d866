//! The model passed from stage to stage: parameters, the linear plan, masks and quantization.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use crate::family::{family_of, ModelFamily, ModuleMap};
use crate::layers::{LinearFactory, LinearKind, LinearPlan, PackedWeights};
use crate::params::ParamStore;
use crate::prune::MaskSet;
use crate::quant::{QuantScheme, QuantizedWeight};

/// What a quantize stage made of a model: the stage's scheme and each quantized weight as stored,
/// packed (its own scheme may be a fallback where the stage's cannot take the row length).
#[derive(Clone, Debug)]
pub struct QuantizedState {
    /// The stage's scheme.
    pub scheme: QuantScheme,
    /// Each quantized weight by parameter name. Linear layers run on these and saving writes them
    /// as they are, so a weight is quantized once.
    pub weights: PackedWeights,
}

impl QuantizedState {
    /// Each quantized weight's scheme.
    pub fn schemes(&self) -> BTreeMap<String, QuantScheme> {
        self.weights
            .iter()
            .map(|(n, w)| (n.clone(), w.scheme()))
            .collect()
    }
}

/// A model between stages.
///
/// Not `Clone`: a clone would share the parameter store, so training one copy would change the
/// other. [`WorkingModel::deep_clone`] makes an independent copy (a teacher beside its student).
#[derive(Debug)]
pub struct WorkingModel {
    /// The parameters; a quantized weight's entry holds its dequantized values (embedding lookups
    /// and export read them), its packed form is in the quantization state.
    pub store: ParamStore,
    /// The model's `config.json`.
    pub config: serde_json::Value,
    /// Which linear variant each module path gets.
    plan: LinearPlan,
    /// Pruning masks that later training must keep applied.
    masks: Option<MaskSet>,
    /// The quantized weights, once quantized.
    quantized: Option<QuantizedState>,
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

    /// The quantized weights, if quantized.
    pub fn quantized(&self) -> Option<&QuantizedState> {
        self.quantized.as_ref()
    }

    /// The factory models are built with: the linear plan, and the packed weights quantized layers
    /// run on.
    pub fn linear_factory(&self) -> LinearFactory {
        let factory = LinearFactory::new(self.plan.clone());
        match &self.quantized {
            Some(state) => factory.with_packed(state.weights.clone()),
            None => factory,
        }
    }

    /// Marks weights as quantized: linear layers' modules get [`LinearKind::Quantized`] with their
    /// weight's scheme in the linear plan and run on the packed weight; other weights (embedding
    /// tables) are looked up as they are stored, so the caller stores their dequantized values.
    ///
    /// # Errors
    /// Fails when a module path is not a valid glob or the family is unknown.
    pub fn set_quantized(
        &mut self,
        scheme: QuantScheme,
        weights: BTreeMap<String, Arc<QuantizedWeight>>,
    ) -> Result<()> {
        let mut plan = self.plan.clone();
        let map = self.modules()?;
        for (name, weight) in weights.iter().filter(|(n, _)| map.is_linear_weight(n)) {
            let module = name.strip_suffix(".weight").unwrap_or(name);
            plan = plan.with_rule(&escape_glob(module), LinearKind::Quantized(weight.scheme()))?;
        }
        self.plan = plan;
        self.quantized = Some(QuantizedState {
            scheme,
            weights: Arc::new(weights),
        });
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
