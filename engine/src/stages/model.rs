//! The model passed from stage to stage: parameters, the linear plan, masks and quantization.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::lora::LoraAdapter;
use super::vocabulary::TrimmedVocabulary;
use crate::error::Result;
use crate::family::{family_of, ModelFamily, ModuleMap};
use crate::layers::{
    ActivationObservers, InputRecorder, InputScales, LinearFactory, LinearKind, LinearPlan,
    PackedWeights,
};
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
    /// Quantized by `method: "dynamic"`: int8 linear weights whose inputs are quantized to int8 per
    /// token at run time. On the CPU every int8 linear layer runs that way (the int8 × int8
    /// kernel); the flag records the method, so a saved and reloaded model says it again.
    pub dynamic: bool,
    /// Quantized by `method: "static"`: each int8 linear module's calibrated input scale, by
    /// module path (empty otherwise).
    pub input_scales: InputScales,
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
    /// Set during a calibration pass: models built from this one record their linear inputs.
    recorder: Option<Arc<InputRecorder>>,
    /// Set while QAT trains with per-tensor int8 inputs: the layers' observed input ranges.
    observers: Option<Arc<ActivationObservers>>,
    /// The vocabulary, once trimmed to the task's tokens; `None` is the input's.
    vocabulary: Option<Arc<TrimmedVocabulary>>,
    /// The LoRA adapter the last stage trained and merged into these weights, if it was a LoRA
    /// fine-tune (any other stage changes the base, and the pipeline drops it).
    adapter: Option<LoraAdapter>,
    /// The dropout LoRA layers apply to their adapter's input in training, while a LoRA stage
    /// trains (0 otherwise).
    lora_dropout: f64,
    /// While a QLoRA stage trains: the adapted modules' frozen base weights, quantized. Their f32
    /// entries are out of the store meanwhile, so the base takes its quantized size in memory.
    qlora_base: Option<PackedWeights>,
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
            adapter: None,
            recorder: None,
            observers: None,
            vocabulary: None,
            lora_dropout: 0.0,
            qlora_base: None,
        }
    }

    /// A model of new weights and config (a student built from this one) that keeps this model's
    /// vocabulary: the tokens its tables are indexed by do not change with its layers.
    pub fn derived(&self, store: ParamStore, config: serde_json::Value) -> Self {
        Self {
            vocabulary: self.vocabulary.clone(),
            ..Self::new(store, config)
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
            recorder: None,
            observers: None,
            vocabulary: self.vocabulary.clone(),
            adapter: self.adapter.clone(),
            lora_dropout: self.lora_dropout,
            qlora_base: self.qlora_base.clone(),
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

    /// The trimmed vocabulary, if the model's was trimmed (see [`super::vocabulary`]).
    pub fn vocabulary(&self) -> Option<&Arc<TrimmedVocabulary>> {
        self.vocabulary.as_ref()
    }

    /// Records the model's vocabulary (its tables must already have its size).
    pub fn set_vocabulary(&mut self, vocabulary: Option<Arc<TrimmedVocabulary>>) {
        self.vocabulary = vocabulary;
    }

    /// The LoRA adapter merged into these weights by the stage that made them, if any.
    pub fn adapter(&self) -> Option<&LoraAdapter> {
        self.adapter.as_ref()
    }

    /// Records (or, with `None`, forgets) the adapter merged into these weights.
    pub fn set_adapter(&mut self, adapter: Option<LoraAdapter>) {
        self.adapter = adapter;
    }

    /// The dropout LoRA layers built from now on apply to their adapter's input in training.
    pub fn set_lora_dropout(&mut self, p: f64) {
        self.lora_dropout = p;
    }

    /// The quantized weights, if quantized.
    pub fn quantized(&self) -> Option<&QuantizedState> {
        self.quantized.as_ref()
    }

    /// The quantized base weights of a QLoRA stage that is training, by parameter name.
    pub fn qlora_base(&self) -> Option<&PackedWeights> {
        self.qlora_base.as_ref()
    }

    /// Records (or, with `None`, forgets) the quantized base weights QLoRA layers run on; the
    /// caller takes their f32 entries out of the store (and puts the merged weights back).
    pub fn set_qlora_base(&mut self, weights: Option<PackedWeights>) {
        self.qlora_base = weights;
    }

    /// Adds weights quantized with `scheme` to the quantization state (made when the model has
    /// none); the caller marks their modules [`LinearKind::Quantized`] and stores their
    /// dequantized values. A QLoRA merge requantizes its merged weights this way.
    pub fn add_quantized_weights(
        &mut self,
        scheme: QuantScheme,
        weights: BTreeMap<String, Arc<QuantizedWeight>>,
    ) {
        let mut all = self
            .quantized
            .as_ref()
            .map(|state| (*state.weights).clone())
            .unwrap_or_default();
        all.extend(weights);
        let (scheme, dynamic, input_scales) = match &self.quantized {
            Some(state) => (state.scheme, state.dynamic, state.input_scales.clone()),
            None => (scheme, false, InputScales::default()),
        };
        self.quantized = Some(QuantizedState {
            scheme,
            weights: Arc::new(all),
            dynamic,
            input_scales,
        });
    }

    /// The factory models are built with: the linear plan, and the packed weights quantized layers
    /// (and a training QLoRA stage's base) run on.
    pub fn linear_factory(&self) -> LinearFactory {
        let mut factory =
            LinearFactory::new(self.plan.clone()).with_lora_dropout(self.lora_dropout);
        let packed: Vec<&PackedWeights> = self
            .quantized
            .as_ref()
            .map(|state| &state.weights)
            .into_iter()
            .chain(self.qlora_base.as_ref())
            .collect();
        match packed[..] {
            [] => {}
            [only] => factory = factory.with_packed(only.clone()),
            _ => {
                let union = packed.iter().flat_map(|p| p.iter());
                let union = union.map(|(n, w)| (n.clone(), w.clone())).collect();
                factory = factory.with_packed(Arc::new(union));
            }
        }
        if let Some(state) = &self.quantized {
            factory = factory.with_input_scales(state.input_scales.clone());
        }
        if let Some(observers) = &self.observers {
            factory = factory.with_activation_observers(observers.clone());
        }
        match &self.recorder {
            Some(recorder) => factory.with_input_recorder(recorder.clone()),
            None => factory,
        }
    }

    /// Models built from now on keep their fake-quantized layers' per-tensor input ranges in
    /// `observers` (`None` stops it): QAT for static int8.
    pub fn set_activation_observers(&mut self, observers: Option<Arc<ActivationObservers>>) {
        self.observers = observers;
    }

    /// Models built from now on record their linear layers' inputs into `recorder` (`None` stops
    /// it): activation importance runs calibration batches through such a model.
    pub fn set_input_recorder(&mut self, recorder: Option<Arc<InputRecorder>>) {
        self.recorder = recorder;
    }

    /// Builds the linear module at `module_path` (e.g. `encoder.layer.0.attention.self.query`) as
    /// `kind` from now on: a LoRA or QAT stage marks the modules it adapts.
    ///
    /// # Errors
    /// A module path that is not a linear layer of the model.
    pub fn set_linear_kind(&mut self, module_path: &str, kind: LinearKind) -> Result<()> {
        let weight = format!("{module_path}.weight");
        if !self.modules()?.is_linear_weight(&weight) {
            return Err(crate::EngineError::InvalidSetting(format!(
                "{module_path} is not a linear layer of the model"
            )));
        }
        self.plan = self
            .plan
            .clone()
            .overriding(&escape_glob(module_path), kind)?;
        Ok(())
    }

    /// Replaces the linear plan: a stage that changed layer kinds for its own training only
    /// (QAT's fake-quantized layers) puts the plan it found back.
    pub(crate) fn set_plan(&mut self, plan: LinearPlan) {
        self.plan = plan;
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
            dynamic: false,
            input_scales: InputScales::default(),
        });
        Ok(())
    }

    /// Records calibrated input scales (static int8), by module path; no-op on a model that is
    /// not quantized.
    pub fn set_input_scales(&mut self, scales: BTreeMap<String, f32>) {
        if let Some(state) = &mut self.quantized {
            state.input_scales = Arc::new(scales);
        }
    }

    /// Records that the quantization is dynamic (int8 activations per token at run time); no-op on
    /// a model that is not quantized.
    pub fn mark_dynamic(&mut self) {
        if let Some(state) = &mut self.quantized {
            state.dynamic = true;
        }
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use serde_json::json;

    use super::*;
    use crate::data::{Batch, Example};
    use crate::models::Outputs;
    use crate::spec::TaskType;

    #[test]
    fn a_module_marked_lora_builds_as_an_adapter_with_trainable_a_and_b() {
        let config = json!({"model_type": "bert", "vocab_size": 12, "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
            "max_position_embeddings": 8, "id2label": {"0": "a", "1": "b"}});
        let store = ParamStore::new();
        store.set_init_missing(Some(5));
        let factory = LinearFactory::default();
        let family = family_of(&config).unwrap();
        let task = TaskType::TextClassification;
        family
            .build(&store, &config, task, &factory, &Device::Cpu)
            .unwrap();
        let dense = ParamStore::from_tensors(store.tensors(), |_| false).unwrap();
        let mut model = WorkingModel::new(dense, config.clone());
        let query = "encoder.layer.0.attention.self.query";
        model
            .set_linear_kind(query, LinearKind::Lora { rank: 2, alpha: 4 })
            .unwrap();
        assert!(model
            .set_linear_kind("embeddings.word_embeddings", LinearKind::Dense)
            .is_err());
        assert_eq!(
            model.plan().kind_for(query),
            LinearKind::Lora { rank: 2, alpha: 4 }
        );
        model.store.set_init_missing(Some(6));
        let built = family
            .build(
                &model.store,
                &config,
                task,
                &model.linear_factory(),
                &Device::Cpu,
            )
            .unwrap();
        let trainable: Vec<String> = model
            .store
            .trainable_vars()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            trainable,
            [
                format!("{query}.lora_A.weight"),
                format!("{query}.lora_B.weight")
            ]
        );
        let rows = [Example {
            input_ids: vec![1, 4, 7],
            label: Some(1),
        }];
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = Batch::collate(&refs, 0, &Device::Cpu).unwrap();
        let out = built.forward(&batch, Outputs::LOGITS, None).unwrap();
        let loss = built.task_loss(&out, &batch).unwrap();
        let grads = loss.backward().unwrap();
        let (_, a) = &model.store.trainable_vars()[0];
        let sum = |t: &Tensor| -> f32 {
            t.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        // B starts at zero, so A's first gradient is zero; B's is not.
        assert_eq!(grads.get(a.as_tensor()).map(sum), Some(0.0));
        let (_, b) = &model.store.trainable_vars()[1];
        assert!(grads.get(b.as_tensor()).map(sum).unwrap() > 0.0);
    }
}
