//! The real [`Workbench`]: a job's model, data and device, for [`crate::pipeline::run`].
//!
//! The model's family ([`crate::family`]) builds it for the job's task: text classification gets a
//! sequence-classification head (created, seeded, when the input model has none). The model
//! is saved after each stage as a Hugging Face folder in transformers' layout for its family (dense;
//! see [`crate::export::HfArchitecture`]) or in the quantized safetensors layout
//! ([`crate::quant::layout`]), plus `compressd.json` saying which weights are pruned or quantized so a
//! resumed job restores its masks and linear plan; Llama models quantized to a GGUF type also get a
//! `model.gguf` when the spec asks for GGUF output.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use super::build;
use super::model::WorkingModel;
use super::saving::SavedQuantization;
use super::vocabulary::TrimmedVocabulary;
use super::ModelRole;
use crate::data::vocabulary::{read_tokenizer_files, unknown_token_id, TokenizerFiles};
use crate::data::{
    epoch_order, ClassificationData, ClassificationSpec, Example, LmCorpus, LmSpec, TextEncoder,
};
use crate::error::{EngineError, Result};
use crate::family::{family_for_task, renumbering, ModuleRole};
use crate::loading::{read_gguf, Checkpoint};
use crate::models::TaskModel;
use crate::params::ParamStore;
use crate::pipeline::{self, PipelineInputs, PipelineResult, ProgressFn, StageContext, Workbench};
use crate::report::ModelMetrics;
use crate::spec::{JobSpec, OutputFormat, StageSpec, TaskType};

/// Default tokens per classification example (MiniLM's tokenizer truncates at 128 too).
const DEFAULT_CLASSIFICATION_LENGTH: usize = 128;
/// Default tokens per language-modelling sequence.
const DEFAULT_LM_LENGTH: usize = 256;
/// The folder inside a model folder that holds the LoRA adapter (PEFT's layout).
pub const ADAPTER_DIR: &str = "adapter";
pub use crate::export::COMPRESSED_TENSORS_DIR;
/// The file recording which weights are pruned or quantized.
const STATE_FILE: &str = "compressd.json";

/// The job's tokenized data.
pub(super) enum TaskData {
    /// Labelled rows split into train, validation and test.
    Classification(ClassificationData),
    /// A chunked corpus.
    LanguageModeling(LmCorpus),
}

/// Which weights are pruned or quantized, saved next to the model.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct SavedState {
    pruned: Vec<String>,
    quantized: Option<SavedQuantization>,
    /// For a trimmed vocabulary, the input tokenizer's ids of the kept tokens, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vocabulary: Option<Vec<u32>>,
}

/// The job's model source, data and device.
pub struct Session {
    pub(super) spec: JobSpec,
    pub(super) device: Device,
    pub(super) data: TaskData,
    pub(super) encoder: TextEncoder,
    model_path: PathBuf,
    /// Local paths of the models stages name, by name ([`PipelineInputs::models`]).
    named_models: BTreeMap<String, PathBuf>,
    tokenizer_dir: Option<PathBuf>,
    /// The trimmed vocabulary the data's ids are in (`None`: the input tokenizer's).
    vocabulary: Option<Arc<TrimmedVocabulary>>,
    /// Training runs started in the current stage: each gets its own checkpoint folder.
    pub(super) train_runs: std::cell::Cell<usize>,
}

impl Session {
    /// Reads the tokenizer and the dataset of `spec` from `inputs`.
    ///
    /// # Errors
    /// Missing or malformed files, or a task the model family cannot do.
    pub fn open(spec: &JobSpec, inputs: &PipelineInputs, device: Device) -> Result<Self> {
        // Before any work: a setting this device does not offer fails the job at once, not after
        // the stages before it ran.
        spec.check_device(&device)?;
        let tokenizer = tokenizer_path(&inputs.model)?;
        let (data, encoder) = match spec.task.task_type {
            TaskType::TextClassification => {
                let length = spec
                    .task
                    .max_length
                    .map_or(DEFAULT_CLASSIFICATION_LENGTH, |l| l as usize);
                let encoder = TextEncoder::from_file(&tokenizer, length)?;
                let data_spec = ClassificationSpec {
                    text_field: spec.task.text_field.clone(),
                    label_field: spec
                        .task
                        .label_field
                        .clone()
                        .unwrap_or_else(|| "label".into()),
                    ..ClassificationSpec::default()
                };
                let mut data = ClassificationData::load(&inputs.dataset, &data_spec, &encoder)?;
                // Caps take the first rows after a seeded shuffle, as the spec says: files are often
                // sorted by label, and their first rows would hold a single class.
                cap(&mut data.train, spec.task.max_train_samples, spec.seed);
                cap(&mut data.validation, spec.task.max_eval_samples, spec.seed);
                cap(&mut data.test, spec.task.max_eval_samples, spec.seed);
                (TaskData::Classification(data), encoder)
            }
            TaskType::LanguageModeling => {
                let length = spec
                    .task
                    .max_length
                    .map_or(DEFAULT_LM_LENGTH, |l| l as usize);
                let encoder = TextEncoder::from_file(&tokenizer, length)?;
                let data_spec = LmSpec {
                    seq_len: length,
                    max_train_samples: spec.task.max_train_samples.map(|n| n as usize),
                    max_eval_samples: spec.task.max_eval_samples.map(|n| n as usize),
                    ..LmSpec::default()
                };
                (
                    TaskData::LanguageModeling(LmCorpus::load(
                        &inputs.dataset,
                        &data_spec,
                        &encoder,
                    )?),
                    encoder,
                )
            }
        };
        Ok(Self {
            spec: spec.clone(),
            device,
            data,
            encoder,
            model_path: inputs.model.clone(),
            named_models: inputs.models.clone(),
            tokenizer_dir: tokenizer.parent().map(Path::to_path_buf),
            vocabulary: None,
            train_runs: std::cell::Cell::new(0),
        })
    }

    /// Builds the model for a forward pass with the model's linear plan. `trainable` keeps the
    /// store's variables (training); otherwise a detached, frozen view is used, which quantized
    /// layers require and which skips gradient bookkeeping.
    pub(super) fn build_model(
        &self,
        model: &WorkingModel,
        trainable: bool,
    ) -> Result<Box<dyn TaskModel>> {
        self.build_model_with(model, trainable, &model.linear_factory())
    }

    /// As [`Self::build_model`], its linear layers made by `factory`.
    pub(super) fn build_model_with(
        &self,
        model: &WorkingModel,
        trainable: bool,
        factory: &crate::layers::LinearFactory,
    ) -> Result<Box<dyn TaskModel>> {
        let store = if trainable {
            model.store.clone()
        } else {
            let frozen = model
                .store
                .tensors()
                .into_iter()
                .map(|(n, t)| (n, t.detach()));
            ParamStore::from_tensors(frozen, |_| false)?
        };
        let task = self.spec.task.task_type;
        family_for_task(&model.config, task)?.build(
            &store,
            &model.config,
            task,
            factory,
            &self.device,
        )
    }

    /// The class names of a classification task (empty otherwise).
    pub(super) fn labels(&self) -> &[String] {
        match &self.data {
            TaskData::Classification(data) => &data.labels.id2label,
            TaskData::LanguageModeling(_) => &[],
        }
    }

    /// A model from a checkpoint: labels set for classification, a missing head created (seeded).
    fn model_from_checkpoint(&self, checkpoint: Checkpoint) -> Result<WorkingModel> {
        let task = self.spec.task.task_type;
        let config = family_for_task(&checkpoint.config, task)?.config_for_task(
            &checkpoint.config,
            task,
            self.labels(),
        )?;
        let mut checkpoint = checkpoint;
        let stale = stale_head(&checkpoint, &config, task, self.labels().len())?;
        if !stale.is_empty() {
            tracing::info!(
                ?stale,
                "the input's task head has another number of classes: made anew"
            );
            checkpoint.tensors.retain(|(n, _)| !stale.contains(n));
        }
        let store = checkpoint.into_store(|_| true)?;
        store.set_init_missing(Some(self.spec.seed));
        let model = WorkingModel::new(store, config);
        // Building once creates the missing head parameters in the store.
        self.build_model(&model, true)?;
        model.store.set_init_missing(None);
        Ok(model)
    }

    /// See [`super::Trainer::load_named_model`].
    pub(super) fn load_named_model(
        &self,
        reference: &str,
        role: ModelRole,
    ) -> Result<WorkingModel> {
        let field = role.field();
        let refuse = |why: String| EngineError::InvalidSetting(format!("distill: {field}: {why}"));
        let path = self
            .named_models
            .get(reference)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(reference));
        if !path.exists() {
            return Err(refuse(format!("no model at {}", path.display())));
        }
        if self.vocabulary.is_some() {
            return Err(refuse(
                "an earlier stage trimmed the job's vocabulary, which this model does not follow; \
                 trim it in this stage instead (`vocabulary: \"task\"`)"
                    .into(),
            ));
        }
        let ours = self
            .tokenizer_dir
            .as_deref()
            .map(|dir| dir.join("tokenizer.json"))
            .ok_or_else(|| refuse("the job's model has no tokenizer to compare with".into()))?;
        if !same_vocabulary(&tokenizer_path(&path)?, &ours)? {
            return Err(refuse(format!(
                "{} reads another tokenizer than the job's model; the data is tokenized once, \
                 for both teacher and student",
                path.display()
            )));
        }
        let checkpoint = read_checkpoint(&path, &self.device, self.spec.task.task_type)?;
        if role == ModelRole::Teacher && self.spec.task.task_type == TaskType::TextClassification {
            let theirs = config_labels(&checkpoint.config);
            if theirs != self.labels() {
                return Err(refuse(format!(
                    "its labels {theirs:?} are not the task's {:?} (a teacher must predict the \
                     task's classes, in the data's order)",
                    self.labels()
                )));
            }
        }
        self.model_from_checkpoint(checkpoint)
    }

    /// The tokenizer files of `model`: its trimmed vocabulary's, else the input's.
    pub(super) fn tokenizer_files(&self, model: &WorkingModel) -> Result<TokenizerFiles> {
        match (model.vocabulary(), &self.tokenizer_dir) {
            (Some(vocabulary), _) => Ok(vocabulary.files.clone()),
            (None, Some(dir)) => read_tokenizer_files(dir),
            (None, None) => Ok(Vec::new()),
        }
    }

    /// Every token id in the task's data, all splits, and the padding id, in `model`'s vocabulary.
    ///
    /// # Errors
    /// A model whose vocabulary the data does not follow (a stage that trimmed it and did not
    /// return yet).
    pub(super) fn data_token_ids(&self, model: &WorkingModel) -> Result<BTreeSet<u32>> {
        if !self.follows(model) {
            return Err(EngineError::InvalidSetting(
                "vocabulary: the model's vocabulary changed within this stage; trim it once".into(),
            ));
        }
        let splits: Vec<&[Example]> = match &self.data {
            TaskData::Classification(d) => vec![&d.train, &d.validation, &d.test],
            TaskData::LanguageModeling(c) => vec![&c.train, &c.validation],
        };
        Ok(splits
            .into_iter()
            .flatten()
            .flat_map(|e| e.input_ids.iter().copied())
            .chain([self.encoder.pad_id()])
            .collect())
    }

    /// Whether the data's ids are in `model`'s vocabulary. Models share their vocabulary's `Arc`
    /// (students, copies), so the pointer answers without comparing the tokenizer files; a model
    /// loaded back from disk has its own, compared by the kept ids.
    fn follows(&self, model: &WorkingModel) -> bool {
        match (&self.vocabulary, model.vocabulary()) {
            (None, None) => true,
            (Some(ours), Some(theirs)) => Arc::ptr_eq(ours, theirs) || ours.kept == theirs.kept,
            _ => false,
        }
    }

    /// Renumbers the data's token ids (and swaps the encoder) to `model`'s vocabulary when a stage
    /// trimmed it, or when a saved model of another vocabulary is loaded.
    fn follow_vocabulary(&mut self, model: &WorkingModel) -> Result<()> {
        let target = model.vocabulary();
        if self.follows(model) {
            return Ok(());
        }
        let (new_ids, encoder) = match target {
            Some(vocabulary) => {
                let json = vocabulary.tokenizer_json()?;
                let size = vocabulary.kept.iter().max().map_or(0, |m| *m as usize + 1);
                let unk = unknown_token_id(json);
                let tokenizer = tokenizers::Tokenizer::from_bytes(json)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                let encoder = TextEncoder::new(tokenizer, self.encoder.max_length(), None)?;
                (Some((renumbering(&vocabulary.kept, size), unk)), encoder)
            }
            None => {
                let dir = self.tokenizer_dir.as_deref().unwrap_or(Path::new("."));
                let encoder =
                    TextEncoder::from_file(&dir.join("tokenizer.json"), self.encoder.max_length())?;
                (None, encoder)
            }
        };
        let current = self.vocabulary.clone();
        let renumber = |id: u32| -> Result<u32> {
            let input = match &current {
                Some(v) => v.kept[id as usize],
                None => id,
            };
            match &new_ids {
                None => Ok(input),
                Some((table, unk)) => table
                    .get(input as usize)
                    .copied()
                    .flatten()
                    .or(*unk)
                    .ok_or_else(|| {
                        EngineError::InvalidModel(format!(
                            "token {input} of the data is not in the trimmed vocabulary, which has no unknown token"
                        ))
                    }),
            }
        };
        let splits: Vec<&mut Vec<Example>> = match &mut self.data {
            TaskData::Classification(d) => vec![&mut d.train, &mut d.validation, &mut d.test],
            TaskData::LanguageModeling(c) => vec![&mut c.train, &mut c.validation],
        };
        for example in splits.into_iter().flatten() {
            for id in &mut example.input_ids {
                *id = renumber(*id)?;
            }
        }
        self.encoder = encoder;
        self.vocabulary = target.cloned();
        Ok(())
    }
}

impl Workbench for Session {
    type Model = WorkingModel;

    fn load_input(&mut self) -> Result<WorkingModel> {
        let model = self.load_input_model()?;
        self.follow_vocabulary(&model)?;
        Ok(model)
    }

    fn load_saved(&mut self, dir: &Path) -> Result<WorkingModel> {
        let state: SavedState = read_json(&dir.join(STATE_FILE))?;
        let mut model = self.load_saved_model(dir, &state)?;
        if let Some(kept) = state.vocabulary {
            let files = read_tokenizer_files(dir)?;
            model.set_vocabulary(Some(Arc::new(TrimmedVocabulary { kept, files })));
        }
        self.follow_vocabulary(&model)?;
        Ok(model)
    }

    fn run_stage(
        &mut self,
        model: &mut WorkingModel,
        spec: &StageSpec,
        ctx: &StageContext,
    ) -> Result<serde_json::Value> {
        let stage = build(spec)?;
        stage.validate(model)?;
        // An adapter describes the weights of the stage that trained it; this stage changes them.
        model.set_adapter(None);
        self.train_runs.set(0);
        let report = stage.run(model, &*self, ctx)?;
        self.follow_vocabulary(model)?;
        Ok(report)
    }

    fn save(&mut self, model: &WorkingModel, dir: &Path) -> Result<()> {
        let pruned = model.masks().map(|m| m.names()).unwrap_or_default();
        let quantized = SavedQuantization::of(model);
        super::saving::save(
            model,
            dir,
            self.tokenizer_dir.as_deref(),
            self.spec.task.task_type,
        )?;
        // A trimmed vocabulary ships its own, renumbered tokenizer files.
        let vocabulary = match model.vocabulary() {
            Some(trimmed) => {
                for (name, bytes) in &trimmed.files {
                    let path = dir.join(name);
                    std::fs::write(&path, bytes).map_err(|e| EngineError::io(&path, e))?;
                }
                Some(trimmed.kept.clone())
            }
            None => None,
        };
        if self.spec.outputs.contains(&OutputFormat::Gguf)
            && self.spec.task.task_type == TaskType::LanguageModeling
        {
            super::saving::save_gguf(
                model,
                &dir.join("model.gguf"),
                &self.model_path,
                self.tokenizer_dir.as_deref(),
            )?;
        }
        if self.spec.outputs.contains(&OutputFormat::CompressedTensors)
            && model.quantized().is_some()
        {
            let ct_dir = dir.join(COMPRESSED_TENSORS_DIR);
            super::saving::save_compressed_tensors(
                model,
                &ct_dir,
                self.tokenizer_dir.as_deref(),
                self.spec.task.task_type,
            )?;
            if let Some(trimmed) = model.vocabulary() {
                for (name, bytes) in &trimmed.files {
                    let path = ct_dir.join(name);
                    std::fs::write(&path, bytes).map_err(|e| EngineError::io(&path, e))?;
                }
            }
        }
        // Only the stage that trained the adapter has one (the pipeline drops it at the next).
        if self.spec.outputs.contains(&OutputFormat::Adapter) && model.adapter().is_some() {
            super::saving::save_adapter(model, &dir.join(ADAPTER_DIR), self.spec.task.task_type)?;
        }
        write_json(
            &dir.join(STATE_FILE),
            &SavedState {
                pruned,
                quantized,
                vocabulary,
            },
        )
    }

    fn evaluate(&mut self, model: &WorkingModel, _dir: &Path) -> Result<ModelMetrics> {
        self.follow_vocabulary(model)?;
        super::measure::evaluate(self, model)
    }
}

impl Session {
    fn load_input_model(&mut self) -> Result<WorkingModel> {
        let checkpoint = read_checkpoint(&self.model_path, &self.device, self.spec.task.task_type)?;
        self.model_from_checkpoint(checkpoint)
    }

    fn load_saved_model(&mut self, dir: &Path, state: &SavedState) -> Result<WorkingModel> {
        let task = self.spec.task.task_type;
        let (mut model, packed) = match &state.quantized {
            Some(_) => super::saving::load_quantized(dir, &self.device, task)?,
            None => {
                let checkpoint = super::saving::read_dense(dir, &self.device, task)?;
                (self.model_from_checkpoint(checkpoint)?, Default::default())
            }
        };
        let quantized = state.quantized.as_ref().map(|saved| (saved, packed));
        super::saving::restore(&mut model, &state.pruned, quantized)?;
        Ok(model)
    }
}

/// Runs a whole job: opens the session on `device` and runs the pipeline into `out_dir`.
///
/// # Errors
/// As [`Session::open`] and [`pipeline::run`].
pub fn run_job(
    spec: &JobSpec,
    inputs: &PipelineInputs,
    device: Device,
    out_dir: &Path,
    progress: ProgressFn,
    cancel: &AtomicBool,
) -> Result<PipelineResult> {
    let mut session = Session::open(spec, inputs, device)?;
    pipeline::run(spec, inputs, &mut session, out_dir, progress, cancel)
}

/// The task head's parameters of a classification checkpoint whose class count is not the
/// dataset's `labels`: a head trained for other classes is replaced by a fresh one (as
/// transformers' `ignore_mismatched_sizes`), not loaded with the wrong shape.
fn stale_head(
    checkpoint: &Checkpoint,
    config: &serde_json::Value,
    task: TaskType,
    labels: usize,
) -> Result<Vec<String>> {
    if task != TaskType::TextClassification {
        return Ok(Vec::new());
    }
    let names: Vec<String> = checkpoint.tensors.iter().map(|(n, _)| n.clone()).collect();
    let map = family_for_task(config, task)?.modules(config, &names)?;
    let heads: Vec<&str> = map
        .with_role(ModuleRole::TaskHead)
        .map(|m| m.path.as_str())
        .collect();
    let stale = checkpoint.tensors.iter().any(|(n, t)| {
        map.role_of(n) == Some(ModuleRole::TaskHead) && t.dims().first() != Some(&labels)
    });
    Ok(if stale {
        names
            .into_iter()
            .filter(|n| {
                heads
                    .iter()
                    .any(|h| n.strip_prefix(h).is_some_and(|r| r.starts_with('.')))
            })
            .collect()
    } else {
        Vec::new()
    })
}

/// Keeps `limit` examples chosen by a shuffle seeded with `seed` (all when `limit` is `None`).
fn cap(examples: &mut Vec<Example>, limit: Option<u64>, seed: u64) {
    let Some(limit) = limit.map(|l| l as usize).filter(|&l| l < examples.len()) else {
        return;
    };
    let order = epoch_order(examples.len(), seed, 0);
    let kept: Vec<Example> = order
        .into_iter()
        .take(limit)
        .map(|i| examples[i].clone())
        .collect();
    *examples = kept;
}

/// A model folder or GGUF file, in full precision.
fn read_checkpoint(path: &Path, device: &Device, task: TaskType) -> Result<Checkpoint> {
    if path.is_dir() {
        // Under the engine's names, so an input in transformers' layout and the folders this
        // job saves (read back on resume) name every weight alike.
        super::saving::read_dense(path, device, task)
    } else {
        read_gguf(path, DType::F32, device)
    }
}

/// A classification config's class names in id order (empty without `id2label`).
fn config_labels(config: &serde_json::Value) -> Vec<String> {
    let Some(map) = config
        .get("id2label")
        .and_then(serde_json::Value::as_object)
    else {
        return Vec::new();
    };
    let mut labels: Vec<(usize, String)> = map
        .iter()
        .map(|(id, name)| {
            let id = id.parse().unwrap_or(usize::MAX);
            (id, name.as_str().unwrap_or_default().to_owned())
        })
        .collect();
    labels.sort();
    labels.into_iter().map(|(_, name)| name).collect()
}

/// Whether two `tokenizer.json` files map the same tokens to the same ids.
fn same_vocabulary(a: &Path, b: &Path) -> Result<bool> {
    let vocabulary = |path: &Path| {
        tokenizers::Tokenizer::from_file(path)
            .map(|t| t.get_vocab(true))
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    };
    Ok(vocabulary(a)? == vocabulary(b)?)
}

fn tokenizer_path(model: &Path) -> Result<PathBuf> {
    let dir = if model.is_dir() {
        model
    } else {
        model.parent().unwrap_or(Path::new("."))
    };
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        Ok(path)
    } else {
        Err(EngineError::InvalidModel(format!(
            "no tokenizer.json next to {}",
            model.display()
        )))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| EngineError::json(path, e))
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| EngineError::json(path, e))?;
    std::fs::write(path, bytes).map_err(|e| EngineError::io(path, e))
}
