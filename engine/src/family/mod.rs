//! Model families: everything that differs between BERT-style encoders and Llama-style decoders,
//! behind one trait, so stages, the trainer and the service never match on a family or a
//! parameter-name pattern.
//!
//! A family owns config parsing and checking, building a [`TaskModel`] for a task, the
//! [`ModuleMap`] (which parameter is a query projection, an FFN neuron bank, an embedding, the
//! task head...), layer dropping for distillation students ([`drop_layers`]) and the names each
//! export format uses. [`FAMILIES`] is the registry: adding a family is one file and one line there.

mod bert;
mod check;
mod llama;
mod modules;
mod surgery;
mod uneven;
mod vocabulary;

use candle_core::Device;
use serde_json::Value;

pub use bert::BertFamily;
pub use check::{check_checkpoint, family_from_config, CheckpointProblem};
pub use llama::LlamaFamily;
pub use modules::{ModuleInfo, ModuleMap, ModuleRole};
pub use surgery::{drop_layers, shrink, StructuredCut};
pub use uneven::{cut_padding, pad_to_config, recorded_widths, LayerWidths, LAYER_WIDTHS_FIELD};
pub use vocabulary::{renumbering, trim_vocabulary};

use crate::error::{EngineError, Result};
use crate::layers::LinearFactory;
use crate::models::TaskModel;
use crate::params::ParamStore;
use crate::spec::TaskType;

/// One model family.
pub trait ModelFamily: Send + Sync {
    /// The family's name, as in `config.json`'s `model_type` (`bert`, `llama`).
    fn name(&self) -> &'static str;

    /// A few words for people (`BERT-style encoders`), used in error messages.
    fn description(&self) -> &'static str;

    /// The `model_type` values this family loads.
    fn model_types(&self) -> &'static [&'static str];

    /// The tasks a model of this family can be built for.
    fn tasks(&self) -> &'static [TaskType];

    /// Parses `config` and checks that its hyper-parameters are consistent.
    ///
    /// # Errors
    /// [`EngineError::InvalidModel`] naming the field.
    fn check_config(&self, config: &Value) -> Result<()>;

    /// The weights whose shapes the config determines, named as in the checkpoint whose parameter
    /// names are `names` (BERT task checkpoints put the encoder under `bert.`), for checking a
    /// checkpoint before any work is done ([`check_checkpoint`]).
    ///
    /// # Errors
    /// An invalid config.
    fn expected_shapes(
        &self,
        config: &Value,
        names: &[String],
    ) -> Result<Vec<(String, Vec<usize>)>>;

    /// Whether a transformers class name (`BertForSequenceClassification`, `LlamaModel`) is one
    /// of this family's.
    fn names_architecture(&self, class: &str) -> bool {
        class.to_ascii_lowercase().starts_with(self.name())
    }

    /// The config for training on `task`: labels set for classification, the rest unchanged.
    ///
    /// # Errors
    /// An invalid config.
    fn config_for_task(&self, config: &Value, task: TaskType, labels: &[String]) -> Result<Value>;

    /// Builds the model for `task` from `store`, each linear layer made by `linears`.
    ///
    /// # Errors
    /// A task the family cannot do, an invalid config, or missing or inconsistent tensors.
    fn build(
        &self,
        store: &ParamStore,
        config: &Value,
        task: TaskType,
        linears: &LinearFactory,
        device: &Device,
    ) -> Result<Box<dyn TaskModel>>;

    /// Which module each of `names` (the model's parameter names) belongs to.
    ///
    /// # Errors
    /// An invalid config.
    fn modules(&self, config: &Value, names: &[String]) -> Result<ModuleMap>;

    /// The prefixes before a layer index in parameter names (`encoder.layer.`), longest first.
    fn layer_prefixes(&self) -> &'static [&'static str];

    /// The config's field holding the number of layers.
    fn layer_count_field(&self) -> &'static str {
        "num_hidden_layers"
    }

    /// The transformers class a dense export of a model for `task` declares in `architectures`.
    fn hf_architecture(&self, task: TaskType) -> &'static str;

    /// Whether the family's formats need the same head count and FFN width in every layer (so
    /// structured pruning must use scope `uniform`).
    fn needs_uniform_layers(&self) -> bool;

    /// The config of a model of this family whose layers were structurally pruned to `widths`
    /// (see [`uneven`]'s module docs for what each format can say).
    ///
    /// # Errors
    /// Widths the family's formats cannot describe, or an invalid config.
    fn config_for_widths(
        &self,
        config: &Value,
        widths: &LayerWidths,
        map: &ModuleMap,
    ) -> Result<Value>;
}

/// Every family the engine can run.
pub static FAMILIES: &[&dyn ModelFamily] = &[&BertFamily, &LlamaFamily];

/// The family of a `config.json`: its `model_type`, else the class in `architectures` (the same
/// rule the service's upload check uses, [`family_from_config`]).
///
/// # Errors
/// A config naming no family the engine loads.
pub fn family_of(config: &Value) -> Result<&'static dyn ModelFamily> {
    family_from_config(config).map_err(|p| EngineError::InvalidModel(p.to_string()))
}

/// The family of `config`, checked to do `task`.
///
/// # Errors
/// As [`family_of`], or a family that cannot do `task`.
pub fn family_for_task(config: &Value, task: TaskType) -> Result<&'static dyn ModelFamily> {
    let family = family_of(config)?;
    if family.tasks().contains(&task) {
        Ok(family)
    } else {
        Err(EngineError::Unsupported(format!(
            "a {} model ({}) cannot be used for {}",
            family.name(),
            family.description(),
            task_name(task)
        )))
    }
}

/// `bert (BERT-style encoders), llama (...)`, for error messages.
pub fn supported_list() -> String {
    FAMILIES
        .iter()
        .map(|f| format!("{} ({})", f.name(), f.description()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn task_name(task: TaskType) -> &'static str {
    match task {
        TaskType::TextClassification => "text_classification",
        TaskType::LanguageModeling => "language_modeling",
    }
}

/// Checks that each named size of a config is at least 1.
///
/// # Errors
/// [`EngineError::InvalidModel`] naming the first field that is zero.
fn require_positive(fields: &[(&str, usize)]) -> Result<()> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((field, _)) => Err(EngineError::InvalidModel(format!(
            "config.json: {field} must be at least 1"
        ))),
        None => Ok(()),
    }
}

/// Parses a config as a family's config type.
///
/// # Errors
/// [`EngineError::InvalidModel`] naming what serde found missing or malformed.
pub(crate) fn parse_config<C: serde::de::DeserializeOwned>(config: &Value) -> Result<C> {
    serde_json::from_value(config.clone())
        .map_err(|e| EngineError::InvalidModel(format!("config.json: {e}")))
}

#[cfg(test)]
mod tests;
