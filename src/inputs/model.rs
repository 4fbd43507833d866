//! Validation of a whole model: a Hugging Face folder (`config.json`, `*.safetensors` with an
//! optional index, `tokenizer.json`, extras) or a single GGUF file with an optional tokenizer.
//!
//! Files arrive one after another (multipart parts, or files read from a folder); each is hashed
//! and checked by its own streaming inspector, and the cross-file checks (architecture, shapes
//! against the config, index against the shards, tokenizer against the embedding) run in
//! [`ModelInspector::finish`].

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use compressd_engine::spec::LinearModule;
use compressd_engine::stages::lora;

use super::gguf::{GgufInspector, GgufSummary};
use super::model_config::{self, Architecture};
use super::safetensors::{SafetensorsInspector, SafetensorsSummary};
use super::{Checked, Rejection};

/// Largest `config.json`, `tokenizer.json` or index accepted; they are parsed in memory.
pub const MAX_JSON_BYTES: usize = 64 << 20;
const INDEX_FILE: &str = "model.safetensors.index.json";
const SLUG: &str = "invalid-model";

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Safetensors,
    Gguf,
}

impl ModelFormat {
    /// The name used in records.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Safetensors => "safetensors",
            Self::Gguf => "gguf",
        }
    }
}

/// One stored file of a model, dataset or artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FileRecord {
    /// Path inside the model folder, `/`-separated.
    pub name: String,
    pub bytes: u64,
    /// Lower-case hex sha256 of the content.
    pub sha256: String,
}

/// What a valid model is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelSummary {
    pub format: ModelFormat,
    pub architecture: Architecture,
    /// Elements of all floating-point weight tensors.
    pub parameters: u64,
    /// Transformer layers (blocks), as the config or GGUF metadata states them.
    pub layers: Option<u64>,
    /// The linear modules and their shapes (Hugging Face folders; `None` for GGUF), so LoRA
    /// settings that cannot fit the model are refused at submission.
    pub linear_modules: Option<Vec<LinearModule>>,
    /// Total bytes of all files.
    pub bytes: u64,
    pub files: Vec<FileRecord>,
}

enum Checker {
    Safetensors(SafetensorsInspector),
    Gguf(GgufInspector),
    /// A small JSON file kept whole for parsing at its end.
    Json(Vec<u8>),
    /// Any other file: hashed only.
    Other,
}

struct OpenFile {
    name: String,
    hasher: Sha256,
    bytes: u64,
    checker: Checker,
}

/// Push-based validator for the files of one model.
#[derive(Default)]
pub struct ModelInspector {
    files: Vec<FileRecord>,
    open: Option<OpenFile>,
    config: Option<Value>,
    index: Option<Value>,
    tokenizer_vocab: Option<usize>,
    shards: Vec<(String, SafetensorsSummary)>,
    gguf: Option<GgufSummary>,
}

/// Checks a file name given by a client: a relative `/`-separated path with no empty, `.` or `..`
/// component, so it can never escape the model's folder, and no `\` or `:`.
///
/// The colon is refused because the artifact store's local backend failed on names ending in one
/// (`A:`, `AA:`: an upload answered 500 under the fuzzer), and Windows and some object stores do
/// not take it either; no model or dataset file we know of has one.
///
/// # Errors
/// An `invalid-file-name` [`Rejection`].
pub fn check_file_name(name: &str) -> Checked<()> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.contains(['\\', '\0', ':'])
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Rejection::new(
            "invalid-file-name",
            format!(
                "file name {name:?} must be a relative path without empty, '.' or '..' parts, \
                 '\\' or ':'"
            ),
        ));
    }
    Ok(())
}

impl ModelInspector {
    /// An inspector with no files yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts the next file, named by its path inside the model folder.
    ///
    /// # Errors
    /// A [`Rejection`] for a bad or repeated name.
    pub fn start_file(&mut self, name: &str) -> Checked<()> {
        check_file_name(name)?;
        if self.files.iter().any(|f| f.name == name)
            || self.open.as_ref().is_some_and(|f| f.name == name)
        {
            return Err(Rejection::in_file(SLUG, name, "appears twice"));
        }
        let at_root = !name.contains('/');
        let checker = if at_root && name.ends_with(".safetensors") {
            Checker::Safetensors(SafetensorsInspector::new(name))
        } else if at_root && name.ends_with(".gguf") {
            Checker::Gguf(GgufInspector::new(name))
        } else if at_root && matches!(name, "config.json" | "tokenizer.json" | INDEX_FILE) {
            Checker::Json(Vec::new())
        } else {
            Checker::Other
        };
        self.open = Some(OpenFile {
            name: name.to_owned(),
            hasher: Sha256::new(),
            bytes: 0,
            checker,
        });
        Ok(())
    }

    /// Feeds the next bytes of the open file.
    ///
    /// # Errors
    /// A [`Rejection`] as soon as the file is known to be bad.
    pub fn feed(&mut self, chunk: &[u8]) -> Checked<()> {
        let Some(file) = self.open.as_mut() else {
            return Err(Rejection::new(SLUG, "bytes arrived outside any file"));
        };
        file.hasher.update(chunk);
        file.bytes += chunk.len() as u64;
        match &mut file.checker {
            Checker::Safetensors(s) => s.feed(chunk),
            Checker::Gguf(g) => g.feed(chunk),
            Checker::Json(buf) if buf.len() + chunk.len() > MAX_JSON_BYTES => {
                Err(Rejection::in_file(
                    SLUG,
                    &file.name,
                    format!("is larger than the {MAX_JSON_BYTES}-byte limit for JSON files"),
                ))
            }
            Checker::Json(buf) => {
                buf.extend_from_slice(chunk);
                Ok(())
            }
            Checker::Other => Ok(()),
        }
    }

    /// Ends the open file, runs its own checks and returns its record. Parsing a tokenizer takes
    /// CPU time (tens of milliseconds); async callers run this off the runtime.
    ///
    /// # Errors
    /// A [`Rejection`] when the file is empty, truncated or does not parse.
    pub fn end_file(&mut self) -> Checked<FileRecord> {
        let Some(file) = self.open.take() else {
            return Err(Rejection::new(SLUG, "no file is open"));
        };
        if file.bytes == 0 {
            return Err(Rejection::in_file(SLUG, &file.name, "the file is empty"));
        }
        match file.checker {
            Checker::Safetensors(s) => self.shards.push((file.name.clone(), s.finish()?)),
            Checker::Gguf(g) => {
                if self.gguf.is_some() {
                    return Err(Rejection::in_file(
                        SLUG,
                        &file.name,
                        "a model holds one GGUF file",
                    ));
                }
                self.gguf = Some(g.finish()?);
            }
            Checker::Json(buf) => self.take_json(&file.name, &buf)?,
            Checker::Other => {}
        }
        let record = FileRecord {
            name: file.name,
            bytes: file.bytes,
            sha256: hex::encode(file.hasher.finalize()),
        };
        self.files.push(record.clone());
        Ok(record)
    }

    fn take_json(&mut self, name: &str, buf: &[u8]) -> Checked<()> {
        if name == "tokenizer.json" {
            let tokenizer = tokenizers::Tokenizer::from_bytes(buf).map_err(|e| {
                Rejection::in_file("invalid-tokenizer", name, format!("does not load: {e}"))
            })?;
            self.tokenizer_vocab = Some(tokenizer.get_vocab_size(true));
            return Ok(());
        }
        let value: Value = serde_json::from_slice(buf).map_err(|e| {
            Rejection::in_file("invalid-config", name, format!("is not valid JSON: {e}"))
        })?;
        if !value.is_object() {
            return Err(Rejection::in_file(
                "invalid-config",
                name,
                "must be a JSON object",
            ));
        }
        if name == INDEX_FILE {
            self.index = Some(value);
        } else {
            self.config = Some(value);
        }
        Ok(())
    }

    /// Runs the cross-file checks and summarises the model.
    ///
    /// # Errors
    /// A [`Rejection`] when files are missing or disagree with each other.
    pub fn finish(self) -> Checked<ModelSummary> {
        if let Some(open) = &self.open {
            return Err(Rejection::in_file(SLUG, &open.name, "was not finished"));
        }
        let bytes = self.files.iter().map(|f| f.bytes).sum();
        let (format, architecture, parameters, linear_modules) = if self.gguf.is_some() {
            let (format, architecture, parameters) = self.finish_gguf()?;
            (format, architecture, parameters, None)
        } else {
            self.finish_safetensors()?
        };
        let layers = match (&self.gguf, &self.config) {
            (Some(gguf), _) => gguf.integers.get("llama.block_count").copied(),
            (None, Some(config)) => architecture.layers_in(config),
            (None, None) => None,
        };
        Ok(ModelSummary {
            format,
            architecture,
            parameters,
            layers,
            linear_modules,
            bytes,
            files: self.files,
        })
    }

    fn finish_gguf(&self) -> Checked<(ModelFormat, Architecture, u64)> {
        let gguf = self.gguf.as_ref().expect("caller checked");
        if !self.shards.is_empty() {
            return Err(Rejection::new(
                SLUG,
                "a model is either GGUF or safetensors, not both",
            ));
        }
        let architecture = model_config::check_gguf(gguf)?;
        let rows = gguf
            .tensors
            .iter()
            .find(|t| t.name == "token_embd.weight")
            .map(|t| t.shape[0]);
        self.check_tokenizer_fits(rows)?;
        let parameters = gguf.tensors.iter().map(|t| t.elements()).sum();
        Ok((ModelFormat::Gguf, architecture, parameters))
    }

    fn finish_safetensors(
        &self,
    ) -> Checked<(ModelFormat, Architecture, u64, Option<Vec<LinearModule>>)> {
        if self.files.is_empty() {
            return Err(Rejection::new(SLUG, "no files were sent"));
        }
        if self.shards.is_empty() {
            return Err(Rejection::new(
                SLUG,
                "no *.safetensors or *.gguf weights file was sent",
            ));
        }
        let config = self.config.as_ref().ok_or_else(|| {
            Rejection::new(SLUG, "config.json is missing next to the safetensors files")
        })?;
        if self.tokenizer_vocab.is_none() {
            return Err(Rejection::new(SLUG, "tokenizer.json is missing"));
        }
        let shapes = self.merged_shapes()?;
        self.check_index(&shapes)?;
        let tensor_shapes = shapes
            .iter()
            .map(|(k, v)| (k.clone(), v.1.clone()))
            .collect();
        let architecture = model_config::check_hf(config, &tensor_shapes)?;
        // The config passed the family's checks, so this only fails on an engine bug; the engine
        // checks LoRA settings again at run time, so none recorded is safe.
        let linear_modules = lora::linear_modules(config, &tensor_shapes).ok();
        let rows = config
            .get("vocab_size")
            .and_then(Value::as_u64)
            .map(|v| v as usize);
        self.check_tokenizer_fits(rows)?;
        let parameters = self
            .shards
            .iter()
            .flat_map(|(_, s)| &s.tensors)
            .filter(|t| t.is_float())
            .map(|t| t.elements())
            .sum();
        Ok((
            ModelFormat::Safetensors,
            architecture,
            parameters,
            linear_modules,
        ))
    }

    /// All tensors of all shards by name, with the shard each is in; names must be unique.
    fn merged_shapes(&self) -> Checked<BTreeMap<String, (String, Vec<usize>)>> {
        let mut all = BTreeMap::new();
        for (file, summary) in &self.shards {
            for t in &summary.tensors {
                if let Some((other, _)) =
                    all.insert(t.name.clone(), (file.clone(), t.shape.clone()))
                {
                    return Err(Rejection::in_file(
                        SLUG,
                        file,
                        format!("tensor '{}' is also in {other}", t.name),
                    ));
                }
            }
        }
        Ok(all)
    }

    /// Every tensor the index maps must be in the shard it names.
    fn check_index(&self, shapes: &BTreeMap<String, (String, Vec<usize>)>) -> Checked<()> {
        let Some(index) = &self.index else {
            return Ok(());
        };
        let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
            return Err(Rejection::in_file(
                "invalid-config",
                INDEX_FILE,
                "has no `weight_map` object",
            ));
        };
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            match shapes.get(tensor) {
                Some((actual, _)) if actual == file => {}
                Some((actual, _)) => {
                    return Err(Rejection::in_file(
                        SLUG,
                        INDEX_FILE,
                        format!("maps tensor '{tensor}' to {file} but it is in {actual}"),
                    ))
                }
                None => {
                    return Err(Rejection::in_file(
                        SLUG,
                        INDEX_FILE,
                        format!("maps tensor '{tensor}' to {file} which does not hold it"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// A tokenizer producing ids past the embedding table would index out of bounds at run time.
    fn check_tokenizer_fits(&self, embedding_rows: Option<usize>) -> Checked<()> {
        match (self.tokenizer_vocab, embedding_rows) {
            (Some(vocab), Some(rows)) if vocab > rows => Err(Rejection::in_file(
                "invalid-tokenizer",
                "tokenizer.json",
                format!("has {vocab} tokens but the model's embedding has only {rows} rows"),
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
